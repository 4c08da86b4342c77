"""Sweeps over the same training job with a real local Ray: a trial that loses a worker resumes,
and an interrupted sweep resumes without re-running finished trials. (The ASHA sweep job, its
early stops and best.json: test_cluster_jobs.py, submitted as jobs/README.md shows.)"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, ROOT, cli_env, run_epochs, wait_for
from emergence_ray.config import load_config
from emergence_ray.errors import ConfigError
from emergence_ray.tune import TuneSection, tune_section


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def _saved_terminated(sweep_dir: Path) -> set[str]:
    """Trial ids that Tune's newest saved experiment state records as TERMINATED."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):  # being written
        return set()
    return {t["trial_id"] for t in (json.loads(entry[0]) for entry in data) if t.get("status") == "TERMINATED"}


def test_tune_section_validation():
    with pytest.raises(ConfigError, match="tune.lr"):
        tune_section(load_config(None, ["tune.lr.loguniform=[0.1, 0.01]"]))
    with pytest.raises(ConfigError, match="tune.bogus"):
        tune_section(load_config(None, ["tune.bogus=1"]))
    assert TuneSection().scheduler.name == "asha"


def test_killed_trial_worker_and_killed_sweep_driver_both_resume(ray_session, tmp_path):
    """Two trials, one at a time. The first trial loses its training worker (SIGKILL by pid): Train
    restarts it from the trial's last checkpoint and the trial finishes with every epoch once. Then
    the sweep's driver is killed once Tune's saved state records that trial as finished; the same
    command resumes the sweep, runs the other trial and does not train the finished one again."""
    cmd = [*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_digits.yaml"), "--set", f"run.storage_path={tmp_path}",
           "--set", "run.name=sweep", "--set", "tune.scheduler.name=none", "--set", "tune.max_concurrent_trials=1",
           "--set", "train.epochs=4", "--set", "run.max_failures=2", "--set", "tune.lr.grid=[0.003]",
           "--set", "tune.weight_decay.grid=[0.0, 0.001]"]
    # Tune saves its experiment state every ~10 s by default; every second here.
    env = cli_env(RAY_ADDRESS=ray_session, TUNE_GLOBAL_CHECKPOINT_S="1")
    log = tmp_path / "first.log"
    first = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    trials = tmp_path / "sweep" / "trials"

    def running_trial() -> Path | None:
        return next((d for d in trials.iterdir() if (d / "workers.json").exists() and len(run_epochs(d)) >= 1), None)

    wait_for(lambda: running_trial() is not None, first, 400, "a trial at epoch 1", log)
    victim_dir = running_trial()
    victim = json.loads((victim_dir / "workers.json").read_text())[0]
    os.kill(victim["pid"], signal.SIGKILL)  # from outside, like an OOM kill
    finished: set[str] = set()

    def one_finished() -> bool:
        finished.update(f"sweep-{t}" for t in _saved_terminated(tmp_path / "sweep"))
        return len(finished) >= 1

    wait_for(one_finished, first, 400, "a finished trial in Tune's saved state", log)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)
    assert finished == {victim_dir.name}  # one at a time: the finished trial is the one that lost its worker
    assert run_epochs(victim_dir) == [1, 2, 3, 4]  # resumed, no epoch twice
    assert json.loads((victim_dir / "workers.json").read_text())[0]["pid"] != victim["pid"]
    mtime = (victim_dir / "metrics.jsonl").stat().st_mtime

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resuming sweep" in second.stdout + second.stderr
    rows = _rows(tmp_path / "sweep")
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["epochs_run"] == "4" for r in rows), rows
    assert (victim_dir / "metrics.jsonl").stat().st_mtime == mtime  # not trained again
