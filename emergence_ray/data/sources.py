"""Data sources, by name: each turns a `DataConfig` into raw Ray Datasets for the train, val and
test splits, with columns `image` (encoded bytes or a uint8 array), `label` (int64) and `id`
(a path or `split/index`), plus the class names.

    raw = SOURCES[cfg.source](cfg)

Splits are decided on the driver, deterministically from `data.split_seed`, so every run, resume
and evaluation of the same job sees the same train/val/test images.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from sklearn.model_selection import train_test_split

from emergence_ray.config import DataConfig
from emergence_ray.data.idx import read_idx
from emergence_ray.data.transforms import IMAGE_EXTENSIONS
from emergence_ray.errors import DataError

BLOCK_ROWS = 2048  # rows per block for in-memory sources: enough blocks to shard, few enough to stay cheap


@dataclass
class RawSplits:
    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    class_names: list[str]
    bad_files: int = 0  # files that are not images, skipped (data.on_bad_image=skip)


Source = Callable[[DataConfig], RawSplits]
SOURCES: dict[str, Source] = {}


def register(name: str) -> Callable[[Source], Source]:
    def wrap(fn: Source) -> Source:
        SOURCES[name] = fn
        return fn

    return wrap


# ---------------------------------------------------------------- helpers


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and in-filesystem path for a local path or a URI (s3://, gs://)."""
    if "://" not in path:
        path = str(Path(path).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.path {path!r}: cannot open ({err})") from None


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test index split (plain random when a class is too small).
    The train indices come in a seeded random order: workers take contiguous runs of the train
    split (`shards.BlockShards`, Ray Data's block-wise split), so a source sorted by class must not
    hand each worker a few classes only."""
    idx = np.arange(len(labels))

    def cut(indices: np.ndarray, fraction: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
        if fraction <= 0 or len(indices) < 2:
            return indices, indices[:0]
        y = labels[indices]
        counts = np.bincount(y)
        stratify = y if counts[counts > 0].min() >= 2 and len(indices) * fraction >= len(counts[counts > 0]) else None
        keep, held = train_test_split(indices, test_size=fraction, random_state=seed + salt, stratify=stratify)
        return np.sort(keep), np.sort(held)

    rest, test = cut(idx, test_fraction, 0)
    train, val = cut(rest, val_fraction / max(1e-9, 1.0 - test_fraction), 1)
    return {"train": np.random.default_rng(seed + 2).permutation(train), "val": val, "test": test}


def from_arrays(images: np.ndarray, labels: np.ndarray, ids: list[str]) -> ray.data.Dataset:
    """uint8 images (N, H, W[, C]) -> a Ray Dataset in blocks of BLOCK_ROWS."""
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    tables = []
    for start in range(0, max(1, len(images)), BLOCK_ROWS):
        sl = slice(start, start + BLOCK_ROWS)
        tables.append(pa.table({
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[sl])),
            "label": pa.array(labels[sl].astype(np.int64)),
            "id": pa.array(ids[sl], pa.string()),
        }))
    return ray.data.from_arrow(tables)


def _check_labels(labels: np.ndarray, cfg: DataConfig, where: str) -> list[str]:
    if labels.size == 0:
        raise DataError(f"{where}: no rows; point data.path at a dataset with images")
    lo, hi = int(labels.min()), int(labels.max())
    n = len(cfg.class_names) if cfg.class_names else hi + 1
    if lo < 0 or hi >= n:
        raise DataError(f"{where}: labels must lie in 0..{n - 1} (found {lo}..{hi}); "
                        "fix the labels, or list every class in data.class_names")
    if len(np.unique(labels)) < 2:
        raise DataError(f"{where}: only one class ({lo}) present; a classifier needs at least two")
    return list(cfg.class_names) if cfg.class_names else [str(i) for i in range(n)]


def _array_splits(images: np.ndarray, labels: np.ndarray, cfg: DataConfig, name: str,
                  fixed_test: tuple[np.ndarray, np.ndarray] | None = None) -> RawSplits:
    class_names = _check_labels(labels, cfg, name)
    if fixed_test is None:
        parts = split_indices(labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        test_images, test_labels, test_idx = images[parts["test"]], labels[parts["test"]], parts["test"]
    else:
        parts = split_indices(labels, cfg.val_fraction, 0.0, cfg.split_seed)
        test_images, test_labels = fixed_test
        test_idx = np.arange(len(test_labels))
    ds = {
        split: from_arrays(images[ix], labels[ix], [f"{name}/{split}/{i}" for i in ix])
        for split, ix in parts.items() if split != "test"
    }
    test = from_arrays(test_images, test_labels, [f"{name}/test/{i}" for i in test_idx])
    return RawSplits(ds["train"], ds["val"], test, class_names)


# ---------------------------------------------------------------- digits


@register("digits")
def digits(cfg: DataConfig) -> RawSplits:
    """scikit-learn's 8x8 digits (1,797 images), values 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return _array_splits(images, d.target.astype(np.int64), cfg, "digits")


# ---------------------------------------------------------------- idx (MNIST / Fashion-MNIST)


def _find_idx(fs: pafs.FileSystem, root: str, stem: str) -> str:
    names = [posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(root))]
    for name in names:
        base = name[:-3] if name.endswith(".gz") else name
        if base.replace(".", "-") == stem:
            return posixpath.join(root, name)
    raise DataError(f"data.path {root!r}: no {stem}[.gz] file; an IDX folder holds train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gzipped or not)")


@register("idx")
def idx(cfg: DataConfig) -> RawSplits:
    """The four standard IDX files: official train/test split, validation carved from train."""
    fs, root = filesystem(cfg.path)
    if _kind(fs, root) != pafs.FileType.Directory:
        raise DataError(f"data.path {cfg.path!r} is not a folder; point it at the folder holding the IDX files")
    arrays = {stem: read_idx(fs, _find_idx(fs, root, stem)) for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    x, y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].astype(np.int64)
    xt, yt = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    if len(x) != len(y) or len(xt) != len(yt):
        raise DataError(f"data.path {cfg.path!r}: image and label files disagree on the number of items")
    _check_labels(yt, cfg, f"{cfg.path} (test)")
    return _array_splits(x, y, cfg, "idx", fixed_test=(xt, yt))


# ---------------------------------------------------------------- imagefolder


def _list_tree(fs: pafs.FileSystem, root: str, cfg: DataConfig) -> tuple[list[str], list[str], list[str]]:
    """-> (class names, image paths, class name of each path) of one class-per-subfolder tree."""
    if _kind(fs, root) != pafs.FileType.Directory:
        raise DataError(f"{root!r} is not a folder; an ImageFolder has one subfolder per class")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    classes = sorted(posixpath.basename(i.path) for i in infos
                     if i.type == pafs.FileType.Directory and posixpath.dirname(i.path).rstrip("/") == root.rstrip("/")
                     and not posixpath.basename(i.path).startswith("."))
    paths, owners, strays = [], [], []
    for info in infos:
        if info.type != pafs.FileType.File or posixpath.basename(info.path).startswith("."):
            continue
        rel = posixpath.relpath(info.path, root)
        parts = rel.split("/")
        if len(parts) < 2:
            strays.append(rel)
            continue
        if info.path.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
            strays.append(rel)
            continue
        paths.append(info.path)
        owners.append(parts[0])
    if strays and cfg.on_bad_image == "fail":
        shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
        raise DataError(f"{root}: {len(strays)} file(s) that are not images in class subfolders ({shown}); "
                        "remove them, or set data.on_bad_image=skip to skip and count them")
    if not paths:
        raise DataError(f"{root}: no images found; expected one subfolder per class holding "
                        f"{'/'.join(IMAGE_EXTENSIONS[:3])} files")
    return classes, paths, owners, len(strays)  # type: ignore[return-value]


def _read_files(fs: pafs.FileSystem, paths: list[str], labels: list[int]) -> ray.data.Dataset:
    label_of = dict(zip(paths, labels))

    def attach(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(p) for p in batch["path"]]
        return {"image": batch["bytes"], "label": np.array([label_of[p] for p in ids], np.int64),
                "id": np.array(ids, dtype=object)}

    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)
    return ds.map_batches(attach, batch_format="numpy")


@register("imagefolder")
def imagefolder(cfg: DataConfig) -> RawSplits:
    fs, root = filesystem(cfg.path)
    if _kind(fs, root) == pafs.FileType.NotFound:
        raise DataError(f"data.path {cfg.path!r} does not exist; point it at a folder with one subfolder per class")
    top = {posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(root))}
    if "train" in top:  # train/ [val/] [test/] layout
        classes, paths, owners, bad = _list_tree(fs, posixpath.join(root, "train"), cfg)
        if len(classes) < 2:
            raise DataError(f"{cfg.path}/train: {len(classes)} class folder(s); a classifier needs at least two")
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[o] for o in owners])
        splits = {}
        for split in ("val", "test"):
            if split in top:
                s_classes, s_paths, s_owners, s_bad = _list_tree(fs, posixpath.join(root, split), cfg)
                unknown = sorted(set(s_classes) - set(classes))
                if unknown:
                    raise DataError(f"{cfg.path}/{split}: class folders {unknown} are not in train/")
                splits[split] = (s_paths, [index[o] for o in s_owners])
                bad += s_bad
        missing = [s for s in ("val", "test") if s not in splits]
        parts = split_indices(labels, cfg.val_fraction if "val" in missing else 0.0,
                              cfg.test_fraction if "test" in missing else 0.0, cfg.split_seed)
        for split in missing:
            splits[split] = ([paths[i] for i in parts[split]], labels[parts[split]].tolist())
        splits["train"] = ([paths[i] for i in parts["train"]], labels[parts["train"]].tolist())
    else:
        classes, paths, owners, bad = _list_tree(fs, root, cfg)
        if len(classes) < 2:
            raise DataError(f"{cfg.path}: {len(classes)} class folder(s); a classifier needs at least two "
                            "(one subfolder per class)")
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[o] for o in owners])
        parts = split_indices(labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        splits = {s: ([paths[i] for i in ix], labels[ix].tolist()) for s, ix in parts.items()}
    ds = {s: _read_files(fs, p, lab) for s, (p, lab) in splits.items()}
    return RawSplits(ds["train"], ds["val"], ds["test"], classes, bad_files=bad)


# ---------------------------------------------------------------- parquet


def _parquet_table(fs: pafs.FileSystem, path: str, cfg: DataConfig) -> pa.Table:
    try:
        schema = pq.read_schema(path, filesystem=fs) if _kind(fs, path) == pafs.FileType.File else \
            pq.ParquetDataset(path, filesystem=fs).schema
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file or folder ({err})") from None
    missing = [c for c in (cfg.image_column, cfg.label_column) if c not in schema.names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {schema.names}); set "
                        f"data.image_column / data.label_column to the right names")
    return pq.read_table(path, filesystem=fs, columns=[cfg.image_column, cfg.label_column])


def _table_to_ds(table: pa.Table, cfg: DataConfig, name: str) -> ray.data.Dataset:
    images = table.column(cfg.image_column).combine_chunks()
    labels = table.column(cfg.label_column).to_numpy().astype(np.int64)
    if pa.types.is_struct(images.type):
        paths = images.field("path") if images.type.get_field_index("path") >= 0 else None
        images = images.field("bytes")
        ids = [p if p else f"{name}/{i}" for i, p in enumerate(paths.to_pylist())] if paths is not None else None
    else:
        ids = None
    ids = ids or [f"{name}/{i}" for i in range(len(labels))]
    tables = [pa.table({"image": images.slice(s, BLOCK_ROWS), "label": pa.array(labels[s:s + BLOCK_ROWS]),
                        "id": pa.array(ids[s:s + BLOCK_ROWS], pa.string())})
              for s in range(0, max(1, len(labels)), BLOCK_ROWS)]
    return ray.data.from_arrow(tables)


def _find_split_file(fs: pafs.FileSystem, root: str, split: str) -> str | None:
    for info in fs.get_file_info(pafs.FileSelector(root)):
        base = posixpath.basename(info.path)
        if base == split or base.startswith(f"{split}.") or base.startswith(f"{split}-"):
            return info.path
    return None


@register("parquet")
def parquet(cfg: DataConfig) -> RawSplits:
    """A Parquet file split by fractions, or a folder with train / [val] / [test] files
    (`train.parquet`, `train-00000-of-00001.parquet` or a `train/` folder)."""
    fs, root = filesystem(cfg.path)
    kind = _kind(fs, root)
    if kind == pafs.FileType.NotFound:
        raise DataError(f"data.path {cfg.path!r} does not exist; point it at a Parquet file or a folder of them")
    train_path = _find_split_file(fs, root, "train") if kind == pafs.FileType.Directory else None
    if train_path is None:
        table = _parquet_table(fs, root, cfg)
        labels = table.column(cfg.label_column).to_numpy().astype(np.int64)
        class_names = _check_labels(labels, cfg, cfg.path)
        parts = split_indices(labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        ds = {s: _table_to_ds(table.take(pa.array(ix)), cfg, f"{s}") for s, ix in parts.items()}
        return RawSplits(ds["train"], ds["val"], ds["test"], class_names)
    tables = {"train": _parquet_table(fs, train_path, cfg)}
    for split in ("val", "test"):
        p = _find_split_file(fs, root, split) or (_find_split_file(fs, root, "validation") if split == "val" else None)
        if p:
            tables[split] = _parquet_table(fs, p, cfg)
    labels = tables["train"].column(cfg.label_column).to_numpy().astype(np.int64)
    class_names = _check_labels(labels, cfg, train_path)
    for split, t in tables.items():
        _check_labels_range(t.column(cfg.label_column).to_numpy(), len(class_names), f"{cfg.path} ({split})")
    missing = [s for s in ("val", "test") if s not in tables]
    parts = split_indices(labels, cfg.val_fraction if "val" in missing else 0.0,
                          cfg.test_fraction if "test" in missing else 0.0, cfg.split_seed)
    train_table = tables["train"]
    tables["train"] = train_table.take(pa.array(parts["train"]))
    for split in missing:
        tables[split] = train_table.take(pa.array(parts[split]))
    ds = {s: _table_to_ds(t, cfg, s) for s, t in tables.items()}
    return RawSplits(ds["train"], ds["val"], ds["test"], class_names)


def _check_labels_range(labels: np.ndarray, n: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n):
        raise DataError(f"{where}: labels must lie in 0..{n - 1} (found {labels.min()}..{labels.max()}); "
                        "fix the labels, or list every class in data.class_names")
