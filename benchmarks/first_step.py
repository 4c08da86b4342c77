"""From `emergence-ray train` to the first training step, on an already running local cluster.

`measure(address, workdir)` launches the real CLI (`emergence-ray train --address ADDRESS`, the
built-in digits job, 1 epoch) and watches the run directory for the files the service writes on
its way: meta.json (after connecting, planning and preparing the data), workers.json (every
worker is up: process group, model built and wrapped in DDP) and progress.json (rank 0 finished
its first step). The stages before the TorchTrainer starts are split by `python
benchmarks/first_step.py --probe ADDRESS`, which runs the real `trainer.train` with a timer around
each driver step (connect, plan, prepare, write_meta, build_trainer) and stops where `fit` would
start. Where the machine's CPU went until the first step is a census of every process (`/proc`
snapshots before the launch and at the first step): on 2 cores start-up is CPU-bound, and every
Ray actor is a Python process that pays its own imports.

    flock /tmp/er-bench.lock python benchmarks/first_step.py [--compare before=/path/to/other/checkout] [--rounds 3]
    python benchmarks/first_step.py --probe 127.0.0.1:6379 --storage /tmp/probe   # prints JSON

The first command starts a local cluster (`cluster/local_cluster.py`, 2 CPUs), launches the
built-in job once to start Ray's once-per-cluster actors, then launches each version in turn
for `--rounds` rounds, and writes benchmarks/FIRST_STEP.md (+ .json).
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

ROOT = Path(__file__).resolve().parents[1]
# appended, not first: a probe of another checkout (PYTHONPATH=that checkout, `_env`) must import
# that checkout's emergence_ray, not this one's
sys.path.append(str(ROOT))
MILESTONES = ("meta.json", "workers.json", "progress.json")


def _cli() -> list[str]:
    exe = shutil.which("emergence-ray")
    return [exe] if exe else [sys.executable, "-m", "emergence_ray"]


def _env(address: str, code: Path | None = None) -> dict:
    """The CLI's environment: the cluster's address, token auth on (as `ray start` requires), and
    `code` (a checkout of this repository) first on the path when comparing two versions."""
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    return env


def processes() -> dict[int, tuple[float, float, str]]:
    """pid -> (start, wall-clock s; CPU s used so far; name) of every process (Linux /proc; {}
    elsewhere). Two snapshots, before the launch and at the first step, cost nothing in between."""
    hz = os.sysconf("SC_CLK_TCK")
    try:
        boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return {}
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        args = [c.decode(errors="replace") for c in cmd if c]
        out[int(proc.name)] = (boot + int(fields[19]) / hz, (int(fields[11]) + int(fields[12])) / hz,
                               _name(args, stat[stat.index("(") + 1:stat.rindex(")")]))
    return out


def _name(args: list[str], comm: str) -> str:
    """`ray::TrainController.run`, `raylet`, `python -m ray.util.client.server`, `emergence-ray`..."""
    if not args:
        return comm
    first = args[0].split()[0]
    if not Path(first).name.startswith("python"):
        return first if first.startswith("ray::") else Path(first).name
    rest = [a for a in args[1:] if a not in ("-u", "-B")]
    if rest and rest[0] in ("-m", "-c"):
        return f"python -m {rest[1]}" if rest[0] == "-m" and len(rest) > 1 else "python -c"
    return Path(rest[0].split()[0]).name if rest else "python"


def census(before: dict, at_step: dict, t0: float) -> list[dict]:
    """CPU each process used from the launch to the first step, grouped by name (ray::IDLE x 3):
    where a 2-core machine's 2 CPU-seconds per second went before training could start."""
    groups: dict[str, dict] = {}
    for pid, (start, cpu, name) in at_step.items():
        old = before.get(pid)
        used = cpu - (old[1] if old and abs(old[0] - start) < 0.05 else 0.0)
        if used < 0.05:
            continue
        g = groups.setdefault(name, {"process": name, "count": 0, "cpu_s": 0.0, "first_start_s": None})
        g["count"] += 1
        g["cpu_s"] += used
        since = max(0.0, start - t0) if start > t0 - 0.05 else None  # start times have 10 ms ticks
        if since is not None and (g["first_start_s"] is None or since < g["first_start_s"]):
            g["first_start_s"] = since
    return sorted(groups.values(), key=lambda g: (g["first_start_s"] is not None, g["first_start_s"] or 0.0))


def measure(address: str, workdir: Path, timeout_s: float = 600, code: Path | None = None) -> dict:
    storage, name = workdir / "first_step", f"first-step-{int(time.time())}"
    run_dir = storage / name
    storage.mkdir(parents=True, exist_ok=True)
    cmd = [*_cli(), "train", "--address", address, "--set", "train.epochs=1",
           "--set", f"run.storage_path={storage}", "--set", f"run.name={name}"]
    seen: dict[str, float] = {}
    before, at_step = processes(), {}
    t0 = time.time()
    with open(storage / "cli.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(address, code))
        while proc.poll() is None and time.time() - t0 < timeout_s:
            for f in MILESTONES:
                if f not in seen and (run_dir / f).exists():
                    seen[f] = time.time() - t0
                    if f == "progress.json":
                        at_step = processes()
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    total = time.time() - t0
    if proc.returncode != 0 or "progress.json" not in seen:
        tail = (storage / "cli.log").read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}) or never stepped:\n{tail}")
    probe = _probe_subprocess(address, storage, code)
    shown = ["emergence-ray", *cmd[cmd.index("train"):]]
    shown[shown.index("--address") + 1] = "ADDRESS"
    shown[shown.index(f"run.storage_path={storage}")] = "run.storage_path=SCRATCH"
    return {
        "command": " ".join(shown), "to_first_step_s": seen["progress.json"], "command_s": total,
        "milestones_s": seen,
        "stages_s": {
            "launch -> run dir written (imports, connect, plan, prepare data)": seen["meta.json"],
            "-> workers up (Trainer.fit: controller, worker group, process group, model, DDP)":
                seen["workers.json"] - seen["meta.json"],
            "-> first step done (shard iterator, first batch, forward/backward)":
                seen["progress.json"] - seen["workers.json"],
        },
        "probe_s": probe,
        "processes": census(before, at_step, t0),  # launch -> first step, CPU s per process
    }


def _probe_subprocess(address: str, storage: Path, code: Path | None = None) -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", address, "--storage",
                           str(storage)], capture_output=True, text=True, timeout=300,
                          env={**_env(address, code), "BENCH_LAUNCH_T": repr(t)})
    if proc.returncode != 0:
        raise RuntimeError(f"first_step --probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _StopBeforeFit(Exception):
    pass


def probe(address: str, storage: str) -> dict:
    """Run the real `trainer.train` up to `fit` (which is replaced by a stop), with a timer
    around each driver step it calls, so the split follows the service's code as it changes."""
    marks = {"interpreter start": T_PROCESS - float(os.environ.get("BENCH_LAUNCH_T", T_PROCESS))}
    t = time.time()
    import emergence_ray.cli  # noqa: F401 - what the console script imports first
    from emergence_ray import config
    from emergence_ray import trainer as tr

    marks["imports (emergence_ray.cli, .trainer and what they import)"] = time.time() - t
    timed: dict[str, float] = {}

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def timed_fn(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                timed[label] = timed.get(label, 0.0) + time.time() - start

        setattr(owner, name, timed_fn)

    wrap(tr.cluster, "connect", "cluster.connect (ray.init to the running cluster)")
    wrap(tr.cluster, "plan", "cluster.plan")
    wrap(tr, "prepare", "pipeline.prepare (read, resolve spec, preprocess + materialize)")
    wrap(tr, "write_meta", "write config.yaml, meta.json")
    wrap(tr, "build_trainer", "build_trainer (the trainer object)")

    def stop(*_args, **_kwargs):
        raise _StopBeforeFit

    if not callable(getattr(tr, "fit", None)):  # renamed: stopping there would silently train instead
        raise RuntimeError("emergence_ray.trainer.fit is gone; update benchmarks/first_step.py:probe")
    tr.fit = stop
    cfg = config.load_config(None, ["train.epochs=1", f"run.storage_path={storage}",
                                    f"run.name=probe-{int(time.time())}"])
    t = time.time()
    try:
        tr.train(cfg, address)
    except _StopBeforeFit:
        pass
    total = time.time() - t
    marks.update(timed)
    marks["other driver steps"] = total - sum(timed.values())
    return marks


def compare(address: str, codes: dict[str, Path | None], rounds: int, workdir: Path) -> dict:
    """`rounds` rounds, each launching every version once in turn (the order rotates), all
    against the same running cluster: ratios within a round hold on a machine whose speed drifts."""
    names = list(codes)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            res = measure(address, workdir, code=codes[name])
            runs[name].append(res)
            print(f"round {r + 1} {name}: {res['to_first_step_s']:.1f} s", flush=True)
    return runs


def render(results: dict) -> str:
    from benchmarks import common

    m = results["machine"]
    names = list(results["runs"])
    title = "`emergence-ray train` to the first training step, on a running cluster"
    lines = [*common.results_header(title, results["command"], m),
             f"Cluster: `python cluster/local_cluster.py start --cpus {results['cpus']}` (a `ray start --head`, the "
             "development set-up), started once; every launch is the built-in digits job, 2 workers, 1 epoch: "
             f"`{results['runs'][names[0]][0]['command']}`. Versions: "
             + "; ".join(f"**{n}** = {results['codes'][n]}" for n in names) + ". "
             "Launches alternate between the versions, the order rotating every round.", "",
             "| version | launch -> first step, s (median) | each round | whole command s (median) |",
             "|---|---|---|---|"]
    for n in names:
        runs = results["runs"][n]
        firsts = [r["to_first_step_s"] for r in runs]
        lines.append(f"| {n} | **{common.median(firsts):.1f}** | {', '.join(f'{x:.1f}' for x in firsts)} | "
                     f"{common.median([r['command_s'] for r in runs]):.1f} |")
    for n in names:
        runs = results["runs"][n]
        lines += ["", f"### {n}: where the time goes (median of the rounds)", "",
                  "Stages, from the files the run writes on its way (meta.json, workers.json, progress.json):", "",
                  "| stage | s |", "|---|---|"]
        for stage in runs[0]["stages_s"]:
            lines.append(f"| {stage} | {common.median([r['stages_s'][stage] for r in runs]):.1f} |")
        lines += ["", "The first stage split by `--probe` (the real `trainer.train` in a new process, a timer "
                  "around each driver step, stopped where `fit` starts):", "", "| driver step | s |", "|---|---|"]
        for step in runs[0]["probe_s"]:
            lines.append(f"| {step} | {common.median([r['probe_s'][step] for r in runs]):.2f} |")
        last = runs[-1]["processes"]
        fresh = [p for p in last if p["first_start_s"] is not None]
        used = sum(p["cpu_s"] for p in last)
        lines += ["", f"CPU from the launch to the first step, per process, last round (`/proc` snapshots): "
                  f"{used:.1f} CPU-s in {runs[-1]['to_first_step_s']:.1f} s on {m['nproc']} cores. Processes "
                  "started by the launch:", "", "| process | count | started at (s after launch) | CPU s |",
                  "|---|---|---|---|"]
        for p in fresh:
            lines.append(f"| `{p['process']}` | {p['count']} | {p['first_start_s']:.1f} | {p['cpu_s']:.1f} |")
        rest = used - sum(p["cpu_s"] for p in fresh)
        lines.append(f"| everything already running (Ray's daemons, idle actors) | | before | {rest:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks import common

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probe", metavar="ADDRESS", help="only time the driver's stages against ADDRESS (prints JSON)")
    p.add_argument("--storage", default=os.path.join(os.getcwd(), "first-step-probe"),
                   help="run.storage_path for the probe's run directory")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=DIR",
                   help="other checkouts of this repository to launch in turn with this one (e.g. "
                        "before=/path/to/worktree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    a = p.parse_args(argv)
    if a.probe:
        print(json.dumps(probe(a.probe, a.storage)))
        return 0
    import tempfile

    codes: dict[str, Path | None] = {"this": None}
    for item in a.compare:
        name, _, path = item.partition("=")
        codes[name] = Path(path).resolve()
    results = {"command": common.command_line("first_step.py", p, a, ("compare", "rounds", "cpus")),
               "machine": common.machine_info(), "cpus": a.cpus,
               "codes": {n: (str(c) if c else f"this checkout ({common.machine_info()['git_revision']})")
                         for n, c in codes.items()}}
    work = Path(tempfile.mkdtemp(prefix="erfs-", dir="/tmp"))  # short: Ray's socket paths
    local = [sys.executable, str(ROOT / "cluster" / "local_cluster.py")]
    subprocess.run([*local, "start", "--dir", str(work / "c"), "--cpus", str(a.cpus)], check=True,
                   capture_output=True, timeout=300)
    try:
        state = json.loads(subprocess.run([*local, "status", "--dir", str(work / "c")], check=True,
                                          capture_output=True, text=True).stdout)
        measure(state["gcs_address"], work)  # the cluster's first job starts Ray's once-per-cluster actors
        results["runs"] = compare(state["gcs_address"], codes, a.rounds, work)
    finally:
        subprocess.run([*local, "stop", "--dir", str(work / "c")], capture_output=True, timeout=300)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "FIRST_STEP.json").write_text(json.dumps(results, indent=2))
    (a.out / "FIRST_STEP.md").write_text(render(results))
    print((a.out / "FIRST_STEP.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
