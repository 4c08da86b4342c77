"""Failures with a real Ray: a worker killed by pid and then the driver killed (one run), a node
removed, an elastic shrink (a killed sweep worker and a killed sweep driver: test_tune.py).
Training resumes from the last committed checkpoint and the metrics history has every epoch
exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CLI, ROOT, cli_env, error_lines, own_traceback, run_epochs, wait_for


@pytest.mark.slow  # multi-minute: deselected by default (README: -m slow)
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


@pytest.mark.slow  # multi-minute: deselected by default (README: -m slow)
def test_killed_worker_then_killed_driver_resume_within_noise_of_uninterrupted(ray_session, tmp_path):
    """One run loses a training worker (SIGKILL by pid, from outside, like an OOM kill): the group
    restarts and resumes from the last committed checkpoint. The same run then loses its driver;
    the same command resumes from the last checkpoint (not epoch 0) and ends within run-to-run
    noise of an uninterrupted run, with every epoch in the history exactly once. A finished run is
    then refused, and `evaluate` re-scores its checkpoint into a new folder."""
    base = ["train", "--set", f"run.storage_path={tmp_path}", "--set", "train.epochs=6", "--set", "data.limit=1000",
            "--set", "run.max_failures=2"]
    env = cli_env(RAY_ADDRESS=ray_session)
    # the uninterrupted run trains beside the interrupted one (the comparison is of accuracy, not time)
    straight = subprocess.Popen([*CLI, *base, "--set", "run.name=straight"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
    cmd = [*CLI, *base, "--set", "run.name=cut"]
    cut = tmp_path / "cut"
    first_log = tmp_path / "first.log"
    first = subprocess.Popen(cmd, stdout=open(first_log, "w"), stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: len(run_epochs(cut)) >= 2 and (cut / "workers.json").exists(), first, 240, "two epochs")
    victim = next(w for w in json.loads((cut / "workers.json").read_text()) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: "resuming from epoch" in first_log.read_text(), first, 240, "the worker group to restart")
    wait_for(lambda: victim["pid"] not in {w["pid"] for w in json.loads((cut / "workers.json").read_text())},
          first, 60, "the restarted workers")
    wait_for(lambda: len(run_epochs(cut)) >= 4, first, 240, "four epochs")
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # let Ray release the dead driver's actors and placement group
    assert not (cut / "summary.json").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    _, straight_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, straight_err[-3000:]
    assert int(out.split("resuming from epoch ")[1].split()[0]) >= 2, out[-2000:]
    assert run_epochs(cut) == list(range(1, 7))  # no gap, no duplicate, across both failures
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


TINY = ["--set", "model.name=mlp", "--set", "data.limit=600"]  # digits, 2 workers on the session Ray


@pytest.fixture(scope="module")
def interrupted_run(ray_session, tmp_path_factory) -> dict:
    """A run stopped with SIGINT once two epochs are in its metrics, then the same command re-run."""
    root = tmp_path_factory.mktemp("interrupted")
    run = root / "runs" / "cut"
    cmd = [*CLI, "train", *TINY, "--set", "train.epochs=5", "--set", f"run.storage_path={root / 'runs'}",
           "--set", "run.name=cut"]
    env = cli_env(RAY_ADDRESS=ray_session)
    log = root / "first.log"
    first = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: len(run_epochs(run)) >= 2, first, 300, "two epochs", log)
    seen = len(run_epochs(run))  # rank 0 writes an epoch's line once its report is handed to Ray Train
    first.send_signal(signal.SIGINT)
    first.wait(timeout=120)
    state = {"rc": first.returncode, "log": log.read_text(), "seen": seen, "run": run,
             "committed": json.loads((run / "committed.json").read_text()),
             "summary_after_stop": (run / "summary.json").exists()}
    state["second"] = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return state


def test_sigint_ends_the_run_cleanly_and_the_rerun_resumes_from_the_last_finished_epoch(interrupted_run):
    s = interrupted_run
    assert s["rc"] == 130, s["log"][-3000:]
    assert not own_traceback(s["log"]) and not error_lines(s["log"])
    epoch = s["committed"]["epoch"]
    assert [line for line in s["log"].splitlines() if line.startswith("interrupted;")] == [
        f"interrupted; re-run the same command to resume from epoch {epoch}"]
    assert epoch >= s["seen"]  # the epoch in flight at the signal was committed before the driver left
    assert not s["summary_after_stop"]
    second = s["second"]
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"resuming from epoch {epoch} " in out
    assert run_epochs(s["run"]) == [1, 2, 3, 4, 5]


def test_sigterm_to_predict_leaves_no_output(interrupted_run, ray_session, tmp_path):
    ckpt = json.loads((interrupted_run["run"] / "summary.json").read_text())["checkpoint"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    log = tmp_path / "predict.log"
    proc = subprocess.Popen([*CLI, "predict", "--checkpoint", ckpt, "--output", str(out_dir / "preds.parquet"),
                             "--actors", "1"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=cli_env(RAY_ADDRESS=ray_session))
    # predict's own line just before the inference starts executing; the signal lands mid-way
    wait_for(lambda: "predicting with 1 model replica" in log.read_text(), proc, 300, "the inference to start", log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 143, text[-3000:]
    assert not own_traceback(text) and not error_lines(text)
    assert "SIGTERM received" not in text  # no crash dump from Ray's core-worker signal handler
    assert [line for line in text.splitlines() if line.startswith("interrupted")] == [
        "interrupted; no predictions file was written"]
    assert list(out_dir.iterdir()) == []  # neither the file nor its temporary


def test_nonfinite_loss_stops_the_run_with_an_error(ray_session, tmp_path):
    """lr and weight decay each within bounds, together divergent (decoupled decay lr x wd = 100)."""
    proc = subprocess.run([*CLI, "train", *TINY, "--set", "train.epochs=2", "--set", "train.batch_size=8",
                           "--set", "optim.lr=10", "--set", "optim.weight_decay=10", "--set", "optim.schedule=constant",
                           "--set", "optim.warmup_epochs=0", "--set", f"run.storage_path={tmp_path}",
                           "--set", "run.name=nan"],
                          capture_output=True, text=True, env=cli_env(RAY_ADDRESS=ray_session), timeout=600)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert not own_traceback(proc.stderr)
    (line,) = error_lines(proc.stderr)
    assert "the training loss became nan at epoch 1, step " in line and "Lower optim.lr" in line, line
    assert "(e.g. --set optim.lr=1)" in line and "new run.name" in line
    assert not (tmp_path / "nan" / "summary.json").exists()
    assert not list((tmp_path / "nan").glob("checkpoint_*"))  # the diverged epoch was never reported


def test_train_epoch_records_the_first_nonfinite_step():
    """Plain torch: the step is kept on the device during the epoch and read once at its end."""
    import torch

    from emergence_ray.engine import train_epoch
    from emergence_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", 1, 3, 8, 8, 1, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [{"image": torch.randn(4, 1, 8, 8), "label": torch.tensor([0, 1, 2, 0])} for _ in range(5)]
    assert train_epoch(model, batches, opt, None, torch.device("cpu")).nonfinite_step == -1
    batches[3]["image"][0, 0, 0, 0] = float("nan")
    totals = train_epoch(model, batches, opt, None, torch.device("cpu"))
    assert totals.nonfinite_step == 3 and not torch.isfinite(torch.tensor(totals.loss_sum))
