"""Data sources, by name: each turns a `DataConfig` into a description of the train, val and test
splits (`Split`: how many images, and how to read them), plus the class names.

    raw = SOURCES[cfg.source](cfg)
    ds = raw.train.dataset(shuffle_seed=0)   # lazy Ray Dataset: image (encoded bytes or uint8 array), label, id

Nothing here reads image bytes on the driver: ImageFolder splits are lists of paths read by Ray
Data's distributed file read (`read_binary_files`, with a per-epoch seeded file order), or dealt as
a file list for decode actors that read the files themselves (`FileSplit.file_list`), Parquet
splits are files read by `ray.data.read_parquet` (only the image and label columns; a split carved
from one file keeps its rows by Ray Data's per-row hash), IDX and digits are small and stay in
memory. Splits are decided on the driver, deterministically from `data.split_seed`, so every run,
resume and evaluation of the same job sees the same train/val/test images.
"""

from __future__ import annotations

import posixpath
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from emergence_ray.config import DataConfig
from emergence_ray.data.idx import read_idx
from emergence_ray.data.split import train_test_split
from emergence_ray.data.transforms import IMAGE_EXTENSIONS
from emergence_ray.errors import DataError

BLOCK_ROWS = 2048  # rows per block for in-memory sources: enough blocks to shard, few enough to stay cheap


class Split:
    """One split described on the driver: `count` images, read lazily by `dataset()`."""

    count: int
    ordered = True  # rows come in the listed (seeded random) order; False: in file order

    def dataset(self, shuffle_seed: int | None = None) -> ray.data.Dataset:
        """Raw rows (image, label, id). `shuffle_seed`: a file order that changes with every
        execution of the dataset (every epoch), reproducibly; None keeps the listed order."""
        raise NotImplementedError

    def head(self, n: int) -> Split:
        raise NotImplementedError

    def sample(self, n: int) -> ray.data.Dataset:
        """At most n rows, reading as little as possible (resolving the DataSpec)."""
        return self.dataset().limit(n)

    def sample_batch(self, n: int) -> dict[str, np.ndarray]:
        """`sample(n)` as one numpy batch (image, label, id)."""
        return self.sample(n).take_batch(n, batch_format="numpy")


@dataclass
class ArraySplit(Split):
    """uint8 images (N, H, W[, C]) in memory (digits, IDX)."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]

    @property
    def count(self) -> int:
        return len(self.labels)

    def dataset(self, shuffle_seed: int | None = None) -> ray.data.Dataset:
        frames = [pd.DataFrame({"image": list(self.images[s:s + BLOCK_ROWS]),
                                "label": self.labels[s:s + BLOCK_ROWS].astype(np.int64),
                                "id": self.ids[s:s + BLOCK_ROWS]})
                  for s in range(0, max(1, self.count), BLOCK_ROWS)]
        return ray.data.from_pandas(frames)

    def head(self, n: int) -> ArraySplit:
        return ArraySplit(self.images[:n], self.labels[:n], self.ids[:n])

    def sample_batch(self, n: int) -> dict[str, np.ndarray]:
        """Straight from memory: no Ray Data task (they would start a worker process for it)."""
        return {"image": self.images[:n], "label": self.labels[:n].astype(np.int64),
                "id": np.asarray(self.ids[:n], dtype=object)}

    def batches(self, rows: int = BLOCK_ROWS):
        """The rows in order as numpy batches (image, label, id) of at most `rows`."""
        for s in range(0, self.count, rows):
            yield {"image": self.images[s:s + rows], "label": self.labels[s:s + rows].astype(np.int64),
                   "id": np.asarray(self.ids[s:s + rows], dtype=object)}


@dataclass
class FileSplit(Split):
    """Image files of one class-per-subfolder tree under `root`; the label is the index of the
    first folder under `root` in `classes`, so tasks carry the class list, not a label per path."""

    fs: pafs.FileSystem
    root: str
    paths: list[str]
    classes: list[str]

    @property
    def count(self) -> int:
        return len(self.paths)

    def dataset(self, shuffle_seed: int | None = None, files_per_block: int | None = None) -> ray.data.Dataset:
        """`files_per_block`: read tasks of about that many files (`override_num_blocks`), so that
        maps after the read may take a whole block and fuse into the read task (decode next to
        the read: no separate read tasks holding CPU slots, no hop through the object store)."""
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
        blocks = -(-len(self.paths) // files_per_block) if files_per_block else None
        ds = ray.data.read_binary_files(self.paths, filesystem=self.fs, include_paths=True, shuffle=shuffle,
                                        override_num_blocks=blocks)
        return ds.map_batches(_LabelFromFolder(self.root, self.classes), batch_format="numpy")

    def file_list(self, shuffle_seed: int | None, files_per_block: int) -> ray.data.Dataset:
        """Rows of (path, label, id) and no image bytes, in blocks of `files_per_block` files; in
        a new seeded order every execution (every epoch) when `shuffle_seed` is set. For a decode
        stage that reads its files itself (`transforms.DecodeFiles`, in long-lived actors)."""
        return ray.data.read_datasource(_FileList(self, shuffle_seed, files_per_block))

    def head(self, n: int) -> FileSplit:
        return FileSplit(self.fs, self.root, self.paths[:n], self.classes)

    def sample(self, n: int) -> ray.data.Dataset:
        return self.head(n).dataset()  # the train paths come in a seeded random order


class _FileList(ray.data.Datasource):
    """A FileSplit's paths and labels as read tasks of `per_block` files each. With a seed, each
    execution of the dataset (one per epoch of a streamed split) deals the files in its own order,
    seeded by (seed, execution index) as `FileShuffleConfig` does for `read_binary_files`:
    reproducible, and different every epoch. Ray also calls `get_read_tasks` to probe metadata and
    parallelism, a varying number of times; only the execution index makes the order, never a count
    of calls."""

    def __init__(self, split: FileSplit, seed: int | None, per_block: int):
        self.paths, self.seed, self.per_block = split.paths, seed, max(1, per_block)
        self.label = _LabelFromFolder(split.root, split.classes)

    def estimate_inmemory_data_size(self) -> int:
        return sum(len(p) for p in self.paths) * 2 + 16 * len(self.paths)

    def order(self, execution: int | None) -> np.ndarray:
        """The file order of execution number `execution` (None: a metadata probe, listed order)."""
        n = len(self.paths)
        if self.seed is None or execution is None:
            return np.arange(n)
        return np.random.default_rng((self.seed, execution)).permutation(n)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ray.data.ReadTask]:
        from ray.data.block import BlockMetadata

        order, tasks = self.order(execution_index(data_context)), []
        for start in range(0, len(order), self.per_block):
            paths = [self.paths[i] for i in order[start:start + self.per_block]]
            meta = BlockMetadata(num_rows=len(paths), size_bytes=sum(len(p) for p in paths) * 2 + 16 * len(paths),
                                 input_files=None, exec_stats=None)
            tasks.append(ray.data.ReadTask(lambda paths=paths, label=self.label: [label.rows(paths)], meta))
        return tasks


def execution_index(data_context: ray.data.DataContext | None) -> int | None:
    """Which execution of a dataset Ray Data is planning: 0, 1, ... (it counts successful
    executions on the dataset's DataContext; `FileShuffleConfig` reseeds by the same count). Ray
    has no public accessor for it, so this one function reads the attribute, and
    tests/test_data.py fails loudly if Ray renames it. None when Ray calls without a context."""
    if data_context is None:
        return None
    return int(data_context._execution_idx)


class _LabelFromFolder:
    def __init__(self, root: str, classes: list[str]):
        self.root, self.index = root.rstrip("/"), {c: i for i, c in enumerate(classes)}

    def labels(self, paths: list[str]) -> np.ndarray:
        return np.array([self.index[p[len(self.root) + 1:].split("/", 1)[0]] for p in paths], np.int64)

    def rows(self, paths: list[str]) -> pa.Table:
        return pa.table({"label": self.labels(paths), "id": pa.array(paths, pa.string())})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(p) for p in batch["path"]]
        return {"image": batch["bytes"], "label": self.labels(ids), "id": np.array(ids, dtype=object)}


@dataclass
class ParquetSplit(Split):
    """Rows of Parquet files; `keep` (sorted uint64 row hashes) selects a split carved out of them.
    `codes`: class name -> index for string labels (None: the labels are integral numbers)."""

    fs: pafs.FileSystem
    files: list[str]
    image_column: str
    label_column: str | None
    keep: np.ndarray | None = None
    rows: int = 0
    codes: dict[str, int] | None = None
    ordered = False  # rows arrive in file order, which may be sorted by class

    @property
    def count(self) -> int:
        return self.rows

    def dataset(self, shuffle_seed: int | None = None) -> ray.data.Dataset:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        with _parquet_v1():
            ds = ray.data.read_parquet(self.files, filesystem=self.fs, columns=columns, include_paths=True,
                                       include_row_hash=True, shuffle=shuffle)
        keep = ray.put(self.keep) if self.keep is not None else None
        return ds.map_batches(_ParquetRows(self.image_column, self.label_column, keep, self.codes),
                              batch_format="pyarrow")

    def head(self, n: int) -> ParquetSplit:
        if self.keep is None:
            raise DataError("data.limit with a Parquet split of its own: not supported; set data.val_fraction "
                            "or remove data.limit")
        return ParquetSplit(self.fs, self.files, self.image_column, self.label_column, np.sort(self.keep[:n]),
                            min(n, self.rows), self.codes)


@contextmanager
def _parquet_v1():
    """Read Parquet with Ray Data's task-based reader (public `DataContext.use_datasource_v2`): in
    2.60 the V2 reader starts a ListFiles actor for every read, a process start (seconds on a
    2-core node) before each epoch's first block; V1 reads the given files in plain read tasks,
    with the same `columns=` projection and `row_hash` (per file path and row position)."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


class _ParquetRows:
    def __init__(self, image_column: str, label_column: str | None, keep, codes: dict[str, int] | None):
        self.image_column, self.label_column, self.keep_ref, self.codes = image_column, label_column, keep, codes
        self.keep: np.ndarray | None = None

    def __call__(self, table: pa.Table) -> pa.Table:
        hashes = table.column("row_hash").to_numpy()
        if self.keep_ref is not None:
            if self.keep is None:
                self.keep = ray.get(self.keep_ref)
            pos = np.searchsorted(self.keep, hashes).clip(max=len(self.keep) - 1)
            table = table.filter(pa.array(self.keep[pos] == hashes))
            hashes = table.column("row_hash").to_numpy()
        images = table.column(self.image_column).combine_chunks()
        paths = table.column("path").to_pylist()
        ids = [f"{posixpath.basename(p)}#{h:016x}" for p, h in zip(paths, hashes)]
        if pa.types.is_struct(images.type):  # Hugging Face style {bytes, path}
            if images.type.get_field_index("path") >= 0:
                ids = [f or i for f, i in zip(images.field("path").to_pylist(), ids)]
            images = images.field("bytes")
        out = {"image": images, "id": pa.array(ids, pa.string())}
        if self.label_column:
            out["label"] = pa.array(label_codes(table.column(self.label_column).combine_chunks(), self.codes),
                                    pa.int64())
        return pa.table(out)


@dataclass
class RawSplits:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    bad_files: int = 0  # files that are not images, skipped (data.on_bad_image=skip)
    train_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


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
    The train indices come in a seeded random order: cached workers take contiguous runs of the
    train split (`shards.BlockShards`), so a source sorted by class must not hand each worker a
    few classes only."""
    idx = np.arange(len(labels))

    def cut(indices: np.ndarray, fraction: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
        if fraction <= 0 or len(indices) < 2:
            return indices, indices[:0]
        y = labels[indices]
        counts = np.bincount(y)
        stratify = y if counts[counts > 0].min() >= 2 and len(indices) * fraction >= len(counts[counts > 0]) else None
        keep, held = train_test_split(indices, test_size=fraction, seed=seed + salt, stratify=stratify)
        return np.sort(keep), np.sort(held)

    rest, test = cut(idx, test_fraction, 0)
    train, val = cut(rest, val_fraction / max(1e-9, 1.0 - test_fraction), 1)
    return {"train": np.random.default_rng(seed + 2).permutation(train), "val": val, "test": test}


def check_learnable(train_labels: np.ndarray, class_names: list[str], where: str) -> None:
    """Every class needs training images: a model with a class it never sees in training still
    predicts it with the untrained head's scores and reports it with zero recall, and nothing says
    why. An error, not a warning: the fix is in the data, and a run that cannot learn every class
    is better refused before it spends the cluster's time."""
    counts = np.bincount(train_labels, minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(repr(c) for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"{where}: class(es) {shown} have no training images (after the train/val/test split), "
                        "so the model could never learn them; add training images for them, or remove them "
                        "(their folders, or their entries in data.class_names)")


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


def label_codes(values: pa.Array, codes: dict[str, int] | None, where: str = "data",
                row_name: Callable[[int], str] | None = None) -> np.ndarray:
    """Labels of one column -> int64 class indices. Accepted: integers, integral floats (3.0), and
    (with `codes`) class names. Refused, naming the first bad row: nulls, NaN, fractional and
    negative numbers, and names outside `codes`."""
    def bad(i: int, what: str, fix: str) -> DataError:
        at = row_name(i) if row_name else f"{where}: row {i}"
        return DataError(f"{at}: a label {what}; {fix}")

    if values.null_count:
        i = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise bad(i, "is empty (null)", "give every row a label, or drop the unlabelled rows")
    if _is_text(values.type):
        names = [str(v) for v in values.to_pylist()]
        if codes is None:
            raise DataError(f"{where}: string labels need class names; this is a bug")
        unknown = [i for i, v in enumerate(names) if v not in codes]
        if unknown:
            raise bad(unknown[0], f"holds {names[unknown[0]]!r}, not one of the classes {sorted(codes)[:10]}",
                      "add it to data.class_names, or fix the label")
        return np.array([codes[v] for v in names], np.int64)
    if pa.types.is_integer(values.type):
        arr = values.to_numpy().astype(np.int64)
    elif pa.types.is_floating(values.type):
        f = values.to_numpy(zero_copy_only=False).astype(np.float64)
        wrong = np.flatnonzero(~np.isfinite(f) | (f != np.round(f)))
        if wrong.size:
            raise bad(int(wrong[0]), f"holds {f[wrong[0]]!r}, not a whole number",
                      "labels must be class indices (0, 1, 2, ...) or class names, not fractions")
        arr = f.astype(np.int64)
    else:
        raise DataError(f"{where}: the label column has type {values.type}; use integer class indices or "
                        "string class names")
    if arr.size and arr.min() < 0:
        i = int(np.flatnonzero(arr < 0)[0])
        raise bad(i, f"holds {arr[i]}, a negative class index", "class indices start at 0")
    return arr


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
    splits = {split: ArraySplit(images[ix], labels[ix], [f"{name}/{split}/{i}" for i in ix])
              for split, ix in parts.items() if split != "test"}
    test = ArraySplit(test_images, test_labels, [f"{name}/test/{i}" for i in test_idx])
    return RawSplits(splits["train"], splits["val"], test, class_names, train_labels=labels[parts["train"]])


# ---------------------------------------------------------------- digits


@register("digits")
def digits(cfg: DataConfig) -> RawSplits:
    """scikit-learn's 8x8 digits (1,797 images), values 0-16 scaled to 0-255."""
    images, target = load_digits()
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    return _array_splits(images, target.astype(np.int64), cfg, "digits")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's `load_digits()` images (float 0-16, (1797, 8, 8)) and targets, read from the
    CSV that scikit-learn installs, without importing scikit-learn (and SciPy): ~1.2 s of CPU on
    the driver's way to the first step. `tests/test_split.py` compares it with `load_digits`."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source=digits needs scikit-learn installed (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


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


def _list_tree(fs: pafs.FileSystem, root: str, cfg: DataConfig) -> tuple[list[str], list[str], list[str], int]:
    """-> (class names, image paths, class name of each path, files skipped) of one
    class-per-subfolder tree. Lists names only: no image is opened."""
    if _kind(fs, root) != pafs.FileType.Directory:
        raise DataError(f"{root!r} is not a folder; an ImageFolder has one subfolder per class")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    classes = sorted(posixpath.basename(i.path) for i in infos
                     if i.type == pafs.FileType.Directory and posixpath.dirname(i.path).rstrip("/") == root.rstrip("/")
                     and not posixpath.basename(i.path).startswith("."))
    paths, owners, strays = [], [], []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or posixpath.basename(info.path).startswith("."):
            continue
        rel = posixpath.relpath(info.path, root)
        parts = rel.split("/")
        if len(parts) < 2 or info.path.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
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
    return classes, paths, owners, len(strays)


@register("imagefolder")
def imagefolder(cfg: DataConfig) -> RawSplits:
    fs, root = filesystem(cfg.path)
    kind = _kind(fs, root)
    if kind == pafs.FileType.NotFound:
        raise DataError(f"data.path {cfg.path!r} does not exist; point it at a folder with one subfolder per class")
    if kind != pafs.FileType.Directory:
        raise DataError(f"data.path {cfg.path!r} is a file; an ImageFolder is a folder with one subfolder per "
                        "class (for a Parquet file set data.source=parquet)")
    top = {posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(root))}
    layout = "train" in top  # train/ [val/] [test/] layout, else one tree split by fractions
    tree = posixpath.join(root, "train") if layout else root
    where = f"{cfg.path}/train" if layout else cfg.path
    classes, paths, owners, bad = _list_tree(fs, tree, cfg)
    if len(classes) < 2:
        raise DataError(f"{where}: {len(classes)} class folder(s); a classifier needs at least two "
                        "(one subfolder per class)")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[o] for o in owners], np.int64)
    given = {}
    for split in ("val", "test") if layout else ():
        if split in top:
            s_root = posixpath.join(root, split)
            s_classes, s_paths, s_owners, s_bad = _list_tree(fs, s_root, cfg)
            unknown = sorted(set(s_owners) - set(classes))
            if unknown:
                raise DataError(f"{cfg.path}/{split}: class folders {unknown} are not in train/, so the model "
                                "could never learn them; add them to train/ or remove them")
            given[split] = FileSplit(fs, s_root, s_paths, classes)
            bad += s_bad
    parts = split_indices(labels, 0.0 if "val" in given else cfg.val_fraction,
                          0.0 if "test" in given else cfg.test_fraction, cfg.split_seed)
    splits = {s: given.get(s) or FileSplit(fs, tree, [paths[i] for i in parts[s]], classes)
              for s in ("train", "val", "test")}
    check_learnable(labels[parts["train"]], classes, where)
    return RawSplits(splits["train"], splits["val"], splits["test"], classes, bad_files=bad,
                     train_labels=labels[parts["train"]])


# ---------------------------------------------------------------- parquet


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    if _kind(fs, path) == pafs.FileType.File:
        return [path]
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith((".", "_")))


def _check_schema(fs: pafs.FileSystem, files: list[str], cfg: DataConfig, where: str) -> pa.Schema:
    if not files:
        raise DataError(f"{where}: no Parquet files found")
    try:
        schema = pq.read_schema(files[0], filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{where}: not a readable Parquet file or folder ({err})") from None
    missing = [c for c in (cfg.image_column, cfg.label_column) if c not in schema.names]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (columns: {schema.names}); set "
                        f"data.image_column / data.label_column to the right names")
    return schema


def _label_table(fs: pafs.FileSystem, files: list[str], cfg: DataConfig) -> pa.Table:
    """(path, row_hash, label) of every row, through Ray Data and the label column only: no image
    bytes are read. Sorted, so the seeded split does not depend on the order tasks finish in."""
    with _parquet_v1():
        ds = ray.data.read_parquet(files, filesystem=fs, columns=[cfg.label_column], include_paths=True,
                                   include_row_hash=True)
    tables = [t for t in (ray.get(ref) for ref in ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise DataError(f"{files[0]}: no rows; point data.path at a dataset with images")
    table = pa.concat_tables([t.select(["path", "row_hash", cfg.label_column]) for t in tables])
    table = table.rename_columns(["path", "row_hash", "label"])
    return table.sort_by([("path", "ascending"), ("row_hash", "ascending")])


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)


def _codes_of(frames: dict[str, pa.Table], cfg: DataConfig) -> tuple[list[str], dict[str, int] | None]:
    """Class names, and name -> index when the labels are strings (sorted names, or data.class_names)."""
    if _is_text(frames["train"].schema.field("label").type):
        if cfg.class_names:
            names = list(cfg.class_names)
        else:
            names = sorted({str(v) for v in frames["train"].column("label").to_pylist() if v is not None})
        return names, {n: i for i, n in enumerate(names)}
    return [], None


def _encoded(frame: pa.Table, codes: dict[str, int] | None, where: str) -> np.ndarray:
    paths = frame.column("path")

    def row_name(i: int) -> str:  # rows are sorted by (path, row hash), not file order: name the file
        return str(paths[i].as_py())

    return label_codes(frame.column("label").combine_chunks(), codes, where, row_name)


def _find_split_file(fs: pafs.FileSystem, root: str, split: str) -> str | None:
    for info in fs.get_file_info(pafs.FileSelector(root)):
        base = posixpath.basename(info.path)
        if base == split or base.startswith(f"{split}.") or base.startswith(f"{split}-"):
            return info.path
    return None


@register("parquet")
def parquet(cfg: DataConfig) -> RawSplits:
    """A Parquet file (or folder of files) split by fractions, or a folder with train / [val] /
    [test] files (`train.parquet`, `train-00000-of-00001.parquet` or a `train/` folder)."""
    fs, root = filesystem(cfg.path)
    kind = _kind(fs, root)
    if kind == pafs.FileType.NotFound:
        raise DataError(f"data.path {cfg.path!r} does not exist; point it at a Parquet file or a folder of them")
    train_path = _find_split_file(fs, root, "train") if kind == pafs.FileType.Directory else None
    given = {"train": train_path or root}
    for split in ("val", "test") if train_path else ():
        p = _find_split_file(fs, root, split) or (_find_split_file(fs, root, "validation") if split == "val" else None)
        if p:
            given[split] = p
    files = {s: _parquet_files(fs, p) for s, p in given.items()}
    for s, f in files.items():
        _check_schema(fs, f, cfg, given[s])
    frames = {s: _label_table(fs, f, cfg) for s, f in files.items()}
    names, codes = _codes_of(frames, cfg)
    labels = {s: _encoded(frames[s], codes, given[s]) for s in frames}
    if codes is None:
        names = _check_labels(labels["train"], cfg, given["train"])
        for s in ("val", "test"):
            if s in labels and labels[s].size and labels[s].max() >= len(names):
                raise DataError(f"{cfg.path} ({s}): labels must lie in 0..{len(names) - 1} (found "
                                f"{labels[s].min()}..{labels[s].max()}); fix the labels, or list every class "
                                "in data.class_names")
    elif len(names) < 2:
        raise DataError(f"{given['train']}: only one class ({names}) present; a classifier needs at least two")
    y = labels["train"]
    parts = split_indices(y, 0.0 if "val" in given else cfg.val_fraction,
                          0.0 if "test" in given else cfg.test_fraction, cfg.split_seed)
    check_learnable(y[parts["train"]], names, given["train"])
    hashes = frames["train"].column("row_hash").to_numpy().astype(np.uint64)
    splits = {}
    for s in ("train", "val", "test"):
        if s in given and s != "train":
            splits[s] = ParquetSplit(fs, files[s], cfg.image_column, cfg.label_column, None, frames[s].num_rows,
                                     codes)
        else:
            keep = hashes[parts[s]]  # train: the seeded order, so data.limit takes a random subset
            splits[s] = ParquetSplit(fs, files["train"], cfg.image_column, cfg.label_column,
                                     keep if s == "train" else np.sort(keep), len(keep), codes)
    splits["train"].keep = np.sort(splits["train"].keep)
    return RawSplits(splits["train"], splits["val"], splits["test"], names, train_labels=y[parts["train"]])
