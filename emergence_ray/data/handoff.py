"""Driver: how each split reaches the training workers, decided once per run (`data.ingest`).

Cached splits (they fit `data.cache_gb_per_worker`) travel as `shards.BlockShards` in the train
loop config, and every worker copies its rows out of the object store once; streamed ones go
through Train's `datasets=` (`TrainSplit`: `streaming_split` among several workers, the dataset
itself for one). The worker side is `ingest.WorkerIngest`.
No torch here: the driver imports none on its way to the first step (`torch_backend`).
"""

from __future__ import annotations

import os

import ray.data
import ray.train

from emergence_ray.config import DataConfig
from emergence_ray.data.pacing import pace_data_executor
from emergence_ray.data.shards import BlockShards

RECORD_IDS_ENV = "EMERGENCE_RAY_RECORD_IDS"  # set (to 1) on the driver: workers log every image id they train on


def use_cache(cfg: DataConfig, split_bytes: int, min_workers: int) -> bool:
    """Cache the shards when asked to, or (auto) when the largest one fits the per-worker budget.
    `split_bytes`: train + val as decoded uint8 images (what a worker would hold)."""
    if cfg.ingest != "auto":
        return cfg.ingest == "cache"
    return split_bytes / max(1, min_workers) <= cfg.cache_gb_per_worker * 2**30


def record_ids() -> bool:
    return os.environ.get(RECORD_IDS_ENV, "") not in ("", "0")


def trainer_inputs(datasets: dict[str, ray.data.Dataset], cache: bool) -> tuple[dict | None, dict, object]:
    """(the trainer's `datasets=`, entries for the train loop config, `dataset_config=`).
    Cached splits travel as `BlockShards` in the loop config; streamed ones through `datasets=`,
    train split by `streaming_split(equal=True)` (every worker the same number of rows, at most
    world - 1 dropped; val whole, read by rank 0 alone), within Ray Data's object-store budget
    (DataContext's limits, by default half of the store)."""
    if cache:
        return None, {"blocks": {name: BlockShards.of(ds) for name, ds in datasets.items()}}, None
    for ds in datasets.values():
        pace_data_executor(ds.context)  # unpaced, its loop spins while the decode is ahead of training
    return datasets, {}, TrainSplit()


class TrainSplit(ray.train.DataConfig):
    """Train's dataset config for streamed splits. Several workers: the train split is divided by
    `streaming_split(equal=True)`, whose Ray Data executor runs in a split coordinator actor; val
    is not split (that would drop up to world - 1 of its images): rank 0 evaluates all of it
    (`WorkerIngest`) and the others skip it. One worker: nothing to divide, every split reaches
    it whole (`Dataset.iterator()`), and the executor runs as a thread of the worker itself
    (no coordinator actor, no hop through it). Either way the executor's scheduling loop is
    paced (`pacing.pace_data_executor`)."""

    def __init__(self):
        super().__init__(datasets_to_split=["train"])
        self._whole = ray.train.DataConfig(datasets_to_split=[])

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if world_size == 1:
            return self._whole.configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
