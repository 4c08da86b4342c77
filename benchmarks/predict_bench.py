"""Batch inference throughput: `emergence-ray predict` (Ray Data, a pool of model actors) next to a
plain single-process torch loop over the same PNG files and the same checkpoint.

    python benchmarks/predict_bench.py [--images 4000] [--repeats 2]

Writes benchmarks/PREDICT.md (machine, date, command, table); re-running regenerates it. Both
paths decode the PNGs, normalize, run the model and take top-5 probabilities; Ray's figure is
the whole command (dataset listing, decode tasks, actor start-up, writing Parquet), so it
includes its start-up cost, reported separately as the first-batch-free rate is not observable
from outside.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, UTC
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emergence_ray import checkpoint  # noqa: E402
from emergence_ray.config import load_config, to_dict  # noqa: E402
from emergence_ray.data.transforms import DataSpec  # noqa: E402
from emergence_ray.models import build_model  # noqa: E402


def make_data(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        d = root / "images" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_checkpoint(root: Path, data: Path) -> Path:
    spec = DataSpec(1, 28, [f"c{i}" for i in range(10)], mean=[0.5], std=[0.29])
    cfg = load_config(None, ["data.source=imagefolder", f"data.path={data}"])
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 28, cfg.model.width)
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    checkpoint.save(ckpt, {"model": model.state_dict(), "epoch": 0, "history": [], "spec": spec.to_dict(),
                           "config": to_dict(cfg), "rng": checkpoint.rng_state()})
    return ckpt


def plain_torch(ckpt: Path, paths: list[Path], batch: int = 256) -> float:
    """images/s of decode + normalize + forward + top-5 in one process (2 threads)."""
    torch.set_num_threads(2)
    state = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = build_model("cnn", 1, 10, 28, state["config"]["model"]["width"])
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = state["spec"]["mean"][0], state["spec"]["std"][0]
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = np.stack([np.asarray(Image.open(io.BytesIO(p.read_bytes())).convert("L"), np.float32)
                          for p in paths[i:i + batch]])[:, None] / 255.0
            probs = model(torch.from_numpy((x - mean) / std)).softmax(1)
            probs.topk(5, dim=1)
    return len(paths) / (time.perf_counter() - start)


def ray_predict(ckpt: Path, data: Path, out: Path) -> float:
    from emergence_ray.predict import predict_command

    start = time.perf_counter()
    predict_command(str(ckpt), str(out), None, None, ["data.source=imagefolder", f"data.path={data}"])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "PREDICT.md"))
    args = p.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_data(root, args.images)
        ckpt = make_checkpoint(root, root / "images")
        torch_rates = [plain_torch(ckpt, paths) for _ in range(args.repeats)]
        ray.init(num_cpus=2, logging_level="WARNING")
        ray_secs = [ray_predict(ckpt, root / "images", root / f"preds{r}.parquet") for r in range(args.repeats)]
        ray.shutdown()
    ray_rates = [args.images / s for s in ray_secs]
    cmd = "python benchmarks/predict_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "# Batch inference: `emergence-ray predict` vs a plain torch loop",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} by `{cmd.strip()}`; "
        "re-running it regenerates this file.",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {ray.__version__}. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other work on the machine makes figures noisy).",
        "",
        f"{args.images} synthetic 28x28 grayscale PNGs in an ImageFolder, the `cnn` model (width 32, random "
        "weights: speed does not depend on them), top-5 probabilities per image. Plain torch: one process, "
        "2 threads, PIL decode in the loop. Ray: `predict_command` on a local `ray.init(num_cpus=2)`: "
        "listing, decode/normalize tasks, 2 model actors (0.5 CPU each), Parquet written under a temporary "
        "name; the whole command is timed, start-up included.",
        "",
        "| path | images/s (each repeat) | ratio to plain torch (median) |",
        "|---|---|---|",
        f"| plain torch loop | {', '.join(f'{r:,.0f}' for r in torch_rates)} | 1.00 |",
        f"| emergence-ray predict | {', '.join(f'{r:,.0f}' for r in ray_rates)} | "
        f"{np.median(ray_rates) / np.median(torch_rates):.2f} |",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"ratio_predict_vs_torch={np.median(ray_rates) / np.median(torch_rates):.3f}")


if __name__ == "__main__":
    main()
