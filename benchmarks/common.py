"""What every throughput benchmark shares, so that (a), (b) and (c) do identical work per step.

A `Workload` fixes the model, the data, the batch size per worker and the step counts. The data
is generated or read once per process from the same recipe (synthetic RGB 3x32x32, or the
Fashion-MNIST IDX files read with `emergence_ray.data.idx.read_idx`); the model comes from
`emergence_ray.models.build_model` with the job defaults (`ModelConfig()`), the optimizer from
`emergence_ray.optim.build_optimizer(OptimConfig())` (AdamW), and every mode runs
`emergence_ray.engine.train_epoch`, recording the end time of each step.

Throughput is measured the same way everywhere (`steady_rates`): the first `warmup` steps are
excluded, the next `repeats * steps` steps are cut into `repeats` consecutive segments, and each
segment gives images/s = steps * batch_size * world / (its last step's end - the end of the step
before it). The median of the segments is what the tables report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, UTC
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
NUM_CLASSES = 10


@dataclass
class Workload:
    model: str            # a name in emergence_ray.models.MODELS
    data: str             # "synthetic" (RGB 3x32x32) or "fashion_mnist" (1x28x28)
    batch_size: int = 64  # per worker
    warmup: int = 10      # steps excluded before timing
    steps: int = 50       # steps per timed segment
    repeats: int = 3      # timed segments; the median is reported

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps * self.repeats

    def rows_per_worker(self) -> int:
        return self.batch_size * self.total_steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @property
    def key(self) -> str:
        return f"{self.model}/{self.data}"


# ---------------------------------------------------------------- data


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n RGB 32x32 uint8 images (N, 32, 32, 3), smooth random patterns (8x8 noise upsampled, so
    PNGs of them compress like photos rather than like noise), and labels 0..9."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    images = low.repeat(4, axis=1).repeat(4, axis=2)
    images = np.clip(images.astype(np.int16) + rng.integers(-12, 13, images.shape), 0, 255).astype(np.uint8)
    return images, rng.integers(0, NUM_CLASSES, n).astype(np.int64)


def fashion_mnist_images(path: str, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training images [offset, offset + n) of the IDX files, (N, 28, 28) uint8, and labels."""
    images = read_idx_file(path, "train-images-idx3-ubyte")
    labels = read_idx_file(path, "train-labels-idx1-ubyte").astype(np.int64)
    if offset + n > len(images):
        raise ValueError(f"{path}: {len(images)} training images, {offset + n} needed; lower the step counts")
    return images[offset:offset + n], labels[offset:offset + n]


def read_idx_file(folder: str, stem: str) -> np.ndarray:
    """One IDX file of a local folder (`stem` or `stem.gz`), read by the service's `read_idx`."""
    import pyarrow.fs as pafs

    from emergence_ray.data.idx import read_idx

    for name in (stem, stem + ".gz"):
        path = Path(folder) / name
        if path.is_file():
            return read_idx(pafs.LocalFileSystem(), str(path))
    raise FileNotFoundError(f"{folder}: no {stem}[.gz]; pass --fashion-mnist FOLDER holding the IDX files")


def load_images(w: Workload, n: int, part: int, fashion_path: str) -> tuple[np.ndarray, np.ndarray]:
    """The `part`-th block of n images of the workload's data (one block per worker)."""
    if w.data == "synthetic":
        return synthetic_images(n, seed=1000 + part)
    if w.data == "fashion_mnist":
        return fashion_mnist_images(fashion_path, n, offset=part * n)
    raise ValueError(f"unknown data {w.data!r}; choose synthetic or fashion_mnist")


def memory_batches(w: Workload, part: int, fashion_path: str) -> list[dict]:
    """The `part`-th worker's block of the workload, normalized, as in-memory torch batches: what
    (a), (b) and Ray Train without Ray Data train on."""
    import torch

    rows, bs = w.rows_per_worker(), w.batch_size
    images, labels = load_images(w, rows, part=part, fashion_path=fashion_path)
    x, y = torch.from_numpy(to_normalized_nchw(images)), torch.from_numpy(labels)
    return [{"image": x[i:i + bs], "label": y[i:i + bs]} for i in range(0, rows, bs)]


def to_normalized_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W), per-channel standardized: the values the
    service's `Preprocess` produces for images already at the model's size."""
    from emergence_ray.data.transforms import channel_stats

    x = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    mean, std = channel_stats(x[:4096])
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x.astype(np.float32) / 255.0 - m) / s)


def shape_of(data: str) -> tuple[int, int]:
    """(channels, image size) of a workload's data."""
    return (3, 32) if data == "synthetic" else (1, 28)


# ---------------------------------------------------------------- model, optimizer


def build_model(model_name: str, data: str):
    """The service's model with the job defaults (`ModelConfig()`), unwrapped."""
    from emergence_ray.config import ModelConfig
    from emergence_ray.models import build_model as build

    mc = ModelConfig(name=model_name)
    channels, size = shape_of(data)
    return build(mc.name, channels, NUM_CLASSES, size, mc.width, mc.depth, mc.dropout)


def build_optimizer(bare_model):
    """The service's default optimizer (AdamW, decoupled decay on weights with dim >= 2)."""
    from emergence_ray.config import OptimConfig
    from emergence_ray.optim import build_optimizer as build

    return build(bare_model, OptimConfig())


# ---------------------------------------------------------------- timing


def steady_rates(step_ends: list[float], batch_size: int, world: int, warmup: int, steps: int,
                 repeats: int) -> list[float]:
    """Images/s of each timed segment (see the module docstring). step_ends[i] is when step i
    ended, in seconds on one monotonic clock; the warm-up steps must be at least 1."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: a segment is timed from the end of the step before it")
    need = warmup + steps * repeats
    if len(step_ends) < need:
        raise ValueError(f"{len(step_ends)} steps recorded, {need} needed")
    rates = []
    for r in range(repeats):
        first = warmup + r * steps
        seconds = step_ends[first + steps - 1] - step_ends[first - 1]
        rates.append(steps * batch_size * world / max(seconds, 1e-9))
    return rates


def command_line(script: str, parser, args, options: tuple[str, ...]) -> str:
    """How the run was started, for the results file: `python benchmarks/<script>` plus each of
    `options` whose value differs from the parser's default. A repeatable option (a list) is
    written once per value; a flag (True) without a value."""
    import shlex

    cmd = f"python benchmarks/{script}"
    for name in options:
        value = getattr(args, name)
        if value == parser.get_default(name):
            continue
        flag = f" --{name.replace('_', '-')}"
        if value is True:
            cmd += flag
        elif isinstance(value, list) and parser._option_string_actions[flag.strip()].nargs is None:
            cmd += "".join(f"{flag} {shlex.quote(str(v))}" for v in value)
        elif isinstance(value, list):
            cmd += flag + "".join(f" {shlex.quote(str(v))}" for v in value)
        else:
            cmd += f"{flag} {shlex.quote(str(value))}"
    return cmd


def add_folder_options(parser) -> None:
    """--data (where stream.py's generated JPEG folders live, `jpeg-<images>` each) and --out (where
    the results files go): the same two options of every benchmark on those JPEGs."""
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "er-stream-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")


def jpeg_bench_start(script: str, doc: str, argv: list[str] | None, images: int, rounds: int):
    """The start every benchmark on stream.py's JPEGs shares: its options (--images, --rounds,
    `add_folder_options`) parsed, the folder of that many JPEGs made (or found), and the results'
    command line and machine -> (args, folder, res)."""
    from benchmarks.stream import make_folder  # stream.py imports this module

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--rounds", type=int, default=rounds)
    add_folder_options(p)
    args = p.parse_args(argv)
    folder = make_folder(args.data / f"jpeg-{args.images}", args.images)
    return args, folder, {"command": command_line(script, p, args, ("images", "rounds")), "machine": machine_info()}


def results_header(title: str, command: str, m: dict, software: bool = True) -> list[str]:
    """The lines every results file opens with: its title, the command that produced it, the git
    revision, the machine (`machine_info`; `software`: torch's and Ray's versions, else the OS)
    and the date."""
    about = f"torch {m['torch']}, Ray {m['ray']}; load average" if software else f"{m['os']}; load average"
    return [f"# {title}", "", f"Command: `{command}`  ", f"Git revision: `{m['git_revision']}`  ",
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB{',' if not software else ';'} {about} at "
            f"start {m['load_average']}  ", f"Date: {m['date']}  ", ""]


def write_results(folder: Path, stem: str, res: dict, text: str) -> None:
    """A benchmark's results: folder/STEM.json (every figure) and folder/STEM.md (`text`, also
    printed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (folder / f"{stem}.md").write_text(text)
    print(text)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def thread_sched() -> dict | None:
    """The calling thread's scheduler counters (Linux /proc/thread-self; None elsewhere): ns on a
    CPU, ns runnable but waiting for one, and its voluntary (it slept) and involuntary (another
    thread took its CPU) context switches. Exact, unlike per-process tick accounting."""
    try:
        run_ns, wait_ns, _ = (int(x) for x in Path("/proc/thread-self/schedstat").read_text().split())
        status = Path("/proc/thread-self/status").read_text()
    except (OSError, ValueError):
        return None
    counts = {k: int(v) for k, v in (line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line)}
    return {"t": time.perf_counter(), "run_ns": run_ns, "wait_ns": wait_ns,
            "voluntary": counts.get("voluntary_ctxt_switches", 0),
            "involuntary": counts.get("nonvoluntary_ctxt_switches", 0)}


def sched_share(start: dict | None, end: dict | None) -> dict | None:
    """Between two `thread_sched` readings: % of the wall time the thread ran, waited runnable for
    a CPU, and slept; context switches per second."""
    if not start or not end or end["t"] <= start["t"]:
        return None
    wall = end["t"] - start["t"]
    run = 100 * (end["run_ns"] - start["run_ns"]) / 1e9 / wall
    wait = 100 * (end["wait_ns"] - start["wait_ns"]) / 1e9 / wall
    return {"seconds": wall, "on_cpu_pct": run, "runnable_waiting_pct": wait,
            "sleeping_pct": max(0.0, 100 - run - wait),
            "voluntary_per_s": (end["voluntary"] - start["voluntary"]) / wall,
            "involuntary_per_s": (end["involuntary"] - start["involuntary"]) / wall}


# ---------------------------------------------------------------- machine


def machine_info() -> dict:
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_gib, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray_version,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "git_revision": _git_revision(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def device_defaults(p, args, defaults: dict) -> None:
    """Fill the options left unset from `defaults[args.device]`; refuse --device cuda without a GPU."""
    import torch

    for k, v in defaults[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
