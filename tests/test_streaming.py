"""Streaming ingest (`data.ingest=stream`): data several times the object store trains without
spilling, and every training image is trained on exactly once per epoch, by image id.

Workers log the ids they train on only when the driver runs with EMERGENCE_RAY_RECORD_IDS=1
(`emergence_ray.data.handoff.RECORD_IDS_ENV`): one line per image into
`<run dir>/seen_ids/<split>-rank<r>-epoch<e>.txt`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CLI, ROOT, cli_env

from emergence_ray import cluster

LOCAL_CLUSTER = [sys.executable, str(ROOT / "cluster" / "local_cluster.py")]
STORE_MB = 256


def seen_ids(run_dir: Path, split: str, epoch: int) -> dict[int, list[str]]:
    """rank -> the ids that rank trained on (or evaluated) in `epoch` (0-based), in order."""
    out = {}
    for f in sorted((run_dir / "seen_ids").glob(f"{split}-rank*-epoch{epoch}.txt")):
        rank = int(f.name.split("-rank")[1].split("-")[0])
        out[rank] = f.read_text().split()
    return out


def assert_exactly_once(run_dir: Path, epochs: int, train_ids: set[str] | None, world: int,
                        train_count: int | None = None) -> None:
    """Every epoch: equal shards, no image twice, every training image but at most world - 1 (the
    listed ids, or any `train_count` ids, the same images every epoch)."""
    orders, first = [], None
    for epoch in range(epochs):
        ranks = seen_ids(run_dir, "train", epoch)
        assert sorted(ranks) == list(range(world)), f"epoch {epoch}: ranks {sorted(ranks)}"
        sizes = {len(ids) for ids in ranks.values()}
        assert len(sizes) == 1, f"epoch {epoch}: unequal shards {sizes}"
        everything = [i for r in sorted(ranks) for i in ranks[r]]
        assert len(everything) == len(set(everything)), f"epoch {epoch}: an image trained twice"
        if train_ids is not None:
            assert set(everything) <= train_ids, f"epoch {epoch}: ids outside the train split"
        total = len(train_ids) if train_ids is not None else train_count
        assert 0 <= total - len(everything) < world, f"epoch {epoch}: {total - len(everything)} missed"
        first = first or set(everything)
        assert len(first ^ set(everything)) < 2 * world, f"epoch {epoch}: other images than epoch 0"
        orders.append(ranks[0])
    assert all(a != b for a, b in zip(orders, orders[1:])), "the same order in two epochs: no reshuffle"


def write_jpegs(root: Path, n: int, classes: int, side: int, seed: int = 0) -> None:
    """Smooth, photo-like colour images (low-frequency noise, upsampled), one folder per class;
    each class has its own mean colour so that the task is learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.normal(0, 40, (6, 6, 3)) + np.array([60 + 120 * (c % 2), 60 + 60 * (c // 2 % 3), 120])
        img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        img.save(d / f"{i:05d}.jpg", quality=85)


@contextlib.contextmanager
def small_store_head():
    """A local head with a 256 MiB object store, its own temp dir and ports; stopped by pid."""
    directory = Path(tempfile.mkdtemp(prefix="er-stream-", dir="/tmp"))
    try:  # a failed start is stopped too: it may have left a GCS or raylet running
        proc = subprocess.run([*LOCAL_CLUSTER, "start", "--dir", str(directory), "--cpus", "2",
                               "--object-store-mb", str(STORE_MB)], capture_output=True, text=True, timeout=400,
                              env=cli_env(RAY_raylet_start_wait_time_s="300"))  # a busy 2-core host is slow
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield json.loads((directory / "cluster.json").read_text())
    finally:
        subprocess.run([*LOCAL_CLUSTER, "stop", "--dir", str(directory)], timeout=120, env=cli_env())
        shutil.rmtree(directory, ignore_errors=True)


def spill_stats(gcs_address: str) -> str:
    proc = subprocess.run(["ray", "memory", "--stats-only", "--address", gcs_address], capture_output=True,
                          text=True, timeout=120, env=cli_env(RAY_AUTH_MODE="token"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_imagefolder_many_times_the_object_store_streams_without_spilling(tmp_path):
    """3,000 JPEGs decoded to 3x160x160: 921 MB as float32 (3.4x the 256 MiB store), 230 MB as
    uint8. Two epochs through the real CLI on the small-store head: no spill, exactly-once epochs."""
    from emergence_ray.config import DataConfig
    from emergence_ray.data.sources import SOURCES

    data = tmp_path / "photos"
    write_jpegs(data, 3000, classes=4, side=96)
    size = 160
    assert 3000 * 3 * size * size * 4 > 3.4 * STORE_MB * 2**20
    overrides = ["data.source=imagefolder", f"data.path={data}", f"data.image_size={size}", "data.ingest=stream",
                 "data.val_fraction=0.1", "data.test_fraction=0.1", "model.name=mlp", "model.width=16",
                 "model.depth=1", "train.epochs=2", "train.batch_size=64", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=big"]
    with small_store_head() as head:
        proc = subprocess.run([*CLI, "train", "--address", head["gcs_address"],
                               *[a for o in overrides for a in ("--set", o)]], capture_output=True, text=True,
                              timeout=900, env=cli_env(EMERGENCE_RAY_RECORD_IDS="1", RAY_AUTH_MODE="token"),
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        stats = spill_stats(head["gcs_address"])
    assert "Spilled" not in stats, stats
    run_dir = tmp_path / "runs" / "big"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ingest"] == "stream" and summary["epochs"] == 2 and summary["first_step_s"] > 0
    assert "first_step_s" in proc.stdout + proc.stderr  # in epoch 1's log line
    cfg = DataConfig(source="imagefolder", path=str(data), val_fraction=0.1, test_fraction=0.1)
    train_ids = set(SOURCES["imagefolder"](cfg).train.paths)  # listed on the driver, no image read
    assert_exactly_once(run_dir, 2, train_ids, world=2)
    val = [i for ids in seen_ids(run_dir, "val", 0).values() for i in ids]
    assert len(val) == len(set(val)) == summary["images"]["val"]  # validation: every image once


def test_streamed_imagefolder_is_decoded_by_actors_and_trained_once_per_epoch(ray_session, digits_imagefolder,
                                                                            tmp_path, monkeypatch):
    """The default run's path through a streamed ImageFolder: the train split's files are listed
    in a new order every epoch and read and decoded by Ray Data decode actors; every training image
    trained on exactly once per epoch, validation whole; the run learns."""
    from conftest import actor_classes
    from emergence_ray.config import load_config
    from emergence_ray.data.handoff import RECORD_IDS_ENV
    from emergence_ray.data.sources import SOURCES
    from emergence_ray.trainer import train

    monkeypatch.setenv(RECORD_IDS_ENV, "1")
    cfg = load_config(None, ["data.source=imagefolder", f"data.path={digits_imagefolder}", "data.ingest=stream",
                             "train.epochs=3", f"run.storage_path={tmp_path}", "run.name=folder",
                             "scaling.keep_freed_memory=true"])
    before = set(actor_classes())
    run_dir = Path(train(cfg))
    started = [cls for actor_id, cls in actor_classes().items() if actor_id not in before]
    assert any("DecodeFiles" in cls for cls in started), started
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ingest"] == "stream" and summary["test_accuracy"] >= 0.85, summary
    train_ids = set(SOURCES["imagefolder"](cfg.data).train.paths)
    assert_exactly_once(run_dir, 3, train_ids, world=2)
    val = [i for ids in seen_ids(run_dir, "val", 2).values() for i in ids]
    assert len(val) == len(set(val)) == summary["images"]["val"]
    # scaling.keep_freed_memory=true: the training workers start with glibc's allocator keeping
    # large freed blocks (other workers keep its defaults: test_train_e2e's embedded-Ray test)
    workers = json.loads((run_dir / "workers.json").read_text())
    assert [w["malloc"] for w in workers] == [cluster.TRAIN_WORKER_MALLOC] * 2, workers


def test_decode_pool_starts_with_the_cpus_the_trainer_leaves(ray_session, digits_imagefolder):
    """Every epoch's decode pool starts with one actor per CPU the training workers leave free
    (`cluster.spare_cpus`, at most the cluster's CPUs), not with one that Ray Data's autoscaler
    grows only once it is busy: all of them are created together, as the execution starts."""
    import threading
    import time

    from conftest import actor_classes, actor_pids
    from emergence_ray.cluster import spare_cpus
    from emergence_ray.config import DataConfig
    from emergence_ray.data import pipeline

    assert spare_cpus(1, 1.0, {"CPU": 2}) == 1  # one worker on this machine
    assert spare_cpus(2, 0.5, {"CPU": 2}) == 1
    assert spare_cpus(1, 1.0, {"CPU": 16, "GPU": 1}) == 15  # a GPU node's spare cores
    assert spare_cpus(4, 1.0, {"CPU": 8}) == 4  # an elastic run's largest group
    assert spare_cpus(4, 0.75, {"CPU": 4}) == 1
    pool = pipeline.decode_actors(5)  # the session Ray has 2 CPUs
    assert (pool.min_size, pool.initial_size, pool.max_size) == (1, 2, 2)
    # several calls per actor, one of them decoding (`DecodeFiles`): the actor is not idle while
    # its last batch goes to the object store
    assert pool.max_concurrent_calls_per_actor == pipeline.DECODE_CALLS_PER_ACTOR > 1
    assert pool.enable_true_multi_threading
    assert not pipeline.decode_actors(1, calls=1).enable_true_multi_threading  # the former pool

    # blocks of whole batches where that costs at most twice the bytes
    per_image = 3 * 256 * 256
    plain = pipeline.files_per_task(10**6, per_image, pipeline.ACTOR_FILES)
    assert plain == min(pipeline.ACTOR_FILES, pipeline.block_bytes() // per_image)
    for batch in (16, 64, plain // 2 + 1):
        rows = pipeline.files_per_task(10**6, per_image, pipeline.ACTOR_FILES, batch_rows=batch)
        assert rows % batch == 0 and plain <= rows <= 2 * plain, (batch, rows, plain)
    assert pipeline.files_per_task(10**6, per_image, pipeline.ACTOR_FILES, batch_rows=2 * plain + 1) == plain
    assert pipeline.files_per_task(40, per_image, pipeline.ACTOR_FILES, batch_rows=64) == 10  # 2 tasks per CPU
    assert pipeline.decode_actors().initial_size == 1

    cfg = DataConfig(source="imagefolder", path=str(digits_imagefolder), ingest="stream")
    # a second decode per actor only below the training workers: at their priority it would take their CPU
    assert pipeline.actor_decodes(cfg) == pipeline.NICED_DECODES_PER_ACTOR == 2
    assert pipeline.actor_decodes(cfg.model_copy(update={"decode_niceness": None})) == 1
    raw = pipeline.load_raw(cfg)
    spec = pipeline.resolve_spec(raw, cfg)
    before = set(actor_classes())

    def decoders() -> list[str]:
        return [cls for actor_id, cls in actor_classes().items() if actor_id not in before and "DecodeFiles" in cls]

    # decode_niceness above Ray's default worker nice value (15), so that it shows however the session's
    # Ray started its workers
    cfg = cfg.model_copy(update={"decode_niceness": 17})
    seen: dict[int, set[int]] = {}  # decode actor's pid -> nice values of its threads, sampled from /proc
    done = threading.Event()

    def watch() -> None:  # the actors may be gone once their last call ends: sample them while they run
        pids: list[int] = []
        while not done.is_set():
            if len(pids) < 2:
                classes = actor_classes()
                pids = [pid for actor_id, pid in actor_pids().items()
                        if pid and actor_id not in before and "DecodeFiles" in classes.get(actor_id, "")]
            for pid in pids:
                with contextlib.suppress(OSError):  # the actor or one of its threads ended meanwhile
                    for t in os.listdir(f"/proc/{pid}/task"):
                        with contextlib.suppress(OSError):
                            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
                            seen.setdefault(pid, set()).add(int(stat.rsplit(")", 1)[1].split()[16]))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    train = pipeline.decoded(raw.train, spec, cfg, shuffle_seed=0, actors=True, start_actors=2)
    batches = iter(train.iterator().iter_batches(batch_size=16))
    first = threading.Thread(target=next, args=(batches,))
    first.start()  # the execution starts, and with it the pool
    deadline = time.monotonic() + 60
    while not decoders() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # far less than an actor's start-up (~1 s), after which the autoscaler would add one
    assert len(decoders()) == 2, decoders()
    first.join()
    assert 16 + sum(len(b["label"]) for b in batches) == raw.train.count
    done.set()
    watcher.join()
    # the threads that ran decode calls yield to the training worker (`data.decode_niceness`); the
    # actors' own threads (Ray's) keep the nice value Ray started them with
    assert any(17 in n and min(n) < 17 for n in seen.values()), {pid: sorted(n) for pid, n in seen.items()}


def test_one_worker_reads_every_split_whole_in_a_new_order_each_epoch(ray_session, digits_imagefolder, tmp_path):
    """`handoff.TrainSplit` for one worker: no streaming_split, the splits reach it whole, and a
    streamed ImageFolder still comes in a new file order every epoch, every image once."""
    import torch

    from emergence_ray.config import DataConfig
    from emergence_ray.data import pipeline
    from emergence_ray.data.handoff import TrainSplit
    from emergence_ray.data.ingest import WorkerIngest

    cfg = DataConfig(source="imagefolder", path=str(digits_imagefolder), ingest="stream")
    raw = pipeline.load_raw(cfg)
    spec = pipeline.resolve_spec(raw, cfg)
    train = pipeline.decoded(raw.train, spec, cfg, shuffle_seed=0, actors=True)
    val = pipeline.decoded(raw.val, spec, cfg)
    [worker] = TrainSplit().configure({"train": train, "val": val}, 1, None, None)
    ingest = WorkerIngest(worker["train"], 64, torch.device("cpu"), shuffle=True, shuffle_buffer=0,
                          record=str(tmp_path / "seen_ids"))
    for epoch in range(2):
        assert sum(len(b["label"]) for b in ingest.epoch(epoch)) == raw.train.count
    assert_exactly_once(tmp_path, 2, set(raw.train.paths), world=1)
    assert sum(len(b["label"]) for b in worker["val"].iter_batches(batch_size=256)) == raw.val.count




def _cpu_s(stats: list[Path]) -> float:
    """User + system CPU seconds of the processes or threads of these /proc .../stat files."""
    total = 0
    for stat in stats:
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _loop_cpu_behind_slow_readers(iterators: list, find_loop) -> float:
    """Read each iterator in a thread of its own, one batch every 0.2 s; once the scheduling loop
    runs (`find_loop()`: its stat files) and 1 s later (the producer ahead by then), the CPU
    seconds it uses in the next 2.5 s."""
    import threading
    import time

    stop = threading.Event()

    def read(batches) -> None:
        for _ in batches:
            if stop.wait(0.2):
                return

    threads = [threading.Thread(target=read, args=(it,), daemon=True) for it in iterators]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while not (stats := find_loop()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats, "no scheduling loop found"
        time.sleep(1.0)
        cpu = _cpu_s(stats)
        time.sleep(2.5)
        return _cpu_s(stats) - cpu
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def _executor_threads() -> list[Path]:
    import threading

    return [Path(f"/proc/self/task/{t.native_id}/stat") for t in threading.enumerate()
            if t.name.startswith("StreamingExecutor-")]


def _split_coordinators() -> list[Path]:
    stats = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if b"SplitCoordinator" in Path(f"/proc/{pid}/cmdline").read_bytes():
                stats.append(Path(f"/proc/{pid}/stat"))
    return stats


def _loop_cpu_paced() -> tuple[float, float]:
    """(whole, split): the CPU seconds of this process's Ray Data scheduling loop (one worker
    reading a split whole) and of a split coordinator's process (two reading it through
    streaming_split), 2.5 s behind slow readers, both paced by `handoff.trainer_inputs`."""
    import numpy as np
    import ray.data

    from emergence_ray.data.handoff import trainer_inputs

    def dataset() -> ray.data.Dataset:  # 80 blocks of 8 MiB, made far faster than read
        return ray.data.range(80, override_num_blocks=80).map_batches(
            lambda b: {"x": np.zeros((len(b["id"]), 2**23), np.uint8)})

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=32 * 2**20)
    whole, _, config = trainer_inputs({"train": dataset(), "val": dataset()}, cache=False)
    [worker] = config.configure(whole, 1, None, None)
    whole_cpu = _loop_cpu_behind_slow_readers([worker["train"].iter_batches(batch_size=1, prefetch_batches=1)],
                                              _executor_threads)
    old_coordinators = set(_split_coordinators())  # other tests' may still be alive
    split, _, config = trainer_inputs({"train": dataset(), "val": dataset()}, cache=False)
    shards = [s["train"].iter_batches(batch_size=1, prefetch_batches=1) for s in config.configure(split, 2, None, None)]
    split_cpu = _loop_cpu_behind_slow_readers(
        shards, lambda: [p for p in _split_coordinators() if p not in old_coordinators])
    return whole_cpu, split_cpu


def test_ray_datas_scheduling_loop_does_not_spin_behind_slow_readers(ray_session):
    """Streams the workers read slower than Ray Data produces them (training slower than decode,
    the usual case). Unpaced, Ray Data's scheduling loop then spins (backpressure leaves it only
    finished tasks to wait on, and `ray.wait` returns at once); `data.pacing` caps it at 50 steps
    a second. Read whole (one worker) the loop is a thread of the reader: measured here 0.45-1.18 s
    of CPU in 2.5 s unpaced, 0.09-0.17 s paced; through streaming_split (several workers) it is
    the split coordinator's, whose process also serves the readers: 2.18-2.32 s unpaced,
    0.59-0.70 s paced. Measured in a process of its own on the session's Ray, as a training worker
    reads: in this one, after other tests' datasets, each step cost more (0.24-0.30 s paced).
    Fails when Ray Data drops the undocumented hook used (`custom_execution_callback_classes`) or
    changes its callback protocol."""
    code = ("import sys, ray; sys.path.insert(0, sys.argv[1]); ray.init(logging_level='ERROR')\n"
            "from test_streaming import _loop_cpu_paced; print(*_loop_cpu_paced())\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True, text=True,
                          timeout=300, env=cli_env(RAY_ADDRESS=ray_session), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole_cpu, split_cpu = map(float, proc.stdout.split()[-2:])
    assert whole_cpu < 0.3 and split_cpu < 1.3, (whole_cpu, split_cpu)
