"""At which CPU priority should the training workers run? An A/B of (c) under three settings.

Ray starts every worker process at nice 15 (its `worker_niceness`): the training workers, and
also the helper actors Ray Train and Ray Data start beside them (controller, placement group
cleaner, synchronization actor, stats and autoscaling actors). Ray's daemons (GCS, raylet,
dashboard, log monitor) run at nice 0, as `torchrun`'s processes do. Three variants of (c)
(`ray_loop.run_ray`: cnn on synthetic data, shards cached in worker memory, 2 workers on 2 CPUs):

- `ray15`: Ray's default, every worker at 15 (`scaling.worker_niceness: null`);
- `train0`: the training workers move themselves to 0, everything else as Ray starts it
  (`scaling.worker_niceness: 0`, the service's default; needs root or CAP_SYS_NICE);
- `all0`: the node starts every worker at 0 (`RAY_worker_niceness=0`), helper actors included.

Each variant gets a fresh local Ray (`ray.init(num_cpus=2)`, as `run.py` starts it) per round;
the order rotates from round to round, and (b) `torchrun` runs before every round and after the
last, so a machine that drifts moves every column alike. The rounds run twice: on the quiet
machine, and with one CPU-bound process at nice 0 beside the training (`--busy`, 1 by default: a
busy-loop `python -c`, started before and stopped after every (b) and (c) run), which is what a
node shared with other work looks like. Writes --out (markdown, with the machine, date and
command) and the JSON beside it; re-running the command regenerates them.

    python benchmarks/niceness.py [--rounds 2] [--busy 1] [--out benchmarks/NICENESS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.run import WORKERS, log, start_ray  # noqa: E402

VARIANTS = {  # name -> (RAY_worker_niceness for the node, scaling.worker_niceness for the training loop)
    "ray15": (None, None),
    "train0": (None, 0),
    "all0": ("0", 0),
}
HERE = Path(__file__).resolve().parent


def run_variant(name: str, w: common.Workload, workdir: Path) -> dict:
    import ray

    from benchmarks.ray_loop import run_ray

    node, loop = VARIANTS[name]
    saved = os.environ.pop("RAY_worker_niceness", None)
    if node is not None:
        os.environ["RAY_worker_niceness"] = node  # read by the raylet ray.init starts
    try:
        start_ray()
        try:
            return run_ray(w, common.FASHION_MNIST, workdir / "ray_train", WORKERS, 1, "auto", loop)
        finally:
            ray.shutdown()
    finally:
        os.environ.pop("RAY_worker_niceness", None)
        if saved is not None:
            os.environ["RAY_worker_niceness"] = saved


@contextlib.contextmanager
def busy(processes: int):
    """`processes` CPU-bound processes at nice 0 (other work on the node) while the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def measure(rounds: int, w: common.Workload, workdir: Path, hogs: int = 0) -> dict:
    from benchmarks.torch_baseline import run_baseline

    names = list(VARIANTS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    torchrun: list[dict] = []
    tag = f"busy {hogs}" if hogs else "quiet"
    for r in range(rounds):
        with busy(hogs):
            torchrun.append(run_baseline(w, WORKERS, 1, workdir / f"b{r}.json", common.FASHION_MNIST))
        log(f"{tag}, round {r + 1}: (b) torchrun {torchrun[-1]['images_per_s']:.0f} img/s")
        for name in names[r % len(names):] + names[:r % len(names)]:
            with busy(hogs):
                runs[name].append(run_variant(name, w, workdir))
            log(f"{tag}, round {r + 1}: {name} {runs[name][-1]['images_per_s']:.0f} img/s "
                f"(training workers at nice {runs[name][-1]['nice']})")
    with busy(hogs):
        torchrun.append(run_baseline(w, WORKERS, 1, workdir / "b-last.json", common.FASHION_MNIST))
    b = common.median([t["images_per_s"] for t in torchrun])
    return {"workload": w.to_dict(), "rounds": rounds, "busy": hogs, "torchrun": [t["images_per_s"] for t in torchrun],
            "torchrun_median": b,
            "variants": {n: {"rates": [x["images_per_s"] for x in runs[n]], "nice": [x["nice"] for x in runs[n]],
                             "median": common.median([x["images_per_s"] for x in runs[n]]),
                             "ratio_to_torchrun": common.median([x["images_per_s"] for x in runs[n]]) / b,
                             "background_pct": [sum(p["cpu_pct"] for p in x["background"].get("processes", [])
                                                    if p["process"] != "ray::RayTrainWorker") for x in runs[n]]}
                         for n in names}}


WHERE = {"ray15": ("nice 15 (Ray's)", "nice 15"), "train0": ("nice 0 (`scaling.worker_niceness: 0`)", "nice 15"),
         "all0": ("nice 0", "nice 0 (`RAY_worker_niceness=0`)")}


def table(part: dict) -> list[str]:
    title = (f"With {part['busy']} CPU-bound process(es) at nice 0 beside the training" if part["busy"]
             else "On the quiet machine")
    lines = [f"## {title}", "",
             f"(b) torchrun: **{part['torchrun_median']:,.0f}** img/s "
             f"({', '.join(f'{x:,.0f}' for x in part['torchrun'])}).", "",
             "| variant | training workers | helper actors (Train, Ray Data) | img/s: median (each round) | /(b) | "
             "rest of the machine, % of a core |", "|---|---|---|---|---|---|"]
    for name, v in part["variants"].items():
        rates = ", ".join(f"{x:,.0f}" for x in v["rates"])
        bg = ", ".join(f"{x:.0f}" for x in v["background_pct"])
        lines.append(f"| `{name}` | {WHERE[name][0]} (seen: {sorted(set(v['nice']))}) | {WHERE[name][1]} | "
                     f"**{v['median']:,.0f}** ({rates}) | {v['ratio_to_torchrun']:.2f} | {bg} |")
    return lines + [""]


def render(res: dict) -> str:
    m, w = res["machine"], res["quiet"]["workload"]
    lines = [
        "# Training worker CPU priority: Ray's nice 15 or nice 0", "",
        f"Generated {m['date']} by `{res['command']}` (git {m['git_revision']}). Re-running that command from the "
        "repository root regenerates this file.", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}, "
        f"ray {m['ray']}. Load average at start: {', '.join(str(x) for x in m['load_average'])}.", "",
        f"(c) as in RESULTS.md: {w['model']} on {w['data']} data, batch {w['batch_size']} per worker, 2 workers x 1 "
        f"thread, shards cached in worker memory, {w['warmup']} warm-up + {w['repeats']} x {w['steps']} steps; "
        "images/s is the median of the timed segments. One fresh local Ray per variant and round, the order "
        "rotating; (b) torchrun (nice 0) before every round and after the last. *rest of the machine*: CPU of "
        "every process but the two training workers while rank 0's timed steps ran, in % of one core.", "",
    ]
    for part in (res["quiet"], res.get("busy")):
        if part:
            lines += table(part)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds per condition (each variant once per round)")
    p.add_argument("--busy", type=int, default=1, help="CPU-bound nice-0 processes in the second condition (0: skip)")
    p.add_argument("--out", type=Path, default=HERE / "NICENESS.md")
    args = p.parse_args(argv)
    w = common.Workload("cnn", "synthetic", 64, 10, 25, 3)
    command = common.command_line("niceness.py", p, args, ("rounds", "busy", "out"))
    res = {"command": command, "machine": common.machine_info()}
    with tempfile.TemporaryDirectory(prefix="emergence-nice-") as tmp:
        res["quiet"] = measure(args.rounds, w, Path(tmp))
        if args.busy:
            res["busy"] = measure(args.rounds, w, Path(tmp), args.busy)
    args.out.write_text(render(res))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {args.out}")
    for part in ("quiet", "busy"):
        for name, v in (res.get(part) or {}).get("variants", {}).items():
            print(f"{part}_{name}_vs_torchrun={v['ratio_to_torchrun']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
