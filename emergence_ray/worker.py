"""The per-worker training loop run by Ray Train's TorchTrainer (one process per worker / GPU).

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

from emergence_ray import checkpoint, storage
from emergence_ray.augment import BatchAugment
from emergence_ray.config import JobConfig
from emergence_ray.data.transforms import DataSpec
from emergence_ray.engine import evaluate, train_epoch
from emergence_ray.ingest import WorkerIngest, worker_source
from emergence_ray.logs import setup_logging
from emergence_ray.models import build_model
from emergence_ray.optim import build_optimizer, build_scheduler
from emergence_ray.priority import apply_worker_niceness
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
    """Rank 0 writes where every rank runs (node, pid, device, process group backend, nice value)
    to workers.json, for operators."""
    import os
    import socket

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "pid": os.getpid(), "device": str(device),
          "backend": dist.get_backend() if dist.is_initialized() else None,
          "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    everyone = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(everyone, me)
    else:
        everyone = [me]
    if rank == 0:
        storage.write_json(storage.join(run_dir, "workers.json"), everyone)


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
    model = build_model(cfg.model.name, spec.channels, spec.num_classes, spec.image_size,
                        cfg.model.width, cfg.model.depth, cfg.model.dropout)
    _seed_everything(cfg.train.seed + 1 + rank)  # then a stream of its own per rank (dropout)
    if device.type == "cuda":  # before DDP wraps it, so its gradient buckets match the weights' strides
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(bare, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)

    start_epoch, history = 0, []
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = checkpoint.load(d)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], list(state["history"])
        if rank == 0:
            checkpoint.set_rng_state(state["rng"])  # rank 0 saved its own stream
        else:
            _seed_everything(cfg.train.seed + 1 + rank + 7919 * start_epoch)
        if rank == 0:
            log.info("resuming from epoch %d (checkpoint %s)", start_epoch, resumed.path)

    _record_workers(run_dir, rank, device)
    bs, world = cfg.train.batch_size, ctx.get_world_size()
    train_data = WorkerIngest(worker_source(loop_config, "train"), bs, device, shuffle=True,
                              augment=BatchAugment.from_config(cfg.data.augment, spec), seed=cfg.train.seed,
                              rank=rank, world=world)
    val_data = WorkerIngest(worker_source(loop_config, "val"), max(bs, 256), device, rank=rank, world=world,
                            name="val", equal=False)
    progress = RankProgress(run_dir, cfg.train.epochs, steps_per_epoch, cfg.train.log_every_s) if rank == 0 else None
    run_start = time.monotonic() - (history[-1]["elapsed_s"] if history else 0.0)

    for epoch in range(start_epoch, cfg.train.epochs):
        if progress:
            progress.epoch = epoch
        t = train_epoch(model, train_data.epoch(epoch), optimizer, scheduler, device, cfg.train.label_smoothing,
                        cfg.train.bf16, on_step=progress.step if progress else None)
        v = evaluate(bare, val_data.epoch(epoch), device, cfg.train.bf16)
        sums = _reduce([t.loss_sum, t.correct, t.count, v.loss_sum, v.correct, v.count], device)
        (seconds,) = _reduce([t.seconds], device, dist.ReduceOp.MAX)
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
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoint.save(tmp, {
                    "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                    "rng": checkpoint.rng_state(), "spec": spec.to_dict(), "config": loop_config["job"],
                })
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            storage.write_text(storage.join(run_dir, "metrics.jsonl"),
                               "".join(json.dumps(m) + "\n" for m in history))
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  %.0f img/s  %.1fs",
                     epoch + 1, cfg.train.epochs, metrics["train_loss"], metrics["val_loss"],
                     metrics["val_accuracy"], metrics["images_per_s"], metrics["elapsed_s"])
    return history
