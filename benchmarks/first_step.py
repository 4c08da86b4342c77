"""From `emergence-ray train` to the first training step, on an already running local cluster.

`measure(address, workdir)` launches the real CLI (`emergence-ray train --address ADDRESS`, the
built-in digits job, 1 epoch) and watches the run directory for the files the service writes on
its way: meta.json (after connecting, planning and preparing the data), workers.json (every
worker is up: process group, model built and wrapped in DDP) and progress.json (rank 0 finished
its first step). The stages before meta.json are split by `python benchmarks/first_step.py
--probe ADDRESS`, which replays the driver's first steps (imports, connect, plan, prepare,
build_trainer) with a timer around each.

    python benchmarks/first_step.py --probe ray://... | 127.0.0.1:6379   # prints JSON
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MILESTONES = ("meta.json", "workers.json", "progress.json")


def _cli() -> list[str]:
    exe = shutil.which("emergence-ray")
    return [exe] if exe else [sys.executable, "-m", "emergence_ray"]


def _env(address: str) -> dict:
    return dict(os.environ, RAY_ADDRESS=address)


def measure(address: str, workdir: Path, timeout_s: float = 600) -> dict:
    storage, name = workdir / "first_step", f"first-step-{int(time.time())}"
    run_dir = storage / name
    cmd = [*_cli(), "train", "--address", address, "--set", "train.epochs=1",
           "--set", f"run.storage_path={storage}", "--set", f"run.name={name}"]
    seen: dict[str, float] = {}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(address))
    while proc.poll() is None and time.time() - t0 < timeout_s:
        for f in MILESTONES:
            if f not in seen and (run_dir / f).exists():
                seen[f] = time.time() - t0
        time.sleep(0.02)
    out, err = proc.communicate(timeout=max(1.0, timeout_s - (time.time() - t0)))
    total = time.time() - t0
    if proc.returncode != 0 or "progress.json" not in seen:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}) or never stepped:\n{err[-3000:]}")
    probe = _probe_subprocess(address)
    return {
        "command": " ".join(cmd), "to_first_step_s": seen["progress.json"], "command_s": total,
        "milestones_s": seen,
        "stages_s": {
            "launch -> run dir written (imports, connect, plan, prepare data)": seen["meta.json"],
            "-> workers up (TorchTrainer.fit: controller, worker group, process group, model, DDP)":
                seen["workers.json"] - seen["meta.json"],
            "-> first step done (shard iterator, first batch, forward/backward)":
                seen["progress.json"] - seen["workers.json"],
        },
        "probe_s": probe,
    }


def _probe_subprocess(address: str) -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", address],
                          capture_output=True, text=True, timeout=300, env={**_env(address),
                                                                            "BENCH_LAUNCH_T": repr(t)})
    if proc.returncode != 0:
        raise RuntimeError(f"first_step --probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(address: str) -> dict:
    """Replay trainer.train up to the TorchTrainer, timing each stage (no training)."""
    marks = {"interpreter": T_PROCESS - float(os.environ.get("BENCH_LAUNCH_T", T_PROCESS))}
    t = time.time()

    def mark(stage: str) -> None:
        nonlocal t
        now = time.time()
        marks[stage] = now - t
        t = now

    from emergence_ray import cluster, config  # noqa: F401 - the CLI's own first import
    from emergence_ray.trainer import build_trainer
    mark("import emergence_ray.trainer (torch, ray, ray.train)")
    cfg = config.load_config(None, ["train.epochs=1"])
    cluster.connect(address)
    mark("cluster.connect (ray.init to the running cluster)")
    cluster.plan(cfg.scaling)
    from emergence_ray.data.pipeline import prepare
    mark("cluster.plan")
    prepared = prepare(cfg.data)
    mark("pipeline.prepare (read, resolve spec, preprocess + materialize 3 splits)")
    build_trainer(cfg, "probe", {"train": prepared.train, "val": prepared.val}, prepared.spec, prepared.counts,
                  "/tmp/unused")
    mark("build_trainer")
    return marks


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probe", metavar="ADDRESS", required=True, help="time the driver's stages against ADDRESS")
    print(json.dumps(probe(p.parse_args().probe)))
