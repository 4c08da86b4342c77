"""The one benchmark command: torch vs torchrun vs emergence-ray, side by side in one run.

    python benchmarks/run.py            # everything, ~30 min on 2 cores      -> benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # cnn on synthetic data, < 5 min      -> benchmarks/RESULTS-quick.md
    python benchmarks/run.py --smoke    # (a) and (b) only, 5 steps, no Ray (the test suite runs this)

Sections, in this order: training throughput of (a) a plain torch process, (b) torchrun DDP
(2 x gloo) and (c) emergence-ray's Ray Data + Ray Train path on the same workloads, with their
start-up costs; ingest (Ray Data vs DataLoader); `emergence-ray train` to the first step on the
running cluster; time to accuracy on Fashion-MNIST (the full run trains the job through the CLI,
--quick reads the recorded run); and benchmarks/gpu.py when a CUDA device is present (full run).
The baselines run before Ray starts, so Ray's idle processes never slow them down, and (b) runs
once more after Ray has stopped: (c) runs between the two (b) runs, so a shared machine that
drifts faster or slower during the run moves both sides of c/b.

Results land in --out (markdown) and beside it as JSON. The last line printed is
`ratio_ray_vs_torchrun=<c/b for cnn on synthetic data>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, results  # noqa: E402
from benchmarks.common import Workload  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKERS = 2

PROFILES = {
    "full": {
        # Fashion-MNIST: 2 workers x 64 x 420 steps = 53,760 images fit the 54,600 of the train split
        "workloads": [Workload("cnn", "synthetic", 64, 20, 80, 5), Workload("cnn", "fashion_mnist", 64, 20, 80, 5),
                      Workload("resnet18_small", "synthetic", 64, 2, 5, 3),
                      Workload("resnet18_small", "fashion_mnist", 64, 2, 5, 3)],
        "ray": True, "ingest_images": 8192, "ingest_repeats": 3, "fashion_ingest": True, "stream_compare": True,
        "time_to_accuracy": "run", "nice_compare": True,
        "gpu": True,
        "out": HERE / "RESULTS.md",
    },
    "quick": {
        "workloads": [Workload("cnn", "synthetic", 64, 10, 25, 3)],
        "ray": True, "ingest_images": 2048, "ingest_repeats": 3, "fashion_ingest": False,
        "stream_compare": False, "time_to_accuracy": "recorded", "nice_compare": True, "gpu": False,
        "out": HERE / "RESULTS-quick.md",
    },
    "smoke": {
        "workloads": [Workload("cnn", "synthetic", 16, 1, 2, 2)],
        "ray": False, "ingest_images": 0, "ingest_repeats": 0, "fashion_ingest": False, "stream_compare": False,
        "time_to_accuracy": None,
        "gpu": False,
        "out": HERE / "RESULTS-smoke.md",
    },
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def optional(res: dict, key: str, fn, *args, into: dict | None = None, label: str | None = None) -> None:
    """Run a section after the throughput comparison; its result goes to `into[key]` (default:
    res), a failure is written down in res["failed"][label or key] (so in RESULTS.md), not fatal."""
    label = label or key
    try:
        (res if into is None else into)[key] = fn(*args)
    except Exception as err:  # noqa: BLE001 - reported in RESULTS.md and on stdout
        log(f"{label} failed: {type(err).__name__}: {str(err)[-2000:]}")
        res.setdefault("failed", {})[label] = f"{type(err).__name__}: {str(err)[-1500:]}"


def baselines(workloads: list[Workload], fashion: str, workdir: Path) -> list[dict]:
    from benchmarks.torch_baseline import run_baseline

    rows = []
    for w in workloads:
        row = {"workload": w.to_dict()}
        for mode, world, threads in (("a", 1, WORKERS), ("b", WORKERS, 1)):
            log(f"({mode}) {w.key}: {'torchrun ' if world > 1 else ''}{world} x {threads} thread(s)")
            row[mode] = run_baseline(w, world, threads, workdir / f"{mode}-{w.model}-{w.data}.json", fashion)
            log(f"({mode}) {w.key}: {row[mode]['images_per_s']:.0f} img/s")
        rows.append(row)
    return rows


def start_ray(**init_options) -> float:
    """A local Ray with WORKERS CPUs (`init_options`: more `ray.init` arguments); -> seconds."""
    import ray

    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    t = time.perf_counter()
    # PYTHONPATH: Ray workers import benchmarks.ray_loop to run its per-worker loop
    path = os.pathsep.join(p for p in (str(common.ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=WORKERS, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_DATA_LOG_LEVEL": "WARNING"}}, **init_options)
    seconds = time.perf_counter() - t
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return seconds


def rebaseline(rows: list[dict], fashion: str, workdir: Path) -> None:
    """(b) again, after (c), with Ray stopped. (b)'s figure becomes the median of the segments of
    both runs; each run's own median is kept in b["runs"]. The ratios are recomputed."""
    from benchmarks.torch_baseline import run_baseline

    for row in rows:
        if not row.get("c"):
            continue
        w = Workload.from_dict(row["workload"])
        log(f"(b) {w.key}: torchrun again, after (c)")
        again = run_baseline(w, WORKERS, 1, workdir / f"b2-{w.model}-{w.data}.json", fashion)
        b = row["b"]
        b["runs"] = [b["images_per_s"], again["images_per_s"]]
        b["rates"] = b["rates"] + again["rates"]
        b["images_per_s"] = common.median(b["rates"])
        row["ratio_c_b"] = row["c"]["images_per_s"] / b["images_per_s"]
        log(f"(b) {w.key}: {again['images_per_s']:.0f} img/s; both runs {b['images_per_s']:.0f}, "
            f"c/b = {row['ratio_c_b']:.3f}")


def with_ray(res: dict, profile: dict, fashion: str, workdir: Path) -> None:
    import ray

    from benchmarks import first_step, ingest, ray_loop

    res["ray_start_s"] = start_ray()
    log(f"Ray started in {res['ray_start_s']:.1f} s")
    try:
        for row in res["throughput"]:
            w = Workload.from_dict(row["workload"])
            log(f"(c) {w.key}: emergence-ray, {WORKERS} workers")
            row["c"] = ray_loop.run_ray(w, fashion, workdir / "ray_train", WORKERS)
            row["ratio_c_b"] = row["c"]["images_per_s"] / row["b"]["images_per_s"]
            row["ratio_c_a"] = row["c"]["images_per_s"] / row["a"]["images_per_s"]
            log(f"(c) {w.key}: {row['c']['images_per_s']:.0f} img/s, c/b = {row['ratio_c_b']:.3f}")
            if profile["nice_compare"] and w.model == "cnn":
                log(f"(c) {w.key}: emergence-ray with the workers left at Ray's nice 15, for comparison")
                optional(res, "c_ray_nice", ray_loop.run_ray, w, fashion, workdir / "ray_train", WORKERS, 1, "auto",
                         None, into=row, label=f"c_ray_nice {w.key}")
            if profile["stream_compare"] and w.model == "cnn" and row["c"]["ingest"] == "cache":
                log(f"(c) {w.key}: emergence-ray with data.ingest=stream, for comparison")
                optional(res, "c_stream", ray_loop.run_ray, w, fashion, workdir / "ray_train", WORKERS, 1, "stream",
                         into=row, label=f"c_stream {w.key}")
                log(f"(c) {w.key}: Ray Train on in-memory tensors, no Ray Data, for comparison")
                optional(res, "c_memory", ray_loop.run_ray, w, fashion, workdir / "ray_train", WORKERS, 1, "memory",
                         into=row, label=f"c_memory {w.key}")
        if profile["ingest_images"]:
            log(f"ingest: {profile['ingest_images']} PNGs, ImageFolder and Parquet")
            optional(res, "ingest", ingest.run_ingest, workdir / "ingest", profile["ingest_images"], WORKERS,
                     profile["ingest_repeats"])
        if profile["fashion_ingest"] and Path(fashion).is_dir():
            log("ingest: the service's epochs over Fashion-MNIST")
            optional(res, "fashion_ingest", ingest.fashion_mnist_ingest, fashion, profile["ingest_repeats"])
        log("first step: emergence-ray train on the running cluster")
        optional(res, "first_step", first_step.measure, ray.get_runtime_context().gcs_address, workdir)
        if res.get("first_step"):
            log(f"first step after {res['first_step']['to_first_step_s']:.1f} s")
    finally:
        ray.shutdown()


def accuracy(res: dict, profile: dict, fashion: str, workdir: Path) -> list[dict]:
    from benchmarks import time_to_accuracy as tta

    runs = []
    if profile["time_to_accuracy"] == "run":
        if Path(fashion).is_dir():
            log("time to accuracy: emergence-ray train --config jobs/fashion_mnist.yaml (~7-10 min)")
            runs.append(tta.run_job(workdir, fashion))
        else:
            res["time_to_accuracy_note"] = f"Not trained here: no Fashion-MNIST IDX files in {fashion}."
    else:
        res["time_to_accuracy_note"] = ("This quick run did not train: the row is the recorded run. "
                                        "`python benchmarks/run.py` trains the job and scores every epoch "
                                        "on the test set.")
    return runs + [tta.recorded()]


def gpu(workdir: Path) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    out = workdir / "gpu.json"
    log("gpu: benchmarks/gpu.py --device cuda")
    subprocess.run([sys.executable, str(HERE / "gpu.py"), "--device", "cuda", "--out", str(out)], check=True,
                   timeout=900)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="cnn on synthetic data only; < 5 min on 2 cores")
    mode.add_argument("--smoke", action="store_true", help="(a) and (b) with 5 steps, no Ray (for tests)")
    p.add_argument("--out", type=Path, help="markdown results (default: benchmarks/RESULTS[-quick|-smoke].md)")
    p.add_argument("--fashion-mnist", default=common.FASHION_MNIST, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = PROFILES[name]
    out = args.out or profile["out"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emergence-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    workloads = profile["workloads"]
    if not Path(args.fashion_mnist).is_dir():
        log(f"no Fashion-MNIST IDX files in {args.fashion_mnist}: synthetic data only")
        workloads = [w for w in workloads if w.data != "fashion_mnist"]
    command = "python benchmarks/run.py" + {"full": "", "quick": " --quick", "smoke": " --smoke"}[name]
    if args.out:
        command += f" --out {shlex.quote(str(args.out))}"
    res: dict = {"command": command, "profile": name, "machine": common.machine_info()}
    t0 = time.perf_counter()
    try:
        res["throughput"] = baselines(workloads, args.fashion_mnist, workdir)
        if profile["ray"]:
            with_ray(res, profile, args.fashion_mnist, workdir)
            rebaseline(res["throughput"], args.fashion_mnist, workdir)
        if profile["time_to_accuracy"]:
            optional(res, "time_to_accuracy", accuracy, res, profile, args.fashion_mnist, workdir)
        if profile["gpu"]:
            optional(res, "gpu", gpu, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    res["total_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(results.render(res))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out} and {out.with_suffix('.json').name} ({res['total_s']:.0f} s)")
    for row in res["throughput"]:
        parts = [f"{m}={row[m]['images_per_s']:.0f}" for m in ("a", "b", "c") if row.get(m)]
        log(f"{row['workload']['model']}/{row['workload']['data']} img/s: {' '.join(parts)}")
    ref = next(r for r in res["throughput"] if r["workload"]["model"] == "cnn" and r["workload"]["data"] == "synthetic")
    if "ratio_c_b" in ref:
        print(f"ratio_ray_vs_torchrun={ref['ratio_c_b']:.3f}", flush=True)
    else:
        print(f"ratio_torch_vs_torchrun={ref['a']['images_per_s'] / ref['b']['images_per_s']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
