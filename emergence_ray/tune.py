"""`emergence-ray tune`: sweep learning rate and weight decay over the very same training job.

Each Tune trial is a driver function that builds the job's own `TorchTrainer` (same data, model,
loop) with only `optim.lr` / `optim.weight_decay` changed, and passes rank 0's per-epoch reports
to Tune through `TuneReportCallback`, so ASHA can stop bad trials early. Trial Train runs are
named from the sweep name and the trial id (never a timestamp), so a re-run of an interrupted
sweep restores it: finished trials are not run again and unfinished ones resume from their last
checkpoint.

    emergence-ray tune --config jobs/sweep_digits.yaml
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from datetime import datetime
from typing import Any, Literal

import ray
import ray.train
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from emergence_ray import cluster, storage
from emergence_ray.config import JobConfig, to_dict, validate
from emergence_ray.data.pipeline import prepare
from emergence_ray.errors import ConfigError, ResourceError, RunExistsError, UserError
from emergence_ray.report import evaluate_checkpoint
from emergence_ray.tracking import Tracker, start_trial
from emergence_ray.trainer import build_trainer, storage_history, write_meta

log = logging.getLogger("emergence_ray")
TRIAL_CPU = 0.01  # what a trial function itself reserves (0 is rejected by Tune)


class Space(BaseModel):
    """One hyperparameter's search space: a log-uniform range, or an explicit grid / choice list."""

    model_config = ConfigDict(extra="forbid")
    loguniform: tuple[float, float] | None = None
    grid: list[float] | None = None
    choice: list[float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Space:
        given = [k for k in ("loguniform", "grid", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform: [low, high], grid: [...], choice: [...]")
        if self.loguniform and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError("loguniform needs 0 < low < high")
        values = self.grid or self.choice or []
        if any(v < 0 for v in values):
            raise ValueError("values must be >= 0")
        return self

    def sampler(self, seed_offset: int = 0) -> Any:
        if self.loguniform:
            return tune.loguniform(*self.loguniform)
        if self.grid:
            return tune.grid_search(list(self.grid))
        return tune.choice(list(self.choice))


class SchedulerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)


class TuneSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: Space = Field(default_factory=lambda: Space(loguniform=(1e-4, 1e-2)))
    weight_decay: Space = Field(default_factory=lambda: Space(loguniform=(1e-5, 1e-1)))
    num_samples: int = Field(8, gt=0, description="random samples (each grid point counts once per sample)")
    max_concurrent_trials: int = Field(2, gt=0)
    num_workers: int | None = Field(None, gt=0, description="workers per trial; default scaling.num_workers")
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    search: Literal["random", "grid"] = "random"
    include_default: bool = Field(False, description="also run the job's own optim.lr / optim.weight_decay first")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TuneSection:
        if self.search == "grid" and not (self.lr.grid or self.weight_decay.grid):
            raise ValueError("search: grid needs lr.grid and/or weight_decay.grid lists")
        if (self.metric == "val_loss") != (self.mode == "min"):
            raise ValueError(f"metric {self.metric} needs mode {'min' if self.metric == 'val_loss' else 'max'}")
        return self


def tune_section(cfg: JobConfig) -> TuneSection:
    try:
        return TuneSection.model_validate(cfg.tune or {})
    except ValidationError as err:
        lines = [f"tune.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid tune section:\n  " + "\n  ".join(lines)) from None


def trial_job(cfg: JobConfig, lr: float, weight_decay: float, num_workers: int, cpus_per_worker: float) -> JobConfig:
    raw = to_dict(cfg)
    raw["optim"]["lr"], raw["optim"]["weight_decay"] = float(lr), float(weight_decay)
    raw["scaling"]["num_workers"] = num_workers
    raw["scaling"]["cpus_per_worker"] = cpus_per_worker
    raw["tune"] = None
    return validate(raw)


def _trial(config: dict, job: dict, sweep: str, sweep_dir: str, num_workers: int, cpus_per_worker: float,
           datasets: dict, spec_dict: dict, counts: dict) -> None:
    """One Tune trial = one Train run of the job, named from the sweep and the trial id."""
    from emergence_ray.data.transforms import DataSpec

    cfg = trial_job(JobConfig.model_validate(job), config["lr"], config["weight_decay"], num_workers,
                    cpus_per_worker)
    trial_id = tune.get_context().get_trial_id()
    name = f"{sweep}-{trial_id}"
    trials_dir = storage.join(sweep_dir, "trials")
    cfg.run.storage_path = trials_dir
    run_dir = storage.join(trials_dir, name)
    storage.makedirs(run_dir)
    cluster.skip_preemption_watcher(cfg.scaling)  # in this trial's process, as trainer.train does
    start_trial(cfg, run_dir, name, sweep_dir)  # MLflow child run of the sweep's (if tracked)
    trainer = build_trainer(cfg, name, datasets, DataSpec.from_dict(spec_dict), counts, run_dir,
                            callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise result.error


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
    sweep = cfg.run.name or f"sweep-{cfg.data.source}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage_path = storage.resolve(cfg.run.storage_path)
    sweep_dir = storage.join(storage_path, sweep)
    if storage.exists(storage.join(sweep_dir, "best.json")):
        raise RunExistsError(f"sweep {sweep!r} already finished ({sweep_dir}/best.json exists) and is never "
                             "overwritten; choose a new run.name")
    tracker = Tracker.connect(cfg)  # MLflow server checked (tracking.on_error) before any work
    cluster.connect(address)
    concurrent, workers, cpw = plan_trials(cfg, section)
    prepared = prepare(cfg.data, keep_ids=False)
    storage.makedirs(sweep_dir)
    write_meta(sweep_dir, cfg, sweep)
    tracker.start(sweep_dir, sweep, kind="sweep")  # the parent run; trials' runs are its children
    datasets = {"train": prepared.train, "val": prepared.val}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=to_dict(cfg), sweep=sweep, sweep_dir=sweep_dir, num_workers=workers,
                             cpus_per_worker=cpw, datasets=datasets, spec_dict=prepared.spec.to_dict(),
                             counts=prepared.counts),
        {"cpu": TRIAL_CPU},  # a trial only waits on its trainer; its workers hold the real CPUs
    )
    if tune.Tuner.can_restore(sweep_dir):
        log.info("resuming sweep %s from %s", sweep, sweep_dir)
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(section),
                           tune_config=_tune_config(cfg, section, concurrent),
                           run_config=tune.RunConfig(name=sweep, storage_path=storage_path,
                                                     failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)))
    log.info("sweep %s: %d samples, %d at a time, %d workers x %g CPU per trial", sweep, section.num_samples,
             concurrent, workers, cpw)
    grid = tuner.fit()
    rows = trial_rows(grid, sweep_dir, sweep, cfg.train.epochs, section)
    if not any(r["status"] == "TERMINATED" or r["stopped_early"] for r in rows):
        raise UserError(f"no trial of sweep {sweep} finished; see the errors in {sweep_dir}")
    write_trials_csv(rows, sweep_dir)
    best = max((r for r in rows if r["best_val_metric"] is not None),
               key=lambda r: r["best_val_metric"] if section.mode == "max" else -r["best_val_metric"])
    report = evaluate_checkpoint(best["checkpoint"], prepared.test, sweep_dir)
    storage.write_json(storage.join(sweep_dir, "best.json"), {
        "trial_id": best["trial_id"], "config": {"optim.lr": best["lr"], "optim.weight_decay": best["weight_decay"]},
        "metric": section.metric, "mode": section.mode, "value": best["best_val_metric"],
        "checkpoint": best["checkpoint"], "test_accuracy": report["test_accuracy"],
    })
    history = storage_history(storage.join(sweep_dir, "trials", f"{sweep}-{best['trial_id']}"))
    storage.write_json(storage.join(sweep_dir, "summary.json"), {
        "run_name": sweep, "best_trial": best["trial_id"], "test_accuracy": report["test_accuracy"],
        "best_val_accuracy": max(m["val_accuracy"] for m in history), "epochs": len(history),
        "train_images_per_s": sum(m["train_images"] for m in history) / max(1e-9, sum(m["train_s"] for m in history)),
        "wall_s": time.monotonic() - wall_start, "checkpoint": best["checkpoint"], "trials": len(rows),
    })
    storage.write_bytes(storage.join(sweep_dir, "sweep.png"), sweep_plot(rows, grid, section.metric))
    tracker.finish_sweep(sweep_dir, rows, best["checkpoint"])  # closes the trials' runs and the parent
    print(results_table(rows, section))
    return sweep_dir


def _param_space(section: TuneSection) -> dict:
    return {"lr": section.lr.sampler(), "weight_decay": section.weight_decay.sampler()}


def _tune_config(cfg: JobConfig, section: TuneSection, concurrent: int) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if section.scheduler.name == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                                  grace_period=section.scheduler.grace_period,
                                  reduction_factor=section.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    default = [{"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}] if section.include_default else None
    return tune.TuneConfig(metric=section.metric, mode=section.mode, num_samples=section.num_samples,
                           max_concurrent_trials=concurrent, scheduler=scheduler,
                           search_alg=BasicVariantGenerator(random_state=section.seed, max_concurrent=concurrent,
                                                            points_to_evaluate=default))


def trial_rows(grid, sweep_dir: str, sweep: str, epochs: int, section: TuneSection) -> list[dict]:
    better = max if section.mode == "max" else min
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        run_dir = storage.join(sweep_dir, "trials", f"{sweep}-{trial_id}")
        try:
            history = storage_history(run_dir)
        except (OSError, FileNotFoundError):
            history = []
        values = [m[section.metric] for m in history]
        best_ckpt = None
        if history:
            try:
                train_result = ray.train.Result.from_path(run_dir)
                scored = [(m.get(section.metric), c) for c, m in train_result.best_checkpoints
                          if m.get(section.metric) is not None]
                if scored:
                    best_ckpt = better(scored, key=lambda s: s[0])[1].path
            except RuntimeError:
                pass
        status = "ERROR" if result.error else "TERMINATED"
        rows.append({
            "trial_id": trial_id,
            "lr": result.config["lr"],
            "weight_decay": result.config["weight_decay"],
            "epochs_run": len(history),
            "last_val_metric": values[-1] if values else None,
            "best_val_metric": better(values) if values else None,
            "status": status,
            "stopped_early": status == "TERMINATED" and len(history) < epochs,
            "checkpoint": best_ckpt,
        })
    sign = -1.0 if section.mode == "max" else 1.0  # best first
    return sorted(rows, key=lambda r: (r["best_val_metric"] is None, sign * (r["best_val_metric"] or 0.0)))


def _trial_id_from_path(path: str) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", path.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else path.rstrip("/").rsplit("/", 1)[-1]


def write_trials_csv(rows: list[dict], sweep_dir: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(sweep_dir, "trials.csv"), buf.getvalue())


def results_table(rows: list[dict], section: TuneSection) -> str:
    head = f"{'trial':<12} {'lr':>10} {'wd':>10} {'epochs':>6} {'best ' + section.metric:>18} {'status':>10} early"
    lines = [head, "-" * len(head)]
    for r in rows:
        best = f"{r['best_val_metric']:.4f}" if r["best_val_metric"] is not None else "-"
        lines.append(f"{r['trial_id']:<12} {r['lr']:>10.3g} {r['weight_decay']:>10.3g} {r['epochs_run']:>6} "
                     f"{best:>18} {r['status']:>10} {'yes' if r['stopped_early'] else 'no'}")
    return "\n".join(lines)


def sweep_plot(rows: list[dict], grid, metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    done = [r for r in rows if r["best_val_metric"] is not None]
    sc = a.scatter([r["lr"] for r in done], [max(r["weight_decay"], 1e-8) for r in done],
                   c=[r["best_val_metric"] for r in done], cmap="viridis", s=80, edgecolors="k")
    a.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="weight decay",
          title=f"best {metric} per trial")
    fig.colorbar(sc, ax=a)
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and metric in df and "epoch" in df:
            a_id = result.metrics.get("trial_id", "") if result.metrics else ""
            b.plot(df["epoch"], df[metric], marker="o", label=f"{a_id} lr={result.config['lr']:.2g}")
    b.set(xlabel="epoch", ylabel=metric, title="learning curves")
    b.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


