"""A training worker's view of one dataset split: its Ray Data shard, read as torch batches.

Two ways, chosen by the driver (`handoff.use_cache`, `handoff.trainer_inputs`) and the same for every worker of
a run:

- cache: the source is the split's `shards.BlockShards`; the worker's rows are copied once out of
  the object store into two tensors on its device, and every epoch shuffles and slices them.
  Epochs cost Ray Data nothing: on 2 cores a stream of `iter_torch_batches` took ~28% of a core
  from training and stalled at every epoch boundary (0.71-0.88x of in-memory training), a cached
  shard trains at in-memory speed.
- stream: the source is `ray.train.get_dataset_shard(split)`, read with `iter_torch_batches` every
  epoch, for shards larger than `data.cache_gb_per_worker`.

Either way batches arrive as uint8 and the train split is reshuffled every epoch (cache: a
permutation of the whole shard; stream: a new seeded file order per epoch from Ray Data's read plus
its local shuffle buffer of `STREAM_SHUFFLE_BATCHES` batches), then converted, normalized and
augmented here, on the device (`augment.DeviceTransform`), with a generator seeded from
(seed, rank, epoch): a resumed run repeats the crops of the epochs it redoes.

    train = WorkerIngest(worker_source(loop_config, "train"), batch_size=128, device=device,
                         shuffle=True, transform=DeviceTransform(spec, cfg.augment, train=True),
                         seed=seed, rank=rank, world=world)
    for batch in train.epoch(epoch): ...
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import ray.data
import ray.train
import torch

from emergence_ray.data.shards import BlockShards
from emergence_ray.errors import DataError

log = logging.getLogger("emergence_ray")
STREAM_SHUFFLE_BATCHES = 4  # stream mode: rows shuffled in a buffer of this many batches


def stream_shuffle_buffer(source: str, batch_size: int) -> int:
    """Rows of the local shuffle buffer a streamed training split needs (0: none). An
    ImageFolder streams its files in a new seeded order every epoch, one image per file: that is
    already a uniform shuffle of the images, and a buffer would only copy every image once more in
    the worker (7% of the stream's rate on 2 cores, benchmarks/README.md). A Parquet file's rows
    come in their stored order (a file sorted by class), so they are mixed in a buffer."""
    return 0 if source == "imagefolder" else STREAM_SHUFFLE_BATCHES * batch_size


Batch = dict[str, torch.Tensor]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def worker_source(loop_config: dict, split: str):
    """Worker: the split's `BlockShards` (cached) or its Ray Data shard iterator (streamed)."""
    blocks = loop_config.get("blocks")
    return blocks[split] if blocks else ray.train.get_dataset_shard(split)


def _seeded(seed: int, rank: int, epoch: int, stream: int) -> torch.Generator:
    # distinct, reproducible streams per (run seed, rank, epoch, purpose)
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 10_007 + epoch) * 7 + stream)


class WorkerIngest:
    """`source`: `BlockShards` (cache this rank's rows) or a Ray Data iterator/dataset (stream it).
    `equal`: cached shards of floor(rows / world) each (training: DDP steps in lockstep); False
    for validation, so that every image is evaluated. `transform`: the device transform (uint8 ->
    normalized float, augmented for training). `record`: a folder; every epoch's image ids are
    appended to `<name>-rank<r>-epoch<e>.txt` there (tests of exactly-once epochs).
    `shuffle_buffer`: rows of a streamed, shuffled split's local shuffle buffer (0: none; default
    `STREAM_SHUFFLE_BATCHES` batches; `stream_shuffle_buffer` says what a source needs)."""

    def __init__(self, source, batch_size: int, device: torch.device, shuffle: bool = False,
                 transform: Transform | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                 name: str = "train", equal: bool = True, record: str | None = None,
                 shuffle_buffer: int | None = None):
        self.source, self.batch_size, self.device = source, batch_size, device
        self.shuffle_buffer = STREAM_SHUFFLE_BATCHES * batch_size if shuffle_buffer is None else shuffle_buffer
        self.cache = isinstance(source, BlockShards)
        self.shuffle, self.transform, self.seed, self.rank, self.name = shuffle, transform, seed, rank, name
        self.world, self.equal, self.record = world, equal, record
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.ids: np.ndarray | None = None
        self.load_s = 0.0

    @property
    def cached(self) -> bool:
        return self.images is not None

    def load(self) -> None:
        """Fill the cache now (otherwise the first `epoch` does): the validation shard waits for
        the first evaluation, so it does not delay the first training step."""
        if not self.cache or self.cached:
            return
        t = time.perf_counter()
        columns = ("image", "label", "id") if self.record else ("image", "label")
        rows = self.source.read(self.world, self.rank, columns, self.equal)
        if not len(rows["label"]) and self.equal:  # an empty validation shard evaluates nothing
            raise DataError(f"this worker's {self.name} shard is empty: fewer images than workers; "
                            "lower scaling.num_workers")
        self.images = torch.from_numpy(rows["image"]).to(self.device)
        self.labels = torch.from_numpy(rows["label"]).to(self.device, torch.int64)
        self.ids = rows.get("id")
        self.load_s = time.perf_counter() - t
        if self.rank == 0:
            log.info("%s shard cached in worker memory: %d images, %.0f MB, read in %.1f s", self.name,
                     len(self.labels), self.nbytes / 2**20, self.load_s)

    @property
    def nbytes(self) -> int:
        return 0 if self.images is None else self.images.nbytes + self.labels.nbytes

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one pass over the shard (the last one may be short)."""
        self.load()
        gen = _seeded(self.seed, self.rank, epoch, 1)
        batches = self._from_cache(gen) if self.cached else self._from_stream(gen)
        if self.record:
            batches = self._recorded(batches, epoch)
        if self.transform is None:
            return batches
        aug_gen = _seeded(self.seed, self.rank, epoch, 2)
        return ({"image": self.transform(b["image"], aug_gen), "label": b["label"]} for b in batches)

    def _recorded(self, batches: Iterator[dict], epoch: int) -> Iterator[Batch]:
        os.makedirs(self.record, exist_ok=True)
        path = os.path.join(self.record, f"{self.name}-rank{self.rank}-epoch{epoch}.txt")
        with open(path, "w") as f:  # rewritten if the epoch is redone after a restart
            for b in batches:
                f.write("".join(f"{i}\n" for i in b.pop("id")))
                yield b

    def _from_cache(self, gen: torch.Generator) -> Iterator[dict]:
        n, bs = len(self.labels), self.batch_size
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        for i in range(0, n, bs):
            idx = slice(i, i + bs) if order is None else order[i:i + bs]
            dev_idx = idx if order is None else idx.to(self.device)  # a view, or a gathered copy
            batch = {"image": self.images[dev_idx], "label": self.labels[dev_idx]}
            if self.record:
                batch["id"] = self.ids[idx.numpy() if order is not None else idx]
            yield batch

    def _from_stream(self, gen: torch.Generator) -> Iterator[dict]:
        if not self.equal and self.rank != 0:  # an unsplit validation stream: rank 0 evaluates it all
            return
        shuffle = {}
        if self.shuffle and self.shuffle_buffer:
            shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer,
                       "local_shuffle_seed": int(torch.randint(0, 2**31 - 1, (1,), generator=gen))}
        if not self.record:
            for b in self.source.iter_torch_batches(batch_size=self.batch_size, device=self.device,
                                                   prefetch_batches=2, drop_last=False, **shuffle):
                yield {"image": b["image"], "label": b["label"].long()}  # images stay uint8 until the transform
            return
        for b in self.source.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=2,
                                          drop_last=False, **shuffle):
            yield {"image": torch.from_numpy(b["image"]).to(self.device),
                   "label": torch.from_numpy(b["label"]).to(self.device, torch.int64), "id": b["id"]}
