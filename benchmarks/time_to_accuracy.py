"""Time to accuracy on Fashion-MNIST with 2 CPU workers, through the real CLI.

`run_job` runs `emergence-ray train --config jobs/fashion_mnist.yaml` (embedded local Ray, as a
user would) keeping every epoch's checkpoint, then scores each checkpoint on the official
10,000 test images (decoded by the service's `Preprocess` with the checkpoint's DataSpec,
scored by `engine.evaluate`). An epoch's wall time is the time from launching the command to its
checkpoint landing in the run directory. Reported: wall time to 90% and to 92% test accuracy, and
the best test accuracy of the checkpoints written within 10 minutes.

`recorded` reads the run recorded in results/fashion_mnist/ instead (no training; used by
--quick): its metrics.jsonl has validation accuracy per epoch on the training clock, and only
the best checkpoint's test accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

TARGETS = (0.90, 0.92)
BUDGET_S = 600.0
JOB = common.ROOT / "jobs" / "fashion_mnist.yaml"


def first_reaching(points: list[tuple[float, float]], target: float) -> float | None:
    """points: (seconds, accuracy) in time order -> seconds of the first point >= target."""
    return next((t for t, acc in points if acc >= target), None)


def summarize(points: list[tuple[float, float]], budget_s: float = BUDGET_S) -> dict:
    within = [acc for t, acc in points if t <= budget_s]
    return {
        **{f"time_to_{int(round(100 * x))}_s": first_reaching(points, x) for x in TARGETS},
        "best_within_budget": max(within) if within else None,
        "budget_s": budget_s,
    }


def recorded(results_dir: Path = common.ROOT / "results" / "fashion_mnist") -> dict:
    history = [json.loads(line) for line in (results_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((results_dir / "summary.json").read_text())
    points = [(m["elapsed_s"], m["val_accuracy"]) for m in history]
    return {"source": f"recorded run ({results_dir.relative_to(common.ROOT)})", "accuracy": "validation",
            "clock": "training loop (elapsed_s)", **summarize(points),
            "epochs": [{"epoch": m["epoch"], "seconds": m["elapsed_s"], "accuracy": m["val_accuracy"]}
                       for m in history],
            "final_test_accuracy": summary["test_accuracy"], "wall_s": summary["wall_s"]}


def _test_batches(spec, fashion_path: str):
    import numpy as np
    import torch

    from emergence_ray.data.transforms import Preprocess

    images = common.read_idx_file(fashion_path, "t10k-images-idx3-ubyte")
    labels = common.read_idx_file(fashion_path, "t10k-labels-idx1-ubyte").astype(np.int64)
    batch = Preprocess(spec)({"image": images, "label": labels})
    x, y = torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])
    return [{"image": x[i:i + 1000], "label": y[i:i + 1000]} for i in range(0, len(y), 1000)]


def score_checkpoints(run_dir: Path, fashion_path: str, t_launch: float) -> list[dict]:
    """Test accuracy of every checkpoint in a run directory, in epoch order."""
    import torch

    from emergence_ray import checkpoint
    from emergence_ray.engine import evaluate
    from emergence_ray.report import model_from_state

    rows, batches = [], None
    for ckpt in sorted(p for p in run_dir.glob("checkpoint_*") if (p / "checkpoint.pt").is_file()):
        state = checkpoint.load(ckpt)
        model, spec = model_from_state(state)
        batches = batches or _test_batches(spec, fashion_path)
        totals = evaluate(model, batches, torch.device("cpu"))
        history = state["history"][-1]
        rows.append({"epoch": state["epoch"], "path": str(ckpt),
                     "wall_s": (ckpt / checkpoint.FILENAME).stat().st_mtime - t_launch,
                     "elapsed_s": history["elapsed_s"], "val_accuracy": history["val_accuracy"],
                     "test_accuracy": totals.accuracy})
    return sorted(rows, key=lambda r: r["epoch"])


def run_job(workdir: Path, fashion_path: str, overrides: list[str] = (), timeout_s: float = 1800) -> dict:
    """Train jobs/fashion_mnist.yaml (plus `--set` overrides, e.g. for a short trial) through the
    CLI and score every epoch on the test set. Call it with no Ray running in this process: the
    CLI starts its own embedded Ray."""
    from emergence_ray.config import load_config

    epochs = load_config(JOB, list(overrides)).train.epochs
    storage = workdir / "time_to_accuracy"
    name = f"fmnist-{int(time.time())}"
    exe = shutil.which("emergence-ray")
    cmd = [exe] if exe else [sys.executable, "-m", "emergence_ray"]
    cmd += ["train", "--config", str(JOB), "--set", f"data.path={fashion_path}",
            "--set", f"run.storage_path={storage}", "--set", f"run.name={name}",
            "--set", f"train.keep_checkpoints={epochs}", *[a for o in overrides for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t_launch = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=common.ROOT)
    wall = time.time() - t_launch
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = storage / name
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = score_checkpoints(run_dir, fashion_path, t_launch)
    points = [(r["wall_s"], r["test_accuracy"]) for r in rows]
    shown = ["emergence-ray", *cmd[cmd.index("train"):]]
    shown = [a.replace(str(common.ROOT) + "/", "").replace(str(storage), "SCRATCH") for a in shown]
    return {"source": "this run", "accuracy": "test", "clock": "wall, from launching the command",
            "command": " ".join(shown), **summarize(points), "epochs": [
                {"epoch": r["epoch"], "seconds": r["wall_s"], "accuracy": r["test_accuracy"],
                 "elapsed_s": r["elapsed_s"], "val_accuracy": r["val_accuracy"]} for r in rows],
            "final_test_accuracy": summary["test_accuracy"], "wall_s": summary["wall_s"], "command_s": wall,
            "train_images_per_s": summary["train_images_per_s"],
            # the service's own report on its chosen checkpoint, next to this module's scoring of it
            "rescored_final": next((r["test_accuracy"] for r in rows if Path(r["path"]).name ==
                                    Path(summary["checkpoint"]).name), None),
            "run_dir": str(run_dir)}
