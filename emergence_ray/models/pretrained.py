"""`model.pretrained`: starting weights from torchvision, a state_dict file, or one of our runs.

    load_into(model, "IMAGENET1K_V2", "resnet50")       # torchvision's cache (TORCH_HOME), downloaded if absent
    load_into(model, "s3://bucket/resnet50.pth", ...)   # a state_dict file, local or s3:// / gs://
    load_into(model, "RUNS/run/checkpoint_000004", ...) # a checkpoint of an emergence-ray run

Tensors of the classifier head whose shape differs (other classes) are left as initialized; a
3-channel stem loaded into a 1-channel model is summed over its input channels (a grayscale image
is the same image in R, G and B), a 1-channel one into 3 channels is spread over them; ViT position
embeddings are interpolated to the image size (torchvision's `interpolate_embeddings`). Any other
mismatch is an error listing the tensors. Everything loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from emergence_ray import checkpoint, storage
from emergence_ray.config import SMALL_MODELS, JobConfig, ModelConfig, is_weights_name
from emergence_ray.errors import CheckpointError, ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what every torchvision classification weight was trained with
IMAGENET_STD = [0.229, 0.224, 0.225]


def weights_enum(model_name: str, weights: str):
    import torchvision.models as tvm

    members = tvm.get_model_weights(model_name)
    if weights not in members.__members__:
        raise CheckpointError(f"model.pretrained={weights}: {model_name} has no such weights; choose one of "
                              f"{', '.join(members.__members__)}")
    return members[weights]


def cached_file(enum) -> Path:
    """Where torchvision keeps (and looks for) a weights file: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)


def fetch_weights(model_name: str, weights: str) -> dict[str, torch.Tensor]:
    """torchvision's weights from its cache, downloaded there first when absent."""
    enum = weights_enum(model_name, weights)
    target = cached_file(enum)
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # no internet (URLError), disk full, ...
        raise CheckpointError(
            f"model.pretrained={weights}: cannot download {enum.url} ({err}); on a machine without internet, "
            f"pre-fetch that file to {target} on every node (or set TORCH_HOME to a folder whose "
            f"hub/checkpoints/ holds {target.name}), or pass a local state_dict path") from None


def ensure_available(m: ModelConfig) -> None:
    """Driver-side check before any Ray work: the weights name exists and its file is cached or
    downloadable; a path exists. Workers then load the same file."""
    if not m.pretrained:
        return
    if is_weights_name(m.pretrained):
        enum = weights_enum(m.name, m.pretrained)
        if not cached_file(enum).is_file():
            fetch_weights(m.name, m.pretrained)
        return
    if not storage.exists(m.pretrained):
        raise CheckpointError(f"model.pretrained={m.pretrained}: no such file or checkpoint directory")


def _read(path: str) -> dict:
    """A state_dict file or a checkpoint directory -> {"model": state_dict, "spec": ... or None}."""
    path = storage.resolve(path)
    if not storage.is_uri(path) and Path(path).is_dir():
        state = checkpoint.load(path)
        return {"model": state.get("ema") or state["model"], "spec": state["spec"],
                "name": state["config"]["model"]["name"]}
    if storage.is_uri(path) and storage.exists(storage.join(path, checkpoint.FILENAME)):
        path = storage.join(path, checkpoint.FILENAME)
    try:
        if storage.is_uri(path):
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_file(p) as f:
                raw = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - missing, corrupt, or pickled code: all refused the same way
        raise CheckpointError(f"model.pretrained={path}: cannot be loaded as a state_dict with "
                              f"weights_only=True ({type(err).__name__}: {err})") from None
    if isinstance(raw, dict) and raw.get("format") == checkpoint.FORMAT and "spec" in raw:
        return {"model": raw.get("ema") or raw["model"], "spec": raw["spec"], "name": raw["config"]["model"]["name"]}
    for key in ("state_dict", "model"):  # common wrappers of a state_dict
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"model.pretrained={path}: not a state_dict (a mapping of names to tensors)")
    return {"model": {k.removeprefix("module."): v for k, v in raw.items()}, "spec": None, "name": None}


def source_spec(pretrained: str) -> dict | None:
    """The DataSpec saved with a checkpoint used as model.pretrained (None for other sources)."""
    if is_weights_name(pretrained):
        return None
    return _read(pretrained)["spec"]


def load_into(model: nn.Module, pretrained: str, model_name: str, class_names: list[str] | None = None) -> list[str]:
    """Load `pretrained` into `model`; -> names of the tensors left as initialized (the new head).
    A run checkpoint trained on other classes (`class_names` differ) gives no head, even when the
    count matches: its rows mean other classes, and unlearning them is slower than learning anew."""
    if is_weights_name(pretrained):
        state = fetch_weights(model_name, pretrained)
    else:
        source = _read(pretrained)
        state = source["model"]
        if source["spec"] and class_names is not None and list(source["spec"]["class_names"]) != list(class_names):
            state = {k: v for k, v in state.items() if not k.startswith(model.er_head + ".")}
    return apply_state(model, state)


def apply_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    head, stem = model.er_head, model.er_stem
    state = _fit_vit_positions(model, state)
    merged, kept_fresh, mismatched = {}, [], []
    for key, value in state.items():
        if key not in own:
            continue  # checked below
        target = own[key]
        if value.shape == target.shape:
            merged[key] = value
        elif key.startswith(head + "."):
            kept_fresh.append(key)  # another number of classes: the new head stays as initialized
        elif key == f"{stem}.weight" and value.dim() == 4 and value.shape[0] == target.shape[0] \
                and value.shape[2:] == target.shape[2:]:
            merged[key] = _adapt_stem(value, target.shape[1])
        else:
            mismatched.append(f"{key}: {tuple(value.shape)} in the weights, {tuple(target.shape)} in the model")
    unexpected = [k for k in state if k not in own and not k.startswith("aux")]  # GoogLeNet/Inception aux heads
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not k.startswith(head + ".")]
    problems = mismatched + [f"{k}: not in the model" for k in unexpected] + \
        [f"{k}: not in the weights" for k in missing]
    if problems:
        more = f"\n    ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        shown = "\n    ".join(problems[:12]) + more
        raise CheckpointError(f"model.pretrained: the weights do not fit {type(model).__name__} "
                              f"({len(problems)} tensors; another architecture?):\n    {shown}")
    kept_fresh += [k for k in own if k.startswith(head + ".") and k not in state]
    model.load_state_dict(merged, strict=False)
    return kept_fresh


def _adapt_stem(w: torch.Tensor, channels: int) -> torch.Tensor:
    """3 -> 1: sum over input channels (a gray image seen as identical R, G, B gives the same
    response); 1 -> 3: spread evenly; otherwise: the mean filter repeated, rescaled to keep the scale."""
    if w.shape[1] == 3 and channels == 1:
        return w.sum(dim=1, keepdim=True)
    return w.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1) * (w.shape[1] / channels)


def _fit_vit_positions(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = "encoder.pos_embedding"
    own = model.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return interpolate_embeddings(model.image_size, model.patch_size, dict(state))


def normalization(m: ModelConfig, channels: int) -> tuple[list[float], list[float]] | None:
    """The mean/std the weights were trained with, for `channels` (None: use the data's own):
    the checkpoint's for our runs, ImageNet's for torchvision weights and for state_dict files of
    torchvision models. One channel from three: their average (what the summed stem expects)."""
    if not m.pretrained:
        return None
    spec = source_spec(m.pretrained)
    if spec:
        mean, std = spec["mean"], spec["std"]
    elif m.name in SMALL_MODELS:
        return None  # a state_dict of our small models says nothing of its data
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if len(mean) == channels:
        return list(mean), list(std)
    return [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels


def job_spec(cfg: JobConfig):
    """Driver: the DataSpec of a job whose weights bring their normalization, else None (the
    data pipeline then resolves it with the data's own statistics)."""
    if not cfg.model.pretrained:
        return None
    import dataclasses

    from emergence_ray.data.pipeline import load_raw, resolve_spec

    spec = resolve_spec(load_raw(cfg.data), cfg.data)
    norm = normalization(cfg.model, spec.channels)
    return None if norm is None else dataclasses.replace(spec, mean=norm[0], std=norm[1])


def check_input_size(name: str, image_size: int) -> None:
    from emergence_ray.models.zoo import input_size_problem

    if name not in SMALL_MODELS and (problem := input_size_problem(name, image_size)):
        raise ConfigError(problem)
