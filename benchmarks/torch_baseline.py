"""Baselines (a) and (b): the service's model, optimizer and `engine.train_epoch` fed by in-memory
tensors, with no Ray anywhere.

(a) one process:       python benchmarks/torch_baseline.py --threads 2 --out a.json
(b) torchrun DDP gloo: python -m torch.distributed.run --nproc_per_node 2 benchmarks/torch_baseline.py \
                           --threads 1 --out b.json
Both take `--workload '{"model": "cnn", "data": "synthetic", "batch_size": 64, ...}'` (see
`common.Workload`). Every rank builds its own block of data (a different block per rank), the
same initial weights (seed 0), and runs warm-up + repeats x steps steps of one epoch; rank 0
writes images/s per timed segment and the start-up timings (from the launch to the first step)
as JSON to --out. `run_baseline` is the driver-side helper that launches either mode.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # the interpreter is up; everything below is import and set-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", required=True, help="JSON of common.Workload fields")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--fashion-mnist", default=common.FASHION_MNIST, help="folder with the IDX files")
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--marks-dir", help="rank 0 touches steady_start / steady_end here as its timed steps start / end")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from emergence_ray import config, models, optim  # noqa: F401 - imported here, timed as imports
    from emergence_ray.engine import train_epoch

    w = common.Workload.from_dict(json.loads(args.workload))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(args.threads)
    t_imported = time.time()
    if world > 1:
        dist.init_process_group("gloo")
    t_group = time.time()

    batches = common.memory_batches(w, rank, args.fashion_mnist)
    t_data = time.time()

    torch.manual_seed(0)  # the same initial weights in every mode
    bare = common.build_model(w.model, w.data)
    model = DistributedDataParallel(bare) if world > 1 else bare
    optimizer = common.build_optimizer(bare)
    t_model = time.time()

    ends: list[float] = []
    first_step_wall = []

    sched: list[dict | None] = []  # the training thread's scheduler counters over the timed steps
    steady = (w.warmup - 1, w.total_steps - 1)  # steps after which the timed ones start / end

    def on_step(step: int) -> None:
        ends.append(time.perf_counter())
        if step == 0:
            first_step_wall.append(time.time())
        if step in steady:
            sched.append(common.thread_sched())
            if rank == 0 and args.marks_dir:  # tells a driver-side census when the timed steps run
                Path(args.marks_dir, "steady_end" if step == steady[1] else "steady_start").touch()

    totals = train_epoch(model, batches, optimizer, None, torch.device("cpu"), on_step=on_step)
    t_done = time.time()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    rates = common.steady_rates(ends, w.batch_size, world, w.warmup, w.steps, w.repeats)
    launch = float(os.environ.get("BENCH_LAUNCH_T", T_PROCESS))
    result = {
        "mode": "torchrun" if world > 1 else "torch",
        "world": world,
        "threads": args.threads,
        "workload": w.to_dict(),
        "rates": rates,
        "images_per_s": common.median(rates),
        "sched": common.sched_share(*sched) if len(sched) == 2 else None,
        "train_loss": totals.loss,
        "startup": {
            "interpreter_s": T_PROCESS - launch,
            "imports_s": t_imported - T_PROCESS,
            "process_group_s": t_group - t_imported,
            "data_s": t_data - t_group,
            "model_s": t_model - t_data,
            "first_step_s": first_step_wall[0] - t_model,
            "launch_to_first_step_s": first_step_wall[0] - launch,
        },
        "train_s": t_done - t_model,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


TEARDOWN_ABORT = "terminate called without an active exception"


def run_baseline(w: common.Workload, world: int, threads: int, out: Path, fashion_path: str,
                 timeout: float = 900, marks_dir: Path | None = None) -> dict:
    """Launch (a) (world=1, a plain process) or (b) (world>1, torchrun) and return rank 0's JSON."""
    script = str(Path(__file__).resolve())
    args = ["--workload", json.dumps(w.to_dict()), "--threads", str(threads), "--fashion-mnist", fashion_path]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               script, *args]
    else:
        cmd = [sys.executable, script, *args]
    shown = ["python", *cmd[1:]]  # as typed from the repository root
    cmd += ["--out", str(out)] + (["--marks-dir", str(marks_dir)] if marks_dir else [])
    for attempt in (1, 2):
        env = dict(os.environ, BENCH_LAUNCH_T=repr(time.time()), OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        # A rare abort of a torchrun rank in C++ teardown (seen once in a full suite run, not reproduced
        # in 15 launches alone) says nothing about the timed steps: launch once more, never twice.
        if proc.returncode == 0 or TEARDOWN_ABORT not in proc.stderr or attempt == 2:
            break
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["command"] = shlex.join(a.replace(str(common.ROOT) + "/", "") for a in shown) + " --out FILE.json"
    return result


if __name__ == "__main__":
    main()
