"""Driver-side data pipeline: source splits -> decoded Ray Datasets ready to shard.

Decode, channel conversion and resize run in Ray Data's own CPU tasks (`transforms.Decode`) and
produce uint8 (C, L, L) images; the training worker converts, normalizes and augments them on its
device (`augment.DeviceTransform`). Two ways to feed the workers (`data.ingest`, decided here):

- cache (small data): the decoded splits are materialized once in the object store and each worker
  copies its shard into memory (`ingest`, `shards`); epochs cost Ray Data nothing.
- stream (any size): the splits stay lazy; every epoch Ray Data reads the files in a new seeded
  order, decodes and streams them to the workers (`TorchTrainer(datasets=...)`, `streaming_split`),
  within its object-store budget. Nothing is materialized whole.

Only a small sample of training images is decoded on the driver's behalf, to resolve the
DataSpec (channels, size, mean/std); counts come from listing the files or the label column.

    prepared = prepare(cfg.data, workers=2)            # resolves the DataSpec from a sample
    prepared = prepare(cfg.data, spec=spec)            # evaluation: decode exactly like training
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray.data
from ray.data.block import BlockAccessor

from emergence_ray.config import DataConfig
from emergence_ray.data.handoff import use_cache
from emergence_ray.data.sources import SOURCES, ArraySplit, FileSplit, RawSplits, Split
from emergence_ray.data.transforms import (DataSpec, Decode, DecodeFiles, at_wire_size, channel_stats, decode,
                                          image_stats, keep_ok)
from emergence_ray.errors import DataError

log = logging.getLogger(__name__)
SAMPLE = 512  # train images inspected to resolve channels, size and normalization
BLOCK_BYTES = 16 * 2**20  # decoded bytes per block, at least: far below a small object store
MAX_BLOCK_BYTES = 64 * 2**20
ACTOR_FILES = 128  # images per batch sent to a decode actor: the next one waits queued meanwhile
# batches a decode actor holds at once: one or two decoding (`actor_decodes`), the others reading
# their files or handing their output to the object store meanwhile
DECODE_CALLS_PER_ACTOR = 4
# batches a decode actor decodes at once when its threads sit below the training workers
# (`data.decode_niceness`): one CPU's worth, as Ray accounts it, and a second thread that takes a
# core only while nothing above it wants one, as a GPU worker's own CPU, mostly idle while the GPU
# computes. The service's one decoder beside an idle held CPU on 2 cores decoded 1.29-1.42x faster
# so; beside a CPU worker, which leaves little idle, no change beyond the noise (benchmarks/README.md,
# twenty-seventh session). At the workers' priority (`decode_niceness` null) a second decode would
# take their CPU: one at a time there.
NICED_DECODES_PER_ACTOR = 2
STORE_SHARE = 32  # a block is at most this fraction of the smallest node's object store

__all__ = ["Prepared", "prepare", "prepare_test", "decoded", "keep_ok", "load_raw", "resolve_spec"]


@dataclass
class Prepared:
    train: ray.data.Dataset  # image (uint8 N,C,L,L), label[, id]: materialized when cached, else lazy
    val: ray.data.Dataset
    test: ray.data.Dataset | None  # always lazy: read once, after training
    spec: DataSpec
    counts: dict[str, int]
    bad_images: int
    cached: bool = True


def resolve_spec(raw: RawSplits, cfg: DataConfig) -> DataSpec:
    """Channels, size and per-channel mean/std from a sample of the train split."""
    batch = raw.train.sample_batch(SAMPLE)
    images, ids = batch["image"], batch["id"]
    gray, sizes = [], Counter()
    for value, ident in zip(images, ids):
        try:
            g, hw = image_stats(value, str(ident))
        except Exception:  # unreadable images are reported by the full pass, not here
            continue
        gray.append(g)
        sizes[hw] += 1
    if not gray:
        raise DataError(f"data.path {cfg.path!r}: none of the first {len(images)} training images could be read")
    channels = cfg.channels or (1 if all(gray) else 3)
    if cfg.image_size:
        size = cfg.image_size
    else:
        (h, w), _ = sizes.most_common(1)[0]
        size = max(h, w)
    policy = cfg.augment.policy
    load = max(size, round(size / cfg.augment.crop_fraction)) if policy == "imagenet" else None
    decoded_sample = []
    for value, ident in zip(images, ids):
        try:
            decoded_sample.append(decode(value, str(ident), channels, load or size, policy))
        except DataError:
            continue
    mean, std = channel_stats(np.stack(decoded_sample))
    return DataSpec(channels=channels, image_size=size, class_names=list(raw.class_names), mean=mean, std=std,
                    policy=policy, load_size=load)


def block_bytes() -> int:
    """Decoded bytes per block of streamed images. Each Ray Data read task pays a fixed gap besides
    its decode (reading its files, storing its block, Ray Data noticing it finished and sending the
    next), so larger tasks decode more of the time: 256-image blocks (50 MB at 256 px) decoded 1.38x
    the images/s of 85-image (16 MB) ones on 2 cores (benchmarks/STREAM.md, decode alone). A block stays below
    1/STORE_SHARE of the smallest node's object store, and never under BLOCK_BYTES: a 256 MiB store
    keeps 16 MB blocks, which tests/test_streaming.py streams without spilling."""
    stores = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n.get("Alive")]
    smallest = min((s for s in stores if s > 0), default=0)
    return int(min(MAX_BLOCK_BYTES, max(BLOCK_BYTES, smallest // STORE_SHARE)))


def files_per_task(count: int, per_image: int, most: int = 256, batch_rows: int = 0) -> int:
    """Images per read task: `block_bytes()` of them (8 to `most`), but at least two tasks per CPU
    of the cluster while the split has images for them, so that a small split still spreads over
    every core. `batch_rows`: the training worker's batch size; the block is rounded up to a whole
    number of batches where that costs at most twice its bytes, so that each batch lies in one
    block and the worker's iterator slices it instead of concatenating two blocks' rows: 128-image
    blocks for batches of 64 streamed at 1.04x (rounds 1.00-1.13) of 85-image ones, 0.08 ms less
    CPU per image (benchmarks/README.md, twenty-fourth session)."""
    per_block = int(max(8, min(most, block_bytes() // per_image)))
    if batch_rows and per_block % batch_rows:
        aligned = -(-per_block // batch_rows) * batch_rows
        if aligned <= 2 * per_block and aligned * per_image <= MAX_BLOCK_BYTES:
            per_block = aligned
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(8, min(per_block, -(-count // (2 * max(1, cpus)))))


def decode_actors(start: int = 1, calls: int = DECODE_CALLS_PER_ACTOR) -> ray.data.ActorPoolStrategy:
    """Decode actors for a streamed ImageFolder: from one up to one per CPU of the cluster, as
    many as Ray Data's autoscaler finds CPUs for beside the training workers; `start` of them
    (at most that) from the first block of every epoch: the CPUs the trainer leaves free
    (`cluster.spare_cpus`). Left to the autoscaler, each epoch's pool starts at one actor and grows
    only once that one is up and busy, a second or two into the epoch: 4k-image passes of decode
    alone ran at 0.74-0.99x of a DataLoader so, 0.92-1.09x with the pool started whole
    (benchmarks/README.md, eighteenth session).

    Each actor runs `calls` calls at once in threads, and `DecodeFiles` lets `actor_decodes` of
    them decode at a time: one CPU's worth of decoding per actor, as Ray accounts it, and below the
    training workers a second decode for the cycles they leave. One call
    at a time, an actor sat idle between batches while its last output went to the object store
    and the next batch was sent: ~15 ms of every ~57 ms batch, a quarter of its core
    (benchmarks/README.md, twenty-fourth session)."""
    most = max(1, int(ray.cluster_resources().get("CPU", 1)))
    threads = {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True} if calls > 1 else {}
    return ray.data.ActorPoolStrategy(min_size=1, max_size=most, initial_size=max(1, min(start, most)), **threads)


def actor_decodes(cfg: DataConfig) -> int:
    """Batches a decode actor decodes at once: `NICED_DECODES_PER_ACTOR` below the training
    workers, one at their priority."""
    return NICED_DECODES_PER_ACTOR if cfg.decode_niceness is not None else 1


def decoded(split: Split, spec: DataSpec, cfg: DataConfig, shuffle_seed: int | None = None,
            keep_ids: bool = True, actors: bool = False, start_actors: int = 1,
            calls_per_actor: int = DECODE_CALLS_PER_ACTOR, batch_rows: int = 0,
            decodes_per_actor: int | None = None) -> ray.data.Dataset:
    """Lazy: read `split` and decode it to uint8 in Ray Data tasks; unreadable images dropped
    (data.on_bad_image=skip) or raising (fail). `actors`: an ImageFolder is read and decoded in a
    pool of long-lived actors (`decode_actors`, `start_actors` of them from the start, each running
    `calls_per_actor` calls at once, in blocks of whole batches of `batch_rows` where that fits,
    `files_per_task`) instead: the streamed train split, decoded every epoch, where a read task's
    slot idles between tasks (benchmarks/STREAM.md). Only those actors' threads move to
    `data.decode_niceness`: a read task's worker process goes on to run other tasks.
    `decodes_per_actor`: batches an actor decodes at once (default `actor_decodes(cfg)`)."""
    per_image = spec.channels * spec.wire_size ** 2
    decode = Decode(spec, cfg.on_bad_image, keep_ids)
    if isinstance(split, FileSplit) and actors:
        files = split.file_list(shuffle_seed, files_per_task(split.count, per_image, ACTOR_FILES, batch_rows))
        pool = decode_actors(start_actors, calls_per_actor)
        decodes = min(calls_per_actor, decodes_per_actor or actor_decodes(cfg))
        ds = files.map_batches(DecodeFiles, fn_constructor_args=(split.fs, spec, cfg.on_bad_image, keep_ids,
                                                                    cfg.decode_niceness, decodes),
                               batch_format="numpy", batch_size=None, compute=pool)
    elif isinstance(split, FileSplit):
        # blocks of `files_per_task` files, decoded whole inside the read task: on 2 CPUs a
        # separate read operator held one of the two task slots, and the stream ran at 0.78x of
        # the fused one (benchmarks/STREAM.md)
        ds = split.dataset(shuffle_seed, files_per_block=files_per_task(split.count, per_image)).map_batches(
            decode, batch_format="numpy", batch_size=None)
    else:
        batch = int(max(8, min(256, BLOCK_BYTES // per_image)))
        ds = split.dataset(shuffle_seed).map_batches(decode, batch_format="numpy", batch_size=batch)
    return ds.map_batches(keep_ok, batch_format="numpy") if cfg.on_bad_image == "skip" else ds


def _materialized(split: Split, spec: DataSpec, cfg: DataConfig, keep_ids: bool) -> tuple[ray.data.Dataset, int]:
    """-> (decoded split materialized in the object store, unreadable images skipped)."""
    if isinstance(split, ArraySplit) and at_wire_size(split.images, spec):
        return _from_memory(split, spec, keep_ids), 0
    ds = decoded(split, spec, cfg, keep_ids=keep_ids)
    if not split.ordered:
        # cached workers take contiguous rows: rows in file order (a Parquet file sorted by class)
        # would give each worker a few classes. Small data by definition, so one seeded shuffle.
        ds = ds.random_shuffle(seed=cfg.split_seed)
    ds = ds.materialize()
    return ds, split.count - ds.count()


def _from_memory(split: ArraySplit, spec: DataSpec, keep_ids: bool) -> ray.data.Dataset:
    """In-memory images already at the wire size (digits, IDX at their own size) need no decode:
    the driver puts them in the object store as blocks itself, the same blocks `Decode` would
    make, so Ray Data runs no task for them. On a running cluster such a task costs a worker
    process start, ~1.5 CPU-seconds on the way to the first step (benchmarks/FIRST_STEP.md)."""
    decode = Decode(spec, keep_ids=keep_ids)
    return ray.data.from_blocks([BlockAccessor.batch_to_block(decode(b)) for b in split.batches()])


def load_raw(cfg: DataConfig) -> RawSplits:
    raw = SOURCES[cfg.source](cfg)
    if cfg.limit and cfg.limit < raw.train.count:
        raw.train = raw.train.head(cfg.limit)
    return raw


def _check_classes(raw: RawSplits, spec: DataSpec) -> None:
    if spec.class_names != raw.class_names:
        raise DataError(f"the data's classes {raw.class_names} differ from the checkpoint's {spec.class_names}; "
                        "evaluate on data with the same classes")


def prepare(cfg: DataConfig, spec: DataSpec | None = None, with_test: bool = True, keep_ids: bool = True,
            workers: int = 1, shuffle_seed: int = 0, decode_cpus: int = 1, batch_rows: int = 0) -> Prepared:
    """Train and val (and test) decoded; cached (materialized) or streamed (lazy) by
    `data.ingest` and the uint8 size of train + val per worker (`workers`: the fewest the run
    will have). `keep_ids=False` for training, whose workers read only image and label;
    `shuffle_seed` seeds the streamed train split's per-epoch file order; `decode_cpus`: the decode
    actors a streamed ImageFolder's train split starts every epoch with (the CPUs the trainer
    leaves free); `batch_rows`: a training worker's batch size, which its blocks hold whole."""
    raw = load_raw(cfg)
    if spec is None:
        spec = resolve_spec(raw, cfg)
    else:
        _check_classes(raw, spec)
    counts = {"train": raw.train.count, "val": raw.val.count}
    if counts["train"] == 0:
        raise DataError("the train split is empty; use more data or lower data.val_fraction / data.test_fraction")
    if counts["val"] == 0:
        raise DataError("the validation split is empty; raise data.val_fraction or add a val/ split")
    wire_bytes = (counts["train"] + counts["val"]) * spec.channels * spec.wire_size ** 2
    cached = use_cache(cfg, wire_bytes, workers)
    bad = raw.bad_files
    if cached:
        train, bad_train = _materialized(raw.train, spec, cfg, keep_ids)
        val, bad_val = _materialized(raw.val, spec, cfg, keep_ids)
        counts = {"train": train.count(), "val": val.count()}
        bad += bad_train + bad_val
    else:  # decode failures (skip) are dropped in the stream and logged by the decoding task
        train = decoded(raw.train, spec, cfg, shuffle_seed, keep_ids, actors=True, start_actors=decode_cpus,
                        batch_rows=batch_rows)
        val = decoded(raw.val, spec, cfg, None, keep_ids)
    test = None
    if with_test:
        test = decoded(raw.test, spec, cfg)
        counts["test"] = raw.test.count
    return Prepared(train, val, test, spec, counts, bad, cached)


def prepare_test(cfg: DataConfig, spec: DataSpec) -> tuple[ray.data.Dataset, int]:
    """Only the test split, decoded lazily with a checkpoint's DataSpec (evaluate, predict):
    -> (dataset, images listed)."""
    raw = load_raw(cfg)
    _check_classes(raw, spec)
    return decoded(raw.test, spec, cfg), raw.test.count
