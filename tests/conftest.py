"""Shared fixtures: one local Ray per test session, and real datasets written to temp folders."""

from __future__ import annotations

import gzip
import io
import json
import re
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray (2 CPUs, like the CI machine) shared by the tests that don't need a cluster
    of their own. Yields the address a subprocess can use as RAY_ADDRESS. No dashboard: these tests
    use no Jobs API (test_cluster_jobs.py starts a cluster with one), and its ten processes would
    take CPU from every test on a 2-core machine."""
    import ray

    ray.init(num_cpus=2, logging_level="WARNING", include_dashboard=False,
             runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def digits_imagefolder(tmp_path_factory) -> Path:
    """The digits as an ImageFolder: one subfolder per class, PNG files, single tree."""
    root = tmp_path_factory.mktemp("digits_imagefolder")
    images, labels = digits_arrays()
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / f"class_{y}"
        d.mkdir(exist_ok=True)
        (d / f"{i:05d}.png").write_bytes(png_bytes(img))
    return root


@pytest.fixture(scope="session")
def digits_parquet(tmp_path_factory) -> Path:
    """The digits as one Parquet file: PNG bytes in a Hugging Face style {bytes, path} struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("digits_parquet") / "digits.parquet"
    images, labels = digits_arrays()
    structs = [{"bytes": png_bytes(img), "path": f"{i}.png"} for i, img in enumerate(images)]
    pq.write_table(pa.table({"image": structs, "label": labels}), path)
    return path


@pytest.fixture(scope="session")
def imagefolder_run(ray_session, digits_imagefolder, tmp_path_factory) -> Path:
    """One finished training run on the digits ImageFolder (6 epochs, shards cached in worker
    memory): test_train_e2e.py checks its accuracy, test_predict.py predicts with its checkpoint."""
    from emergence_ray.config import load_config
    from emergence_ray.trainer import train

    storage = tmp_path_factory.mktemp("imagefolder_runs")
    cfg = load_config(None, ["data.source=imagefolder", f"data.path={digits_imagefolder}", "train.epochs=6",
                             "data.ingest=auto", f"run.storage_path={storage}", "run.name=imagefolder"])
    before = set(actor_classes())
    run_dir = Path(train(cfg))
    RUN_ACTORS["imagefolder"] = [cls for actor_id, cls in actor_classes().items() if actor_id not in before]
    return run_dir


RUN_ACTORS: dict[str, list[str]] = {}  # run -> classes of the actors Ray started during it


def actor_classes() -> dict[str, str]:
    """Every actor the session's Ray has known (alive or dead): id -> class name. From the GCS, as
    the session Ray runs no dashboard for the state API."""
    import ray

    return {a["ActorID"]: a["ActorClassName"] for a in ray._private.state.actors().values()}


def actor_pids() -> dict[str, int]:
    """Process id of every actor the session's Ray has known (alive or dead), by actor id."""
    import ray

    return {a["ActorID"]: a["Pid"] for a in ray._private.state.actors().values()}


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _idx_folder(root: Path, gz: bool) -> Path:
    """The digits as the four MNIST-style IDX files (first 1,400 train, rest test)."""
    images, labels = digits_arrays()
    write_idx(root / "train-images-idx3-ubyte", images[:1400], gz)
    write_idx(root / "train-labels-idx1-ubyte", labels[:1400], gz)
    write_idx(root / "t10k-images-idx3-ubyte", images[1400:], gz)
    write_idx(root / "t10k-labels-idx1-ubyte", labels[1400:], gz)
    return root


@pytest.fixture(scope="session", params=[True, False], ids=["gz", "raw"])
def digits_idx(request, tmp_path_factory) -> Path:
    return _idx_folder(tmp_path_factory.mktemp("digits_idx"), request.param)


@pytest.fixture(scope="session")
def digits_idx_gz(tmp_path_factory) -> Path:
    return _idx_folder(tmp_path_factory.mktemp("digits_idx_gz"), True)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


CLI = [sys.executable, "-m", "emergence_ray"]


def run_epochs(run_dir: Path) -> list[int]:
    """The epochs in a run's metrics.jsonl, in order."""
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, log: Path | None = None) -> None:
    """Poll `predicate` (files being written may raise) until it holds; fail if `proc` ends first
    or the time runs out, with the tail of `log` if given."""
    tail = (lambda: "\n" + log.read_text()[-3000:]) if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, f"process ended before {what}{tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}{tail()}")


def can_lower_niceness() -> bool:
    """Whether processes here may lower their nice value (root, CAP_SYS_NICE or RLIMIT_NICE)."""
    probe = "import os; os.nice(1); os.setpriority(os.PRIO_PROCESS, 0, 0)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")  # a Ray actor's or worker's line, forwarded


def own_traceback(text: str) -> bool:
    """A traceback printed by the command itself. Train's PlacementGroupCleaner actor prints one of
    its own on machines running several Rays ("Found multiple active Ray instances"), forwarded
    with its `(PlacementGroupCleaner pid=N)` prefix; not this command's doing."""
    return any("Traceback" in line for line in text.splitlines() if not RAY_FORWARDED.match(line))
