"""The benchmarks keep working: benchmarks/gpu.py on the CPU with tiny settings, run.py's --smoke
mode ((a) one torch process and (b) torchrun, 5 steps, no Ray), and the pure helpers. Nothing here
asserts a timing value: only that the numbers exist and are positive."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, results, time_to_accuracy  # noqa: E402


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def tiny_idx(tmp_path) -> Path:
    """Fashion-MNIST-shaped IDX files of random images (the real files are not a test dependency)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for prefix, n in (("train", 512), ("t10k", 128)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def test_steady_rates_cut_warmup_and_segments():
    ends = [0.0, 0.5, 1.0, 2.0, 3.0]  # step 0 is warm-up; then two segments of two steps
    assert common.steady_rates(ends, batch_size=10, world=2, warmup=1, steps=2, repeats=2) == [40.0, 20.0]
    with pytest.raises(ValueError):
        common.steady_rates(ends, 10, 2, warmup=1, steps=3, repeats=2)


def test_time_to_accuracy_helpers_and_recorded_run():
    points = [(10.0, 0.85), (20.0, 0.905), (30.0, 0.921), (700.0, 0.93)]
    s = time_to_accuracy.summarize(points, budget_s=600)
    assert (s["time_to_90_s"], s["time_to_92_s"], s["best_within_budget"]) == (20.0, 30.0, 0.921)
    assert time_to_accuracy.summarize(points[:1])["time_to_90_s"] is None
    rec = time_to_accuracy.recorded()
    assert rec["time_to_90_s"] > 0 and 0.9 < rec["final_test_accuracy"] < 1


def test_gpu_script_runs_on_cpu(tmp_path, tiny_idx):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--models", "cnn,resnet18_small",
         "--data", "synthetic,fashion_mnist", "--fashion-mnist", str(tiny_idx), "--batch-size", "4",
         "--steps", "2", "--warmup", "1", "--repeats", "3", "--tta-epochs", "2", "--tta-limit", "256",
         "--tta-width", "8", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["device"] == "cpu" and printed["world"] == 1 and printed["skipped"] == []
    combos = {(t["model"], t["data"]) for t in printed["throughput"]}
    assert combos == {(m, d) for m in ("cnn", "resnet18_small") for d in ("synthetic", "fashion_mnist")}
    for t in printed["throughput"]:
        assert len(t["rates"]) == 3 and all(r > 0 for r in t["rates"]) and t["images_per_s"] > 0
    tta = printed["time_to_accuracy"]
    assert [e["epoch"] for e in tta["epochs"]] == [1, 2]
    assert tta["train_images"] == 256 and 0 <= tta["best_test_accuracy"] <= 1
    assert all(e["elapsed_s"] > 0 for e in tta["epochs"])
    assert "time_to_target_s" in tta  # None: random labels never reach 92%
    _render_gpu_results(tmp_path, out, printed)


def _render_gpu_results(tmp_path: Path, run_json: Path, res: dict) -> None:
    """The entry point writes RESULTS-gpu.md (+ .json) from gpu.py's JSON, two runs side by side, and
    re-renders the same markdown from that JSON."""
    md = tmp_path / "RESULTS-gpu.md"
    notes = tmp_path / "notes.md"
    notes.write_text("A CPU smoke run.\n")
    script = str(ROOT / "benchmarks" / "results.py")
    proc = subprocess.run(
        [sys.executable, script, "gpu", "--run", f"cpu={run_json}", "--run", f"cpu again={run_json}",
         "--command", "python benchmarks/gpu.py --device cpu", "--machine", "this test's machine",
         "--notes", str(notes), "--date", "2026-11-30", "--git-revision", "abc1234", "--out", str(md)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    assert "Run 2026-11-30 at git abc1234" in text and "Machine: this test's machine" in text
    assert "- `python benchmarks/gpu.py --device cpu`" in text and "A CPU smoke run." in text
    for t in res["throughput"]:
        for label in ("cpu", "cpu again"):
            assert (f"| {t['model']} | {t['data']} | {label} | 4 | 1 | none | no | 1 + 3 x 2 | "
                    f"**{t['images_per_s']:,.0f}** ({', '.join(f'{r:,.0f}' for r in t['rates'])}) | 1.00 |") in text
    tta = res["time_to_accuracy"]
    assert (f"| cpu | cnn width 8 | 256 / {tta['test_images']} | 4 | {tta['lr']:g} | 2 | 92% | not reached | - | - | "
            f"{tta['best_test_accuracy']:.4f} |") in text
    accs = " ".join(f"{e['test_accuracy']:.4f}" for e in tta["epochs"])
    assert f"- cpu again (epochs 1-2): {accs}" in text
    record = json.loads(md.with_suffix(".json").read_text())
    assert record["runs"][0] == {"label": "cpu", "result": res}
    md.unlink()
    proc = subprocess.run([sys.executable, script, "gpu", "--from", str(md.with_suffix(".json"))],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text() == text


def test_run_smoke_torch_and_torchrun(tmp_path):
    out = tmp_path / "RESULTS-smoke.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio_torch_vs_torchrun=") and float(last.split("=")[1]) > 0
    res = json.loads(out.with_suffix(".json").read_text())
    (row,) = res["throughput"]
    assert row["a"]["world"] == 1 and row["b"]["world"] == 2 and row["b"]["mode"] == "torchrun"
    for mode in ("a", "b"):
        assert len(row[mode]["rates"]) == 2 and all(r > 0 for r in row[mode]["rates"])
        assert row[mode]["startup"]["launch_to_first_step_s"] > 0
    text = out.read_text()
    assert "python benchmarks/run.py --smoke" in text and "| cnn | synthetic |" in text


def test_results_render_every_section():
    """RESULTS.md renders from a result of the full shape (no benchmark runs here)."""
    run = {"images_per_s": 100.0, "rates": [90.0, 100.0, 110.0], "command": "python x",
           "startup": {"launch_to_first_step_s": 5.0, "imports_s": 2.0, "fit_to_first_step_s": 9.0}}
    ing = {"images_per_s": 1000.0, "first_batch_s": 0.1, "runs": [900.0, 1000.0, 1100.0]}
    tta = {"source": "this run", "accuracy": "test", "clock": "wall", "time_to_90_s": 100.0, "time_to_92_s": None,
           "best_within_budget": 0.915, "final_test_accuracy": 0.918, "wall_s": 400.0, "command": "emergence-ray train",
           "epochs": [{"epoch": 1, "seconds": 30.0, "elapsed_s": 25.0, "val_accuracy": 0.8, "accuracy": 0.79}]}
    res = {
        "command": "python benchmarks/run.py", "machine": {**common.machine_info(), "nproc": 2}, "ray_start_s": 4.0,
        "throughput": [{"workload": common.Workload("cnn", "synthetic").to_dict(), "a": run,
                        "b": {**run, "runs": [95.0, 105.0], "sched": {
                            "on_cpu_pct": 94.0, "runnable_waiting_pct": 2.0, "sleeping_pct": 4.0,
                            "involuntary_per_s": 110.0}},
                        "c": {**run, "ingest": "cache", "workload": common.Workload("cnn", "synthetic").to_dict(),
                              "sched": {"on_cpu_pct": 85.0, "runnable_waiting_pct": 11.0, "sleeping_pct": 4.0,
                                        "involuntary_per_s": 600.0},
                              "background": {"seconds": 30.0, "processes": [
                                  {"process": "ray::RayTrainWorker", "count": 2, "cpu_pct": 170.0},
                                  {"process": "raylet", "count": 1, "cpu_pct": 2.5},
                                  {"process": "gcs_server", "count": 1, "cpu_pct": 1.5}]}},
                        "c_stream": {**run, "images_per_s": 80.0},
                        "c_memory": {**run, "images_per_s": 125.0},
                        "c_ray_nice": {**run, "images_per_s": 85.0, "nice": 15},
                        "ratio_c_b": 1.0, "ratio_c_a": 1.0},
                       {"workload": common.Workload("cnn", "fashion_mnist").to_dict(), "a": run, "b": run,
                        "c": {**run, "ingest": "cache"}, "ratio_c_b": 1.0, "ratio_c_a": 1.0}],
        "ingest": {"images": 64, "batch_size": 64, "workers": 2, "repeats": 3, "formats": {
            "parquet": {"ray_cold": ing, "service_stream": {**ing, "materialize_s": 1.0},
                        "service_cache": {**ing, "load_s": 0.5}, "dataloader": ing}}},
        "fashion_ingest": {"stream": {**ing, "images_per_s": 250.0}, "cache": {**ing, "load_s": 1.0},
                           "prepare_s": 9.0, "images": 54600, "batch_size": 128},
        "time_to_accuracy": [{**tta, "train_images_per_s": 500.0}, time_to_accuracy.recorded()],
        "first_step": {"command": "emergence-ray train", "to_first_step_s": 9.5, "command_s": 40.0,
                       "stages_s": {"launch -> x": 5.0}, "probe_s": {"imports": 3.0},
                       "processes": [{"process": "raylet", "count": 1, "cpu_s": 0.5, "first_start_s": None},
                                     {"process": "ray::RayTrainWorker", "count": 2, "cpu_s": 11.0,
                                      "first_start_s": 8.25}]},
        "gpu": {"device": "cuda", "backend": None, "compile": False, "steps": 100, "warmup": 20, "repeats": 3,
                "skipped": [], "time_to_accuracy": None,
                "throughput": [{"model": "resnet18", "data": "synthetic", "batch_size": 512, "world": 1,
                                "images_per_s": 5000.0, "rates": [4000.0, 5000.0, 6000.0], "setup_s": 0.5,
                                "warmup_s": 2.0}]},
    }
    text = results.render(res)
    for heading in ("Training throughput", "start-up cost", "Ingest", "Time to accuracy", "first training step",
                    "GPU"):
        assert heading in text
    assert "not reached" in text and "within the 10 s target" in text
    assert "| `raylet` | 1 | before | 0.5 |" in text and "| `ray::RayTrainWorker` | 2 | 8.2 | 11.0 |" in text
    assert "11.5 CPU-s of the 19.0" in text
    assert "the training workers 170%, everything else 4%" in text and "| `raylet` | 1 | 2.5 |" in text
    assert "of the 200% 2 cores have" in text
    assert "| (b) torchrun | 94 | 2 | 4 | 110 |" in text and "| (c) emergence-ray | 85 | 11 | 4 | 600 |" in text
    many = results.render({**res, "machine": {**res["machine"], "nproc": 16}})
    assert "of the 1600% 16 cores have" in many and "11.5 CPU-s of the 152.0 the 16 cores had" in many
    assert ("| cnn | synthetic | 100 | **100** (90, 100, 110) | **80** (90, 100, 110) | **125** (90, 100, 110) | "
            "1.00 | 0.80 | 1.25 | 0.80 |") in text
    assert "**100** (90, 100, 110; runs 95 / 105)" in text  # (b) before and after (c)
    assert ("| cnn | synthetic | 100 | **100** (90, 100, 110) (nice ?) | **85** (90, 100, 110) (nice 15) | "
            "1.00 | 0.85 |") in text
    assert "Service, cache epoch (read into memory once: 0.5 s)" in text
    # ingest against consumption: (c) for cnn on Fashion-MNIST (100/s), and the job's own rate (500/s)
    assert "| 100 | 2.5x | 10.0x |" in text and "| 500 | 0.5x | 2.0x |" in text
    assert ("| resnet18 | synthetic | this run | 512 | 1 | none | no | 20 + 3 x 100 | **5,000** (4,000, 5,000, 6,000) "
            "| 0.5 | 2.0 |") in text


def test_first_step_comparison_renders_each_version_round_by_round():
    from benchmarks import common, first_step

    def run(t: float) -> dict:
        return {"command": "emergence-ray train --address ADDRESS", "to_first_step_s": t, "command_s": t + 5,
                "stages_s": {"launch -> run dir": t / 3, "-> workers up": t / 2}, "probe_s": {"imports": 2.0},
                "processes": [{"process": "raylet", "count": 1, "cpu_s": 0.5, "first_start_s": None},
                              {"process": "ray::RayTrainWorker", "count": 2, "cpu_s": 9.0, "first_start_s": 6.0}]}

    res = {"command": "python benchmarks/first_step.py", "machine": common.machine_info(), "cpus": 2,
           "codes": {"this": "this checkout", "before": "/x"},
           "runs": {"this": [run(9.0), run(11.0), run(10.0)], "before": [run(15.0), run(14.0), run(16.0)]}}
    text = first_step.render(res)
    assert "| this | **10.0** | 9.0, 11.0, 10.0 | 15.0 |" in text
    assert "| before | **15.0** | 15.0, 14.0, 16.0 | 20.0 |" in text
    assert "| `ray::RayTrainWorker` | 2 | 6.0 | 9.0 |" in text and "| before | 0.5 |" in text
    assert "9.5 CPU-s in 10.0 s on" in text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process census reads Linux /proc")
def test_first_step_census_counts_the_cpu_of_processes_started_since_the_launch():
    import time

    from benchmarks import first_step

    before, t0 = first_step.processes(), time.time()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])
    try:
        time.sleep(0.2)
        deadline = time.time() + 30
        while time.time() < deadline:
            at = first_step.processes()
            if at.get(busy.pid, (0, 0.0))[1] >= 0.6:
                break
            time.sleep(0.1)
        groups = {g["process"]: g for g in first_step.census(before, at, t0)}
    finally:
        busy.kill()
        busy.wait()
    assert at[busy.pid][2] == "python -c"
    g = groups["python -c"]
    assert g["count"] >= 1 and g["cpu_s"] >= 0.55 and 0 <= g["first_start_s"] < 5
    assert all(g["cpu_s"] >= 0.05 for g in groups.values())


def test_niceness_ab_renders_every_variant():
    from benchmarks import niceness

    variants = {name: {"rates": [700.0, 720.0], "nice": [n, n], "median": 710.0, "ratio_to_torchrun": 0.8,
                       "background_pct": [12.0, 14.0]}
                for name, n in (("ray15", 15), ("train0", 0), ("all0", 0))}
    part = {"workload": common.Workload("cnn", "synthetic", 64, 10, 25, 3).to_dict(), "rounds": 2, "busy": 0,
            "torchrun": [880.0, 900.0, 890.0], "torchrun_median": 890.0, "variants": variants}
    res = {"command": "python benchmarks/niceness.py", "machine": common.machine_info(), "quiet": part,
           "busy": {**part, "busy": 1, "torchrun_median": 600.0}}
    text = niceness.render(res)
    assert "(b) torchrun: **890** img/s (880, 900, 890)" in text and "(b) torchrun: **600** img/s" in text
    assert "## On the quiet machine" in text and "## With 1 CPU-bound process(es) at nice 0" in text
    assert ("| `train0` | nice 0 (`scaling.worker_niceness: 0`) (seen: [0]) | nice 15 | **710** (700, 720) | "
            "0.80 | 12, 14 |") in text
    assert "`ray15`" in text and "`all0`" in text and "python benchmarks/niceness.py" in text


def test_thread_sched_sees_a_busy_and_a_sleeping_thread():
    import time

    start = common.thread_sched()
    assert start is not None and start["run_ns"] > 0
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:  # on a CPU (or waiting for one) for 0.3 s
        pass
    time.sleep(0.3)  # then asleep for 0.3 s
    share = common.sched_share(start, common.thread_sched())
    assert 0.55 < share["seconds"] < 5
    assert 10 < share["on_cpu_pct"] + share["runnable_waiting_pct"] <= 100.5
    assert share["sleeping_pct"] >= 20 and share["voluntary_per_s"] > 0
    assert common.sched_share(None, start) is None and common.sched_share(start, start) is None


def test_floor_summary_ratios_use_the_neighbouring_torchrun_runs_and_render():
    from benchmarks import floor

    def run(rate, others_cpu, wakes, training):
        sched = {"on_cpu_pct": 90.0, "runnable_waiting_pct": 6.0, "sleeping_pct": 4.0, "involuntary_per_s": 300.0}
        procs = [{"process": training, "count": 2, "cpu_pct": 180.0, "wakeups_per_s": 50.0},
                 {"process": "raylet", "count": 1, "cpu_pct": others_cpu, "wakeups_per_s": wakes}]
        return {"images_per_s": rate, "rates": [rate], "sched": sched, "census": {"seconds": 10, "processes": procs}}

    runs = {"torchrun": [run(800.0, 1.0, 10.0, "torch_baseline.py"), run(1000.0, 1.0, 10.0, "torch_baseline.py"),
                         run(900.0, 1.0, 10.0, "torch_baseline.py")],
            "bare": [run(855.0, 5.0, 500.0, "ray::_BareWorker"), run(760.0, 7.0, 700.0, "ray::_BareWorker")],
            "service": [run(720.0, 9.0, 900.0, "ray::RayTrainWorker"),
                        run(665.0, 11.0, 1100.0, "ray::RayTrainWorker")],
            "stripped": [run(810.0, 6.0, 600.0, "ray::RayTrainWorker"),
                         run(760.0, 8.0, 800.0, "ray::RayTrainWorker")]}
    w = common.Workload("cnn", "synthetic", 64, 10, 40, 3)
    part = floor.summarize(w, runs)
    service = part["variants"]["service"]
    # round 1: 720 / mean(800, 1000) = 0.80; round 2: 665 / mean(1000, 900) = 0.70
    assert service["ratios"] == pytest.approx([0.8, 0.7]) and service["ratio"] == pytest.approx(0.75)
    assert service["others_cpu_pct"] == pytest.approx(10.0) and service["others_wakeups_per_s"] == pytest.approx(1000)
    assert service["top"] == [{"process": "raylet", "count": 1, "cpu_pct": 10.0, "wakeups_per_s": 1000.0}]
    assert part["variants"]["torchrun"]["ratio"] == 1.0 and part["rounds"] == 2
    text = floor.render({"command": "python benchmarks/floor.py", "machine": common.machine_info(), "result": part})
    row = "| (c) the service (`service`) | **692** (720, 665) | **0.75** (0.80, 0.70) | 90 / 6 / 4 | 300 | 10, 1,000 |"
    assert row in text
    assert "- `service`: `raylet` 1,000/s (10.0%)" in text and "python benchmarks/floor.py" in text


def _check_ray_run(r: dict) -> None:
    """A few steps of `ray_loop.run_ray`: cached ingest, two epochs' rates, CPU and start-up figures."""
    assert r["ingest"] == "cache" and len(r["rates"]) == 2 and all(x > 0 for x in r["rates"])
    assert r["sched"]["on_cpu_pct"] > 0 and r["startup"]["fit_to_first_step_s"] > 0


def test_ray_path_of_the_benchmarks_runs_the_service_on_a_real_ray(ray_session, tmp_path):
    """(c) (`ray_loop.run_ray`: the service's Trainer), a few steps on the session Ray: the
    benchmarks' Ray path keeps working."""
    from benchmarks import ray_loop

    w = common.Workload("cnn", "synthetic", 8, 2, 2, 2)
    r = ray_loop.run_ray(w, str(tmp_path / "no-fmnist"), tmp_path / "ray_train")
    _check_ray_run(r)


@pytest.mark.slow  # ~15 s: one more Train run and a torchrun-style bare run
def test_floor_paths_run_on_a_real_ray(ray_session, tmp_path):
    """floor.py's stripped Trainer (`ray_loop.run_ray` with it) and its plain Ray actors."""
    from benchmarks import floor, ray_loop

    w = common.Workload("cnn", "synthetic", 8, 2, 2, 2)
    r = ray_loop.run_ray(w, str(tmp_path / "no-fmnist"), tmp_path / "ray_train",
                         trainer_cls=floor._stripped_trainer(), before_fit=floor._stop_data_stats_actor)
    _check_ray_run(r)
    marks = tmp_path / "marks"
    marks.mkdir()
    bare = floor.run_bare(w, tmp_path, marks)
    assert bare["world"] == 2 and len(bare["rates"]) == 2 and bare["sched"]["on_cpu_pct"] > 0
    assert {p.name for p in marks.iterdir()} == {"steady_start", "steady_end"}


def test_command_line_names_only_the_options_that_differ_from_their_defaults():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/FLOOR.md"))
    assert common.command_line("floor.py", p, p.parse_args([]), ("rounds", "out")) == "python benchmarks/floor.py"
    args = p.parse_args(["--rounds", "1", "--out", "/tmp/a b.md"])
    assert common.command_line("floor.py", p, args, ("rounds", "out")) == \
        "python benchmarks/floor.py --rounds 1 --out '/tmp/a b.md'"


def test_command_line_writes_lists_and_flags_as_they_were_given():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--compare", action="append", default=[])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000])
    p.add_argument("--skip", action="store_true")
    argv = ["--compare", "a=/x", "--compare", "b=/y z", "--sizes", "1", "2", "--skip"]
    line = common.command_line("s.py", p, p.parse_args(argv), ("compare", "sizes", "skip"))
    assert line == "python benchmarks/s.py --compare a=/x --compare 'b=/y z' --sizes 1 2 --skip"
    assert p.parse_args(__import__("shlex").split(line)[2:]) == p.parse_args(argv)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from Linux /proc")
def test_epoch_overhead_counts_the_cpu_of_its_child_processes():
    """A busy child is counted while it runs (from /proc) and once waited for (RUSAGE_CHILDREN).
    Only the child's own share is compared: the session Ray's processes are descendants too and
    come and go while this runs."""
    import resource
    import time

    from benchmarks import epoch_overhead

    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.5: pass\ntime.sleep(30)"])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and epoch_overhead._tree().get(busy.pid, (0.0, ""))[0] < 0.5:
            time.sleep(0.1)
        assert epoch_overhead._tree()[busy.pid][0] >= 0.45
    finally:
        busy.kill()
        busy.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (after.ru_utime + after.ru_stime) - (reaped.ru_utime + reaped.ru_stime) >= 0.45  # still counted


def test_epoch_overhead_renders_runs_idle_cost_and_first_step():
    from benchmarks import epoch_overhead

    run = {"job": "digits", "poll_s": "2.0", "epochs": 3, "epoch_wall_s": [2.0, 2.1], "overhead_s": [1.8, 1.9],
           "median_overhead_s": 1.85, "median_train_s": 0.15, "median_val_s": 0.02, "images_per_s": 4000.0,
           "command_s": 30.0, "cpu_s": 40.0, "test_accuracy": 0.97}
    fs = {"poll_s": "0.1", "to_first_step_s": 9.5, "command_s": 15.0,
          "stages_s": {"a": 4.0, "b": 5.4, "c": 0.1}, "probe_s": {"imports": 2.5},
          "processes": [{"process": "raylet", "count": 1, "first_start_s": None, "cpu_s": 0.2}]}
    res = {"command": "python benchmarks/epoch_overhead.py", "machine": common.machine_info(), "runs": [run],
           "idle": [{"poll_s": "0.1", "window_s": 17.0, "cpu_per_s": 0.12, "by_process_cpu_per_s": {"raylet": 0.05}}],
           "first_step": [fs]}
    text = epoch_overhead.render(res)
    assert "| digits | 2.0 | 3 | 2.050 | 0.170 | **1.850** | 1.80, 1.90 | 4,000 | 30.0 | 40.0 | 0.9700 |" in text
    assert "| 0.1 | **0.120** | `raylet` 0.050 |" in text
    assert "| 0.1 | **9.5** | 4.0 | 5.4 | 0.1 | 15.0 |" in text
    assert "flock /tmp/er-bench.lock python benchmarks/epoch_overhead.py" in text


@pytest.mark.slow  # ~40 s: three service runs; a smoke run of a GPU benchmark (test_gpu_script_runs_on_cpu stays)
def test_gpu_service_script_runs_on_cpu_through_the_real_service(ray_session, tmp_path, tiny_idx):
    """benchmarks/gpu_service.py --device cpu: the bare loop and the service (`trainer.train` on the
    session Ray, cached IDX and streamed JPEGs) side by side, the CLI job of jobs/fashion_mnist_gpu.yaml
    (tiny overrides) beside gpu.py's bare loop, and the markdown renderer; figures exist, none is asserted."""
    from benchmarks import gpu_service

    out, md = tmp_path / "gpu-service.json", tmp_path / "RESULTS-gpu-service.md"
    res = gpu_service.main(["--device", "cpu", "--fashion-mnist", str(tiny_idx), "--address", ray_session,
                            "--workdir", str(tmp_path / "work"), "--out", str(out), "--md", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and res["skipped"] == []
    (t,) = res["throughput"]
    assert t["model"] == "cnn" and len(t["service"]["epoch_rates"]) == 2
    assert t["service"]["images_per_s"] > 0 and t["bare"][0]["images_per_s"] > 0 and len(t["bare"]) == 1
    assert t["service_over_bare"] == t["service"]["images_per_s"] / t["bare"][0]["images_per_s"]
    assert Path(t["service"]["run_dir"], "summary.json").is_file()  # a whole service run, test set included
    s = res["stream"]
    assert s["service"]["images_per_s"] > 0 and s["gpu_busy_fraction"] > 0
    assert "data.ingest=stream" in s["service"]["overrides"] and s["stages"]["cpu_chain_per_core"] > 0
    assert s["service"]["gpu_utilization"] is None and "h2d_images_per_s" not in s["stages"]  # no GPU here
    tta = res["tta"]
    assert tta["recipe_differs_from_gpu_py"] == {} and tta["recipe"]["epochs"] == 2
    assert tta["service"]["epochs"] == 2 and tta["service"]["launch_to_exit_s"] > tta["service"]["training_only_s"] > 0
    assert len(tta["bare_gpu_py"]["test_accuracy"]) == 2
    text = md.read_text()
    assert "a CPU smoke run (no GPU figures here)" in text and res["command"] in text
    assert f"`service / bare = {int(t['service_over_bare'] * 100) / 100:.2f}` ({t['service_over_bare']:.3f})" in text
    assert "emergence-ray train --config" in text and "fashion_mnist_gpu.yaml" in text
    again = tmp_path / "again.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results.py"), "gpu-service", "--from", str(out),
                           "--out", str(again)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert again.read_text() == text


def test_cache_ab_renders_ratios_to_this_checkout_round_by_round():
    from benchmarks import cache_ab, common

    def run(rnd: int, version: str, loop: float, step: float, first_step: float | None) -> dict:
        return {"round": rnd, "version": version, "loop_images_per_s": loop, "train_images_per_s": step,
                "wall_s": 40.0, "test_accuracy": 0.8, "first_step_s": first_step}

    runs = [run(1, "this", 1000.0, 2000.0, 9.0), run(1, "before", 900.0, 2100.0, None),
            run(2, "before", 1100.0, 2000.0, None), run(2, "this", 1000.0, 2000.0, 8.0)]
    for r in runs:
        this = next(t for t in runs if t["round"] == r["round"] and t["version"] == "this")
        r.update(loop_ratio=r["loop_images_per_s"] / this["loop_images_per_s"],
                 train_ratio=r["train_images_per_s"] / this["train_images_per_s"])
    res = {"command": "python benchmarks/cache_ab.py --compare before=/tmp/wt", "machine": common.machine_info(),
           "versions": {"this": "/work/main", "before": "/tmp/wt"}, "limit": 12000, "epochs": 3, "runs": runs}
    text = cache_ab.render(res)
    assert "| 1 | before | 900 | 0.900 | 2100 | 1.050 | - | 40.0 | 0.8000 |" in text
    assert "| 2 | this | 1000 | 1.000 | 2000 | 1.000 | 8.0 | 40.0 | 0.8000 |" in text
    assert "| before | 1.000 | 1.025 |" in text and "| this | 1.000 | 1.000 |" in text
    assert "**before** = /tmp/wt" in text
    assert text.startswith("# The cache path for small data") and "12000 training images" in text
    jpeg = cache_ab.render({**res, "job": "jpeg", "images": 1000})
    assert jpeg.startswith("# A streamed epoch of 224 px JPEGs") and "1000 photo-like 256 px JPEGs" in jpeg
    assert "best test accuracy is 0.2" in jpeg and "best test accuracy" not in text
    revisions = {"this": cache_ab.revision(ROOT), "before": "cb33b3a"}
    assert "**before** = /tmp/wt (`cb33b3a`)" in cache_ab.render({**res, "revisions": revisions})
    assert revisions["this"].split("+")[0] == subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                             capture_output=True, text=True).stdout.strip()
    assert "| 1 | before | 900 | 0.900 | 2100 | 1.050 | - | 40.0 | 0.8000 |" in jpeg


def test_cache_ab_jpeg_job_is_stream_py_training_run():
    """--job jpeg trains on stream.py's folder with its first-step overrides, each checkout's own CLI."""
    import argparse

    from benchmarks import cache_ab, stream

    job, overrides = cache_ab.job_args(Path("/x"), argparse.Namespace(job="jpeg", folder=Path("/data/jpegs")))
    assert job == [] and "data.path=/data/jpegs" in overrides and "data.augment.policy=imagenet" in overrides
    assert f"train.batch_size={stream.BATCH}" in overrides and f"data.image_size={stream.SIZE}" in overrides
    job, overrides = cache_ab.job_args(Path("/x"), argparse.Namespace(job="fashion", limit=500))
    assert job == ["--config", "/x/jobs/fashion_mnist.yaml"] and overrides == ["data.limit=500"]


def test_stream_bench_measures_every_path_on_real_jpegs_and_renders_them(ray_session, tmp_path):
    """stream.py's ingest rounds on a small photo-like JPEG folder, on the session Ray: the stream
    as one worker reads it and as several do (streaming_split), and the DataLoader, with and
    without the device transform; then the tables they fill. The unpaced path once, for its
    image count."""
    from benchmarks import common, stream
    from emergence_ray.data import pipeline

    folder = stream.make_folder(tmp_path / "jpegs", 120)
    train_images = pipeline.load_raw(stream._data_cfg(folder)).train.count  # 5% validation, 5% test held out
    assert 100 <= train_images < 120
    measure = stream.ingest_paths(folder, procs=1, limit_s=20, batch=16)
    # the same code as ray_split unpaced, as ray with 1 CPU held, with one call per decode actor
    # and with the decode actors at the consumer's nice value: checked in one pass below
    for k in ("ray_unpaced", "ray_held", "ray_held_serial", "ray_unniced", "ray_split_unniced", "ray_held_unniced",
              "ray_one_decode", "ray_held_one_decode"):
        del measure[k]
    res = {"command": "python benchmarks/stream.py --decode-repeats 1", "machine": common.machine_info(),
           "first_step": {}, "ingest": stream.ingest_rounds(measure, 1, True, 120, 1, warmup=False),
           "decode_only": stream.ingest_rounds(measure, 1, False, 120, 1, warmup=False)}
    for section in ("ingest", "decode_only"):
        runs = res[section]["runs"]
        assert set(runs) == {"ray", "ray_split", "loader"}
        for r in runs.values():
            assert r["images_per_s"][0] > 0 and r["with_start_images_per_s"][0] > 0
            assert r["first_batch_s"][0] > 0
            # where the CPU went: some of this machine's cores, and every image cost the machine at
            # least what it cost the consuming process (less /proc/stat's tick granularity)
            assert 0 < r["cores_busy"][0] <= os.cpu_count() + 0.05
            assert r["cpu_ms_per_image"][0] >= 0.8 * r["consumer_cpu_ms_per_image"][0] > 0
        assert res[section]["ratio"]["loader"] == 1.0
    import ray.util

    before = set(ray.util.placement_group_table())
    one = stream.ray_stream_rate(folder, limit_s=20, batch=16, transform=False, split=True, paced=False,
                                 hold_cpus=1, calls_per_actor=1, niced=False, decodes=1)
    assert one["images"] == train_images - 16  # all but the first batch, each image once
    held = {k: v for k, v in ray.util.placement_group_table().items() if k not in before}
    assert [v["bundles"] for v in held.values()] == [{0: {"CPU": 1.0}}]  # one CPU held for the pass,
    assert all(v["state"] == "REMOVED" for v in held.values())  # and given back
    text = stream.render(res)
    ratio = res["ingest"]["ratio"]["ray"]
    pair = res["ingest"]["pair_ratios"]["ray"][0]
    assert (f"Ratio as shipped / DataLoader: {ratio:.2f} (medians); within each round {pair:.2f} (median), "
            f"{pair:.2f} to {pair:.2f}, at or above 1.0 in {int(pair >= 1.0)} of 1 rounds (target >= 1.0).") in text
    res["consumer_threads"] = 1
    assert "device transform on 1 torch thread(s), as a training worker" in stream.render(res)
    assert "## Decode alone (120 images, 1 CPU processes each, no device transform)" in text
    assert text.count("| the same through streaming_split, as shipped for each") == 2
    assert text.count("| torch DataLoader (num_workers=1") == 2
    loader = res["ingest"]["runs"]["loader"]
    assert text.count("| path | cores in use | CPU ms per image | consumer's CPU ms per image |") == 2
    assert (f"| `loader` | {loader['cores_busy'][0]:.2f} | {loader['cpu_ms_per_image'][0]:.3f} | "
            f"{loader['consumer_cpu_ms_per_image'][0]:.3f} |") in text
    ing = res["ingest"]  # the held path's row and line, from the one-worker figures
    ing["runs"]["ray_held"], ing["ratio"]["ray_held"] = ing["runs"]["ray"], ing["ratio"]["ray"]
    ing["pair_ratios"]["ray_held"] = ing["pair_ratios"]["ray"]
    text = stream.render(res)
    assert "holding 1 of Ray's CPUs as a training worker holds its own: the decode pool gets the other 1" in text
    assert (f"The service's pool on this node / DataLoader: {ratio:.2f} (medians); within each round {pair:.2f} "
            f"(median), {pair:.2f} to {pair:.2f}, at or above 1.0 in {int(pair >= 1.0)} of 1 rounds.") in text
    ing["runs"]["ray_unniced"] = {k: [2 * x for x in v] for k, v in ing["runs"]["ray"].items()}
    ing["ratio"]["ray_unniced"], ing["pair_ratios"]["ray_unniced"] = 2 * ratio, [2 * pair]
    text = stream.render(res)
    assert "| Ray Data stream for one worker, its decode actors' threads at the consumer's nice value" in text
    assert ("Decode actors below the consumer (`data.decode_niceness`) / at its nice value, within each round: "
            "`ray` 0.50.") in text
    for part in ("runs", "ratio", "pair_ratios"):
        ing[part]["ray_one_decode"] = ing[part]["ray_unniced"]
    text = stream.render(res)
    assert "| Ray Data stream for one worker, each decode actor decoding one batch at a time" in text
    assert "Two decodes per actor (as shipped) / one, within each round: `ray` 0.50." in text
    res["ingest_from"] = {"command": "python benchmarks/stream.py --skip-first-step", "git_revision": "abc1234",
                          "date": "2026-12-05"}
    assert ("From an earlier run: `python benchmarks/stream.py --skip-first-step` at git "
            "`abc1234`, 2026-12-05.") in stream.render(res)


def test_stream_bench_rounds_reverse_the_order_of_the_paths_every_other_round():
    """No path always runs right after the same one: each follows and precedes the others alike."""
    from benchmarks import stream

    order: list[str] = []

    def path(name: str):
        def run(transform: bool, seconds: float = 1.0) -> dict:
            order.append(name)
            return {"images_per_s": 10.0, "with_start_images_per_s": 9.0, "first_batch_s": 0.1, "cores_busy": 2.0,
                    "cpu_ms_per_image": 1.5, "consumer_cpu_ms_per_image": 0.7}
        return run

    res = stream.ingest_rounds({k: path(k) for k in ("ray", "ray_held", "loader")}, 3, True, 100, 2)
    assert order == ["ray", "ray_held", "loader",  # the untimed warm-up pass
                     "ray", "ray_held", "loader", "loader", "ray_held", "ray", "ray", "ray_held", "loader"]
    assert res["pair_ratios"]["ray"] == [1.0, 1.0, 1.0]


def test_allocator_bench_renders_its_rounds_against_glibcs_defaults():
    from benchmarks import allocator

    res = {"command": "python benchmarks/allocator.py --rounds 2", "machine": common.machine_info(), "steps": 4,
           "env": {"MALLOC_ARENA_MAX": "1"}, "main_thread": False,
           "step_s": {"glibc_default": [2.6, 2.8], "keep": [1.3, 1.5]}}
    text = allocator.render(res)
    assert "Command: `python benchmarks/allocator.py --rounds 2`" in text
    assert "| glibc's defaults | 2.60, 2.80 | 2.70 | 1.00x faster |" in text
    assert "| one arena, large freed blocks kept (`MALLOC_ARENA_MAX=1`) | 1.30, 1.50 | 1.40 | 1.93x faster |" in text
    assert "thread other than the worker's main thread: yes" in text


def test_decode_bench_compares_identical_outputs_and_renders(tmp_path):
    from benchmarks import decode, stream

    folder = stream.make_folder(tmp_path / "jpegs", 12)
    res = {"command": "python benchmarks/decode.py --images 12 --rounds 2", "machine": common.machine_info(),
           "decode": decode.measure(folder, 12, 2)}
    assert res["decode"]["identical_output"] and res["decode"]["images"] == 12
    assert all(len(v) == 2 and min(v) > 0 for v in res["decode"]["runs"].values())
    text = decode.render(res)
    assert "Command: `python benchmarks/decode.py --images 12 --rounds 2`" in text
    assert "Outputs identical: yes" in text and "Former / shipped:" in text


def test_transform_bench_compares_identical_outputs_under_both_allocators_and_renders(tmp_path):
    from benchmarks import stream, transform

    folder = stream.make_folder(tmp_path / "jpegs", 8)
    res = {"command": "python benchmarks/transform.py --images 8 --rounds 2", "machine": common.machine_info(),
           "allocators": {a: transform.in_subprocess(a, folder, 8, 2) for a in transform.ALLOCATORS}}
    res["images"] = res["allocators"]["glibc"]["images"]
    assert res["images"] == 8
    for r in res["allocators"].values():
        assert set(r["cases"]) == set(transform.CASES)
        for c in r["cases"].values():
            assert c["identical_output"] and all(len(v) == 2 and min(v) > 0 for v in c["runs"].values())
    text = transform.render(res)
    assert "Command: `python benchmarks/transform.py --images 8 --rounds 2`" in text
    assert "| the training worker's kept freed memory (`scaling.keep_freed_memory`) | imagenet policy, training" in text
    assert "| NO |" not in text and text.count("| yes |") == 6


@pytest.mark.slow  # ~40 s: two CLI runs; the driver's allocator setting stays in test_units' default run
def test_evaluate_bench_runs_the_cli_both_ways_and_renders(tmp_path):
    from benchmarks import evaluate_bench, predict_bench, stream

    folder = stream.make_folder(tmp_path / "jpegs", 60)  # 6 per class: every class keeps training images
    ckpt = predict_bench.make_checkpoint(tmp_path, folder)
    res = {"command": "python benchmarks/evaluate_bench.py --images 60 --rounds 1", "machine": common.machine_info(),
           "images": 60, "runs": {}}
    for k, (_, extra) in evaluate_bench.VARIANTS.items():
        got = evaluate_bench.evaluate_run(ckpt, folder, tmp_path / f"eval-{k}", extra)
        assert 6 <= got["images"] <= 18 and got["images_per_s"] > 0  # the seeded 20% test split of 60
        assert got["images"] == res.get("test_images", got["images"])  # the same split both ways
        res["runs"][k], res["test_images"] = [got["images_per_s"]], got["images"]
    text = evaluate_bench.render(res)
    assert "Command: `python benchmarks/evaluate_bench.py --images 60 --rounds 1`" in text
    assert "| glibc's defaults (`scaling.keep_freed_memory=false`, as before) |" in text and "**1.00x** |" in text


def test_epoch_start_bench_runs_both_starts_of_the_embedded_ray_and_renders_them(tmp_path):
    """epoch_start.py end to end on a small JPEG folder: each configuration in its own process with
    its own embedded Ray (one round, two passes each: one timed), then the table and the line."""
    from conftest import cli_env

    proc = subprocess.run([sys.executable, "benchmarks/epoch_start.py", "--rounds", "1", "--passes", "2",
                           "--images", "120", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "EPOCH_START.json").read_text())
    assert set(res["runs"]) == {"inherited", "runtime_env"}
    for rounds in res["runs"].values():
        assert len(rounds) == 1 and len(rounds[0]) == 1 and 0 < rounds[0][0] < 60
    text = (tmp_path / "out" / "EPOCH_START.md").read_text()
    assert "Command: `python benchmarks/epoch_start.py --rounds 1 --passes 2 --images 120`" in text
    assert "| as shipped: the workers' environment variables inherited from the raylet" in text
    assert "As shipped, the first batch comes" in text
