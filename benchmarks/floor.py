"""Where does (c) lose to torchrun on a small node, and how close can Ray get at all?

Four ways to run the same DDP training (cnn on synthetic data, 2 workers x 1 thread, gloo, the
service's model, optimizer and `engine.train_epoch`), side by side in one run:

- `torchrun`: (b), no Ray on the machine;
- `bare`: the Ray runtime as `run.py` starts it (`ray.init(num_cpus=2)`: GCS, raylet, dashboard,
  log monitor, pre-started workers), two plain Ray actors running (b)'s loop
  (`torch_baseline.main`) in a thread, as Ray Train runs its loop; no Ray Train, no Ray Data;
- `service`: (c) as RESULTS.md measures it (Ray Data materialized, shard cached in worker memory,
  the service's `trainer.Trainer`);
- `stripped`: (c) with every Ray process that can go gone: Ray started without the dashboard and
  keeping no idle worker processes (`num_workers_soft_limit=0`), Train without its placement
  group cleaner and metrics callbacks, Ray Data's stats actor stopped once the data is
  materialized (just before `fit`). Train's scaling policy still starts Ray Data's autoscaling
  coordinator. Not something to ship (no dashboard means no Jobs API, no state API, and
  leaked placement groups if a controller dies); it bounds what trimming processes can win.

Each Ray variant gets a fresh local Ray per round; the order rotates; torchrun runs before every
round and after the last, and every other variant's ratio is to the mean of the torchrun runs
just before and after its round, so a drifting machine moves numerator and denominator alike.

For each run: images/s (median of the timed segments), and over the timed steps: rank 0's
training thread as the scheduler saw it (`/proc/thread-self/schedstat`: % on a CPU, % runnable
but waiting for one, involuntary context switches per second), and every other process's CPU
and wake-ups (voluntary context switches of all its threads) per second. Writes --out
(markdown, with machine, date and command) and the JSON beside it.

    python benchmarks/floor.py [--rounds 3] [--out benchmarks/FLOOR.md]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.run import WORKERS, log, start_ray  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("bare", "service", "stripped")
TRAINING = {"torchrun": "torch_baseline.py", "bare": "ray::_BareWorker", "service": "ray::RayTrainWorker",
            "stripped": "ray::RayTrainWorker"}  # the training processes' names in the census


# ---------------------------------------------------------------- census of the other processes


def wakeups() -> dict[int, int]:
    """pid -> voluntary context switches of all its threads so far (each one a sleep, so a later
    wake-up that needs a CPU)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        total = 0
        try:
            for task in (proc / "task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue
        out[int(proc.name)] = total
    return out


def census_of_timed_steps(marks_dir: Path, out: dict, done: threading.Event) -> None:
    """Driver thread: snapshots when rank 0 starts and ends its timed steps -> out["processes"]:
    [{process, count, cpu_pct, wakeups_per_s}], every process on the machine, grouped by name."""
    from benchmarks.first_step import processes

    snaps = []
    for mark in ("steady_start", "steady_end"):
        while not (marks_dir / mark).exists():
            if done.wait(0.1):
                return
        snaps.append((time.time(), processes(), wakeups()))
    (t_a, cpu_a, wake_a), (t_b, cpu_b, wake_b) = snaps
    dt = max(1e-9, t_b - t_a)
    groups: dict[str, dict] = {}
    for pid, (start, cpu, name) in cpu_b.items():
        old = cpu_a.get(pid)
        same = old is not None and abs(old[0] - start) < 0.05
        g = groups.setdefault(name, {"process": name, "count": 0, "cpu_pct": 0.0, "wakeups_per_s": 0.0})
        g["count"] += 1
        g["cpu_pct"] += 100 * (cpu - (old[1] if same else 0.0)) / dt
        g["wakeups_per_s"] += (wake_b.get(pid, 0) - (wake_a.get(pid, 0) if same else 0)) / dt
    out["seconds"] = dt
    out["processes"] = sorted((g for g in groups.values() if g["cpu_pct"] > 0 or g["wakeups_per_s"] > 0),
                              key=lambda g: -g["wakeups_per_s"])


class _Census:
    """Runs `census_of_timed_steps` around one run; `result` is its output ({} if no marks)."""

    def __init__(self, workdir: Path, tag: str):
        self.marks = workdir / f"marks-{tag}-{time.time_ns()}"
        self.marks.mkdir(parents=True)
        self.result: dict = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=census_of_timed_steps, args=(self.marks, self.result, self._done),
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=10)


# ---------------------------------------------------------------- the variants


class _BareWorker:
    """A plain Ray actor that runs (b)'s loop in a thread (the main thread stays in Ray's task
    loop, as a Ray Train worker's does)."""

    def __init__(self, rank: int, world: int, port: int):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        self.rank, self.error, self.thread = rank, None, None

    def start(self, argv: list[str]) -> bool:
        def run():
            from benchmarks import torch_baseline
            from emergence_ray.priority import apply_worker_niceness

            try:
                apply_worker_niceness(0, self.rank)  # as the service's training loop does
                torch_baseline.main(argv)
            except BaseException as err:  # noqa: BLE001 - reported through done()
                self.error = repr(err)

        self.thread = threading.Thread(target=run, name="bare-train", daemon=True)
        self.thread.start()
        return True

    def done(self) -> tuple[bool, str | None]:
        return not self.thread.is_alive(), self.error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bare(w: common.Workload, workdir: Path, marks: Path) -> dict:
    import ray

    out = workdir / f"bare-{time.time_ns()}.json"
    argv = ["--workload", json.dumps(w.to_dict()), "--threads", "1", "--fashion-mnist", common.FASHION_MNIST,
            "--out", str(out), "--marks-dir", str(marks)]
    cls = ray.remote(num_cpus=1 / WORKERS)(_BareWorker)
    port = _free_port()
    actors = [cls.remote(r, WORKERS, port) for r in range(WORKERS)]
    try:
        ray.get([a.start.remote(argv) for a in actors])
        deadline = time.time() + 900
        while time.time() < deadline:
            states = ray.get([a.done.remote() for a in actors])
            errors = [e for _, e in states if e]
            if errors:
                raise RuntimeError(f"bare Ray actors failed: {errors}")
            if all(d for d, _ in states):
                break
            time.sleep(1.0)  # Ray Train's controller polls its workers every 2 s
        else:
            raise TimeoutError("bare Ray actors did not finish within 900 s")
    finally:
        for a in actors:
            ray.kill(a)
    return json.loads(out.read_text())


def _stripped_trainer():
    from ray.train.v2._internal.callbacks.metrics import ControllerMetricsCallback, WorkerMetricsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from emergence_ray.trainer import Trainer

    class StrippedTrainer(Trainer):
        def _create_default_callbacks(self):
            drop = (PlacementGroupCleanerCallback, ControllerMetricsCallback, WorkerMetricsCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

    return StrippedTrainer


def _stop_data_stats_actor() -> None:
    import ray
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    try:
        ray.kill(ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE), no_restart=True)
    except ValueError:  # not started
        pass


def _start_stripped_ray() -> None:
    """No dashboard; idle worker processes are not kept (`num_workers_soft_limit=0`)."""
    start_ray(include_dashboard=False, _system_config={"num_workers_soft_limit": 0})


def run_variant(name: str, w: common.Workload, workdir: Path) -> dict:
    """One run of `name` -> {"images_per_s", "rates", "sched", "census"}."""
    import ray

    from benchmarks import ray_loop
    from benchmarks.torch_baseline import run_baseline

    with _Census(workdir, name) as census:
        if name == "torchrun":
            r = run_baseline(w, WORKERS, 1, workdir / f"b-{time.time_ns()}.json", common.FASHION_MNIST,
                             marks_dir=census.marks)
        else:
            (_start_stripped_ray if name == "stripped" else start_ray)()
            try:
                if name == "bare":
                    r = run_bare(w, workdir, census.marks)
                else:
                    stripped = name == "stripped"
                    r = ray_loop.run_ray(w, common.FASHION_MNIST, workdir / "ray_train", WORKERS,
                                         trainer_cls=_stripped_trainer() if stripped else None,
                                         before_fit=_stop_data_stats_actor if stripped else None,
                                         marks_dir=census.marks)
            finally:
                ray.shutdown()
    return {"images_per_s": r["images_per_s"], "rates": r["rates"], "sched": r.get("sched"),
            "census": census.result}


def measure(rounds: int, w: common.Workload, workdir: Path) -> dict:
    runs: dict[str, list[dict]] = {n: [] for n in ("torchrun", *VARIANTS)}
    for r in range(rounds):
        runs["torchrun"].append(run_variant("torchrun", w, workdir))
        log(f"round {r + 1}: torchrun {runs['torchrun'][-1]['images_per_s']:.0f} img/s")
        for name in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            runs[name].append(run_variant(name, w, workdir))
            log(f"round {r + 1}: {name} {runs[name][-1]['images_per_s']:.0f} img/s")
    runs["torchrun"].append(run_variant("torchrun", w, workdir))
    log(f"torchrun {runs['torchrun'][-1]['images_per_s']:.0f} img/s")
    return summarize(w, runs)


def summarize(w: common.Workload, runs: dict[str, list[dict]]) -> dict:
    """Per variant: medians of images/s, of the ratio to the neighbouring torchrun runs, of the
    training thread's scheduler shares, and of the rest of the machine's CPU and wake-ups."""
    b = [x["images_per_s"] for x in runs["torchrun"]]
    out = {"workload": w.to_dict(), "rounds": len(b) - 1, "runs": runs, "variants": {}}
    for name, rs in runs.items():
        ratios = [x["images_per_s"] / ((b[i] + b[i + 1]) / 2) for i, x in enumerate(rs)] if name != "torchrun" else []
        scheds = [x["sched"] for x in rs if x.get("sched")]
        others = [[p for p in x["census"].get("processes", []) if p["process"] != TRAINING[name]]
                  for x in rs if x["census"].get("processes")]
        out["variants"][name] = {
            "images_per_s": [x["images_per_s"] for x in rs],
            "median": common.median([x["images_per_s"] for x in rs]),
            "ratios": ratios, "ratio": common.median(ratios) if ratios else 1.0,
            **{k: common.median([s[k] for s in scheds]) for k in ("on_cpu_pct", "runnable_waiting_pct",
                                                                  "sleeping_pct", "involuntary_per_s")},
            "others_cpu_pct": common.median([sum(p["cpu_pct"] for p in o) for o in others]),
            "others_wakeups_per_s": common.median([sum(p["wakeups_per_s"] for p in o) for o in others]),
            "top": _top(others),
        }
    return out


def _top(censuses: list[list[dict]], n: int = 10) -> list[dict]:
    """The processes with the most wake-ups, median over the runs (0 where a run lacked one)."""
    names = {p["process"] for c in censuses for p in c}
    rows = []
    for name in names:
        per_run = [next((p for p in c if p["process"] == name), None) for c in censuses]
        rows.append({"process": name, "count": max(p["count"] for p in per_run if p),
                     "cpu_pct": common.median([p["cpu_pct"] if p else 0.0 for p in per_run]),
                     "wakeups_per_s": common.median([p["wakeups_per_s"] if p else 0.0 for p in per_run])})
    return sorted(rows, key=lambda r: -r["wakeups_per_s"])[:n]


# ---------------------------------------------------------------- report

LABELS = {"torchrun": "(b) torchrun, no Ray", "bare": "Ray runtime + 2 plain actors running (b)'s loop",
          "service": "(c) the service", "stripped": "(c) with every removable Ray process removed"}


def render(res: dict) -> str:
    m, part = res["machine"], res["result"]
    w = part["workload"]
    lines = [
        "# How close can Ray Train get to torchrun on this machine?", "",
        f"Generated {m['date']} by `{res['command']}` (git {m['git_revision']}). Re-running that command from the "
        "repository root regenerates this file.", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}, "
        f"ray {m['ray']}. Load average at start: {', '.join(str(x) for x in m['load_average'])}.", "",
        f"{w['model']} on {w['data']} data, batch {w['batch_size']} per worker, {WORKERS} workers x 1 thread, gloo, "
        f"{w['warmup']} warm-up + {w['repeats']} x {w['steps']} steps; {part['rounds']} rounds, a fresh Ray per "
        "Ray run, the order rotating, torchrun before every round and after the last. *ratio*: each run's images/s "
        "over the mean of the torchrun runs before and after its round; median (each round). *training thread*: "
        "rank 0's, over its timed steps (`/proc/thread-self/schedstat`). *rest of the machine*: every process "
        "but the training workers, over the same steps: CPU in % of one core, and wake-ups (voluntary context "
        "switches, all threads) per second. The variants are in the docstring of `benchmarks/floor.py`.", "",
        "| variant | img/s: median (each round) | ratio to torchrun | training thread on a CPU / runnable, "
        "waiting / sleeping (%) | its involuntary switches /s | rest of the machine: CPU % of a core, wake-ups /s |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in part["variants"].items():
        rates = ", ".join(f"{x:,.0f}" for x in v["images_per_s"])
        ratio = ("1" if name == "torchrun" else
                 f"**{v['ratio']:.2f}** ({', '.join(f'{x:.2f}' for x in v['ratios'])})")
        lines.append(f"| {LABELS[name]} (`{name}`) | **{v['median']:,.0f}** ({rates}) | {ratio} | "
                     f"{v['on_cpu_pct']:.0f} / {v['runnable_waiting_pct']:.0f} / {v['sleeping_pct']:.0f} | "
                     f"{v['involuntary_per_s']:.0f} | {v['others_cpu_pct']:.0f}, {v['others_wakeups_per_s']:,.0f} |")
    lines += ["", "The other processes with the most wake-ups, per variant (median over the rounds):", ""]
    for name, v in part["variants"].items():
        top = ", ".join(f"`{p['process']}`{' x' + str(p['count']) if p['count'] > 1 else ''} "
                        f"{p['wakeups_per_s']:,.0f}/s ({p['cpu_pct']:.1f}%)" for p in v["top"])
        lines.append(f"- `{name}`: {top or 'none recorded'}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (each variant once per round)")
    p.add_argument("--out", type=Path, default=HERE / "FLOOR.md")
    p.add_argument("--steps", type=int, default=40, help="steps per timed segment (3 segments, 10 warm-up steps)")
    args = p.parse_args(argv)
    w = common.Workload("cnn", "synthetic", 64, 10, args.steps, 3)
    command = common.command_line("floor.py", p, args, ("rounds", "steps", "out"))
    res = {"command": command, "machine": common.machine_info()}
    with tempfile.TemporaryDirectory(prefix="emergence-floor-") as tmp:
        res["result"] = measure(args.rounds, w, Path(tmp))
    args.out.write_text(render(res))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {args.out}")
    for name, v in res["result"]["variants"].items():
        print(f"{name}_vs_torchrun={v['ratio']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
