"""Experiment tracking against the real things: an MLflow tracking server started here on 127.0.0.1
(SQLite backend store, served artifacts) in a subprocess, and TensorBoard event files read back with
tensorboard's EventAccumulator."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import CLI, ROOT, cli_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# README's tracking-server command, run here as written but for the port and the folder
README_SERVER = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nice -n 19 mlflow server --backend-store-uri "
                 "sqlite:///mlflow.db --artifacts-destination ./mlartifacts --host 127.0.0.1 --port 5000 --workers 1")


def readme_server_command(port: int) -> tuple[dict[str, str], list[str]]:
    """README's server command split into its environment and argv, on `port`."""
    assert README_SERVER in (ROOT / "README.md").read_text(), "README's mlflow server command changed"
    words = shlex.split(README_SERVER)
    env = dict(w.split("=", 1) for w in words[:1])
    argv = words[1:]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("mlflow")] = f"{sys.executable} -m mlflow"  # the mlflow of this interpreter
    return env, shlex.split(" ".join(argv))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` per test session, started with README's command (SQLite backend
    store, artifacts served by the server, niced, its job runner off) in a folder of its own."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    extra_env, cmd = readme_server_command(port)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
                            env={**env, **extra_env})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        tail = (root / "server.log").read_text()[-3000:]
        assert proc.poll() is None and time.monotonic() < deadline, f"mlflow server did not come up\n{tail}"
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, in its own session
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="session")
def tracked_run(ray_session, mlflow_server, tmp_path_factory) -> Path:
    """One tiny training run tracked in the session's MLflow server (mlp, 600 digits, 2 epochs)."""
    from emergence_ray.config import load_config
    from emergence_ray.trainer import train

    storage = tmp_path_factory.mktemp("tracked_runs")
    cfg = load_config(None, ["model.name=mlp", "data.limit=600", "train.epochs=2", "scaling.num_workers=1",
                             f"run.storage_path={storage}", "run.name=tracked", f"tracking.mlflow_uri={mlflow_server}",
                             "tracking.experiment=tests"])
    return Path(train(cfg))


def tensorboard_serves(logdir: Path) -> dict:
    """Run README's `tensorboard --logdir DIR` (on a free port of 127.0.0.1) and return what it
    serves: {run: [scalar tags]}."""
    port = _free_port()
    proc = subprocess.Popen(["tensorboard", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
                if tags:
                    return {run: sorted(t) for run, t in tags.items()}
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_tracked_run_params_metrics_artifacts_and_model_read_back(tracked_run, mlflow_server):
    import mlflow.pytorch
    import torch

    from emergence_ray import checkpoint
    from emergence_ray.report import model_from_state

    record = json.loads((tracked_run / "mlflow.json").read_text())
    assert record["tracking_uri"] == mlflow_server and record["experiment"] == "tests"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # tracking one run never turns it on for the next
    client = _client(mlflow_server)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    # params: the resolved config
    p = run.data.params
    assert (p["model.name"], p["train.epochs"], p["data.limit"], p["run.name"]) == ("mlp", "2", "600", "tracked")
    assert p["tracking.mlflow_uri"] == mlflow_server and float(p["optim.lr"]) == 3e-3
    # per-epoch metrics, equal to metrics.jsonl; final test metrics equal to summary.json
    history = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_accuracy", "lr", "images_per_s"):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == [1, 2], key
        assert [m.value for m in points] == pytest.approx([h[key] for h in history]), key
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
    # artifacts: the reports, the confusion matrix, the config, the weights-only checkpoint
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "classification_report.txt", "confusion_matrix.png", "config.yaml",
            "metrics.jsonl", "summary.json", "checkpoint"} <= names, names
    local = Path(client.download_artifacts(run.info.run_id, "report.json", str(tracked_run.parent / "dl")))
    assert json.loads(local.read_text())["test_accuracy"] == summary["test_accuracy"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    # the logged model is the evaluated checkpoint: same outputs
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # pt2: no unpickling
    finally:
        mlflow.set_tracking_uri(previous)
    ours, spec = model_from_state(checkpoint.load(summary["checkpoint"]))
    x = torch.randn(4, spec.channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        assert torch.allclose(logged(x), ours(x))


def test_tensorboard_events_hold_every_epoch(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    history = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_accuracy",
                     "accuracy/val": "val_accuracy", "lr": "lr", "throughput/images_per_s": "images_per_s"}.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2], tag
        assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-5), tag
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("test/accuracy")] == \
        [(2, round(summary["test_accuracy"], 5))]
    images = acc.Images("test/confusion_matrix")
    assert len(images) == 1 and images[0].width > 100 and images[0].encoded_image_string[:4] == b"\x89PNG"
    # README's command serves them
    served = tensorboard_serves(tracked_run)
    assert list(served) == ["tensorboard"]
    assert {"loss/train", "accuracy/val", "test/accuracy"} <= set(served["tensorboard"])


def test_evaluate_and_predict_take_runs_uri(tracked_run, mlflow_server, ray_session, tmp_path, monkeypatch):
    """The CLI's own dispatch (`cli.run` on parsed arguments), in this process on the session Ray;
    the error paths through the CLI process are in test_unreachable_server_fails_..."""
    from emergence_ray.cli import parser, run
    from emergence_ray.errors import CheckpointError

    record = json.loads((tracked_run / "mlflow.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = run(parser().parse_args(["evaluate", "--checkpoint", f"runs:/{record['run_id']}", "--output",
                                   str(tmp_path / "eval")]))
    report = json.loads((Path(out) / "report.json").read_text())
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert report["test_accuracy"] == summary["test_accuracy"]  # same weights, same test split
    downloaded = Path(report["checkpoint"])
    assert downloaded == tmp_path / "cache" / "emergence-ray" / "mlflow" / record["run_id"] / "checkpoint"
    assert (downloaded / "checkpoint.pt").read_bytes() == (Path(summary["checkpoint"]) / "checkpoint.pt").read_bytes()
    # predict resolves through the same place: an unknown run is refused before anything is written
    preds = tmp_path / "preds.parquet"
    with pytest.raises(CheckpointError, match=f"no MLflow run 0123456789abcdef at {mlflow_server}$"):
        run(parser().parse_args(["predict", "--checkpoint", "runs:/0123456789abcdef", "--output", str(preds)]))
    assert not preds.exists()


def test_unreachable_server_fails_before_anything_with_on_error_fail(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run([*CLI, "train", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=r",
                           "--set", f"tracking.mlflow_uri=http://127.0.0.1:{port}", "--set", "tracking.on_error=fail"],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow tracking server http://127.0.0.1:{port} "
                                                   "cannot be used before training"), proc.stderr
    assert "tracking.on_error=warn" in lines[0] and "Traceback" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no run directory, no Ray started
    # and a checkpoint from a server that cannot be reached: one error line too
    proc = subprocess.run([*CLI, "predict", "--checkpoint", "runs:/abc", "--output", str(tmp_path / "p.csv")],
                          capture_output=True, text=True, env=cli_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
                          timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --checkpoint runs:/abc: MLflow tracking server http://127.0.0.1:{port}")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_with_on_error_warn_warns_once_and_tracks_nothing():
    import logging

    from emergence_ray.config import load_config
    from emergence_ray.tracking import Tracker

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    port = _free_port()
    cfg = load_config(None, [f"tracking.mlflow_uri=http://127.0.0.1:{port}"])
    assert cfg.tracking.on_error == "warn"  # the default
    # on the logger itself: an earlier in-process CLI run (setup_logging) may stop it propagating to root
    logger, records = logging.getLogger("emergence_ray"), Records()
    logger.addHandler(records)
    try:
        tracker = Tracker.connect(cfg)
    finally:
        logger.removeHandler(records)
    warnings = [r.getMessage() for r in records.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: MLflow tracking server http://127.0.0.1:{port}")
    assert "misses this run" in warnings[0]
    assert tracker.uri is None  # the run trains untracked


def test_sweep_parent_and_child_runs(mlflow_server, tmp_path):
    """The calls tune.py makes, without the training: a parent run for the sweep folder, a child run
    per trial folder (as `_trial` starts it), and `finish_sweep` closing both (one FAILED trial)."""
    import yaml

    from emergence_ray.config import load_config, to_dict
    from emergence_ray.tracking import Tracker, start_trial

    cfg = load_config(None, [f"tracking.mlflow_uri={mlflow_server}", "tracking.experiment=sweeps",
                             "tracking.log_model=false", "tune.num_samples=2"])
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    tracker = Tracker.connect(cfg)
    tracker.start(str(sweep_dir), "sw", kind="sweep")
    parent = json.loads((sweep_dir / "mlflow.json").read_text())["run_id"]
    for trial in ("a_00000", "a_00001"):
        trial_dir = sweep_dir / "trials" / f"sw-{trial}"
        trial_dir.mkdir(parents=True)  # as tune._trial makes it: no config.yaml in it
        start_trial(cfg, str(trial_dir), f"sw-{trial}", str(sweep_dir))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint.pt").write_bytes(b"not read: log_model is off")
    (sweep_dir / "summary.json").write_text(json.dumps({"test_accuracy": 0.5, "epochs": 3}))
    rows = [{"trial_id": "a_00000", "status": "TERMINATED", "stopped_early": True},
            {"trial_id": "a_00001", "status": "ERROR", "stopped_early": False}]
    tracker.finish_sweep(str(sweep_dir), rows, str(ckpt))

    client = _client(mlflow_server)
    exp = client.get_experiment_by_name("sweeps")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted((r.info.run_name, r.info.status, r.data.tags["stopped_early"]) for r in children) == [
        ("sw-a_00000", "FINISHED", "true"), ("sw-a_00001", "FAILED", "false")]
    top = client.get_run(parent)
    assert top.info.status == "FINISHED" and top.data.metrics["test_accuracy"] == 0.5
    assert top.data.params["tune.num_samples"] == "2"
    assert {r.data.params["run.name"] for r in children} == {"sw-a_00000", "sw-a_00001"}
    assert {"summary.json", "checkpoint"} <= {a.path for a in client.list_artifacts(parent)}


@pytest.mark.slow
def test_sweep_through_the_cli_is_a_parent_run_with_a_child_per_trial(mlflow_server, ray_session, tmp_path):
    proc = subprocess.run([*CLI, "tune", "--config", str(ROOT / "jobs" / "sweep_digits.yaml"),
                           "--set", f"run.storage_path={tmp_path}", "--set", "run.name=sweep",
                           "--set", "train.epochs=2", "--set", "tune.scheduler.name=none",
                           "--set", "model.name=mlp", "--set", "data.limit=600",
                           "--set", "tune.lr.grid=[0.003]", "--set", "tune.weight_decay.grid=[0.0, 0.001]",
                           "--set", "tracking.experiment=cli-sweeps"],
                          capture_output=True, text=True, timeout=900,
                          env=cli_env(RAY_ADDRESS=ray_session, MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = proc.stdout + proc.stderr
    assert "warning: MLflow" not in out and "MLflow: closed the runs of 2 of 2 trials" in out, out[-3000:]
    sweep_dir = tmp_path / "sweep"
    parent = json.loads((sweep_dir / "mlflow.json").read_text())["run_id"]
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name("cli-sweeps")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    trials = sorted(d.name for d in (sweep_dir / "trials").iterdir())
    assert sorted(r.info.run_name for r in children) == trials and len(trials) == 2
    for child in children:
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if "MLflow" in line or "trial" in line]
        assert child.info.status == "FINISHED", (child.info.run_name, said[-30:])
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1, 2]
        assert child.data.params["optim.weight_decay"] in ("0.0", "0.001")
        # one TensorBoard folder per trial under the sweep folder
        assert list((sweep_dir / "trials" / child.info.run_name / "tensorboard").glob("events.out.tfevents.*"))
    # README's `tensorboard --logdir SWEEP_DIR`: one run per trial, side by side
    # (Tune's own per-trial folders, `_trial_*` with ray/tune/* tags, show beside them)
    served = tensorboard_serves(sweep_dir)
    ours = [run for run in served if run.startswith("trials/")]
    assert sorted(ours) == [f"trials/{t}/tensorboard" for t in trials], served
    assert all({"loss/train", "accuracy/val", "lr"} <= set(served[run]) for run in ours), served
    top = client.get_run(parent)
    best = json.loads((sweep_dir / "best.json").read_text())
    assert top.info.status == "FINISHED" and top.data.metrics["test_accuracy"] == pytest.approx(best["test_accuracy"])
    assert {"trials.csv", "best.json", "model", "checkpoint"} <= {a.path for a in client.list_artifacts(parent)}
    assert not (ROOT / "mlflow.db").exists() and not (ROOT / "mlruns").exists()


@pytest.mark.slow
def test_unreachable_server_with_on_error_warn_trains_untracked_through_the_cli(ray_session, tmp_path):
    port = _free_port()
    proc = subprocess.run([*CLI, "train", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=r",
                           "--set", "model.name=mlp", "--set", "data.limit=600", "--set", "train.epochs=1",
                           "--set", "scaling.num_workers=1"], capture_output=True, text=True, timeout=600,
                          env=cli_env(RAY_ADDRESS=ray_session, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert sum(line.startswith("warning: MLflow tracking server") for line in out.splitlines()) == 1, out[-3000:]
    run_dir = tmp_path / "r"
    assert (run_dir / "summary.json").is_file() and not (run_dir / "mlflow.json").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard regardless


def test_tracking_section_is_validated():
    from emergence_ray.config import load_config
    from emergence_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.on_error"):
        load_config(None, ["tracking.on_error=maybe"])
    with pytest.raises(ConfigError, match="tracking.mlflow_urii: unknown key"):
        load_config(None, ["tracking.mlflow_urii=http://x"])
    cfg = load_config(None, [])
    assert cfg.tracking.tensorboard and cfg.tracking.mlflow_uri is None and cfg.tracking.on_error == "warn"
