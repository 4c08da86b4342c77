"""Driver-side data pipeline: raw source splits -> preprocessed Ray Datasets ready to shard.

Decode, channel conversion, resize and normalization run once in Ray Data and the result is
materialized in the object store, so no epoch decodes again. Train-only augmentation runs in the
training workers, in torch, on the batches they read (`emergence_ray.augment`, `.ingest`).

    prepared = prepare(cfg.data)             # resolves the DataSpec from the train split
    prepared = prepare(cfg.data, spec=spec)  # evaluation: preprocess exactly like training
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray.data

from emergence_ray.config import DataConfig
from emergence_ray.data.sources import SOURCES, RawSplits
from emergence_ray.data.transforms import DataSpec, Preprocess, channel_stats, decode, image_stats
from emergence_ray.errors import DataError

log = logging.getLogger(__name__)
SAMPLE = 512  # train images inspected to resolve channels, size and normalization
MAP_BATCH = 256


@dataclass
class Prepared:
    train: ray.data.Dataset  # all three materialized: image (normalized float32 NCHW), label[, id]
    val: ray.data.Dataset
    test: ray.data.Dataset | None
    spec: DataSpec
    counts: dict[str, int]
    bad_images: int


def resolve_spec(raw: RawSplits, cfg: DataConfig) -> DataSpec:
    """Channels, size and per-channel mean/std from a sample of the train split."""
    batch = raw.train.limit(SAMPLE).take_batch(SAMPLE, batch_format="numpy")
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
    decoded = []
    for value, ident in zip(images, ids):
        try:
            decoded.append(decode(value, str(ident), channels, size))
        except DataError:
            continue
    mean, std = channel_stats(np.stack(decoded))
    return DataSpec(channels=channels, image_size=size, class_names=list(raw.class_names), mean=mean, std=std)


def preprocess(ds: ray.data.Dataset, spec: DataSpec, cfg: DataConfig,
               keep_ids: bool = True) -> tuple[ray.data.Dataset, int]:
    """-> (materialized preprocessed dataset, number of unreadable images skipped)."""
    out = ds.map_batches(Preprocess(spec, cfg.on_bad_image, keep_ids), batch_format="numpy",
                         batch_size=MAP_BATCH).materialize()
    if cfg.on_bad_image != "skip":
        return out, 0
    ok = out.map_batches(keep_ok, batch_format="numpy").materialize()
    return ok, out.count() - ok.count()


def keep_ok(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the rows of images that could not be read, and the `ok` column itself."""
    mask = batch["ok"]
    return {k: v[mask] for k, v in batch.items() if k != "ok"}


def load_raw(cfg: DataConfig) -> RawSplits:
    raw = SOURCES[cfg.source](cfg)
    if cfg.limit:
        raw.train = raw.train.limit(cfg.limit)
    return raw


def prepare(cfg: DataConfig, spec: DataSpec | None = None, with_test: bool = True,
            keep_ids: bool = True) -> Prepared:
    """Train and val (and test) preprocessed; `keep_ids=False` for training, whose workers read
    only image and label."""
    raw = load_raw(cfg)
    if spec is None:
        spec = resolve_spec(raw, cfg)
    elif spec.class_names != raw.class_names:
        raise DataError(f"the data's classes {raw.class_names} differ from the checkpoint's {spec.class_names}; "
                        "evaluate on data with the same classes")
    train, bad_train = preprocess(raw.train, spec, cfg, keep_ids)
    val, bad_val = preprocess(raw.val, spec, cfg, keep_ids)
    counts = {"train": train.count(), "val": val.count()}
    if counts["train"] == 0:
        raise DataError("the train split is empty; use more data or lower data.val_fraction / data.test_fraction")
    if counts["val"] == 0:
        raise DataError("the validation split is empty; raise data.val_fraction or add a val/ split")
    test = None
    bad_test = 0
    if with_test:
        test, bad_test = preprocess(raw.test, spec, cfg)
        counts["test"] = test.count()
    return Prepared(train, val, test, spec, counts, raw.bad_files + bad_train + bad_val + bad_test)


def prepare_test(cfg: DataConfig, spec: DataSpec) -> tuple[ray.data.Dataset, int]:
    """Only the test split, preprocessed with a checkpoint's DataSpec (evaluate, predict)."""
    raw = load_raw(cfg)
    if spec.class_names != raw.class_names:
        raise DataError(f"the data's classes {raw.class_names} differ from the checkpoint's {spec.class_names}; "
                        "evaluate on data with the same classes")
    return preprocess(raw.test, spec, cfg)
