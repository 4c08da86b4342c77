"""`emergence-ray tune`: sweep any job keys over the very same training job.

Each Tune trial is a driver function that builds the job's own trainer (`trainer.Trainer`: same data, model,
loop) with only the searched keys changed (and `train.seed + repeat`), and passes rank 0's
per-epoch reports to Tune (`sweep.bridge`), so ASHA can stop bad trials early and PBT can move a
trial onto a better one's weights. Trial Train runs are named from the sweep name and the trial
id (never a timestamp), so a re-run of an interrupted sweep restores it: finished trials are not
run again and unfinished ones resume from their last checkpoint.

The search space, searchers and schedulers, and the result files live in `emergence_ray.sweep`.

    emergence-ray tune --config jobs/sweep_digits.yaml
"""

from __future__ import annotations

import logging
import math
import os
import time
from datetime import datetime

import ray
from ray import tune
from ray.util.queue import Queue

from emergence_ray import cluster, interrupt, storage
from emergence_ray.config import JobConfig, to_dict
from emergence_ray.data.pipeline import prepare
from emergence_ray.errors import ResourceError, RunExistsError, UserError
from emergence_ray.report import evaluate_checkpoint
from emergence_ray.sweep import bridge
from emergence_ray.sweep.results import best_record, results_table, sweep_plot, trial_rows, write_trials_csv
from emergence_ray.sweep.search import REPEAT, check_installed, trial_values, tune_setup
from emergence_ray.sweep.space import Space, TuneSection, trial_job, tune_section
from emergence_ray.runlock import RunLock
from emergence_ray.trainer import build_trainer, check_finite, storage_history, write_meta
from emergence_ray.tracking import Tracker, start_trial

log = logging.getLogger("emergence_ray")
TRIAL_CPU = 0.01  # what a trial function itself reserves (0 is rejected by Tune)
__all__ = ["tune_run", "plan_trials", "tune_section", "TuneSection", "Space", "trial_job"]


def _trial(config: dict, job: dict, sweep: str, sweep_dir: str, num_workers: int, cpus_per_worker: float,
           datasets: dict, spec_dict: dict, counts: dict, tune_checkpoints: bool) -> None:
    """One Tune trial = one Train run of the job, named from the sweep and the trial id (under PBT,
    a trial that took over a better trial's checkpoint continues in a new run named from it)."""
    from emergence_ray.data.transforms import DataSpec

    started = time.time()
    cfg = trial_job(JobConfig.model_validate(job), trial_values(config), config.get(REPEAT, 0), num_workers,
                    cpus_per_worker)
    trial_id = tune.get_context().get_trial_id()
    trials_dir = storage.join(sweep_dir, "trials")
    name, start_from = bridge.continue_run(sweep, trials_dir, trial_id)
    cfg.run.storage_path = trials_dir
    run_dir = storage.join(trials_dir, name)
    storage.makedirs(run_dir)
    cluster.skip_preemption_watcher(cfg.scaling)  # in this trial's process, as trainer.train does
    start_trial(cfg, run_dir, name, sweep_dir)  # MLflow child run of the sweep's (if tracked)
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, name, datasets, DataSpec.from_dict(spec_dict), counts, run_dir,
                            callbacks=[bridge.ToTune(reports)], start_from=start_from,
                            pg_cleaner=True)  # a stopped trial's placement group goes, the sweep lives on
    # seed: this trial's own (PBT clones a donor's whole config, repeat included, on an exploit)
    extra = {"train_run": name, "trial_start": started, "seed": cfg.train.seed}
    result = bridge.fit_reporting(trainer, reports, extra, tune_checkpoints, trial_id)
    if result.error is not None:
        raise result.error
    check_finite(result.return_value, name, True)  # a diverged trial is an ERROR row, not "stopped early"


def plan_trials(cfg: JobConfig, section: TuneSection, resources: dict[str, float] | None = None,
                nodes: list[float] | None = None) -> tuple[int, int, float]:
    """-> (concurrent trials, workers per trial, CPUs per worker). Trials hold ~no CPU themselves
    (the trial function only waits on its trainer); workers share what is left after Ray Data,
    and some node keeps a whole CPU for Ray Data wherever the workers of all running trials land
    (`cluster.data_cpu_left`). `resources`/`nodes` default to the connected cluster's."""
    res = resources if resources is not None else ray.cluster_resources()
    nodes = nodes if nodes is not None else cluster.node_cpus(resources)
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    workers = section.num_workers or cfg.scaling.max_workers
    concurrent = section.max_concurrent_trials
    if cfg.scaling.use_gpu:
        if workers > gpus:
            raise ResourceError(f"one trial needs {workers} GPUs (tune.num_workers); the cluster has {gpus:g}. "
                                "Lower tune.num_workers or add GPU nodes.")
        concurrent = min(concurrent, int(gpus // workers))
    spare = cpus - cluster.DATA_CPU_RESERVE - TRIAL_CPU * concurrent  # whole CPU left for Ray Data tasks

    def reserve(c: int) -> float:  # the trial functions may all sit on the node kept for Ray Data
        return cluster.DATA_CPU_RESERVE + TRIAL_CPU * c

    def data_left(c: int, cpw: float) -> bool:
        return cluster.data_cpu_left(nodes, workers * c, cpw, reserve(c))

    if cfg.scaling.cpus_per_worker:
        cpw = cfg.scaling.cpus_per_worker
        if workers * cpw > spare:
            raise ResourceError(f"one trial needs {workers * cpw:g} CPUs ({workers} workers x {cpw:g}) plus one "
                                f"for Ray Data; the cluster has {cpus:g}. Lower tune.num_workers or "
                                "scaling.cpus_per_worker.")
        concurrent = min(concurrent, int(spare // (workers * cpw)))
        while concurrent > 1 and not data_left(concurrent, cpw):
            concurrent -= 1
        if not data_left(concurrent, cpw):
            log.warning("a trial's %d workers x %g CPUs can leave no node with a whole free CPU for Ray Data; if "
                        "the sweep waits for resources, lower scaling.cpus_per_worker", workers, cpw)
    else:
        cpw = min(1.0, math.floor(spare / (workers * concurrent) * 4) / 4) if spare > 0 else 0
        if cpw < 0.25:
            concurrent = max(1, int(spare // (workers * 0.25)))
            cpw = min(1.0, math.floor(spare / (workers * concurrent) * 4) / 4) if spare > 0 else 0
        # fewer CPUs per worker, then fewer trials, until some node keeps a CPU for Ray Data
        start = cpw
        while (cpw := cluster.largest_fit(nodes, workers * concurrent, start, reserve(concurrent))) == 0 \
                and concurrent > 1:
            concurrent -= 1
        if cpw < 0.25:
            raise ResourceError(f"not even one trial of {workers} workers fits a cluster of {cpus:g} CPUs (each worker "
                                "needs a quarter CPU, Ray Data one CPU on one node). Lower tune.num_workers or add "
                                "nodes.")
    return max(1, concurrent), workers, cpw


def tune_run(cfg: JobConfig, address: str | None = None) -> str:
    wall_start = time.monotonic()
    section = tune_section(cfg)
    check_installed(section)
    sweep = cfg.run.name or f"sweep-{cfg.data.source}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage_path = storage.resolve(cfg.run.storage_path)
    sweep_dir = storage.join(storage_path, sweep)
    check_sweep_dir(sweep_dir, sweep)
    tracker = Tracker.connect(cfg)  # MLflow server checked (tracking.on_error) before any work
    lock = RunLock(sweep_dir, "sweep", sweep)
    try:
        with interrupt.handling():
            return _sweep(cfg, address, section, sweep, storage_path, sweep_dir, wall_start, lock, tracker)
    except KeyboardInterrupt as err:
        out = err if isinstance(err, interrupt.Interrupted) else interrupt.Interrupted()
        rerun = "re-run the same command" + ("" if cfg.run.name else f" with --set run.name={sweep}")
        out.message = (f"interrupted; {rerun} to resume the sweep (finished trials are kept, unfinished ones "
                       "resume from their last checkpoint)" if storage.exists(sweep_dir)
                       else "interrupted before the sweep started; nothing was written")
        raise out from None
    finally:
        lock.release()


def check_sweep_dir(sweep_dir: str, sweep: str) -> None:
    if storage.exists(storage.join(sweep_dir, "best.json")):
        raise RunExistsError(f"sweep {sweep!r} already finished ({sweep_dir}/best.json exists) and is never "
                             "overwritten; choose a new run.name")


def _sweep(cfg: JobConfig, address: str | None, section: TuneSection, sweep: str, storage_path: str,
           sweep_dir: str, wall_start: float, lock: RunLock, tracker: Tracker) -> str:
    cluster.connect(address)
    interrupt.install()  # ray.init replaced the SIGTERM handler
    # Tune's own SIGINT handler would end the sweep early and return as if it had finished
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    concurrent, workers, cpw = plan_trials(cfg, section)
    from emergence_ray.models import pretrained  # zoo: the weights' normalization, as in trainer.train

    pretrained.ensure_available(cfg.model)
    prepared = prepare(cfg.data, spec=pretrained.job_spec(cfg), keep_ids=False, batch_rows=cfg.train.batch_size)
    lock.acquire()  # a second driver on this sweep stops here (RunLockedError)
    check_sweep_dir(sweep_dir, sweep)  # again: it may have finished while this driver read its data
    storage.makedirs(sweep_dir)
    write_meta(sweep_dir, cfg, sweep)
    tracker.start(sweep_dir, sweep, kind="sweep")  # the parent run; trials' runs are its children
    datasets = {"train": prepared.train, "val": prepared.val}
    pbt = section.scheduler.name == "pbt"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=to_dict(cfg), sweep=sweep, sweep_dir=sweep_dir, num_workers=workers,
                             cpus_per_worker=cpw, datasets=datasets, spec_dict=prepared.spec.to_dict(),
                             counts=prepared.counts, tune_checkpoints=pbt),
        {"cpu": TRIAL_CPU},  # a trial only waits on its trainer; its workers hold the real CPUs
    )
    if tune.Tuner.can_restore(sweep_dir):
        log.info("resuming sweep %s from %s", sweep, sweep_dir)
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space, tune_config = tune_setup(cfg, section, concurrent)
        # PBT restores an exploiting trial from the donor's Tune checkpoint of the exploit step, which
        # may be several epochs old by the time the trial restarts on a busy cluster: keep them all
        keep = tune.CheckpointConfig(num_to_keep=None) if pbt else None
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=tune.RunConfig(name=sweep, storage_path=storage_path, checkpoint_config=keep,
                                                     failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)))
    log.info("sweep %s: %s search, %d samples, %d at a time, %d workers x %g CPU per trial", sweep, section.search,
             section.num_samples, concurrent, workers, cpw)
    grid = tuner.fit()
    rows = trial_rows(grid, sweep_dir, sweep, cfg.train.epochs, section, cfg.train.seed)
    if not any(r["status"] == "TERMINATED" or r["stopped_early"] for r in rows):
        raise UserError(f"no trial of sweep {sweep} finished; see the errors in {sweep_dir}")
    write_trials_csv(rows, sweep_dir)
    best = max((r for r in rows if r["best_val_metric"] is not None),
               key=lambda r: r["best_val_metric"] if section.mode == "max" else -r["best_val_metric"])
    report = evaluate_checkpoint(best["checkpoint"], prepared.test, sweep_dir, keep_freed=cfg.scaling.keep_freed_memory)
    storage.write_json(storage.join(sweep_dir, "best.json"), {
        **best_record(rows, best, section), "checkpoint": best["checkpoint"], "test_accuracy": report["test_accuracy"],
    })
    history = storage_history(storage.join(sweep_dir, "trials", best["train_run"]))
    storage.write_json(storage.join(sweep_dir, "summary.json"), {
        "run_name": sweep, "best_trial": best["trial_id"], "test_accuracy": report["test_accuracy"],
        "best_val_accuracy": max(m["val_accuracy"] for m in history), "epochs": len(history),
        "train_images_per_s": sum(m["train_images"] for m in history) / max(1e-9, sum(m["train_s"] for m in history)),
        "wall_s": time.monotonic() - wall_start, "checkpoint": best["checkpoint"], "trials": len(rows),
    })
    storage.write_bytes(storage.join(sweep_dir, "sweep.png"), sweep_plot(rows, grid, section.metric, cfg.optim.lr,
                                                                        cfg.optim.weight_decay))
    tracker.finish_sweep(sweep_dir, rows, best["checkpoint"])  # closes the trials' runs and the parent
    print(results_table(rows, section))
    return sweep_dir
