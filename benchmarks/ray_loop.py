"""Mode (c): emergence-ray's data path under Ray Train, timed per step.

The driver side is the service's: the images become a Ray Dataset (`sources.from_arrays` for
synthetic data, the `idx` source via `pipeline.prepare` for Fashion-MNIST), are preprocessed
(decode, normalize) and materialized by `pipeline.preprocess`, and the `TorchTrainer` gets the
resources `cluster.plan` gives a 2-worker job (0.5 CPU each on 2 CPUs, leaving Ray Data a CPU).
The worker side mirrors `emergence_ray.worker.train_loop_per_worker` step for step:
`prepare_model` (DDP, gloo), `ingest.WorkerIngest` over `ingest.worker_source` (the shard
copied once from the materialized dataset's blocks into worker memory, or streamed from
`get_dataset_shard("train")` with `iter_torch_batches`, as `handoff.use_cache` decides for the
job's defaults, or forced with `ingest=`), and `engine.train_epoch`; it only adds
per-step timestamps and leaves out validation and checkpoints, which happen between epochs.
Augmentation is off, as in (a) and (b) (its cost is
in the ingest benchmark). One epoch holds exactly warm-up + repeats x steps batches per worker.

    result = run_ray(workload, fashion_path, storage_dir)   # needs ray.init() first
"""

from __future__ import annotations

import os
import threading
import time

T_MODULE = time.time()  # in a Ray Train worker: when unpickling the loop function imported this module

from pathlib import Path  # noqa: E402

import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from emergence_ray.engine import train_epoch  # noqa: E402
from emergence_ray.data.augment import DeviceTransform  # noqa: E402
from emergence_ray.data.ingest import WorkerIngest, worker_source  # noqa: E402
from emergence_ray.data.transforms import DataSpec  # noqa: E402
from emergence_ray.priority import apply_worker_niceness  # noqa: E402


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc; 10 ms resolution), else nan."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return float("nan")


def bench_loop_per_worker(config: dict) -> dict:
    """Runs in every Ray Train worker; rank 0's return value reaches the driver. Imports happen
    at module level, as for the service's loop: they are paid when Ray unpickles the function."""
    t_enter = time.time()
    torch.set_num_threads(config["threads"])
    w = common.Workload.from_dict(config["workload"])
    rank = ray.train.get_context().get_world_rank()
    apply_worker_niceness(config["niceness"], rank)  # as the service's loop does
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(0)  # the same initial weights as (a) and (b)
    bare = common.build_model(w.model, w.data)
    model = ray.train.torch.prepare_model(bare)
    optimizer = common.build_optimizer(bare)
    t_model = time.time()

    if config["ingest"] == "memory":  # Ray Train without Ray Data: the worker makes its block as (b) does
        batches = common.memory_batches(w, rank, config["fashion_path"])
        t_shard, cached = time.time(), "memory"
    else:
        data = WorkerIngest(worker_source(config, "train"), w.batch_size, device, shuffle=True, seed=0, rank=rank,
                            world=world, transform=DeviceTransform(DataSpec.from_dict(config["spec"])))
        data.load()
        t_shard, cached = time.time(), "cache" if data.cached else "stream"
        batches = data.epoch(0)
    marks: dict[str, float] = {}

    def timed(it):  # note when the first batch arrives
        for batch in it:
            marks.setdefault("first_batch", time.time())
            yield batch

    ends: list[float] = []

    steady = (w.warmup - 1, w.total_steps - 1)  # steps after which the timed ones start / end

    sched: list[dict | None] = []  # the training thread's scheduler counters over the timed steps

    def on_step(step: int) -> None:
        ends.append(time.perf_counter())
        if step == 0:
            marks["first_step"] = time.time()
        if step in steady:
            sched.append(common.thread_sched())
            if rank == 0:  # tells the driver's census when the timed steps run
                Path(config["marks_dir"], "steady_end" if step == steady[1] else "steady_start").touch()

    totals = train_epoch(model, timed(batches), optimizer, None, device, on_step=on_step)
    t_done = time.time()
    return {
        "rank": rank, "world": world, "steps_run": len(ends), "train_loss": totals.loss,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "rates": common.steady_rates(ends, w.batch_size, world, w.warmup, w.steps, w.repeats),
        "sched": common.sched_share(*sched) if len(sched) == 2 else None,
        "t_process": process_start_time(), "t_module": T_MODULE, "t_enter": t_enter, "t_model": t_model,
        "t_shard": t_shard, "ingest": cached,
        "t_first_batch": marks["first_batch"],
        "t_first_step": marks["first_step"], "t_done": t_done,
    }


def _census_of_timed_steps(marks_dir: Path, out: dict, done: threading.Event) -> None:
    """Driver thread: /proc snapshots when rank 0 starts and ends its timed steps -> `out`
    {"seconds", "processes": [{process, count, cpu_pct}]}: who else used the CPUs meanwhile.
    Gives up, leaving `out` empty, once `done` is set (fit returned without both marks)."""
    from benchmarks.first_step import census, processes

    snaps = []
    for mark in ("steady_start", "steady_end"):
        while not (marks_dir / mark).exists():
            if done.wait(0.1):  # 10 checks a second: the census's own cost stays out of the figures
                return
        snaps.append((time.time(), processes()))
    (t_a, a), (t_b, b) = snaps
    dt = max(1e-9, t_b - t_a)
    out["seconds"] = dt
    out["processes"] = [{"process": g["process"], "count": g["count"], "cpu_pct": 100 * g["cpu_s"] / dt}
                        for g in sorted(census(a, b, t_a), key=lambda g: -g["cpu_s"])]


def build_dataset(w: common.Workload, world: int, fashion_path: str):
    """-> (decoded (uint8), materialized train Dataset with columns image/label, its row count, its
    DataSpec: the workers normalize on their device, as the service's do)."""
    from emergence_ray.config import DataConfig
    from emergence_ray.data import pipeline
    from emergence_ray.data.sources import ArraySplit, RawSplits

    rows = w.rows_per_worker() * world
    no_aug = {"crop_padding": 0, "flip": False}
    if w.data == "fashion_mnist":
        cfg = DataConfig(source="idx", path=fashion_path, limit=rows, augment=no_aug)
        prepared = pipeline.prepare(cfg, with_test=False)
        if prepared.counts["train"] < rows:
            raise ValueError(f"{fashion_path}: the train split has {prepared.counts['train']} images, "
                             f"{rows} needed; lower the step counts")
        return prepared.train.select_columns(["image", "label"]), prepared.counts["train"], prepared.spec
    # synthetic: one block of images per worker, as the baselines generate them
    blocks = [common.load_images(w, w.rows_per_worker(), part=r, fashion_path=fashion_path) for r in range(world)]
    import numpy as np

    images = np.concatenate([b[0] for b in blocks])
    labels = np.concatenate([b[1] for b in blocks])
    split = ArraySplit(images, labels, [f"synthetic/{i}" for i in range(rows)])
    cfg = DataConfig(source="digits", augment=no_aug)  # source unused: the raw dataset is given
    raw = RawSplits(train=split, val=split, test=split, class_names=[str(i) for i in range(common.NUM_CLASSES)])
    spec = pipeline.resolve_spec(raw, cfg)
    train = pipeline.decoded(split, spec, cfg, keep_ids=False).materialize()
    return train.select_columns(["image", "label"]), train.count(), spec


def run_ray(w: common.Workload, fashion_path: str, storage_dir: Path, num_workers: int = 2,
            threads: int = 1, ingest: str = "auto", niceness: int | None = 0, trainer_cls=None,
            before_fit=None, marks_dir: Path | None = None) -> dict:
    """`ingest`: auto / cache / stream (the service's `data.ingest`), or memory: no Ray Data at all,
    each worker builds its block of images in memory as the torchrun baseline does. `niceness`:
    the service's `scaling.worker_niceness` (None: the workers stay at Ray's nice 15).
    `trainer_cls` replaces the service's `trainer.Trainer` and `before_fit()` runs just before
    `fit` (floor.py's stripped-down variant). Rank 0 touches steady_start /
    steady_end in `marks_dir` (default: a new folder under storage_dir) around its timed steps."""
    from emergence_ray.trainer import Trainer  # the service's TorchTrainer

    from emergence_ray import cluster
    from emergence_ray.config import DataConfig, ScalingConfig
    from emergence_ray.data.handoff import trainer_inputs, use_cache

    t0 = time.time()
    spec = None
    if ingest == "memory":
        train_ds, rows = None, w.rows_per_worker() * num_workers
    else:
        train_ds, rows, spec = build_dataset(w, num_workers, fashion_path)
    t_data = time.time()
    placement = cluster.plan(ScalingConfig(num_workers=num_workers))
    if marks_dir is None:
        marks_dir = Path(storage_dir) / f"marks-{w.model}-{w.data}-{ingest}-{int(t0 * 1000)}"
        marks_dir.mkdir(parents=True)
    cluster.skip_preemption_watcher(ScalingConfig(num_workers=num_workers))  # as trainer.train does
    datasets, handoff, data_config = None, {}, None
    if train_ds is not None:  # as the service's build_trainer hands the splits over
        cache = use_cache(DataConfig(ingest=ingest), train_ds.size_bytes(), num_workers)
        datasets, handoff, data_config = trainer_inputs({"train": train_ds}, cache)
        handoff["spec"] = spec.to_dict()
    trainer = (trainer_cls or Trainer)(
        bench_loop_per_worker,
        train_loop_config={"workload": w.to_dict(), "threads": threads, "ingest": ingest, "fashion_path": fashion_path,
                           "marks_dir": str(marks_dir), "niceness": niceness, **handoff},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers,
                                               resources_per_worker={"CPU": placement.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"bench-{w.model}-{w.data}-{int(t0)}", storage_path=str(storage_dir),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        dataset_config=data_config,
    )
    t_fit = time.time()
    census: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=_census_of_timed_steps, args=(marks_dir, census, done), daemon=True)
    watcher.start()
    if before_fit is not None:
        before_fit()
    try:
        result = trainer.fit()
    finally:
        t_end = time.time()
        done.set()
        watcher.join(timeout=5)
    if result.error is not None:
        raise result.error
    r = result.return_value
    if r["steps_run"] != w.total_steps:
        raise RuntimeError(f"rank 0 ran {r['steps_run']} steps, expected {w.total_steps} ({rows} rows)")
    return {
        "mode": "emergence-ray", "ingest": r["ingest"], "world": num_workers,
        "threads": threads, "nice": r["nice"],
        "cpus_per_worker": placement.cpus_per_worker, "workload": w.to_dict(), "rows": rows,
        "rates": r["rates"], "images_per_s": common.median(r["rates"]), "train_loss": r["train_loss"],
        "sched": r["sched"],  # rank 0's training thread over its timed steps
        "background": census,  # CPU per process while the timed steps ran
        "startup": {
            "data_prepare_s": t_data - t0,  # Ray Data read, preprocess, materialize
            # fit() -> rank 0's worker process exists (<= 0: Ray reused a pre-started worker process)
            "worker_process_s": r["t_process"] - t_fit,
            "worker_imports_s": r["t_module"] - max(r["t_process"], t_fit),  # -> loop function unpickled
            "to_loop_s": r["t_enter"] - r["t_module"],  # -> loop entered (process group, dataset shards up)
            "model_s": r["t_model"] - r["t_enter"],  # build model, prepare_model (DDP)
            "shard_s": r["t_shard"] - r["t_model"],  # cache: the whole shard read into memory
            "first_batch_s": r["t_first_batch"] - r["t_shard"],  # -> first batch
            "first_step_s": r["t_first_step"] - r["t_first_batch"],
            "fit_to_first_step_s": r["t_first_step"] - t_fit,
            "teardown_s": t_end - r["t_done"],
        },
    }
