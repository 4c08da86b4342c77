"""Jobs on a real local cluster started with `ray start --head` (free ports, own temp dir):
`ray job submit` and `JobSubmissionClient`, the sweep job, and two nodes sharing storage.
Each cluster fixture stops exactly the processes its cluster started."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

LOCAL_CLUSTER = [sys.executable, str(ROOT / "cluster" / "local_cluster.py")]


@contextlib.contextmanager
def _local_cluster(workers: int):
    """Start a head (+ `workers` nodes); yield its state; stop it and check nothing it started is left."""
    # short: Ray's unix socket paths under the temp dir must stay under ~107 characters
    directory = Path(tempfile.mkdtemp(prefix="erc-", dir="/tmp"))
    proc = subprocess.run([*LOCAL_CLUSTER, "start", "--dir", str(directory), "--workers", str(workers),
                           "--cpus", "2"], capture_output=True, text=True, timeout=240, env=cli_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = json.loads((directory / "cluster.json").read_text())
    try:
        yield state
    finally:
        subprocess.run([*LOCAL_CLUSTER, "stop", "--dir", str(directory)], timeout=120, env=cli_env())
        shutil.rmtree(directory, ignore_errors=True)
        assert not [p for p in state["pids"] if Path(f"/proc/{p}").exists()
                    and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()], "cluster processes left running"


@pytest.fixture(scope="module")
def head_cluster():
    """A head-only cluster for the slow sweep job test. (On a 2-node cluster of 2 CPUs each, the
    sweep job was once seen waiting forever: its plan counted the cluster's CPUs, not a node's, and
    gave each 1-worker trial a whole CPU. With the two trials' workers on different nodes, no node
    had a whole CPU left for a Ray Data task. The plan now counts per node:
    test_sweep_plan_counts_the_cpus_of_a_node.)"""
    with _local_cluster(0) as state:
        yield state


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and one worker node, 2 CPUs each, shared by this module's default tests (jobs run
    one after another on it, as on a real cluster)."""
    with _local_cluster(1) as state:
        yield state


CLIENT_SCRIPT = """
import time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient({dashboard!r})
job_id = client.submit_job(entrypoint={entrypoint!r}, runtime_env={{"working_dir": {root!r}}})
deadline = time.monotonic() + 800
while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.monotonic() < deadline, "job did not finish"
    time.sleep(2)
print(status.value)
print(client.get_job_logs(job_id))
"""


def _client_env() -> dict:
    return cli_env(RAY_AUTH_MODE="token")


def _submit(dashboard: str, *entrypoint: str) -> str:
    proc = subprocess.run(["ray", "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
                           *entrypoint], capture_output=True, text=True, timeout=900, env=_client_env(), cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-3000:]
    return proc.stdout


def _run_dir_from(logs: str) -> Path:
    lines = [line for line in logs.splitlines() if line.strip() and not line.startswith(("-", "Job '", "Status"))]
    for line in reversed(lines):
        if line.strip().startswith("/"):
            return Path(line.strip())
    raise AssertionError(f"no run directory in the job output:\n{logs[-2000:]}")


def test_submit_with_cli_and_client(two_node_cluster, tmp_path, digits_idx_gz):
    """The jobs/README.md line (overrides keep CI short; STRICT_SPREAD puts one worker on each
    node, both writing to the same storage), then the Python client, then a refusal without the token."""
    dashboard = two_node_cluster["dashboard"]
    runs = tmp_path / "runs"
    out = _submit(dashboard, "python", "-m", "emergence_ray", "train", "--config", "jobs/digits.yaml",
                  "--set", f"run.storage_path={runs}", "--set", "run.name=cli", "--set", "train.epochs=3",
                  "--set", "scaling.placement_strategy=STRICT_SPREAD")
    run_dir = _run_dir_from(out)
    assert run_dir == runs / "cli"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["test_accuracy"] > 0.8
    workers = json.loads((run_dir / "workers.json").read_text())
    assert len({w["node_id"] for w in workers}) == 2, workers

    # The Python client, in its own process (Ray reads RAY_AUTH_MODE when it is imported), submits
    # the Fashion-MNIST job file, pointed at small digits IDX files.
    client_script = CLIENT_SCRIPT.format(
        dashboard=dashboard, root=str(ROOT),
        entrypoint=f"python -m emergence_ray train --config jobs/fashion_mnist.yaml --set data.path={digits_idx_gz} "
                   f"--set data.class_names=null --set train.epochs=1 --set run.storage_path={runs} "
                   "--set run.name=fmnist")
    proc = subprocess.run([sys.executable, "-c", client_script], capture_output=True, text=True, timeout=900,
                          env=_client_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    status, logs = proc.stdout.split("\n", 1)
    assert status == "SUCCEEDED", logs[-3000:]
    assert _run_dir_from(logs) == runs / "fmnist"
    assert "epoch 1/1" in logs
    assert json.loads((runs / "fmnist" / "summary.json").read_text())["epochs"] == 1

    # without the token the Jobs API refuses
    proc = subprocess.run(["ray", "job", "list", "--address", dashboard], capture_output=True, text=True,
                          timeout=120, env=cli_env(RAY_AUTH_TOKEN_PATH=str(tmp_path / "no-token"),
                                               RAY_AUTH_MODE="token", HOME=str(tmp_path)))
    assert proc.returncode != 0


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # multi-minute: deselected by default (README: -m slow)
def test_submit_asha_sweep_and_resnet_jobs(head_cluster, tmp_path, digits_imagefolder):
    """jobs/sweep_digits.yaml as submitted: 4 trials, 2 at a time on 2 CPUs; ASHA stops some early and
    best.json names the best trial. Then the ResNet-18 job file, pointed at small digits PNGs."""
    dashboard = head_cluster["dashboard"]
    runs = tmp_path / "runs"
    out = _submit(dashboard, "python", "-m", "emergence_ray", "tune", "--config", "jobs/sweep_digits.yaml",
                  "--set", f"run.storage_path={runs}", "--set", "run.name=sweep",
                  "--set", "train.epochs=3")  # ASHA's rungs stay at epochs 1 and 2
    sweep_dir = _run_dir_from(out)
    assert sweep_dir == runs / "sweep"
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
    assert "best val_accuracy" in out  # the table is printed, sorted by the metric

    _submit(dashboard, "python", "-m", "emergence_ray", "train", "--config", "jobs/resnet18_imagefolder.yaml",
            "--set", f"data.path={digits_imagefolder}", "--set", "data.image_size=8", "--set", "model.width=8",
            "--set", "scaling.use_gpu=false", "--set", "train.epochs=1", "--set", "data.limit=256",
            "--set", "train.batch_size=32", "--set", f"run.storage_path={runs}", "--set", "run.name=resnet")
    assert (runs / "resnet" / "summary.json").is_file()


PLAN_SCRIPT = """
import ray
from emergence_ray import cluster
from emergence_ray.config import load_config
from emergence_ray.tune import plan_trials, tune_section
ray.init(address={gcs!r}, logging_level="ERROR")
cfg = load_config("jobs/sweep_digits.yaml")
print(cluster.node_cpus(), *plan_trials(cfg, tune_section(cfg)))
"""


def test_sweep_plan_counts_the_cpus_of_a_node(two_node_cluster):
    # The sweep job's plan on this cluster: 2 trials of 1 worker. By the cluster's total (4 CPUs)
    # each worker would get a whole CPU, and one on each node leaves neither a whole CPU for Ray
    # Data; per node, each gets 0.75.
    plan = subprocess.run([sys.executable, "-c", PLAN_SCRIPT.format(gcs=two_node_cluster["gcs_address"])],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=_client_env())
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert plan.stdout.split()[-5:] == ["[2.0,", "2.0]", "2", "1", "0.75"], plan.stdout
