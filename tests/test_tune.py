"""Sweeps over the same training job with a real local Ray: ASHA stops bad trials, best.json
names the best trial, and an interrupted sweep resumes without re-running finished trials."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, ROOT, cli_env
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


def test_sweep_job_runs_asha_and_picks_the_best(ray_session, tmp_path):
    """jobs/sweep_digits.yaml through the CLI: 4 trials, 2 at a time on 2 CPUs."""
    proc = subprocess.run([*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_digits.yaml"),
                           "--set", f"run.storage_path={tmp_path}", "--set", "run.name=sweep",
                           "--set", "train.epochs=3"],  # ASHA's rungs stay at epochs 1 and 2
                          capture_output=True, text=True, env=cli_env(RAY_ADDRESS=ray_session), timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep_dir = tmp_path / "sweep"
    assert proc.stdout.strip().splitlines()[-1] == str(sweep_dir)
    rows = _rows(sweep_dir)
    assert len(rows) == 4
    assert any(r["stopped_early"] == "True" for r in rows), rows
    best = json.loads((sweep_dir / "best.json").read_text())
    top = max(rows, key=lambda r: float(r["best_val_metric"] or -1))
    assert best["trial_id"] == top["trial_id"]
    assert best["value"] == pytest.approx(float(top["best_val_metric"]))
    assert Path(best["checkpoint"], "checkpoint.pt").is_file()
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5 and (sweep_dir / "report.json").is_file()
    assert (sweep_dir / "sweep.png").stat().st_size > 1000
    # the table is printed sorted by the metric
    assert "best val_accuracy" in proc.stdout


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    cmd = [*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_digits.yaml"), "--set", f"run.storage_path={tmp_path}",
           "--set", "run.name=sweep", "--set", "tune.scheduler.name=none", "--set", "tune.max_concurrent_trials=1",
           "--set", "train.epochs=2"]
    # Tune saves its experiment state every ~10 s by default; every second here. The driver is killed
    # once a saved state records two trials as finished (they must not run again after the restore).
    env = cli_env(RAY_ADDRESS=ray_session, TUNE_GLOBAL_CHECKPOINT_S="1")
    first = subprocess.Popen(cmd, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, env=env)
    trials = tmp_path / "sweep" / "trials"
    deadline = time.monotonic() + 400
    finished: set[str] = set()
    while time.monotonic() < deadline and first.poll() is None:
        finished = {f"sweep-{t}" for t in _saved_terminated(tmp_path / "sweep")}
        if len(finished) >= 2:
            break
        time.sleep(0.5)
    assert first.poll() is None and len(finished) >= 2, (tmp_path / "first.log").read_text()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)
    assert all(len((trials / name / "metrics.jsonl").read_text().splitlines()) == 2 for name in finished)
    mtimes = {name: (trials / name / "metrics.jsonl").stat().st_mtime for name in finished}

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "resuming sweep" in second.stdout + second.stderr
    rows = _rows(tmp_path / "sweep")
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    for name in finished:  # finished trials were not trained again
        assert (trials / name / "metrics.jsonl").stat().st_mtime == mtimes[name]
