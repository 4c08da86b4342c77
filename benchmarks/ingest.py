"""Ingest throughput: the service's data path next to a torch DataLoader, same transforms.

Data: synthetic RGB 32x32 PNGs written once as an ImageFolder (10 class folders) and as one
Parquet file of PNG bytes. Each pipeline decodes, normalizes (`transforms.Preprocess` with one
resolved `DataSpec`), augments (`augment.BatchAugment`: 2-pixel random crop, flip, in torch on
the consumer's side, as the training workers do) and yields batches of 64 as torch tensors:

- Ray Data, cold: the `imagefolder` / `parquet` source -> map_batches(Preprocess) ->
  `iter_torch_batches` -> augment, decoding every pass (for reference: the service decodes once).
- Service, stream epoch (`data.ingest=stream`): `pipeline.preprocess` materializes the decoded
  images once, then each pass is `WorkerIngest` streaming the materialized base through
  `iter_torch_batches`, then augment.
- Service, cache epoch (`data.ingest=cache`, the default when a shard fits in memory): the
  materialized base read once into tensors by `WorkerIngest`, then each pass is a shuffled
  slice + augment.
- DataLoader: a map-style Dataset (file bytes read in the worker, or Parquet bytes held in
  memory) whose collate_fn runs the same Preprocess and augment, `num_workers` = Ray's CPUs.

Images/s are whole passes over the train split (images / seconds from creating the iterator to
its end), after one warm-up pass, median of `repeats` passes; the time to the first batch is
reported next to them. A rate "after the first batch" would flatter Ray Data: with few blocks,
most of the work is done by the time the first block arrives.

`fashion_mnist_ingest` runs the two service epochs on Fashion-MNIST (the `idx` source, the cnn
job's batch of 128 and augmentation) so `run.py` can set them against the rate at which the
cnn trains on it. Run through `python benchmarks/run.py`.
"""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path

import numpy as np

from benchmarks import common

BATCH = 64


def write_datasets(root: Path, n: int, held_out: int = 20) -> tuple[Path, Path]:
    """-> (ImageFolder root, Parquet folder), each with a train split of the same n PNG images
    (plus `held_out` val and test images, which the sources require and the benchmark skips)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = common.synthetic_images(n + 2 * held_out, seed=7)
    splits = {"train": slice(0, n), "val": slice(n, n + held_out), "test": slice(n + held_out, None)}
    folder, parquet = root / "imagefolder", root / "parquet"
    parquet.mkdir(parents=True, exist_ok=True)
    for split, sl in splits.items():
        blobs = []
        for i, (img, y) in enumerate(zip(images[sl], labels[sl])):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            blobs.append(buf.getvalue())
            d = folder / split / f"class_{y}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:06d}.png").write_bytes(blobs[-1])
        pq.write_table(pa.table({"image": blobs, "label": labels[sl]}), parquet / f"{split}.parquet")
    return folder, parquet


def data_config(source: str, path: Path):
    from emergence_ray.config import DataConfig

    return DataConfig(source=source, path=str(path), augment={"crop_padding": 2, "flip": True})


def _time_batches(batches) -> dict:
    start = time.perf_counter()
    first, n = None, 0
    for batch in batches:
        first = first or time.perf_counter()
        n += len(batch["label"])
    end = time.perf_counter()
    return {"images": n, "first_batch_s": (first or end) - start, "images_per_s": n / max(end - start, 1e-9)}


def _repeat(make_batches, repeats: int) -> dict:
    """One warm-up pass (worker processes start, caches fill), then the median over `repeats`
    full passes of images/s and of the time to the first batch."""
    _time_batches(make_batches())
    runs = [_time_batches(make_batches()) for _ in range(repeats)]
    return {"images": runs[0]["images"], "images_per_s": common.median([r["images_per_s"] for r in runs]),
            "first_batch_s": common.median([r["first_batch_s"] for r in runs]),
            "runs": [round(r["images_per_s"], 1) for r in runs]}


def service_epochs(base, spec, batch_size: int, repeats: int) -> dict:
    """Passes of the service's per-epoch path over a materialized, preprocessed dataset: streamed
    (`iter_torch_batches`) and cached in memory, both augmented by `BatchAugment` in torch."""
    import torch

    from emergence_ray.data.augment import DeviceTransform
    from emergence_ray.config import AugmentConfig
    from emergence_ray.data.ingest import WorkerIngest
    from emergence_ray.data.shards import BlockShards

    aug = DeviceTransform(spec, AugmentConfig(crop_padding=2, flip=True), train=True)
    device = torch.device("cpu")
    stream = WorkerIngest(base, batch_size, device, shuffle=True, transform=aug)
    epochs = itertools.count()  # a new epoch number (fresh order and crops) for every pass
    out = {"stream": _repeat(lambda: stream.epoch(next(epochs)), repeats)}
    t = time.perf_counter()
    cached = WorkerIngest(BlockShards.of(base), batch_size, device, shuffle=True, transform=aug)
    cached.load()
    out["cache"] = {**_repeat(lambda: cached.epoch(next(epochs)), repeats), "load_s": time.perf_counter() - t}
    return out


def ray_pipelines(source: str, path: Path, repeats: int) -> dict:
    """Cold (decode every pass) and the service's epochs (materialized base) in Ray Data."""

    from emergence_ray.data.augment import DeviceTransform
    from emergence_ray.data import pipeline
    from emergence_ray.data.sources import SOURCES

    cfg = data_config(source, path)
    raw = SOURCES[source](cfg)
    spec = pipeline.resolve_spec(raw, cfg)
    aug = DeviceTransform(spec, cfg.augment, train=True)

    def cold():
        ds = pipeline.decoded(raw.train, spec, cfg, keep_ids=False)
        batches = ds.select_columns(["image", "label"]).iter_torch_batches(batch_size=BATCH,
                                                                           prefetch_batches=2)
        return ({"image": aug(b["image"]), "label": b["label"]} for b in batches)

    t = time.perf_counter()
    base = pipeline.decoded(raw.train, spec, cfg, keep_ids=False).materialize()
    materialize_s = time.perf_counter() - t
    epochs = service_epochs(base, spec, BATCH, repeats)
    return {"cold": _repeat(cold, repeats), "stream": {**epochs["stream"], "materialize_s": materialize_s},
            "cache": epochs["cache"], "spec": spec}


def fashion_mnist_ingest(fashion_path: str, repeats: int, batch_size: int = 128) -> dict:
    """The service's epochs on Fashion-MNIST's train split, as `jobs/fashion_mnist.yaml` reads it."""
    from emergence_ray.config import DataConfig
    from emergence_ray.data import pipeline

    t = time.perf_counter()
    prepared = pipeline.prepare(DataConfig(source="idx", path=fashion_path, val_fraction=0.09), with_test=False,
                                keep_ids=False)
    prepare_s = time.perf_counter() - t
    epochs = service_epochs(prepared.train, prepared.spec, batch_size, repeats)
    return {**epochs, "prepare_s": prepare_s, "images": prepared.counts["train"], "batch_size": batch_size}


class _Items:
    """Map-style dataset of (encoded image, label): file paths read on access, or bytes in memory."""

    def __init__(self, items: list, labels: np.ndarray, from_files: bool):
        self.items, self.labels, self.from_files = items, labels, from_files

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        item = self.items[i]
        return (Path(item).read_bytes() if self.from_files else item), int(self.labels[i])


class _Collate:
    """collate_fn running the service's transforms on a whole batch, inside the loader worker."""

    def __init__(self, spec, padding: int, flip: bool):
        from emergence_ray.data.augment import DeviceTransform
        from emergence_ray.config import AugmentConfig
        from emergence_ray.data.transforms import Decode

        self.pre = Decode(spec, keep_ids=False)
        self.aug = DeviceTransform(spec, AugmentConfig(crop_padding=padding, flip=flip), train=True)

    def __call__(self, items: list[tuple[bytes, int]]) -> dict:
        import torch

        raw = np.empty(len(items), dtype=object)
        raw[:] = [b for b, _ in items]
        batch = self.pre({"image": raw, "label": np.array([y for _, y in items], np.int64)})
        return {"image": self.aug(torch.from_numpy(batch["image"])), "label": torch.from_numpy(batch["label"])}


def dataloader(source: str, path: Path, spec, workers: int, repeats: int) -> dict:
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader

    if source == "imagefolder":
        files = sorted((path / "train").rglob("*.png"))
        labels = np.array([int(f.parent.name.split("_")[1]) for f in files], np.int64)
        ds = _Items([str(f) for f in files], labels, from_files=True)
    else:
        table = pq.read_table(path / "train.parquet")
        ds = _Items(table.column("image").to_pylist(), table.column("label").to_numpy(), from_files=False)
    cfg = data_config(source, path)
    collate = _Collate(spec, cfg.augment.crop_padding, cfg.augment.flip)
    return _repeat(lambda: DataLoader(ds, batch_size=BATCH, shuffle=False, num_workers=workers,
                                      collate_fn=collate, prefetch_factor=2), repeats)


def run_ingest(workdir: Path, n_images: int, workers: int, repeats: int) -> dict:
    """Both formats, Ray Data (cold and service epoch) and DataLoader; needs ray.init() first."""
    t = time.perf_counter()
    folder, parquet = write_datasets(workdir, n_images)
    out: dict = {"images": n_images, "workers": workers, "repeats": repeats, "batch_size": BATCH,
                 "write_s": time.perf_counter() - t, "formats": {}}
    for source, path in (("imagefolder", folder), ("parquet", parquet)):
        ray_res = ray_pipelines(source, path, repeats)
        spec = ray_res.pop("spec")
        out["formats"][source] = {"ray_cold": ray_res["cold"], "service_stream": ray_res["stream"],
                                  "service_cache": ray_res["cache"],
                                  "dataloader": dataloader(source, path, spec, workers, repeats)}
    return out
