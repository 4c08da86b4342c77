"""Experiment tracking: TensorBoard event files in every run directory, and MLflow when configured
(`tracking.mlflow_uri` or `MLFLOW_TRACKING_URI`; `pip install -e '.[mlflow]'`).

Who writes what:
- rank 0 of the training loop, once per epoch after its report (`EpochLogger.log`): the epoch's
  scalars to `<run dir>/tensorboard/`, and one batched `log_batch` to the MLflow run that the run
  directory records in `mlflow.json` (the driver writes it before training starts);
- the driver (`Tracker`): checks the server before any work (`tracking.on_error`: `warn` trains
  untracked with one warning, `fail` stops with one `error:` line), creates the MLflow run with
  the resolved config as params, and at the end logs the test metrics, the reports, the evaluated
  checkpoint and the model (`mlflow.pytorch`), plus the confusion matrix image to TensorBoard;
- sweeps: the sweep is a parent run (`Tracker.start(..., kind="sweep")`), each trial a child run
  (`start_trial`), closed by `Tracker.finish_sweep`; every trial has its own TensorBoard folder
  under `<sweep dir>/trials/`;
- `resolve_checkpoint` turns `--checkpoint runs:/<run id>` into a local checkpoint directory.

    tensorboard --logdir ~/emergence-ray-runs/RUN     # or a sweep folder: one curve per trial
    emergence-ray train --set tracking.mlflow_uri=http://127.0.0.1:5000
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from emergence_ray import storage
from emergence_ray.config import JobConfig, TrackingConfig
from emergence_ray.errors import CheckpointError, TrackingError

log = logging.getLogger("emergence_ray")

RECORD = "mlflow.json"  # in the run directory: tracking URI, experiment and run id
TB_DIR = "tensorboard"
# TensorBoard tag -> metrics key of the per-epoch report (worker.py); step = epoch
TB_SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_accuracy",
              "accuracy/val": "val_accuracy", "lr": "lr", "throughput/images_per_s": "images_per_s",
              "time/epoch_train_s": "train_s"}
RUN_ARTIFACTS = ("config.yaml", "meta.json", "metrics.jsonl", "summary.json", "report.json",
                 "classification_report.txt", "confusion_matrix.png", "workers.json")
SWEEP_ARTIFACTS = ("config.yaml", "meta.json", "trials.csv", "best.json", "summary.json", "sweep.png",
                   "report.json", "classification_report.txt", "confusion_matrix.png")
FINAL_METRICS = ("test_accuracy", "test_loss", "best_val_accuracy", "final_val_accuracy", "train_images_per_s",
                 "wall_s")


def mlflow_uri(cfg: TrackingConfig) -> str | None:
    return cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _client(uri: str):
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingError(f"MLflow tracking is asked for ({uri}) but mlflow is not installed; "
                            "pip install -e '.[mlflow]', or unset tracking.mlflow_uri / MLFLOW_TRACKING_URI") from None
    # A server that goes away must cost a run seconds, not minutes: MLflow's defaults are 7 retries
    # with exponential backoff and a 120 s timeout per request. The user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return MlflowClient(tracking_uri=uri)


def _probe(uri: str) -> None:
    """One quick GET of an HTTP server's /health, so that a dead server fails in seconds."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            response.read()
    except urllib.error.HTTPError:
        pass  # it answered: reachable (a proxy may not route /health); the API calls decide
    except (OSError, ValueError) as err:
        raise ConnectionError(str(getattr(err, "reason", err))) from None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _trouble(cfg: TrackingConfig, uri: str, err: BaseException, when: str) -> None:
    """A tracking failure: raise (on_error=fail) or warn once (on_error=warn). Never silent."""
    msg = f"MLflow tracking server {uri} cannot be used {when} ({_short(err)})"
    if cfg.on_error == "fail":
        raise TrackingError(f"{msg}; start the server or fix tracking.mlflow_uri / MLFLOW_TRACKING_URI "
                            "(or set tracking.on_error=warn to train without MLflow)") from None
    log.warning("warning: %s; MLflow misses this %s, the run directory keeps every result "
                "(tracking.on_error=fail stops instead)", msg, "run" if "before" in when else "part")


def read_record(run_dir: str) -> dict | None:
    path = storage.join(run_dir, RECORD)
    return storage.read_json(path) if storage.exists(path) else None


def flat_params(node: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, YAML-ish values (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (json.dumps(value) if isinstance(value, list | tuple) else str(value))[:6000]
    return out


class Tracker:
    """The driver's side of one tracked run or sweep. Without MLflow (`uri` None) only TensorBoard."""

    def __init__(self, cfg: TrackingConfig, uri: str | None = None, client: Any = None,
                 experiment_id: str | None = None):
        self.cfg, self.uri, self.client, self.experiment_id = cfg, uri, client, experiment_id
        self.run_id: str | None = None

    @classmethod
    def connect(cls, job: JobConfig) -> Tracker:
        """Check the MLflow server (and its experiment) before any data is read or worker started."""
        uri = mlflow_uri(job.tracking)
        if uri is None:
            return cls(job.tracking)
        client = _client(uri)
        try:
            _probe(uri)
            exp = client.get_experiment_by_name(job.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(job.tracking.experiment)
        except Exception as err:  # noqa: BLE001 - any failure of the server is reported the same way
            _trouble(job.tracking, uri, err, "before training")
            return cls(job.tracking)
        return cls(job.tracking, uri, client, exp_id)

    def start(self, run_dir: str, name: str, kind: str = "train", parent_run_id: str | None = None,
              resolved: dict | None = None) -> None:
        """Create (or, for a resumed run, reopen) the MLflow run and record its id in the run directory.
        Params: `resolved`, by default the resolved config the driver wrote to config.yaml."""
        if self.uri is None:
            return
        record = read_record(run_dir)
        try:
            if record and record["tracking_uri"] == self.uri:
                self.run_id = record["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("MLflow: resuming run %s", self.run_id)
                return
            meta = _json_or_empty(storage.join(run_dir, "meta.json"))
            tags = {"run_dir": run_dir, "emergence_ray.kind": kind,
                    "mlflow.source.git.commit": meta.get("git_revision", "unknown")}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            if resolved is None:
                resolved = yaml.safe_load(storage.read_text(storage.join(run_dir, "config.yaml"))) or {}
            params = [Param(k, v) for k, v in flat_params(resolved).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001
            _trouble(self.cfg, self.uri, err, "before training")
            self.uri = None
            return
        storage.write_json(storage.join(run_dir, RECORD), {
            "tracking_uri": self.uri, "experiment": self.cfg.experiment, "experiment_id": self.experiment_id,
            "run_id": self.run_id, "parent_run_id": parent_run_id})
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, self.cfg.experiment, self.uri)

    def finish_run(self, run_dir: str, checkpoint_dir: str, summary: dict) -> None:
        """End of a training run: test metrics and the confusion matrix to TensorBoard; test metrics,
        reports, the evaluated checkpoint and the model to MLflow; the run marked FINISHED."""
        if self.cfg.tensorboard:
            tensorboard_test(run_dir, summary)
        self._finish(run_dir, checkpoint_dir, summary, RUN_ARTIFACTS, step=summary.get("epochs", 0))

    def finish_sweep(self, sweep_dir: str, rows: list[dict], checkpoint_dir: str) -> None:
        """End of a sweep: close every trial's child run (FINISHED, or FAILED for a trial that
        errored; `stopped_early` tagged), then the parent with the best trial's results and model."""
        if self.uri is None:
            return
        status = {str(r["trial_id"]): r for r in rows}
        trials = storage.join(sweep_dir, "trials")
        closed = []
        try:
            for child in sorted(Path(trials).iterdir()) if not storage.is_uri(trials) else []:
                record = read_record(str(child))
                row = next((r for t, r in status.items() if child.name.endswith(t)), None)
                if record is None or row is None:
                    continue
                self.client.set_tag(record["run_id"], "stopped_early", str(bool(row["stopped_early"])).lower())
                self.client.set_terminated(record["run_id"], "FAILED" if row["status"] == "ERROR" else "FINISHED")
                closed.append(child.name)
        except Exception as err:  # noqa: BLE001
            _trouble(self.cfg, self.uri, err, "after the sweep")
        log.info("MLflow: closed the runs of %d of %d trials (%s)", len(closed), len(rows), ", ".join(closed))
        summary = _json_or_empty(storage.join(sweep_dir, "summary.json"))
        self._finish(sweep_dir, checkpoint_dir, summary, SWEEP_ARTIFACTS, step=summary.get("epochs", 0))

    def _finish(self, run_dir: str, checkpoint_dir: str, summary: dict, names: tuple[str, ...], step: int) -> None:
        if self.uri is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(summary[k]), now, step) for k in FINAL_METRICS
                   if isinstance(summary.get(k), int | float)]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
            with tempfile.TemporaryDirectory(prefix="er-mlflow-") as tmp:
                for n in names:  # through storage: the run directory may be an s3:// / gs:// URI
                    if storage.exists(storage.join(run_dir, n)):
                        Path(tmp, n).write_bytes(_read_bytes(storage.join(run_dir, n)))
                self.client.log_artifacts(self.run_id, tmp)
            self.client.log_artifacts(self.run_id, checkpoint_dir, "checkpoint")
            if self.cfg.log_model:
                self._log_model(checkpoint_dir)
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as err:  # noqa: BLE001
            _trouble(self.cfg, self.uri, err, f"after training (results are in {run_dir})")

    def _log_model(self, checkpoint_dir: str) -> None:
        """The evaluated checkpoint as an MLflow PyTorch model in the pt2 (torch.export) format, dynamic
        batch size: `mlflow.pytorch.load_model` / pyfunc serve it without unpickling any code."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        from emergence_ray import checkpoint
        from emergence_ray.report import model_from_state

        model, spec = model_from_state(checkpoint.load(checkpoint_dir))
        x = torch.zeros(2, spec.channels, spec.image_size, spec.image_size)
        with torch.no_grad():
            signature = infer_signature(x.numpy(), model(x).numpy())
        # saved locally, then logged as the run's `model` artifact through the client: the fluent
        # log_model would need mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI in this
        # process's environment (every later run in it would be tracked there).
        with tempfile.TemporaryDirectory(prefix="er-mlflow-model-") as tmp:
            # pt2 (torch.export): loads without unpickling code; explicit requirements, as
            # inferring them starts a subprocess that loads the model
            mlflow.pytorch.save_model(model, f"{tmp}/model", signature=signature, input_example=x.numpy(),
                                      serialization_format="pt2",
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            self.client.log_artifacts(self.run_id, f"{tmp}/model", "model")


def start_trial(job: JobConfig, run_dir: str, name: str, sweep_dir: str) -> None:
    """In a sweep trial's process: a child run of the sweep's parent run (recorded in the sweep
    folder's mlflow.json), recorded in the trial's run directory for its rank 0 to log to."""
    parent = read_record(sweep_dir)
    if parent is None:
        return
    from emergence_ray.config import to_dict

    resolved = to_dict(job)  # the trial's own job (its lr, weight decay, workers); it writes no config.yaml
    resolved["run"]["name"] = name
    tracker = Tracker(job.tracking, parent["tracking_uri"], _client(parent["tracking_uri"]), parent["experiment_id"])
    tracker.start(run_dir, name, kind="trial", parent_run_id=parent["run_id"], resolved=resolved)


class EpochLogger:
    """Rank 0's per-epoch tracking: TensorBoard scalars (flushed each epoch, so curves show while it
    trains) and one asynchronous MLflow `log_batch` per epoch, all confirmed after the last epoch.
    Other ranks get an instance that does nothing."""

    def __init__(self, run_dir: str, cfg: TrackingConfig, rank: int, start_epoch: int, epochs: int):
        self.cfg, self.epochs, self.writer, self.client, self.run_id = cfg, epochs, None, None, None
        self.pending: list = []
        if rank != 0:
            return
        if cfg.tensorboard and not storage.is_uri(run_dir):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume TensorBoard drops points of epochs that are trained again
            self.writer = SummaryWriter(log_dir=storage.join(run_dir, TB_DIR), purge_step=start_epoch + 1)
        elif cfg.tensorboard:
            log.info("TensorBoard: event files need a local or NFS run directory; %s gets none", run_dir)
        record = read_record(run_dir)
        if record is not None:
            self.uri, self.run_id = record["tracking_uri"], record["run_id"]
            self.client = _client(self.uri)

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["epoch"])
        if self.writer is not None:
            for tag, key in TB_SCALARS.items():
                if key in metrics:
                    self.writer.add_scalar(tag, metrics[key], step)
            self.writer.flush()
            if step >= self.epochs:
                self.writer.close()
                self.writer = None
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                     if k != "epoch" and isinstance(v, int | float)]
            try:
                # asynchronous: MLflow's own background thread sends it, so a slow server never holds
                # rank 0 (and with it every rank, at the next collective); the last epoch waits for all
                self.pending.append((step, self.client.log_batch(self.run_id, metrics=batch, synchronous=False)))
            except Exception as err:  # noqa: BLE001
                _trouble(self.cfg, self.uri, err, f"at epoch {step} (metrics.jsonl keeps it)")
            if step >= self.epochs:
                self.flush()

    def flush(self) -> None:
        """Wait until every queued epoch reached the server; a failure is reported (on_error) once."""
        pending, self.pending = self.pending, []
        failed = []
        for step, operation in pending:
            try:
                operation.wait()
            except Exception as err:  # noqa: BLE001
                failed.append((step, err))
        if failed:
            steps = ", ".join(str(s) for s, _ in failed)
            _trouble(self.cfg, self.uri, failed[0][1], f"for epoch(s) {steps} (metrics.jsonl keeps them)")


def tensorboard_test(run_dir: str, summary: dict) -> None:
    """Test accuracy/loss and the confusion matrix image, at the step of the last epoch."""
    png = storage.join(run_dir, "confusion_matrix.png")
    if storage.is_uri(run_dir):
        return
    import io

    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    step = int(summary.get("epochs", 0))
    with SummaryWriter(log_dir=storage.join(run_dir, TB_DIR)) as writer:
        for key in ("test_accuracy", "test_loss"):
            if isinstance(summary.get(key), int | float):
                writer.add_scalar(f"test/{key.removeprefix('test_')}", summary[key], step)
        if storage.exists(png):
            image = np.asarray(Image.open(io.BytesIO(_read_bytes(png))).convert("RGB"))
            writer.add_image("test/confusion_matrix", image, step, dataformats="HWC")


def resolve_checkpoint(arg: str, config: str | None, overrides: list[str]) -> str:
    """`runs:/<run id>[/<artifact path>]` -> a local copy of that run's logged checkpoint (artifact
    path `checkpoint` by default), downloaded once into ~/.cache/emergence-ray/mlflow/. Anything
    else is returned unchanged (a checkpoint directory)."""
    if not arg.startswith("runs:/"):
        return arg
    run_id, _, path = arg[len("runs:/"):].strip("/").partition("/")
    path = path.strip("/") or "checkpoint"
    if not run_id:
        raise CheckpointError(f"--checkpoint {arg}: expected runs:/<MLflow run id>[/<artifact path>]")
    from emergence_ray.config import load_raw

    section = (load_raw(config, overrides).get("tracking") or {}) if config or overrides else {}
    uri = section.get("mlflow_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError(f"--checkpoint {arg}: which MLflow server? set MLFLOW_TRACKING_URI or "
                            "--set tracking.mlflow_uri=http://HOST:PORT")
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "emergence-ray" / "mlflow" / run_id
    local = cache / path
    if (local / "checkpoint.pt").is_file():
        return str(local)
    client = _client(uri)
    try:
        _probe(uri)
        client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
            raise CheckpointError(f"--checkpoint {arg}: no MLflow run {run_id} at {uri}") from None
        raise TrackingError(f"--checkpoint {arg}: MLflow tracking server {uri} cannot be used "
                            f"({_short(err)})") from None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        try:
            got = Path(client.download_artifacts(run_id, path, tmp))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"--checkpoint {arg}: run {run_id} has no artifact {path!r} "
                                  f"({_short(err)}); emergence-ray logs its checkpoint under 'checkpoint'") from None
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, local)  # whole, or not at all
    return str(local)


def _read_bytes(path: str) -> bytes:
    if not storage.is_uri(path):
        return Path(path).read_bytes()
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def _json_or_empty(path: str) -> dict:
    try:
        return storage.read_json(path)  # type: ignore[return-value]
    except (OSError, ValueError):
        return {}
