"""End to end through the real CLI: the README's main job, ImageFolder and Parquet digits,
resume after the driver is killed part-way, and `evaluate` on a finished run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, cli_env


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


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_digits_from_files_reach_93_percent(source, ray_session, tmp_path, request):
    path = request.getfixturevalue(f"digits_{source}")
    from emergence_ray.config import load_config
    from emergence_ray.trainer import train

    cfg = load_config(None, [f"data.source={source}", f"data.path={path}", f"run.storage_path={tmp_path}",
                             f"run.name={source}"])
    run_dir = Path(train(cfg))
    summary = _summary(run_dir)
    assert summary["test_accuracy"] >= 0.93, summary


def _wait_for_epochs(path: Path, n: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError(f"no {n} epochs in {timeout}s")


def test_killed_driver_resumes_from_last_checkpoint(ray_session, tmp_path):
    cmd = [*CLI, "train", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=resume",
           "--set", "train.epochs=8", "--set", "data.limit=800"]
    env = cli_env(RAY_ADDRESS=ray_session)
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env)
    metrics = tmp_path / "resume" / "metrics.jsonl"
    _wait_for_epochs(metrics, 3, first, timeout=240)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # let Ray release the dead driver's actors and placement group
    assert not (tmp_path / "resume" / "summary.json").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    resumed_from = int(out.split("resuming from epoch ")[1].split()[0])
    assert resumed_from >= 2, out[-2000:]
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, 9))  # no gap, no duplicate
    assert _summary(tmp_path / "resume")["epochs"] == 8

    # a finished run is never overwritten
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 2 and "already finished" in third.stderr

    # evaluate the run's checkpoint alone, into a new folder
    ckpt = _summary(tmp_path / "resume")["checkpoint"]
    ev = subprocess.run([*CLI, "evaluate", "--checkpoint", ckpt, "--output", str(tmp_path / "eval")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert _last_line(ev.stdout) == str(tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["test_accuracy"] == pytest.approx(
        json.loads((tmp_path / "resume" / "report.json").read_text())["test_accuracy"])
