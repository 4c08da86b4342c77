"""Every data source loads through the real Ray Data pipeline, from real files in temp folders."""

from __future__ import annotations


from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import digits_arrays, png_bytes
from emergence_ray.config import DataConfig
from emergence_ray.data.pipeline import prepare

pytestmark = pytest.mark.usefixtures("ray_session")


def _check(prepared, total: int, channels: int, size: int):
    counts = prepared.counts
    assert sum(counts.values()) == total
    assert prepared.spec.channels == channels and prepared.spec.image_size == size
    assert prepared.spec.class_names and prepared.spec.num_classes == 10
    batch = prepared.val.take_batch(4, batch_format="numpy")
    assert batch["image"].shape == (4, channels, size, size) and batch["image"].dtype == np.uint8  # on the wire
    assert batch["image"].max() > 0
    assert len(prepared.spec.mean) == channels and all(0 < s for s in prepared.spec.std)  # normalized on device
    return counts


def test_digits():
    p = prepare(DataConfig())
    counts = _check(p, 1797, 1, 8)
    assert counts["test"] == pytest.approx(0.2 * 1797, abs=2)


def test_in_memory_splits_skip_ray_data_tasks_and_match_the_decoded_path(digits_idx):
    """Digits and IDX at their own size are put in the object store by the driver (no Ray Data
    task on the way to the first step); the blocks equal what the Decode tasks make, row for row."""
    from emergence_ray.data.pipeline import decoded, load_raw
    from emergence_ray.data.shards import BlockShards

    for cfg in (DataConfig(), DataConfig(source="idx", path=str(digits_idx), val_fraction=0.1)):
        p = prepare(cfg, with_test=False)
        raw = load_raw(cfg)
        for name, split in (("train", raw.train), ("val", raw.val)):
            fast = getattr(p, name).take_all()
            slow = decoded(split, p.spec, cfg).take_all()
            assert len(fast) == len(slow) == p.counts[name] == split.count
            for a, b in zip(fast, slow):
                assert a["id"] == b["id"] and a["label"] == b["label"]
                assert a["image"].dtype == np.uint8 and np.array_equal(a["image"], b["image"])
        shards = BlockShards.of(p.train)  # what the workers read
        rows = [shards.read(2, r, ("label", "id")) for r in (0, 1)]
        assert sum(len(r["id"]) for r in rows) == 2 * (p.counts["train"] // 2)


def test_controller_side_module_stays_light():
    """Train's controller unpickles the CommitRecorder callback, so it imports its module before
    it starts the workers: that module must not pull in the data pipeline or scikit-learn."""
    import subprocess
    import sys

    code = ("import sys, emergence_ray.commit; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('sklearn', 'scipy', 'torchvision', 'mlflow', 'tensorboard', 'PIL') "
            "or m.startswith('emergence_ray.data')]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_imagefolder_single_tree(digits_imagefolder):
    p = prepare(DataConfig(source="imagefolder", path=str(digits_imagefolder)))
    _check(p, 1797, 1, 8)
    assert p.spec.class_names[0] == "class_0"


def test_imagefolder_split_folders_and_resize(tmp_path, digits_imagefolder):
    images, labels = digits_arrays()
    for split, sl in (("train", slice(0, 1200)), ("test", slice(1200, None))):
        for i, (img, y) in list(enumerate(zip(images, labels)))[sl]:
            d = tmp_path / split / str(y)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i}.png").write_bytes(png_bytes(img))
    p = prepare(DataConfig(source="imagefolder", path=str(tmp_path), image_size=12, channels=3))
    counts = _check(p, 1797, 3, 12)
    assert counts["test"] == 597 and counts["val"] == pytest.approx(120, abs=2)


def test_imagefolder_mixed_sizes_and_modes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        d = tmp_path / f"c{c}"
        d.mkdir()
        for i in range(6):
            size = (8, 8) if i % 3 else (11, 9)  # mostly 8x8: the common size wins
            img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            img.convert("RGB" if i % 3 else "L").save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    p = prepare(DataConfig(source="imagefolder", path=str(tmp_path), val_fraction=0.2, test_fraction=0.2))
    _check(p, 60, 3, 8)


def test_parquet_struct_column_single_file(digits_parquet):
    p = prepare(DataConfig(source="parquet", path=str(digits_parquet)))
    _check(p, 1797, 1, 8)


def test_parquet_split_files_plain_bytes(tmp_path):
    images, labels = digits_arrays()
    for split, sl in (("train", slice(0, 1000)), ("val", slice(1000, 1300)), ("test", slice(1300, None))):
        pq.write_table(pa.table({"png": [png_bytes(i) for i in images[sl]], "digit": labels[sl]}),
                       tmp_path / f"{split}.parquet")
    p = prepare(DataConfig(source="parquet", path=str(tmp_path), image_column="png", label_column="digit"))
    counts = _check(p, 1797, 1, 8)
    assert counts == {"train": 1000, "val": 300, "test": 497}


def test_idx_files(digits_idx):
    p = prepare(DataConfig(source="idx", path=str(digits_idx), val_fraction=0.1))
    counts = _check(p, 1797, 1, 8)
    assert counts["test"] == 397 and counts["val"] == 140


def test_splits_are_seeded_and_stable(digits_imagefolder, tmp_path):
    """The same job sees the same split on every run (resume, evaluate) and moves with the seed."""
    from emergence_ray.data.sources import SOURCES

    cfg = DataConfig(source="imagefolder", path=str(digits_imagefolder))
    ids = lambda raw: sorted(raw.test.paths)  # noqa: E731  (listed on the driver: no image is read)
    assert ids(SOURCES["imagefolder"](cfg)) == ids(SOURCES["imagefolder"](cfg))
    other = SOURCES["imagefolder"](cfg.model_copy(update={"split_seed": 1}))
    assert ids(other) != ids(SOURCES["imagefolder"](cfg))


def test_train_split_of_a_class_sorted_parquet_comes_shuffled(tmp_path):
    """Workers read contiguous runs of the train split: a file sorted by class must not give one
    worker the low classes and the other the high ones."""
    images, labels = digits_arrays()
    order = np.argsort(labels, kind="stable")
    table = pa.table({"image": [png_bytes(images[i]) for i in order[:600]], "label": labels[order[:600]]})
    pq.write_table(table, tmp_path / "sorted.parquet")
    p = prepare(DataConfig(source="parquet", path=str(tmp_path / "sorted.parquet")))
    train = p.train.to_pandas()["label"].to_numpy()
    halves = np.array_split(train, 2)
    assert set(halves[0]) == set(halves[1]) == set(labels[order[:600]])  # every class on both workers
    again = prepare(DataConfig(source="parquet", path=str(tmp_path / "sorted.parquet"))).train
    assert np.array_equal(again.to_pandas()["label"].to_numpy(), train)  # the order is seeded


# ---------------------------------------------------------------- labels and unlearnable classes


def _pngs(n: int) -> list[bytes]:
    images, _ = digits_arrays()
    return [png_bytes(images[i]) for i in range(n)]


def test_parquet_string_and_integral_float_labels(tmp_path):
    """String class names (sorted into class_names, or mapped by data.class_names) and integral
    floats train like integer labels; the label pass reads no image bytes on the driver."""
    _, labels = digits_arrays()
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    pq.write_table(pa.table({"image": _pngs(300), "label": names[labels[:300]]}), tmp_path / "names.parquet")
    pq.write_table(pa.table({"image": _pngs(300), "label": labels[:300].astype(np.float64)}),
                   tmp_path / "floats.parquet")
    p = prepare(DataConfig(source="parquet", path=str(tmp_path / "names.parquet")), with_test=False)
    assert p.spec.class_names == sorted(names.tolist())
    got = p.val.to_pandas()
    by_id = dict(zip(got["id"], got["label"]))
    order = list(names)
    mapped = prepare(DataConfig(source="parquet", path=str(tmp_path / "names.parquet"), class_names=order),
                     with_test=False)
    assert mapped.spec.class_names == order
    again = mapped.val.to_pandas()
    # each label is its name's index in the given order (the split may differ: it is stratified by code)
    common = [(i, y) for i, y in zip(again["id"], again["label"]) if i in by_id]
    assert common and all(order[y] == sorted(order)[by_id[i]] for i, y in common)
    f = prepare(DataConfig(source="parquet", path=str(tmp_path / "floats.parquet")), with_test=False)
    assert f.spec.class_names == [str(i) for i in range(10)] and f.counts["train"] + f.counts["val"] == 240


@pytest.fixture(scope="module")
def label_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labels")
    images, labels = digits_arrays()
    pngs = _pngs(200)
    y = labels[:200].astype(np.float64)
    frac = y.copy()
    frac[7] = 1.5
    pq.write_table(pa.table({"image": pngs, "label": frac}), root / "fractional.parquet")
    nulls = pa.array([None if i == 3 else int(v) for i, v in enumerate(labels[:200])], pa.int64())
    pq.write_table(pa.table({"image": pngs, "label": nulls}), root / "nulls.parquet")
    neg = labels[:200].copy()
    neg[5] = -1
    pq.write_table(pa.table({"image": pngs, "label": neg}), root / "negative.parquet")
    pq.write_table(pa.table({"image": pngs, "label": labels[:200]}), root / "ok.parquet")
    tree = root / "empty_class"
    for i in range(200):
        (tree / f"c{labels[i]}").mkdir(parents=True, exist_ok=True)
        (tree / f"c{labels[i]}" / f"{i}.png").write_bytes(pngs[i])
    (tree / "c_new").mkdir()  # a class folder with no images
    split = root / "test_only_class"
    for i in range(200):
        part = "train" if i < 150 else "test"
        cls = f"c{labels[i]}" if part == "train" or labels[i] != 3 else "c_extra"
        (split / part / cls).mkdir(parents=True, exist_ok=True)
        (split / part / cls / f"{i}.png").write_bytes(pngs[i])
    (root / "one.png").write_bytes(pngs[0])
    return {p.stem: p for p in root.iterdir()}


LABEL_CASES = {
    # name: (overrides, fragments of the one error line)
    "fractional float labels": (["data.source=parquet", "data.path={fractional}"],
                                ["fractional.parquet", "1.5", "not a whole number", "class indices"]),
    "null labels": (["data.source=parquet", "data.path={nulls}"], ["nulls.parquet", "null", "give every row"]),
    "negative labels": (["data.source=parquet", "data.path={negative}"],
                        ["negative.parquet", "-1", "negative class index", "start at 0"]),
    "imagefolder path is a file": (["data.source=imagefolder", "data.path={one}"],
                                   ["is a file", "one subfolder per class", "data.source=parquet"]),
    "class with no training images": (["data.source=imagefolder", "data.path={empty_class}"],
                                      ["'c_new'", "no training images", "could never learn"]),
    "class only in the test split": (["data.source=imagefolder", "data.path={test_only_class}"],
                                     ["c_extra", "not in train/", "could never learn"]),
    "class name with no rows": (["data.source=parquet", "data.path={ok}",
                                 "data.class_names=[a, b, c, d, e, f, g, h, i, j, k]"],
                                ["'k'", "no training images"]),
}


@pytest.fixture(scope="module")
def label_refusals(ray_session, label_data, tmp_path_factory) -> dict:
    """Every LABEL_CASES command through the real CLI against the session's Ray, a few at a time."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from conftest import CLI, cli_env

    def run(case: str):
        storage = tmp_path_factory.mktemp("label_runs")
        args = ["train", "--set", f"run.storage_path={storage}"]
        for o in LABEL_CASES[case][0]:
            args += ["--set", o.format(**{k: str(v) for k, v in label_data.items()})]
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600,
                              env=cli_env(RAY_ADDRESS=ray_session))
        return proc, sorted(storage.rglob("*"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(LABEL_CASES, pool.map(run, LABEL_CASES)))


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_bad_labels_and_unlearnable_classes_are_refused(case, label_refusals):
    proc, written = label_refusals[case]
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in LABEL_CASES[case][1]:
        assert fragment in errors[0], errors[0]
    assert written == []  # nothing written


def test_streamed_blocks_follow_the_object_store_and_spread_small_splits(ray_session):
    """Read tasks take up to 256 images, in blocks of at most 1/32 of the smallest object store
    (never under 16 MB), and a small split still gets two tasks per CPU."""
    import ray

    from emergence_ray.data import pipeline

    store = min(n["Resources"]["object_store_memory"] for n in ray.nodes() if n["Alive"])
    want = min(pipeline.MAX_BLOCK_BYTES, max(pipeline.BLOCK_BYTES, int(store) // pipeline.STORE_SHARE))
    assert pipeline.block_bytes() == want
    per_image = 3 * 256 * 256
    big = pipeline.files_per_task(100_000, per_image)
    assert big == max(8, min(256, want // per_image)) and big * per_image <= max(want, 8 * per_image)
    assert pipeline.files_per_task(200, per_image) == min(big, 50)  # 200 images over 2 CPUs: 4 tasks
    assert pipeline.files_per_task(10, per_image) == 8  # never fewer than 8 images a task


def test_file_list_deals_every_file_once_in_a_new_seeded_order_each_execution(ray_session, digits_imagefolder):
    """The streamed ImageFolder's file list: no image bytes, labels from the folders, every file
    once per execution, each execution in the seeded order of its execution index (a different one
    each time, reproducible from (seed, index)); unshuffled splits keep the listed order."""
    from emergence_ray.data.sources import SOURCES, _FileList

    split = SOURCES["imagefolder"](DataConfig(source="imagefolder", path=str(digits_imagefolder))).train
    paths, per_block = np.array(split.paths), 100

    def blocks(order: np.ndarray) -> set[tuple[str, ...]]:
        return {tuple(paths[order[i:i + per_block]]) for i in range(0, len(order), per_block)}

    # Read tasks finish in any order (Ray Data does not preserve it by default): an execution's
    # order is its blocks, each of `per_block` files in the seeded order
    seeded = {i: blocks(_FileList(split, 7, per_block).order(i)) for i in range(50)}

    def execution(ds) -> tuple[int | None, list[dict]]:
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        got = {tuple(b["id"]) for b in batches}
        rows = [{"label": int(y), "id": str(i)} for b in batches for y, i in zip(b["label"], b["id"])]
        return next((i for i, o in seeded.items() if o == got), None), rows

    ds = split.file_list(7, files_per_block=per_block)
    runs = [execution(ds) for _ in range(3)]
    assert set(ds.take(1)[0]) == {"label", "id"}
    for _, rows in runs:
        assert sorted(r["id"] for r in rows) == sorted(split.paths)
        assert all(r["label"] == int(Path(r["id"]).parent.name.split("_")[1]) for r in rows)
    indices = [i for i, _ in runs]
    assert indices == [0, 1, 2], f"the executions dealt the seeded orders of {indices}"
    # reproducible: a new dataset with the same seed deals the same first order; another seed does not
    assert execution(split.file_list(7, files_per_block=per_block))[0] == 0
    assert seeded[3] != blocks(_FileList(split, 8, per_block).order(3))
    listed = split.file_list(None, files_per_block=per_block)
    assert {tuple(b["id"]) for b in listed.iter_batches(batch_size=None)} == blocks(np.arange(len(paths)))


def test_execution_index_is_read_from_ray_data(ray_session):
    """`sources.execution_index` reads an underscored attribute of Ray Data's DataContext (no public
    accessor): this fails loudly if Ray renames it or stops counting executions."""
    from emergence_ray.data.sources import execution_index

    import ray.data

    ds = ray.data.range(4)
    assert execution_index(ds.context) == 0
    ds.take_all()
    ds.take_all()
    assert execution_index(ds.context) == 2
    assert execution_index(None) is None


def test_decode_files_names_an_unreadable_file_or_skips_it(tmp_path):
    import pyarrow.fs as pafs

    from emergence_ray.data.transforms import DataSpec, DecodeFiles
    from emergence_ray.errors import DataError

    good = tmp_path / "a.png"
    good.write_bytes(png_bytes(np.full((8, 8), 200, np.uint8)))
    gone = str(tmp_path / "gone.png")
    spec = DataSpec(channels=1, image_size=8, class_names=["a"], mean=[0.5], std=[0.2])
    batch = {"id": np.array([str(good), gone], dtype=object), "label": np.array([0, 0])}
    with pytest.raises(DataError, match="gone.png: cannot be read.*data.on_bad_image=skip"):
        DecodeFiles(pafs.LocalFileSystem(), spec)(batch)
    out = DecodeFiles(pafs.LocalFileSystem(), spec, "skip")(batch)
    assert out["ok"].tolist() == [True, False] and out["image"][0].mean() == 200


@pytest.mark.parametrize("decoders", [1, 2])
def test_decode_files_called_from_threads_decodes_at_most_its_decoders_at_a_time(tmp_path, decoders):
    """A decode actor runs several calls at once (`pipeline.decode_actors`): each call's output is
    its own batch's, and at most `decoders` batches decode at the same time (one: one CPU per
    actor, as Ray accounts it; two where its threads sit below the training workers)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    from emergence_ray.data.transforms import DataSpec, DecodeFiles

    paths = []
    for i in range(24):
        p = tmp_path / f"{i}.png"
        p.write_bytes(png_bytes(np.full((16, 16), i * 10, np.uint8)))
        paths.append(str(p))
    spec = DataSpec(channels=1, image_size=16, class_names=["a"], mean=[0.5], std=[0.2])
    files = DecodeFiles(pafs.LocalFileSystem(), spec, keep_ids=False, decoders=decoders)
    decode, active, most, guard = files.decode, [0], [0], threading.Lock()

    def counted(batch):  # the batch decode, counting how many run at once
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            threading.Event().wait(0.02)  # long enough for the other threads to arrive
            return decode(batch)
        finally:
            with guard:
                active[0] -= 1

    files.decode = counted
    batches = [{"id": np.array(paths[i:i + 3], dtype=object), "label": np.arange(i, i + 3)} for i in range(0, 24, 3)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(files, batches))
    assert most[0] == decoders
    with pytest.raises(ValueError, match="decoders must be at least 1"):
        DecodeFiles(pafs.LocalFileSystem(), spec, decoders=0)
    for batch, out in zip(batches, outs):
        assert out["label"].tolist() == batch["label"].tolist()
        assert [int(img.mean()) for img in out["image"]] == [int(lbl) * 10 for lbl in batch["label"]]


def test_decode_files_threads_yield_to_the_training_worker(tmp_path):
    """`data.decode_niceness`: every thread that runs a `DecodeFiles` call moves itself to that nice
    value, never below the one it has (lowering it needs privileges), and no other thread moves."""
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    from emergence_ray.data.transforms import DataSpec, DecodeFiles
    from emergence_ray.priority import yield_this_thread

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice()
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes(np.full((8, 8), 9, np.uint8)))
    spec = DataSpec(channels=1, image_size=8, class_names=["a"], mean=[0.5], std=[0.2])
    target = min(19, mine + 4)
    files = DecodeFiles(pafs.LocalFileSystem(), spec, keep_ids=False, nice=target)
    batch = {"id": np.array([str(p)], dtype=object), "label": np.array([0])}

    together = threading.Barrier(3)  # three calls at once: three threads of the pool

    def call(_):
        before = nice()
        files(batch)
        together.wait(timeout=30)
        return before, nice(), threading.get_native_id()

    with ThreadPoolExecutor(3) as pool:
        seen = list(pool.map(call, range(12)))
    assert {(after, before == mine or before == target) for before, after, _ in seen} == {(target, True)}
    assert len({tid for _, _, tid in seen}) == 3  # each thread moved on its first call
    assert nice() == mine  # the caller's own thread stays

    def lower():  # a thread already below the target stays where it is
        yield_this_thread(min(19, mine + 6))
        return yield_this_thread(target)

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(lower).result() == min(19, mine + 6)
