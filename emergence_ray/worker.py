"""The per-worker training loop run by Ray Train on the torch backend (one process per worker / GPU;
`torch_backend.train_loop` imports it on the worker).

It touches only its dataset shards, the model and `ray.train.report`; the math lives in
`engine`. Every epoch ends with a report that carries a checkpoint, so a restarted worker group
(`run.max_failures`) or a re-run driver resumes from the last committed epoch.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from emergence_ray import checkpoint, recipe, storage
from emergence_ray.data.augment import DeviceTransform
from emergence_ray.config import JobConfig
from emergence_ray.data.transforms import DataSpec
from emergence_ray.engine import evaluate, train_epoch
from emergence_ray.data.ingest import WorkerIngest, stream_shuffle_buffer, worker_source
from emergence_ray.logs import setup_logging
from emergence_ray.models import build_for_job
from emergence_ray.optim import build_optimizer, build_scheduler
from emergence_ray.priority import apply_worker_niceness
from emergence_ray.sweep.exploit import continue_with
from emergence_ray.tracking import EpochLogger
from emergence_ray.progress import RankProgress

log = logging.getLogger("emergence_ray")


def _reduce(values: list[float], device: torch.device, op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _record_workers(run_dir: str, rank: int, device: torch.device) -> None:
    """Rank 0 writes where every rank runs (node, pid, device, process group backend, nice value,
    glibc's `MALLOC_*` settings: `cluster.TRAIN_WORKER_MALLOC`) to workers.json, for operators."""
    import os
    import socket

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid(), "device": str(device),
          "backend": dist.get_backend() if dist.is_initialized() else None,
          "nice": os.getpriority(os.PRIO_PROCESS, 0),
          "malloc": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}
    everyone = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(everyone, me)
    else:
        everyone = [me]
    if rank == 0:
        storage.write_json(storage.join(run_dir, "workers.json"), everyone)


def _time_first_step(batches, started: float, out: dict[str, float]):
    """Pass batches through; note in `out` the seconds from `started` (the command's time.time())
    to the end of the first optimizer step, i.e. when the second batch is asked for."""
    n = 0
    for n, batch in enumerate(batches):
        if n == 1:
            out["first_step_s"] = time.time() - started
        yield batch
    out.setdefault("first_step_s", time.time() - started)


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict]:
    setup_logging()
    cfg = JobConfig.model_validate(loop_config["job"])
    spec = DataSpec.from_dict(loop_config["spec"])
    run_dir: str = loop_config["run_dir"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    apply_worker_niceness(cfg.scaling.worker_niceness, rank)  # Ray started this process at nice 15
    # equal shards: every worker gets floor(rows / workers) rows (elastic runs re-split on resize)
    steps_per_epoch = math.ceil(loop_config["train_rows"] // ctx.get_world_size() / cfg.train.batch_size)
    device = ray.train.torch.get_device()
    _seed_everything(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts)
    resumed = ray.train.get_checkpoint()
    # model.pretrained weights and model.freeze (a resumed run loads its own weights instead)
    model = build_for_job(cfg.model, spec.channels, spec.num_classes, spec.image_size,
                          load_weights=resumed is None, class_names=spec.class_names)
    _seed_everything(cfg.train.seed + 1 + rank)  # then a stream of its own per rank (dropout)
    model = recipe.sync_batchnorm(model, cfg.train, device, ctx.get_world_size())
    if recipe.channels_last(cfg.train, device):  # before DDP wraps it, so its gradient buckets match the strides
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(bare, cfg.optim)
    accum = cfg.train.grad_accum_steps
    scheduler = build_scheduler(optimizer, cfg.optim, math.ceil(steps_per_epoch / accum), cfg.train.epochs)
    ema = recipe.build_ema(bare, cfg.train.ema)
    mix = recipe.build_mix(cfg.data.augment, spec.num_classes)

    start_epoch, history = 0, []
    resumed = ray.train.get_checkpoint()
    exploit = resumed is None and loop_config.get("start_from") is not None  # PBT: a better trial's weights
    if exploit:
        resumed = ray.train.Checkpoint(loop_config["start_from"])
    if resumed is not None:
        with resumed.as_directory() as d:
            state = checkpoint.load(d)
        bare.load_state_dict(state["model"])
        if exploit:  # its moments and schedule position, this trial's lr and weight decay
            continue_with(optimizer, scheduler, state)
        else:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state and not exploit:
            recipe.load_ema(ema, state)
        start_epoch, history = state["epoch"], list(state["history"])
        if rank == 0:
            checkpoint.set_rng_state(state["rng"])  # rank 0 saved its own stream
        else:
            _seed_everything(cfg.train.seed + 1 + rank + 7919 * start_epoch)
        if rank == 0:
            log.info("%s from epoch %d (checkpoint %s)", "continuing a better trial" if exploit else "resuming",
                     start_epoch, resumed.path)

    _record_workers(run_dir, rank, device)
    bs, world = cfg.train.batch_size, ctx.get_world_size()
    record = loop_config.get("record_ids")
    train_data = WorkerIngest(worker_source(loop_config, "train"), bs, device, shuffle=True,
                              transform=DeviceTransform(spec, cfg.data.augment, train=True), seed=cfg.train.seed,
                              rank=rank, world=world, record=record,
                              shuffle_buffer=stream_shuffle_buffer(cfg.data.source, bs))
    val_data = WorkerIngest(worker_source(loop_config, "val"), max(bs, 256), device, rank=rank, world=world,
                            name="val", equal=False, transform=DeviceTransform(spec), record=record)
    first_step: dict[str, float] = {}
    progress = RankProgress(run_dir, cfg.train.epochs, steps_per_epoch, cfg.train.log_every_s) if rank == 0 else None
    run_start = time.monotonic() - (history[-1]["elapsed_s"] if history else 0.0)
    tracked = EpochLogger(run_dir, cfg.tracking, rank, start_epoch, cfg.train.epochs)  # a no-op off rank 0

    for epoch in range(start_epoch, cfg.train.epochs):
        if progress:
            progress.epoch = epoch
        batches = train_data.epoch(epoch)
        if epoch == start_epoch and loop_config.get("started"):
            batches = _time_first_step(batches, loop_config["started"], first_step)
        t = train_epoch(model, batches, optimizer, scheduler, device, cfg.train.label_smoothing,
                        cfg.train.bf16, on_step=progress.step if progress else None, grad_accum_steps=accum,
                        grad_clip=cfg.train.grad_clip, mix=mix,
                        after_update=(lambda: ema.update_parameters(bare)) if ema is not None else None)
        v = evaluate(ema.module if ema is not None else bare, val_data.epoch(epoch), device, cfg.train.bf16)
        sums = _reduce([t.loss_sum, t.correct, t.count, v.loss_sum, v.correct, v.count], device)
        (seconds,) = _reduce([t.seconds], device, dist.ReduceOp.MAX)
        # every rank gets the same answer, so all stop together (a lone rank leaving would hang DDP)
        (bad_step,) = _reduce([t.nonfinite_step if t.nonfinite_step >= 0 else math.inf], device, dist.ReduceOp.MIN)
        if math.isfinite(bad_step) or not math.isfinite(sums[0]):
            # not reported: the last checkpoint stays the last good epoch; the driver raises the error
            return history + [{"nonfinite": {
                "epoch": epoch + 1, "step": int(bad_step) + 1 if math.isfinite(bad_step) else steps_per_epoch,
                "steps": steps_per_epoch, "value": "nan" if math.isnan(sums[0]) else "infinite",
                "lr": cfg.optim.lr}}]
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(1, sums[2]),
            "train_accuracy": sums[1] / max(1, sums[2]),
            "val_loss": sums[3] / max(1, sums[5]),
            "val_accuracy": sums[4] / max(1, sums[5]),
            "train_images": int(sums[2]),
            "val_images": int(sums[5]),
            "train_s": seconds,
            "val_s": v.seconds,  # rank 0's; with train_s, what elapsed_s spent outside the loop's own work
            "images_per_s": sums[2] / max(1e-9, seconds),
            "lr": scheduler.get_last_lr()[0],
            "elapsed_s": time.monotonic() - run_start,
            **(first_step if epoch == start_epoch else {}),
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoint.save(tmp, {
                    "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                    "rng": checkpoint.rng_state(), "spec": spec.to_dict(), "config": loop_config["job"],
                    **(recipe.ema_state(ema) if ema is not None else {}),
                })
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        tracked.log(metrics)  # TensorBoard + MLflow, once per epoch (rank 0)
        if rank == 0:
            storage.write_text(storage.join(run_dir, "metrics.jsonl"),
                               "".join(json.dumps(m) + "\n" for m in history))
            first = f"  first_step_s {metrics['first_step_s']:.1f}" if "first_step_s" in metrics else ""
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  %.0f img/s  %.1fs%s",
                     epoch + 1, cfg.train.epochs, metrics["train_loss"], metrics["val_loss"],
                     metrics["val_accuracy"], metrics["images_per_s"], metrics["elapsed_s"], first)
    return history
