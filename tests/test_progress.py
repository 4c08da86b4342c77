"""The progress display and the per-epoch overhead: the CLI in a pseudo-terminal (bar and log lines
never share a line, no Ray warning), the run's own records (median per-epoch overhead well under
a second), and the pieces without Ray (rank 0's progress file, the bar's position, the log guard,
no bar without a terminal)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import statistics
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from conftest import CLI, cli_env
from emergence_ray import logs, progress

BAR = re.compile(r"\d+%\|[^|]*\|\s*[\d.]+/\d+|^\[[# ]{10,}\]")  # tqdm's bar, or the old hand-drawn one
LOG = re.compile(r"\((RayTrainWorker|TrainController|\w+) pid=\d+|train_loss|test accuracy|data: \{")
RAY_WARNING = re.compile(r"\bWARNING\b|\bWarning:|\bwarnings?\.warn|UserWarning|DeprecationWarning")


def run_in_pty(cmd: list[str], env: dict, timeout: float, cols: int = 120) -> tuple[int, str]:
    """Run `cmd` with stdin/stdout/stderr on a pseudo-terminal of `cols` columns (a pty without a
    size has 0, and tqdm then draws nothing); returns its exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the pty
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{cmd} ran past {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
    finally:
        os.close(master)
    return proc.wait(), out.decode(errors="replace")


def screen_lines(raw: str) -> list[str]:
    """The lines a terminal shows for `raw`: carriage returns move to the line's start and later
    characters overwrite earlier ones; colour codes are dropped."""
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    lines, row, col = [], [], 0
    for ch in raw:
        if ch == "\n":
            lines.append("".join(row).rstrip())
            row, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(row):
                row[col] = ch
            else:
                row.append(ch)
            col += 1
    lines.append("".join(row).rstrip())
    return [line for line in lines if line]


def epoch_overheads(metrics: list[dict]) -> list[float]:
    """Per epoch after the first: wall time between rank 0's records minus its training and
    validation time, i.e. what reporting, checkpointing and Ray Train's controller cost."""
    return [b["elapsed_s"] - a["elapsed_s"] - b["train_s"] - b["val_s"] for a, b in zip(metrics, metrics[1:])]


def test_cli_in_a_terminal_keeps_bar_and_log_lines_apart_and_short_epochs_cost_little(ray_session, tmp_path):
    """The built-in job, 10 epochs, on the session Ray, in a pseudo-terminal."""
    cmd = [*CLI, "train", "--address", ray_session, "--set", "train.epochs=10",
           "--set", f"run.storage_path={tmp_path}", "--set", "run.name=tty"]
    code, raw = run_in_pty(cmd, cli_env(), timeout=600)
    assert code == 0, raw[-3000:]
    shown = screen_lines(raw)
    assert any(BAR.search(line) for line in shown), f"no progress bar drawn:\n{raw[-3000:]}"
    mixed = [line for line in shown if BAR.search(line) and LOG.search(line)]
    assert not mixed, "bar and log text on one line:\n" + "\n".join(mixed[:5])
    assert any(re.search(r"epoch 10/10 +train_loss", line) for line in shown), "\n".join(shown[-20:])
    warnings = [line for line in shown if RAY_WARNING.search(line)]
    assert not warnings, "warnings on a normal run:\n" + "\n".join(warnings[:5])
    assert shown[-1] == str(tmp_path / "tty"), shown[-3:]

    metrics = [json.loads(x) for x in (tmp_path / "tty" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    over = epoch_overheads(metrics)
    # Ray Train's default 2 s controller poll made this ~1.8 s per epoch (benchmarks/EPOCH_OVERHEAD.md)
    assert statistics.median(over) < 0.5, f"per-epoch overheads {over}"


def test_rank_progress_writes_within_an_epoch_and_always_its_last_step(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    rank = progress.RankProgress(str(tmp_path), total_epochs=3, steps_per_epoch=10, log_every_s=1e9)
    path = tmp_path / progress.PROGRESS_FILE
    seen = []
    for epoch in range(2):
        rank.epoch = epoch
        for step in range(10):
            rank.step(step)
            seen.append(json.loads(path.read_text())["step"])
            clock[0] += 0.1  # 10 steps a second: a write every third step, and each epoch's last
    assert seen[:10] == [1, 1, 1, 4, 4, 4, 7, 7, 7, 10], seen
    assert json.loads(path.read_text()) == {"epoch": 1, "epochs": 3, "step": 10, "steps": 10}
    assert progress.bar_position(json.loads(path.read_text())) == (20, 30, "epoch 2/3")
    assert not list(tmp_path.glob("*.tmp")), "the atomic write left its temporary file"


def test_read_progress_ignores_a_missing_or_partial_file(tmp_path):
    path = tmp_path / progress.PROGRESS_FILE
    assert progress.read_progress(str(path)) is None
    path.write_text('{"epoch": 1, "epo')
    assert progress.read_progress(str(path)) is None
    path.write_text('{"epoch": 1}')
    assert progress.read_progress(str(path)) is None


def test_log_lines_are_written_between_the_guards_calls(capsys):
    logs.setup_logging()
    calls = []
    with logs.set_output_guard(lambda: calls.append("hide"), lambda: calls.append("show")):
        logging.getLogger("emergence_ray").info("a line")
    logging.getLogger("emergence_ray").info("after")
    assert calls == ["hide", "show"]
    assert capsys.readouterr().out == "a line\nafter\n"


def test_no_bar_without_a_terminal_and_plain_worker_lines(tmp_path, capfd, monkeypatch):
    """Under pytest stdout and stderr are not terminals: nothing is drawn, and Ray is told to
    print forwarded worker lines without colour codes."""
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    (tmp_path / progress.PROGRESS_FILE).write_text(json.dumps({"epoch": 0, "epochs": 2, "step": 3, "steps": 5}))
    with progress.display(str(tmp_path)):
        time.sleep(2 * progress.POLL_S)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert os.environ.get("RAY_COLOR_PREFIX") == "0"


@pytest.mark.parametrize("path", ["s3://bucket/runs/x"])
def test_no_bar_for_remote_run_directories(path):
    assert progress.wants_bar(path) is False


def test_quieted_loggers_exist_in_the_installed_ray():
    """logs.QUIETED names Ray modules by their logger names; a rename would bring the warnings
    back silently (the pty test above would catch it too, slower)."""
    import importlib.util

    for name in logs.QUIETED:
        assert importlib.util.find_spec(name) is not None, f"{name} is gone from this Ray; update logs.QUIETED"


def test_train_env_defaults_keep_a_users_value(monkeypatch):
    from emergence_ray import cluster

    monkeypatch.delenv(cluster.HEALTH_CHECK_INTERVAL, raising=False)
    cluster.train_env_defaults()
    assert os.environ[cluster.HEALTH_CHECK_INTERVAL] == cluster.POLL_S
    monkeypatch.setenv(cluster.HEALTH_CHECK_INTERVAL, "1.5")
    cluster.train_env_defaults()
    assert os.environ[cluster.HEALTH_CHECK_INTERVAL] == "1.5"


def test_ray_train_still_reads_the_poll_interval_from_the_controllers_environment():
    """The mechanism depends on Train propagating RAY_TRAIN_HEALTH_CHECK_INTERVAL_S from the
    process calling fit() to its controller; fail loudly if a Ray upgrade drops it."""
    from ray.train.v2._internal import constants

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR in constants.ENV_VARS_TO_PROPAGATE


def test_shipped_cluster_configs_set_the_poll_interval():
    from emergence_ray import cluster

    root = Path(__file__).resolve().parents[1]
    want = f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={cluster.POLL_S}"
    assert f"--env {want}" in (root / "cluster" / "gpu-cluster.yaml").read_text()
    assert f"ENV {want}" in (root / "docker" / "Dockerfile").read_text()
    import yaml

    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (root / "cluster" / "kuberay" / name).read_text()
        envs = [e for doc in yaml.safe_load_all(text) for e in _container_envs(doc)]
        assert envs and all(e.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") == cluster.POLL_S for e in envs), name


def _container_envs(node) -> list[dict]:
    """{name: value} of every container that has an env list, anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        if "image" in node and "env" in node:
            found.append({e["name"]: e.get("value") for e in node["env"]})
        for v in node.values():
            found += _container_envs(v)
    elif isinstance(node, list):
        for v in node:
            found += _container_envs(v)
    return found
