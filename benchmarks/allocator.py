"""glibc's allocator in a Ray Train worker: one CPU training step on a batch of 224 px images
with glibc's defaults, and with one arena and large freed blocks kept for reuse (`MALLOC`, read
by each worker process as it starts: the settings the service gives its training workers,
`cluster.TRAIN_WORKER_MALLOC`; see benchmarks/README.md, nineteenth and twentieth sessions).

    flock /tmp/er-bench.lock python benchmarks/allocator.py [--rounds 3] [--steps 4]

Each round starts a Ray (2 CPUs) per setting, the variables in the job's `runtime_env`, and
times `--steps` steps after one untimed step in a one-worker `TorchTrainer`: the training loop
runs in a thread of the worker that is not its main thread, as every Train loop does. The
model: two 16-channel 3x3 convolutions, pooling and a linear layer on 64 random 3x224x224
images, 1 torch thread. Writes benchmarks/ALLOCATOR.json and benchmarks/ALLOCATOR.md (command,
git revision, machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from emergence_ray import cluster  # noqa: E402

SETTINGS = ("glibc_default", "keep")
# one arena: Ray Train's loop runs in a thread other than the main one, whose arenas are heaps
# of at most 64 MB, so larger blocks are mmapped and unmapped whatever the thresholds
MALLOC = dict(cluster.TRAIN_WORKER_MALLOC)


def _loop(config: dict) -> None:
    import threading
    import time

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 224, 224), torch.randint(0, 10, (64,))
    times = []
    for i in range(config["steps"] + 1):
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step is untimed
            times.append(time.perf_counter() - t)
    Path(config["out"]).write_text(json.dumps({"step_s": sum(times) / len(times),
                                               "main_thread": threading.current_thread() is threading.main_thread()}))


def step_time(setting: str, steps: int) -> dict:
    """One Ray with `setting`'s worker environment, one Train run: seconds per step."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = dict(MALLOC) if setting == "keep" else {}
    out = Path(tempfile.mkdtemp(prefix="er-allocator-")) / "step.json"  # the worker runs on this machine
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
    try:
        TorchTrainer(_loop, train_loop_config={"steps": steps, "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(storage_path=str(out.parent))).fit()
    finally:
        ray.shutdown()
    return json.loads(out.read_text())


def render(res: dict) -> str:
    m = res["machine"]
    runs = res["step_s"]
    lines = ["# glibc's allocator in a Ray Train worker: a CPU step on 224 px images", "",
             f"Command: `{res['command']}`  ", f"Git revision: `{m['git_revision']}`  ",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB; torch {m['torch']}, Ray {m['ray']}; "
             f"load average at start {m['load_average']}  ", f"Date: {m['date']}  ", "",
             "One `TorchTrainer` worker (the loop in a thread other than the worker's main thread: "
             f"{'yes' if not res['main_thread'] else 'no'}), 1 torch thread: two 16-channel 3x3 convolutions, "
             f"pooling and a linear layer on 64 random 3x224x224 images; the mean of {res['steps']} steps after an "
             "untimed one. Settings alternate round by round, each on a Ray of its own.", "",
             "| worker environment | s per step (each round) | median | x glibc's defaults |", "|---|---|---|---|"]
    base = common.median(runs["glibc_default"])
    env = " ".join(f"{k}={v}" for k, v in res["env"].items())
    names = {"glibc_default": "glibc's defaults", "keep": f"one arena, large freed blocks kept (`{env}`)"}
    for k in SETTINGS:
        med = common.median(runs[k])
        lines.append(f"| {names[k]} | {', '.join(f'{x:.2f}' for x in runs[k])} | {med:.2f} | "
                     f"{base / max(1e-9, med):.2f}x faster |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = p.parse_args(argv)
    res = {"command": common.command_line("allocator.py", p, args, ("rounds", "steps")),
           "machine": common.machine_info(), "steps": args.steps, "env": MALLOC,
           "step_s": {k: [] for k in SETTINGS}, "main_thread": False}
    for _ in range(args.rounds):
        for k in SETTINGS:
            metrics = step_time(k, args.steps)
            res["step_s"][k].append(metrics["step_s"])
            res["main_thread"] = res["main_thread"] or metrics["main_thread"]
            print(k, round(metrics["step_s"], 3), flush=True)
    common.write_results(args.out, "ALLOCATOR", res, render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
