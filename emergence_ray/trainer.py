"""The driver of a training run: reads the data, builds the trainer, fits, and evaluates
the chosen checkpoint on the test split.

    run_dir = train(load_config("jobs/digits.yaml"))

The run directory (`run.storage_path/run.name`) holds Ray Train's checkpoints next to ours:
config.yaml, meta.json, metrics.jsonl, summary.json, report.json, classification_report.txt and
confusion_matrix.png. Re-running the same `run.name` resumes; a finished run is never touched.
"""

from __future__ import annotations

import logging
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, UTC
from importlib.metadata import version as package_version
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import yaml
from ray.data.dataset import MaterializedDataset
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from emergence_ray import __version__, cluster, interrupt, progress, storage
from emergence_ray.commit import CommitRecorder, committed
from emergence_ray.config import SMALL_MODELS, JobConfig, to_dict
from emergence_ray.data.pipeline import prepare, prepare_test
from emergence_ray.data.handoff import record_ids, trainer_inputs
from emergence_ray.errors import NonFiniteLossError, ResourceError, RunExistsError, UserError
from emergence_ray.runlock import RunLock
from emergence_ray.torch_backend import TorchBackendConfig, train_loop
from emergence_ray.tracking import Tracker

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
        "torch_version": package_version("torch"), "python": sys.version.split()[0],
        "command": sys.argv, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })


def newest_checkpoint_dir(run_dir: str) -> str | None:
    """Name of the newest `checkpoint_<timestamp>` folder: rank 0's report writes it to storage
    before the controller picks the report up (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)."""
    fs, root = pafs.FileSystem.from_uri(storage.resolve(run_dir))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory]
    return max((n for n in names if n.startswith("checkpoint_")), default=None)


def commit_wait_s() -> float:
    """A few polls of Train's controller: on a busy node one poll was seen to take 4-6 s."""
    return max(20.0, 5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))


def wait_for_commit(run_dir: str, timeout_s: float) -> None:
    """Until the newest checkpoint written to storage is committed, at most `timeout_s`."""
    newest = newest_checkpoint_dir(run_dir)
    done = committed(run_dir)
    if newest is None or (done and posixpath.basename(done["checkpoint"].rstrip("/")) >= newest):
        return
    sys.stderr.write(f"interrupted: waiting up to {timeout_s:.0f} s for the last epoch's checkpoint to be "
                     "committed (interrupt again to stop now)\n")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = committed(run_dir)
        if done and posixpath.basename(done["checkpoint"].rstrip("/")) >= newest:
            return
        time.sleep(0.1)


def fit(trainer: DataParallelTrainer, run_dir: str) -> ray.train.Result:
    """`trainer.fit()` in a thread, so that this (main) thread keeps the SIGINT / SIGTERM handlers:
    Train's own SIGINT handler (only installed on the main thread) aborts the controller at once
    and loses a checkpoint reported but not yet picked up. Here a signal first waits, briefly,
    for that checkpoint to be committed; then the driver exits and its controller and workers
    end with it."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = err

    fitting = threading.Thread(target=run, name="trainer-fit", daemon=True)
    with progress.display(run_dir), interrupt.handling():
        fitting.start()
        try:
            while fitting.is_alive():
                fitting.join(0.2)  # a timed join lets the signal handler run
        except interrupt.Interrupted:
            wait_for_commit(run_dir, commit_wait_s())
            # Stop the run here: its controller and workers belong to this driver and go with it.
            # Otherwise they train on (and commit more epochs) until the process is gone, and the
            # "resume from epoch N" message would name an older epoch than the re-run resumes from.
            ray.shutdown()
            raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def nonfinite_loss(history: list[dict] | None) -> dict | None:
    """The worker loop's last entry when the loss became NaN / inf (worker.py)."""
    return history[-1].get("nonfinite") if history else None


def check_finite(history: list[dict] | None, name: str, named: bool) -> None:
    bad = nonfinite_loss(history)
    if bad is None:
        return
    raise NonFiniteLossError(
        f"the training loss became {bad['value']} at epoch {bad['epoch']}, step {bad['step']} of {bad['steps']} "
        f"(optim.lr={bad['lr']:g}); run {name!r} stopped there. Lower optim.lr (e.g. --set optim.lr="
        f"{bad['lr'] / 10:g}) and start a new run{' (a new run.name)' if named else ''}: resuming this one would "
        "restore the old learning rate")


def interrupted(err: KeyboardInterrupt, name: str, run_dir: str, named: bool,
                what: str = "epoch") -> interrupt.Interrupted:
    """`err` as an Interrupted whose message says how to resume."""
    out = err if isinstance(err, interrupt.Interrupted) else interrupt.Interrupted(signal.SIGINT)
    rerun = "re-run the same command" + ("" if named else f" with --set run.name={name}")
    done = committed(run_dir) if storage.exists(run_dir) else None
    if done and done.get("epoch"):
        out.message = f"interrupted; {rerun} to resume from {what} {done['epoch']}"
    elif storage.exists(run_dir):
        out.message = f"interrupted before the first {what} was saved; {rerun} to start it again"
    else:
        out.message = "interrupted before the run started; nothing was written"
    return out


def check_batch(cfg: JobConfig, counts: dict) -> None:
    most = cfg.scaling.max_workers
    rows_per_worker = counts["train"] // most
    if cfg.train.batch_size > rows_per_worker:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is larger than a worker's shard "
                        f"({rows_per_worker} images = {counts['train']} / {most} workers); "
                        "lower train.batch_size or scaling.num_workers")


class Trainer(DataParallelTrainer):
    """Ray Train's data-parallel trainer on the torch backend (`torch_backend`: torch loads on the
    workers, not in the driver), less two of Train's default helpers where they would only cost:

    - no `datasets=` (cached shards travel as block refs in the loop config): no DatasetsCallback,
      which would start a DatasetManager actor, one more process on the way to the first step
      that then wakes 100 times a second for the whole run;
    - `pg_cleaner=False` (a `train` command): no PlacementGroupCleaner, a detached actor that
      removes the workers' placement group if Train's controller dies while its driver lives
      on, and asks the dashboard once a second whether the controller is alive. A `train`
      driver ends when its controller does (`fit` raises, the command exits), and Ray removes a
      job's placement groups when the job ends. A sweep's trial is stopped while the sweep's
      driver lives on, so sweeps keep it (`pg_cleaner=True`).

    Both are found by class name, so that no private module is imported; if Ray renames them,
    nothing is dropped and tests/test_train_e2e.py (neither actor in a cached run) fails loudly."""

    def __init__(self, *args, pg_cleaner: bool = False, backend_config: TorchBackendConfig | None = None,
                 **kwargs):
        self.pg_cleaner = pg_cleaner  # read by _create_default_callbacks, which __init__ calls
        if backend_config is None:  # as TorchTrainer chooses: NCCL on GPUs, gloo on CPUs
            scaling = kwargs.get("scaling_config")
            backend_config = TorchBackendConfig(backend="nccl" if scaling and scaling.use_gpu else "gloo")
        super().__init__(*args, backend_config=backend_config, **kwargs)

    def _create_default_callbacks(self):
        drop = set() if self.datasets else {"DatasetsCallback"}
        if not self.pg_cleaner:
            drop.add("PlacementGroupCleanerCallback")
        return without_callbacks(super()._create_default_callbacks(), drop)


def without_callbacks(callbacks: list, names: set[str]) -> list:
    """Train's default callbacks less those whose class is named in `names`."""
    return [c for c in callbacks if type(c).__name__ not in names]


def build_trainer(cfg: JobConfig, name: str, datasets: dict, spec, counts: dict, run_dir: str,
                  callbacks: list | None = None, started: float | None = None,
                  start_from: str | None = None, pg_cleaner: bool = False) -> DataParallelTrainer:
    """`datasets`: decoded train and val, materialized (cached in worker memory) or lazy (streamed).
    `started`: the command's start (time.time()), for first_step_s. `start_from`: a checkpoint
    directory a fresh run starts from (a PBT trial taking over a better trial's weights,
    `emergence_ray.sweep.bridge`); a run with checkpoints of its own resumes. `pg_cleaner`: keep
    Train's placement-group cleaner (a sweep's trials: see `Trainer`)."""
    placement = cluster.plan(cfg.scaling)
    cluster.train_env_defaults()  # Train's controller reads it from the process calling fit(): here, or a Tune trial
    check_batch(cfg, counts)
    resources = {"CPU": placement.cpus_per_worker}
    if placement.gpus_per_worker:
        resources["GPU"] = placement.gpus_per_worker
    cache = isinstance(datasets["train"], MaterializedDataset)  # prepare() materialized it: cached
    # cached splits go as block refs in the loop config, streamed ones through datasets=
    trainer_datasets, handoff, dataset_config = trainer_inputs({"train": datasets["train"], "val": datasets["val"]},
                                                               cache)
    if record_ids():
        handoff["record_ids"] = storage.join(run_dir, "seen_ids")
    return Trainer(
        train_loop,
        train_loop_config={"job": to_dict(cfg), "spec": spec.to_dict(), "run_dir": run_dir,
                           "train_rows": counts["train"], "started": started or time.time(),
                           "start_from": start_from, **handoff},
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
            callbacks=[CommitRecorder(run_dir), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": cluster.train_worker_env(
                cfg.scaling.keep_freed_memory, cfg.scaling.use_gpu,
                cfg.train.batch_size * spec.channels * spec.image_size ** 2 * 4)},
        ),
        datasets=trainer_datasets,
        dataset_config=dataset_config,
        pg_cleaner=pg_cleaner,
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
    wall_start, started = time.monotonic(), time.time()
    name = run_name(cfg)
    run_dir = storage.join(storage.resolve(cfg.run.storage_path), name)
    check_run_dir(run_dir, name)
    zoo = zoo_models(cfg)
    if zoo:
        zoo.ensure_available(cfg.model)  # weights cached or downloadable, before starting Ray
    tracker = Tracker.connect(cfg)  # MLflow server checked (tracking.on_error) before any work
    try:
        with interrupt.handling():
            return _train(cfg, address, name, run_dir, wall_start, started, tracker, zoo)
    except KeyboardInterrupt as err:
        raise interrupted(err, name, run_dir, cfg.run.name is not None) from None


JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a `ray job submit` driver


def load_torch_before_ray() -> None:
    """In a `ray job submit` driver, import torch before `ray.init`, although the driver needs it
    only after training (the test report, MLflow's model): such a driver on a two-node cluster
    that first loaded torch after connecting died at its first matrix product ("Intel oneMKL FATAL
    ERROR: Cannot load .../torch/lib/libtorch_cpu.so"; tests/test_cluster_jobs.py), as a bare
    `ray.init()` then `import torch` in such a job does. A driver started by hand (the CLI against
    a running cluster or its embedded Ray, one node or two) loads it after training, 1.2 s off
    the way to the first step (benchmarks/FIRST_STEP.md); the cause inside the job driver was not
    found (its environment, limits, libraries and threads after `ray.init` match a hand-started one)."""
    if os.environ.get(JOB_DRIVER_ENV):
        import torch  # noqa: F401


def zoo_models(cfg: JobConfig):
    """`models.pretrained` for a job with torchvision models or pretrained weights (its checks and
    the weights' normalization); None for a small model trained from scratch, whose driver then
    imports no torch on its way to the first step (`torch_backend`)."""
    if cfg.model.name in SMALL_MODELS and not cfg.model.pretrained:
        return None
    from emergence_ray.models import pretrained

    return pretrained


def _train(cfg: JobConfig, address: str | None, name: str, run_dir: str, wall_start: float,
           started: float, tracker: Tracker, zoo) -> str:
    load_torch_before_ray()
    cluster.connect(address)
    interrupt.install()  # ray.init replaced the SIGTERM handler
    placement = cluster.plan(cfg.scaling)  # fail fast, before reading any data
    cluster.skip_preemption_watcher(cfg.scaling)
    # zoo: pretrained weights bring their normalization (ImageNet's, or the source run's)
    # test split: after training; ids only when a test records which images each epoch saw
    prepared = prepare(cfg.data, spec=zoo.job_spec(cfg) if zoo else None, with_test=False, keep_ids=record_ids(),
                       workers=cfg.scaling.min_workers, shuffle_seed=cfg.train.seed,
                       decode_cpus=cluster.spare_cpus(cfg.scaling.max_workers, placement.cpus_per_worker),
                       batch_rows=cfg.train.batch_size)
    log.info("data: %s  classes=%d  channels=%d  size=%d  ingest=%s  bad images skipped=%d", prepared.counts,
             prepared.spec.num_classes, prepared.spec.channels, prepared.spec.image_size,
             "cache" if prepared.cached else "stream", prepared.bad_images)
    if zoo:
        zoo.check_input_size(cfg.model.name, prepared.spec.image_size)
    check_batch(cfg, prepared.counts)
    lock = RunLock(run_dir, "run", name)
    try:
        lock.acquire()  # a second driver on this run stops here (RunLockedError)
        check_run_dir(run_dir, name)  # again: it may have finished while this driver read its data
        storage.makedirs(run_dir)
        write_meta(run_dir, cfg, name)
    except OSError as err:
        lock.release()
        raise UserError(f"run.storage_path: cannot write to {run_dir} ({err}); choose a writable "
                        "run.storage_path (shared storage for multi-node clusters)") from None
    except BaseException:
        lock.release()
        raise
    with lock:
        return _fit_and_test(cfg, name, run_dir, prepared, wall_start, started, tracker)


def _fit_and_test(cfg: JobConfig, name: str, run_dir: str, prepared, wall_start: float, started: float,
                  tracker: Tracker) -> str:
    tracker.start(run_dir, name)  # the MLflow run, its id recorded in run_dir/mlflow.json for rank 0
    trainer = build_trainer(cfg, name, {"train": prepared.train, "val": prepared.val}, prepared.spec,
                            prepared.counts, run_dir, started=started)
    result = fit(trainer, run_dir)
    if result.error is not None:
        raise result.error
    check_finite(result.return_value, name, cfg.run.name is not None)
    ckpt = chosen_checkpoint(result, cfg.train.evaluate)
    history = [m for m in result.return_value or []] or storage_history(run_dir)
    import torch

    from emergence_ray.report import evaluate_checkpoint

    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    cluster.wait_for_free_cpu()  # the trainer's CPUs come back asynchronously; the test set needs one
    test, listed = prepare_test(cfg.data, prepared.spec)
    with ckpt.as_directory() as local:
        report = evaluate_checkpoint(local, test, run_dir, device, cfg.scaling.keep_freed_memory)
    prepared.counts["test"] = report["num_images"]
    bad_test = listed - report["num_images"]  # unreadable test images skipped (data.on_bad_image=skip)
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
        "ingest": "cache" if prepared.cached else "stream",
        "first_step_s": history[0].get("first_step_s"),
    }
    storage.write_json(storage.join(run_dir, "summary.json"), summary)
    with ckpt.as_directory() as local:  # TensorBoard's test scalars and image; MLflow's results and model
        tracker.finish_run(run_dir, local, summary)
    log.info("test accuracy %.4f  best val accuracy %.4f  (%d epochs, %.0f img/s, %.0f s)",
             summary["test_accuracy"], summary["best_val_accuracy"], summary["epochs"],
             summary["train_images_per_s"], summary["wall_s"])
    return run_dir


def storage_history(run_dir: str) -> list[dict]:
    import json

    text = storage.read_text(storage.join(run_dir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


__all__ = ["train", "build_trainer", "Trainer", "ResourceError"]
