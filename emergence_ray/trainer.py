"""The driver of a training run: reads the data, builds the TorchTrainer, fits, and evaluates
the chosen checkpoint on the test split.

    run_dir = train(load_config("jobs/digits.yaml"))

The run directory (`run.storage_path/run.name`) holds Ray Train's checkpoints next to ours:
config.yaml, meta.json, metrics.jsonl, summary.json, report.json, classification_report.txt and
confusion_matrix.png. Re-running the same `run.name` resumes; a finished run is never touched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import datetime, UTC
from pathlib import Path

import ray
import ray.train
import torch
import yaml
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback  # Trainer drops it when there are no datasets

from emergence_ray import __version__, cluster, progress, storage
from emergence_ray.config import JobConfig, to_dict
from emergence_ray.data.pipeline import prepare, prepare_test
from emergence_ray.errors import ResourceError, RunExistsError, UserError
from emergence_ray.ingest import trainer_inputs, use_cache
from emergence_ray.report import evaluate_checkpoint
from emergence_ray.worker import train_loop_per_worker

log = logging.getLogger("emergence_ray")


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_name(cfg: JobConfig) -> str:
    return cfg.run.name or f"{cfg.data.source}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"


def check_run_dir(run_dir: str, name: str) -> None:
    """Refuse a finished run, and an unwritable storage path, before any work is done."""
    if storage.exists(storage.join(run_dir, "summary.json")):
        raise RunExistsError(f"run {name!r} already finished ({run_dir}/summary.json exists) and is never "
                             "overwritten; choose a new run.name (or omit it for a fresh timestamped one)")
    if storage.is_uri(run_dir):
        return
    parent = Path(run_dir)
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"run.storage_path: cannot write to {run_dir} ({parent} is not a writable folder); "
                        "choose a writable run.storage_path (shared storage for multi-node clusters)")


def write_meta(run_dir: str, cfg: JobConfig, name: str) -> None:
    resolved = to_dict(cfg)
    resolved["run"]["name"] = name
    storage.write_text(storage.join(run_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False))
    storage.write_json(storage.join(run_dir, "meta.json"), {
        "emergence_ray_version": __version__, "git_revision": git_revision(), "ray_version": ray.__version__,
        "torch_version": torch.__version__, "python": sys.version.split()[0],
        "command": sys.argv, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })


def fit(trainer: TorchTrainer, run_dir: str) -> ray.train.Result:
    with progress.display(run_dir):
        return trainer.fit()


def check_batch(cfg: JobConfig, counts: dict) -> None:
    most = cfg.scaling.max_workers
    rows_per_worker = counts["train"] // most
    if cfg.train.batch_size > rows_per_worker:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is larger than a worker's shard "
                        f"({rows_per_worker} images = {counts['train']} / {most} workers); "
                        "lower train.batch_size or scaling.num_workers")


class Trainer(TorchTrainer):
    """TorchTrainer that starts no dataset machinery when it gets no `datasets=` (cached shards
    travel as block refs in the loop config): Train's DatasetsCallback would still start a
    DatasetManager actor, one more process on the way to the first step that then wakes 100 times
    a second for the whole run. With datasets, nothing changes."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def build_trainer(cfg: JobConfig, name: str, datasets: dict, spec, counts: dict, run_dir: str,
                  callbacks: list | None = None) -> TorchTrainer:
    placement = cluster.plan(cfg.scaling)
    cluster.train_env_defaults()  # Train's controller reads it from the process calling fit(): here, or a Tune trial
    check_batch(cfg, counts)
    resources = {"CPU": placement.cpus_per_worker}
    if placement.gpus_per_worker:
        resources["GPU"] = placement.gpus_per_worker
    cache = use_cache(cfg.data, datasets["train"].size_bytes() + datasets["val"].size_bytes(),
                      cfg.scaling.min_workers)
    # image + label only (keep_ids=False); cached splits go as block refs in the loop config
    trainer_datasets, handoff = trainer_inputs({"train": datasets["train"], "val": datasets["val"]}, cache)
    return Trainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "spec": spec.to_dict(), "run_dir": run_dir,
                           "train_rows": counts["train"], **handoff},
        scaling_config=ray.train.ScalingConfig(num_workers=_workers(placement.num_workers), use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.resolve(cfg.run.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                         checkpoint_score_attribute="val_accuracy",
                                                         checkpoint_score_order="max"),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=trainer_datasets,
    )


def _workers(n: int | tuple[int, int] | list[int]) -> int | tuple[int, int]:
    return n if isinstance(n, int) else (int(n[0]), int(n[1]))


def chosen_checkpoint(result: ray.train.Result, which: str) -> ray.train.Checkpoint:
    if which == "best" and result.best_checkpoints:
        return max(result.best_checkpoints, key=lambda cm: (cm[1].get("val_accuracy", -1.0), cm[1].get("epoch", 0)))[0]
    if result.checkpoint is None:
        raise UserError("training produced no checkpoint")
    return result.checkpoint


def train(cfg: JobConfig, address: str | None = None) -> str:
    """Run a training job end to end; returns the run directory."""
    wall_start = time.monotonic()
    name = run_name(cfg)
    run_dir = storage.join(storage.resolve(cfg.run.storage_path), name)
    check_run_dir(run_dir, name)
    cluster.connect(address)
    cluster.plan(cfg.scaling)  # fail fast, before reading any data
    cluster.skip_preemption_watcher(cfg.scaling)
    prepared = prepare(cfg.data, with_test=False, keep_ids=False)  # test split: after training
    log.info("data: %s  classes=%d  channels=%d  size=%d  bad images skipped=%d", prepared.counts,
             prepared.spec.num_classes, prepared.spec.channels, prepared.spec.image_size, prepared.bad_images)
    check_batch(cfg, prepared.counts)
    try:
        storage.makedirs(run_dir)
        write_meta(run_dir, cfg, name)
    except OSError as err:
        raise UserError(f"run.storage_path: cannot write to {run_dir} ({err}); choose a writable "
                        "run.storage_path (shared storage for multi-node clusters)") from None
    trainer = build_trainer(cfg, name, {"train": prepared.train, "val": prepared.val}, prepared.spec,
                            prepared.counts, run_dir)
    result = fit(trainer, run_dir)
    if result.error is not None:
        raise result.error
    ckpt = chosen_checkpoint(result, cfg.train.evaluate)
    history = [m for m in result.return_value or []] or storage_history(run_dir)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    cluster.wait_for_free_cpu()  # the trainer's CPUs come back asynchronously; the test set needs one
    test, bad_test = prepare_test(cfg.data, prepared.spec)
    prepared.counts["test"] = test.count()
    with ckpt.as_directory() as local:
        report = evaluate_checkpoint(local, test, run_dir, device)
    train_s = sum(m["train_s"] for m in history)
    summary = {
        "run_name": name,
        "test_accuracy": report["test_accuracy"],
        "test_loss": report["test_loss"],
        "best_val_accuracy": max(m["val_accuracy"] for m in history),
        "final_val_accuracy": history[-1]["val_accuracy"],
        "epochs": len(history),
        "train_images_per_s": sum(m["train_images"] for m in history) / max(1e-9, train_s),
        "wall_s": time.monotonic() - wall_start,
        "checkpoint": ckpt.path,
        "evaluated": cfg.train.evaluate,
        "num_workers": cfg.scaling.num_workers,
        "images": prepared.counts,
        "bad_images_skipped": prepared.bad_images + bad_test,
    }
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    log.info("test accuracy %.4f  best val accuracy %.4f  (%d epochs, %.0f img/s, %.0f s)",
             summary["test_accuracy"], summary["best_val_accuracy"], summary["epochs"],
             summary["train_images_per_s"], summary["wall_s"])
    return run_dir


def storage_history(run_dir: str) -> list[dict]:
    import json

    text = storage.read_text(storage.join(run_dir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


__all__ = ["train", "build_trainer", "Trainer", "ResourceError"]
