"""Per-epoch overhead, its fix and its price: Ray Train's controller poll at 2 s (Ray's default,
"before") against the service's 0.1 s ("after"), side by side in one run on one local Ray.

- **Per-epoch overhead**: the real CLI (`emergence-ray train --address ADDRESS`) on the built-in
  digits job and on Fashion-MNIST, once with `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2.0` in its
  environment and once without (the service then sets 0.1). From each run's metrics.jsonl: epoch
  wall time (`elapsed_s` delta) minus rank 0's training and validation time (`train_s`, `val_s`):
  what reporting, checkpointing and the controller add per epoch.
- **CPU cost of the shorter poll**: a TorchTrainer (2 workers) whose loop only sleeps, once per
  interval; CPU-seconds used by every process of this Ray (GCS, raylet, controller, workers, ...)
  per second of the sleep, read from /proc. The difference is what polling costs. Also the
  training throughput of the Fashion-MNIST runs above (images/s on rank 0's training clock).
- **Start-up**: `first_step.measure` (command to rank 0's first step on this running Ray), once
  per interval.

Run it alone: `flock /tmp/er-bench.lock python benchmarks/epoch_overhead.py` (~10 min on 2 quiet
cores) -> benchmarks/EPOCH_OVERHEAD.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, first_step  # noqa: E402

VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
BEFORE, AFTER = "2.0", None  # None: the service's own default (emergence_ray.cluster.POLL_S)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tree() -> dict[int, tuple[float, str]]:
    """pid -> (CPU s incl. reaped children, name) of every descendant of this process."""
    hz = os.sysconf("SC_CLK_TCK")
    parent, info = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        parent[int(proc.name)] = int(f[1])
        info[int(proc.name)] = (sum(int(x) for x in f[11:15]) / hz, cmd.split()[0] if cmd else "")
    me, out = os.getpid(), {}
    for pid in info:
        p = pid
        while p in parent and p not in (0, 1, me):
            p = parent[p]
        if p == me and pid != me:
            out[pid] = info[pid]
    return out


def tree_cpu() -> float:
    """CPU s of this process's descendants, alive or waited for (the CLI runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(c for c, _ in _tree().values()) + children.ru_utime + children.ru_stime


def _env(poll: str | None, address: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    if poll is not None:
        env[VAR] = poll
    env["RAY_ADDRESS"] = address
    return env


def cli_run(address: str, poll: str | None, config: list[str], overrides: list[str], workdir: Path,
            name: str) -> dict:
    storage = workdir / "runs"
    cmd = [sys.executable, "-m", "emergence_ray", "train", *config, "--address", address,
           "--set", f"run.storage_path={storage}", "--set", f"run.name={name}",
           *(x for o in overrides for x in ("--set", o))]
    cpu0, t0 = tree_cpu(), time.monotonic()
    proc = subprocess.run(cmd, env=_env(poll, address), capture_output=True, text=True, timeout=3600)
    wall, cpu = time.monotonic() - t0, tree_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    metrics = [json.loads(x) for x in (storage / name / "metrics.jsonl").read_text().splitlines()]
    over = [b["elapsed_s"] - a["elapsed_s"] - b["train_s"] - b["val_s"] for a, b in zip(metrics, metrics[1:])]
    shown = " ".join(["emergence-ray train", *config, "--address ADDRESS", *(f"--set {o}" for o in overrides)])
    return {
        "poll_s": poll or _service_default(), "command": shown, "epochs": len(metrics),
        "epoch_wall_s": [round(b["elapsed_s"] - a["elapsed_s"], 3) for a, b in zip(metrics, metrics[1:])],
        "overhead_s": [round(x, 3) for x in over], "median_overhead_s": statistics.median(over),
        "median_train_s": statistics.median(m["train_s"] for m in metrics[1:]),
        "median_val_s": statistics.median(m["val_s"] for m in metrics[1:]),
        "images_per_s": sum(m["train_images"] for m in metrics[1:]) / sum(m["train_s"] for m in metrics[1:]),
        "loop_s": metrics[-1]["elapsed_s"], "command_s": wall, "cpu_s": cpu,
        "test_accuracy": json.loads((storage / name / "summary.json").read_text())["test_accuracy"],
    }


def _service_default() -> str:
    from emergence_ray import cluster

    return cluster.POLL_S


def _sleep_loop(config: dict) -> None:
    import ray.train

    marks = Path(config["marks"])
    if ray.train.get_context().get_world_rank() == 0:
        (marks / "start").write_text(str(time.time()))
    time.sleep(config["seconds"])
    if ray.train.get_context().get_world_rank() == 0:
        (marks / "end").write_text(str(time.time()))


def idle_poll_cost(poll: str, seconds: float, workdir: Path) -> dict:
    """CPU-seconds per second used by this Ray's processes while 2 Train workers sleep."""
    import ray.train
    from ray.train.torch import TorchTrainer

    os.environ[VAR] = poll  # Train propagates it from this process to the controller at fit()
    marks = Path(tempfile.mkdtemp(dir=workdir))
    trainer = TorchTrainer(_sleep_loop, train_loop_config={"marks": str(marks), "seconds": seconds},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(name=f"idle-{poll}-{time.time():.0f}",
                                                          storage_path=str(workdir / "idle")))
    import threading

    sample: dict = {}

    def watch() -> None:
        while not (marks / "start").exists():
            time.sleep(0.05)
        time.sleep(1.0)  # past the start-up of the workers' loop
        sample["t0"], sample["cpu0"], sample["tree0"] = time.monotonic(), tree_cpu(), _tree()
        time.sleep(seconds - 3.0)
        sample["t1"], sample["cpu1"], sample["tree1"] = time.monotonic(), tree_cpu(), _tree()

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    trainer.fit()
    th.join(timeout=30)
    del os.environ[VAR]
    span = sample["t1"] - sample["t0"]
    by_name: dict[str, float] = {}
    for pid, (cpu, name) in sample["tree1"].items():
        if pid in sample["tree0"]:
            by_name[name] = by_name.get(name, 0.0) + (cpu - sample["tree0"][pid][0]) / span
    top = dict(sorted(((k, round(v, 4)) for k, v in by_name.items() if v >= 0.001), key=lambda kv: -kv[1]))
    return {"poll_s": poll, "window_s": span, "cpu_per_s": (sample["cpu1"] - sample["cpu0"]) / span,
            "by_process_cpu_per_s": top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--digits-epochs", type=int, default=10)
    p.add_argument("--fashion-epochs", type=int, default=3)
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--out", default=str(Path(__file__).with_name("EPOCH_OVERHEAD")))
    args = p.parse_args(argv)
    cmd = common.command_line("epoch_overhead.py", p, args,
                              ("fashion_mnist", "digits_epochs", "fashion_epochs", "idle_s", "out"))
    from benchmarks.run import start_ray

    workdir = Path(tempfile.mkdtemp(prefix="er-epoch-overhead-"))
    res: dict = {"command": cmd, "machine": common.machine_info(), "runs": [], "idle": [], "first_step": []}

    def save() -> None:  # after every measurement: a run cut short still leaves what it measured
        Path(args.out + ".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        Path(args.out + ".md").write_text(render(res))

    try:
        start_ray(include_dashboard=False)
        import ray

        address = ray.get_runtime_context().gcs_address
        jobs = [("digits", [], [f"train.epochs={args.digits_epochs}"], (BEFORE, AFTER, AFTER, BEFORE))]
        if Path(args.fashion_mnist).is_dir():
            jobs.append(("fashion_mnist", ["--config", str(common.ROOT / "jobs" / "fashion_mnist.yaml")],
                         [f"data.path={args.fashion_mnist}", f"train.epochs={args.fashion_epochs}"],
                         (BEFORE, AFTER)))
        else:
            log(f"no Fashion-MNIST at {args.fashion_mnist}: skipped")

        def run_job(job: str, config: list[str], overrides: list[str], polls: tuple) -> None:
            for i, poll in enumerate(polls):
                r = cli_run(address, poll, config, overrides, workdir, f"{job}-{i}")
                r["command"] = r["command"].replace(str(common.ROOT) + "/", "")
                r["job"] = job
                res["runs"].append(r)
                save()
                log(f"{job} poll {r['poll_s']}: median overhead {r['median_overhead_s']:.3f} s/epoch, "
                    f"{r['images_per_s']:.0f} img/s, {r['cpu_s']:.1f} CPU-s, {r['command_s']:.1f} s")

        run_job(*jobs[0])
        for poll in (BEFORE, _service_default()):
            r = idle_poll_cost(poll, args.idle_s, workdir)
            res["idle"].append(r)
            save()
            log(f"idle poll {poll}: {r['cpu_per_s']:.3f} CPU-s/s")
        for poll in (BEFORE, AFTER):
            old = os.environ.pop(VAR, None)
            if poll is not None:
                os.environ[VAR] = poll
            try:
                fs = first_step.measure(address, workdir)
            finally:
                os.environ.pop(VAR, None)
                if old is not None:
                    os.environ[VAR] = old
            fs["poll_s"] = poll or _service_default()
            res["first_step"].append(fs)
            save()
            log(f"first step, poll {fs['poll_s']}: {fs['to_first_step_s']:.1f} s")
        for job in jobs[1:]:  # longest last
            run_job(*job)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    save()
    log(f"wrote {args.out}.md")
    return 0


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Per-epoch overhead: Ray Train's controller poll at 2 s (before) and 0.1 s (after)", "",
        f"Command: `flock /tmp/er-bench.lock {res['command']}` at git revision {m['git_revision']}, {m['date']}, "
        f"on {m['host']} ({m['nproc']} cores, {m['cpu']}, {m['ram_gib']} GiB; torch {m['torch']}, Ray {m['ray']}); "
        f"load average at the start {m['load_average']}. **The machine was shared** with other sessions' tests: "
        "compare the columns of one table (same run, alternating order), not absolute figures across files.", "",
        "## Per-epoch overhead (the CLI on a running local Ray, 2 workers)", "",
        "Overhead = epoch wall time (`elapsed_s` delta in metrics.jsonl) minus rank 0's `train_s` and `val_s`; "
        "epochs 2..N. *before*: `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2.0` in the command's environment (Ray's "
        "default); *after*: unset, the service sets 0.1.", "",
        "| job | poll (s) | epochs | median epoch wall (s) | median train + val (s) | median overhead (s) | "
        "overhead per epoch (s) | train img/s | whole command (s) | CPU-s, all processes | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['job']} | {r['poll_s']} | {r['epochs']} | {statistics.median(r['epoch_wall_s']):.3f} | "
            f"{r['median_train_s'] + r['median_val_s']:.3f} | **{r['median_overhead_s']:.3f}** | "
            f"{', '.join(f'{x:.2f}' for x in r['overhead_s'])} | {r['images_per_s']:,.0f} | {r['command_s']:.1f} | "
            f"{r['cpu_s']:.1f} | {r['test_accuracy']:.4f} |")
    lines += ["", "## CPU cost of the shorter poll", "",
              f"2 Train workers whose loop only sleeps; CPU-seconds per second used by every process of this "
              f"Ray (from /proc, a window of {res['idle'][0]['window_s'] if res['idle'] else 0:.0f} s inside the "
              "sleep).", "",
              "| poll (s) | CPU-s per s, all Ray processes | top processes (CPU-s per s) |", "|---|---|---|"]
    for r in res["idle"]:
        top = ", ".join(f"`{k}` {v:.3f}" for k, v in list(r["by_process_cpu_per_s"].items())[:6])
        lines.append(f"| {r['poll_s']} | **{r['cpu_per_s']:.3f}** | {top} |")
    lines += ["", "## Start-up: command to rank 0's first step (this running Ray)", "",
              "| poll (s) | to first step (s) | run dir written | workers up | first step | whole command (s) |",
              "|---|---|---|---|---|---|"]
    for fs in res["first_step"]:
        st = list(fs["stages_s"].values())
        lines.append(f"| {fs['poll_s']} | **{fs['to_first_step_s']:.1f}** | {st[0]:.1f} | {st[1]:.1f} | "
                     f"{st[2]:.1f} | {fs['command_s']:.1f} |")
    if res["first_step"]:
        lines += ["", "Driver stages of the last start-up (`first_step.py --probe`):", "",
                  "| stage | s |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in res["first_step"][-1]["probe_s"].items()]
        lines += ["", "CPU used from the launch to the first step, per process (last start-up):", "",
                  "| process | count | started at (s after launch) | CPU s |", "|---|---|---|---|"]
        for g in res["first_step"][-1]["processes"]:
            start = "before" if g["first_start_s"] is None else f"{g['first_start_s']:.1f}"
            lines.append(f"| `{g['process']}` | {g['count']} | {start} | {g['cpu_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
