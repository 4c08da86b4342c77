"""Checkpoint files: one `checkpoint.pt` per directory, plain tensors and Python values only, so
it loads with `torch.load(weights_only=True)` (no pickled code runs when a checkpoint is read).

Holds model, optimizer and scheduler state, the completed epoch, RNG state, the metrics history,
the DataSpec (class names, channels, size, normalization) and the resolved job config.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from emergence_ray.errors import CheckpointError

FILENAME = "checkpoint.pt"
FORMAT = 1


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write leaves no partial checkpoint.pt."""
    path = Path(directory) / FILENAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {FILENAME} here; pass a checkpoint directory of an "
                              "emergence-ray run (e.g. <run dir>/checkpoint_...)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or containing pickled code
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(err).__name__}: {err}); "
                              "use another checkpoint of the run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an emergence-ray checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"][0], state["python"][1:-1], state["python"][-1]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(s: tuple) -> list:
    version, internal, gauss = s
    return [version, *internal, gauss]


def check_compatible(state: dict[str, Any], model_name: str, num_classes: int, in_channels: int) -> None:
    """Refuse, with a message, a checkpoint of another model, class count or channel count."""
    saved = state["config"]["model"]["name"]
    spec = state["spec"]
    if saved != model_name:
        raise CheckpointError(f"checkpoint holds model {saved!r}, the job asks for {model_name!r}; "
                              f"set model.name={saved} or use a {model_name} checkpoint")
    if len(spec["class_names"]) != num_classes:
        raise CheckpointError(f"checkpoint has {len(spec['class_names'])} classes, the data has {num_classes}; "
                              "use a checkpoint trained on the same classes")
    if spec["channels"] != in_channels:
        raise CheckpointError(f"checkpoint expects {spec['channels']}-channel images, the job gives {in_channels}")
