"""Failures with a real Ray: a worker killed by pid, a node removed, an elastic shrink, a killed
driver, a killed sweep worker. Training resumes from the last committed checkpoint and the
metrics history has every epoch exactly once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, ROOT, cli_env


def _epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, f"process ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    run_dir = tmp_path / "w"
    cmd = [*CLI, "train", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=w", "--set", "train.epochs=6",
           "--set", "data.limit=800", "--set", "run.max_failures=2"]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env(RAY_ADDRESS=ray_session))
    _wait(lambda: len(_epochs(run_dir)) >= 2 and (run_dir / "workers.json").exists(), proc, 240, "two epochs")
    victim = next(w for w in json.loads((run_dir / "workers.json").read_text()) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)  # mid-run, from outside, like an OOM kill
    assert proc.wait(timeout=600) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    out = (tmp_path / "log.txt").read_text()
    assert "resuming from epoch" in out
    assert _epochs(run_dir) == list(range(1, 7))
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 6
    restarted = json.loads((run_dir / "workers.json").read_text())
    assert victim["pid"] not in {w["pid"] for w in restarted}


@pytest.mark.parametrize("scenario", ["node-failure", "elastic"])
def test_node_removed_mid_run(scenario, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_scenarios.py"), scenario, str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=cli_env(), cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["removed_at_epoch"], result
    assert "error" not in result["outcome"], result["outcome"]
    assert result["epochs"] == list(range(1, 7)), result["epochs"]
    assert result["summary"]["epochs"] == 6
    after = result["workers_after"]
    assert all(w["node_id"] != result["removed_node"] for w in after)
    if scenario == "elastic":
        assert len(result["workers_before"]) == 2 and len(after) == 1  # finished on fewer workers
    else:
        assert len(after) == 2


def test_killed_driver_resumes_within_noise_of_uninterrupted(ray_session, tmp_path):
    """Kill the driver part-way; the same command resumes from the last checkpoint (not epoch 0)
    and ends within run-to-run noise of an uninterrupted run. A finished run is then refused,
    and `evaluate` re-scores its checkpoint into a new folder."""
    base = ["train", "--set", f"run.storage_path={tmp_path}", "--set", "train.epochs=6", "--set", "data.limit=1000"]
    env = cli_env(RAY_ADDRESS=ray_session)
    # the uninterrupted run trains beside the interrupted one (the comparison is of accuracy, not time)
    straight = subprocess.Popen([*CLI, *base, "--set", "run.name=straight"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
    cmd = [*CLI, *base, "--set", "run.name=cut"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _wait(lambda: len(_epochs(tmp_path / "cut")) >= 3, first, 240, "three epochs")
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # let Ray release the dead driver's actors and placement group
    assert not (tmp_path / "cut" / "summary.json").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    _, straight_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, straight_err[-3000:]
    assert int(out.split("resuming from epoch ")[1].split()[0]) >= 2, out[-2000:]
    assert _epochs(tmp_path / "cut") == list(range(1, 7))  # no gap, no duplicate
    summary = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in ("straight", "cut")}
    assert summary["cut"]["epochs"] == 6
    acc = {n: s["test_accuracy"] for n, s in summary.items()}
    assert abs(acc["straight"] - acc["cut"]) <= 0.04, acc  # digits runs differ by ~1-2 points seed to seed

    # the refused re-run and `evaluate` (which only reads the finished run) run side by side
    third = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ev = subprocess.run([*CLI, "evaluate", "--checkpoint", summary["cut"]["checkpoint"], "--output",
                         str(tmp_path / "eval")], capture_output=True, text=True, env=env, timeout=300)
    _, third_err = third.communicate(timeout=300)
    assert third.returncode == 2 and "already finished" in third_err

    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ev.stdout.strip().splitlines()[-1] == str(tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["test_accuracy"] == pytest.approx(acc["cut"])


def test_killed_sweep_worker_trial_continues(ray_session, tmp_path):
    cmd = [*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_digits.yaml"), "--set", f"run.storage_path={tmp_path}",
           "--set", "run.name=sw", "--set", "tune.scheduler.name=none", "--set", "train.epochs=5",
           "--set", "run.max_failures=2", "--set", "tune.lr.grid=[0.003]",
           "--set", "tune.weight_decay.grid=[0.0, 0.001]"]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env(RAY_ADDRESS=ray_session))
    trials = tmp_path / "sw" / "trials"

    def running_trial():
        for d in trials.iterdir():
            if (d / "workers.json").exists() and len(_epochs(d)) >= 2:
                return d
        return None

    _wait(lambda: running_trial() is not None, proc, 400, "a trial at epoch 2")
    victim_dir = running_trial()
    victim = json.loads((victim_dir / "workers.json").read_text())[0]
    os.kill(victim["pid"], signal.SIGKILL)
    assert proc.wait(timeout=900) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    with open(tmp_path / "sw" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" and r["epochs_run"] == "5" for r in rows), rows
    assert _epochs(victim_dir) == [1, 2, 3, 4, 5]
    assert json.loads((victim_dir / "workers.json").read_text())[0]["pid"] != victim["pid"]
