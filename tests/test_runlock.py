"""One driver per run and per sweep: the OS file lock of emergence_ray/runlock.py, alone and
through the real CLI (two drivers started at once on one name, the holder killed with SIGKILL,
a sweep whose folder is held)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, cli_env, error_lines, own_traceback, run_epochs, wait_for
from emergence_ray.errors import RunLockedError
from emergence_ray.runlock import FILENAME, RunLock

TINY = ["--set", "model.name=mlp", "--set", "data.limit=600"]  # digits, 2 workers on the session Ray


def test_second_holder_refused_with_owner_and_free_again_after_release(tmp_path):
    first = RunLock(str(tmp_path / "run"), "run", "run").acquire()
    with pytest.raises(RunLockedError) as err:
        RunLock(str(tmp_path / "run"), "run", "run").acquire()  # another open file: flock conflicts
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(err.value)
    assert "choose another run.name" in str(err.value)
    first.release()
    with RunLock(str(tmp_path / "run")):
        pass
    assert json.loads((tmp_path / "run" / FILENAME).read_text())["pid"] == os.getpid()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    """The kernel drops a dead process's flock: SIGKILL leaves nothing stuck."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from emergence_ray.runlock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, env=cli_env())
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
        RunLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    RunLock(str(tmp_path)).acquire().release()


@pytest.mark.slow  # two trainings; the lock's CLI refusal runs by default in test_sweep_in_use_is_refused
def test_two_drivers_on_one_name_one_runs_then_killed_holder_resumes(ray_session, tmp_path):
    """Two `train` commands on one run.name started together: exactly one trains, the other is
    refused naming it. The holder is then killed with SIGKILL after its first committed epoch; the
    same command then resumes (not refused, not from scratch) and every epoch is there once."""
    cmd = [*CLI, "train", *TINY, "--set", "train.epochs=6", "--set", f"run.storage_path={tmp_path}",
           "--set", "run.name=shared"]
    env = cli_env(RAY_ADDRESS=ray_session)
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    drivers = [subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env) for log in logs]
    run = tmp_path / "shared"
    deadline = time.monotonic() + 300
    while all(d.poll() is None for d in drivers) and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = [i for i, d in enumerate(drivers) if d.poll() is not None]
    assert len(ended) == 1, [log.read_text()[-2000:] for log in logs]
    loser, winner = drivers[ended[0]], drivers[1 - ended[0]]
    text = logs[ended[0]].read_text()
    assert loser.returncode == 2, text[-3000:]
    assert not own_traceback(text)
    (line,) = error_lines(text)
    assert f"run 'shared' is in use by pid {winner.pid} on host {socket.gethostname()}" in line, line

    wait_for(lambda: json.loads((run / "committed.json").read_text())["epoch"] >= 1, winner, 300,
             "a committed epoch", logs[1 - ended[0]])
    winner.send_signal(signal.SIGKILL)
    winner.wait()
    assert not (run / "summary.json").exists()
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = third.stdout + third.stderr
    assert third.returncode == 0, out[-3000:]
    assert "resuming from epoch" in out and not error_lines(out)
    assert run_epochs(run) == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["epochs"] == 6


def test_sweep_in_use_is_refused(ray_session, tmp_path):
    """`tune` on a sweep folder another driver holds: one error line, nothing written there."""
    sweep = tmp_path / "sw"
    with RunLock(str(sweep), "sweep", "sw"):
        before = sorted(p.name for p in sweep.iterdir())
        proc = subprocess.run([*CLI, "tune", *TINY, "--set", f"run.storage_path={tmp_path}", "--set", "run.name=sw",
                               "--set", "tune.num_samples=1"],
                              capture_output=True, text=True, env=cli_env(RAY_ADDRESS=ray_session), timeout=300)
        assert sorted(p.name for p in sweep.iterdir()) == before == [FILENAME]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not own_traceback(proc.stderr)
    (line,) = error_lines(proc.stderr)
    assert f"sweep 'sw' is in use by pid {os.getpid()}" in line, line
    assert not Path(tmp_path, "sw", "tuner.pkl").exists()
