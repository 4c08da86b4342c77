"""End to end through the real CLI: the README's main job, and ImageFolder and Parquet digits.
(Resuming after a killed driver, and `evaluate`, are in test_failures.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import RUN_ACTORS, can_lower_niceness, cli_env


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_readme_main_job_on_embedded_ray(tmp_path):
    """`emergence-ray train` with no arguments: built-in digits, 2 workers, embedded local Ray."""
    exe = shutil.which("emergence-ray")
    assert exe, "the console script is installed by `pip install -e .`"
    home = tmp_path / "home"
    home.mkdir()
    start = time.monotonic()
    proc = subprocess.run([exe, "train"], capture_output=True, text=True, timeout=600,
                          env=cli_env(HOME=str(home)), cwd=tmp_path)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(_last_line(proc.stdout))
    assert run_dir.parent == home / "emergence-ray-runs"
    summary = _summary(run_dir)
    print(f"README main job: test_accuracy={summary['test_accuracy']:.4f} wall={wall:.0f}s")
    assert summary["test_accuracy"] >= 0.95
    assert summary["epochs"] == 10 and summary["train_images_per_s"] > 0
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "report.json", "classification_report.txt",
                 "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    assert Path(summary["checkpoint"], "checkpoint.pt").is_file()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["emergence_ray_version"] and meta["git_revision"]
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["confusion_matrix"]) == 10 and "macro avg" in report["classification_report"]
    assert "epoch 10/10" in proc.stdout + proc.stderr
    assert "will hang" not in proc.stderr  # the test set is read once the trainer's CPUs are back
    # the embedded Ray starts its workers at nice 0 (RAY_worker_niceness), whoever runs it
    workers = json.loads((run_dir / "workers.json").read_text())
    assert [w["nice"] for w in workers] == [0, 0]
    # 8 px digits: glibc's allocator as it comes (scaling.keep_freed_memory=null turns it on for
    # large images only; tests/test_streaming.py turns it on)
    assert [w["malloc"] for w in workers] == [{}, {}], workers


def test_digits_imagefolder_cached_reaches_93_percent(imagefolder_run):
    """ImageFolder with shards cached in worker memory (data.ingest=auto): conftest.imagefolder_run."""
    summary = _summary(imagefolder_run)
    assert summary["test_accuracy"] >= 0.93, summary
    assert summary["epochs"] == 6
    # cached shards travel as block refs: no Ray Data actors in the trainer, and on this one-node
    # cluster no preemption watcher (each would be one more process waking 100 times a second);
    # a `train` command starts no placement-group cleaner (trainer.Trainer; a sweep does: test_tune)
    actors = RUN_ACTORS["imagefolder"]
    assert "TrainController" in actors and actors.count("RayTrainWorker") == 2, actors
    unwanted = {"DatasetManager", "SplitCoordinator", "PreemptionWatcher", "PlacementGroupCleaner"}
    assert not unwanted & set(actors), actors
    workers = json.loads((imagefolder_run / "workers.json").read_text())
    assert [(w["rank"], w["device"], w["backend"]) for w in workers] == [(0, "cpu", "gloo"), (1, "cpu", "gloo")]
    # Ray starts workers at nice 15; scaling.worker_niceness (default 0) moves them up where permitted
    assert [w["nice"] for w in workers] == [0, 0] if can_lower_niceness() else [15, 15], workers


def test_digits_parquet_streamed_reaches_93_percent(ray_session, digits_parquet, tmp_path, monkeypatch):
    """Parquet, streamed through Ray Data every epoch (data.ingest=stream) to one worker, which
    reads the splits whole (`handoff.TrainSplit`; tests/test_streaming.py covers two workers and
    streaming_split): accuracy, and every training image exactly once per epoch (workers log ids:
    EMERGENCE_RAY_RECORD_IDS)."""
    from emergence_ray.config import load_config
    from emergence_ray.data.handoff import RECORD_IDS_ENV
    from emergence_ray.trainer import train
    from test_streaming import assert_exactly_once, seen_ids

    monkeypatch.setenv(RECORD_IDS_ENV, "1")
    cfg = load_config(None, ["data.source=parquet", f"data.path={digits_parquet}", f"run.storage_path={tmp_path}",
                             "run.name=parquet", "train.epochs=6", "data.ingest=stream", "scaling.num_workers=1"])
    run_dir = Path(train(cfg))
    summary = _summary(run_dir)
    assert summary["test_accuracy"] >= 0.93, summary
    assert summary["ingest"] == "stream" and summary["first_step_s"] > 0
    assert_exactly_once(run_dir, 6, None, world=1, train_count=summary["images"]["train"])
    val = [i for ids in seen_ids(run_dir, "val", 5).values() for i in ids]
    assert len(val) == len(set(val)) == summary["images"]["val"]  # validation: every image, once


def test_embedded_ray_starts_workers_at_nice_0_and_leaves_the_environment_alone(tmp_path):
    code = ("import os, ray\nfrom emergence_ray import cluster\ncluster.connect()\n"
            "probe = ray.remote(lambda: (os.getpriority(os.PRIO_PROCESS, 0), os.environ.get('MALLOC_ARENA_MAX')))\n"
            "nice, arenas = ray.get(probe.remote())\n"
            "print(nice, os.environ.get('RAY_worker_niceness'), arenas)\n"
            "env = ray.remote(lambda: (os.environ.get('RAY_ADDRESS'), os.environ.get('RAY_DATA_LOG_LEVEL'),\n"
            "                          ray.get_runtime_context().runtime_env))\n"
            "print(ray.get_runtime_context().gcs_address, os.environ.get('RAY_ADDRESS'), *ray.get(env.remote()))\n"
            "ray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=cli_env(HOME=str(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a worker other than a training worker keeps glibc's allocator as it comes
    assert proc.stdout.strip().splitlines()[-2] == "0 None None"
    # the workers find this Ray and log quietly through the environment they inherit from its raylet;
    # the driver's own environment is as it was, and the job has no runtime_env (one would send every
    # worker's start through Ray's runtime-env agent)
    gcs, driver_address, worker_address, level, runtime_env = _last_line(proc.stdout).split(" ", 4)
    assert gcs.startswith("127.0.0.1:") and worker_address == gcs and driver_address == "None"
    assert level == "WARNING" and runtime_env == "{}"
    # a value the user set is the one the workers get, and it stays set
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=cli_env(HOME=str(tmp_path), RAY_worker_niceness="5"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2] == "5 5 None"
