"""Connecting to Ray and sizing the request to the cluster.

`RAY_ADDRESS` (or `--address`) set means that cluster, checked with a plain socket first (an address
with nothing behind it fails in seconds with one `error:` line, not after minutes of Ray's GCS
time-outs); otherwise an embedded local Ray sized to this machine starts, reachable only from this
machine: every Ray process listens on 127.0.0.1, and the metrics export that would answer without
the auth token is off. A running local cluster is ignored unless its address is given. A request
the cluster can never satisfy fails fast instead of waiting forever.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import ray.data as ray_data

from emergence_ray.address import check_address, given_address
from emergence_ray.config import ScalingConfig
from emergence_ray.errors import AddressError, ResourceError

log = logging.getLogger(__name__)
DATA_CPU_RESERVE = 1.0  # CPUs left free for Ray Data tasks (a full cluster deadlocks ingest)
LOOPBACK = "127.0.0.1"


def connect(address: str | None = None) -> None:
    train_env_defaults()
    if ray.is_initialized():
        return
    address, source = given_address(address)
    # Quiet Ray Data's per-dataset INFO lines in every process; our per-epoch lines stay.
    quiet = {"RAY_DATA_LOG_LEVEL": os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING")}
    os.environ.update(quiet)
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address and address != "local":
        checked = check_address(address, source)
        try:
            ray.init(address=checked, runtime_env={"env_vars": quiet}, **common)
        except ConnectionError as err:  # "auto" finding nothing, a Ray Client time-out
            raise AddressError(f"{source}={address}: {err}") from None
    else:
        start_embedded(quiet, common)
    ray_data.DataContext.get_current().enable_progress_bars = False


# ------------------------------------------------------------------------- the embedded Ray


def start_embedded(env_vars: dict[str, str], init_kwargs: dict) -> None:
    """Start a Ray on this machine for this process, reachable from nowhere else.

    - Node IP 127.0.0.1: Ray's GCS, raylet, object manager, workers, agents and dashboard then bind
      127.0.0.1 instead of every interface (they choose by the node IP; `_loopback_node`).
    - Metrics collection off (`enable_metrics_collection`): the dashboard agent's Prometheus export
      would answer without the auth token; a single-machine run does not need it. The dashboard and
      autoscaler-monitor metrics ports have no switch; with this node IP they bind 127.0.0.1.
    - The dashboard stays (127.0.0.1, token required): it serves the state API that Ray Train's
      placement-group cleaner asks whether the controller is alive.
    - `address="local"`: always a new Ray, never one a `ray start` left in /tmp/ray (Ray would
      connect to that, and then refuse num_cpus). `RAY_ADDRESS` in every worker's environment pins
      Ray's own in-cluster look-ups (Train's state-API calls) to this Ray: without them they search
      the machine and find several Rays (tracebacks: "Found multiple active Ray instances"), or the
      one a `ray start` recorded, which knows nothing of this run.
    - `env_vars` and that `RAY_ADDRESS` reach the workers through the environment they inherit from
      the raylet started here, not a job runtime_env: with one, even of environment variables only,
      every worker's start goes through Ray's runtime-env agent, and each streamed epoch's decode
      pool delivered its first batch 0.36 s later (benchmarks/EPOCH_START.md).
    """
    gcs_port = free_port()
    inherited = {**embedded_env(gcs_port), **env_vars, "RAY_ADDRESS": f"{LOOPBACK}:{gcs_port}"}
    with environ(inherited), _loopback_node():
        ray.init(address="local", num_cpus=os.cpu_count() or 1, _node_ip_address=LOOPBACK,
                 dashboard_host=LOOPBACK, _system_config={"enable_metrics_collection": False}, **init_kwargs)
    if ray.util.get_node_ip_address() != LOOPBACK:
        log.warning("the embedded Ray did not bind to %s (node IP %s): its ports are reachable from the "
                    "network; check this Ray version's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", LOOPBACK,
                    ray.util.get_node_ip_address())


def embedded_env(gcs_port: int) -> dict[str, str]:
    """Environment the embedded Ray's processes read as they start (restored here after ray.init).

    RAY_worker_niceness: workers start at nice 0, not Ray's 15: a non-root user's training workers
    could not move back up themselves (priority.py); a value the user set wins.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's own switch for a loopback-only node (its default on
    macOS and Windows), so its processes agree on node IP 127.0.0.1.
    RAY_GCS_SERVER_PORT: the GCS port chosen here, so the workers' RAY_ADDRESS can name it."""
    return {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness") or "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_GCS_SERVER_PORT": str(gcs_port)}


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration; restore the previous values (or absence)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _loopback_node() -> Iterator[None]:
    """Make ray.init choose node IP 127.0.0.1 (the one private Ray name this module touches).

    Ray decides "loopback node or not" from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER read once, when ray
    is imported, and maps a `_node_ip_address` of 127.0.0.1 back to the machine's address unless
    that switch is off. The CLI imports ray before it knows whether a cluster address was given, so
    the switch is flipped here for the one ray.init call. tests/test_connect.py checks that
    `ray.util.get_node_ip_address()` gives 127.0.0.1 inside this and the machine's address outside,
    and fails loudly if Ray renames or drops the constant."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_S = "0.1"  # benchmarks/EPOCH_OVERHEAD.md: what it saves per short epoch and what it costs in CPU


def train_env_defaults() -> None:
    """Environment defaults for Ray Train, set in this process unless the user set them.

    `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`: each Train worker hands its `ray.train.report` to the
    controller through a queue of size one that the controller drains once per interval (2 s by
    default), so a loop reporting every epoch waits for the poll whenever an epoch is shorter than
    that: a 0.2 s digits epoch took 2 s. The controller reads the variable when it is created, at
    `TorchTrainer.fit()`, from the environment Train propagates from the process that calls
    `fit()` (the driver, or a Tune trial: `build_trainer` calls this too); set here, before an
    embedded Ray starts, every process of that Ray inherits it as well. The shipped cluster
    configs set it on every node.
    """
    os.environ.setdefault(HEALTH_CHECK_INTERVAL, POLL_S)


# glibc's allocator in the training workers, read by each worker process as it starts (other C
# libraries ignore the variables). By default a freed block above 32 MB goes back to the kernel,
# and a thread other than the main one (Train runs the loop in one) allocates from arenas of at
# most 64 MB heaps, so every step's large tensors (a 224 px batch's activations: hundreds of MB)
# came as fresh pages, faulted in and zeroed, every step: a streamed epoch of 224 px JPEGs on the
# CPU trained 1.86x faster with these (benchmarks/JPEG_AB.md). With small images no tensor is that
# large, nothing is gained, and the one arena may cost (the Fashion-MNIST job 1.11-1.18x slower in
# one A/B: benchmarks/README.md, twentieth session), hence the threshold on a batch's float
# images. Training workers only: Ray Data's decoders, Tune's trial actors and Ray's daemons keep
# glibc's defaults.
TRAIN_WORKER_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**30),
                       "MALLOC_TRIM_THRESHOLD_": str(2**31)}
KEEP_FREED_FROM_BYTES = 8 * 2**20  # a batch of float images from which scaling.keep_freed_memory=null turns it on


def train_worker_env(keep_freed: bool | None, use_gpu: bool, batch_image_bytes: int) -> dict[str, str]:
    """Environment variables for the training workers (`RunConfig.worker_runtime_env`) and
    predict's model replicas (`predict.replica_options`): glibc's
    allocator keeping large freed blocks for reuse where `keep_freed` (`scaling.keep_freed_memory`)
    says so, or, when it is None, for CPU workers whose batch of float images (`batch_image_bytes`)
    reaches `KEEP_FREED_FROM_BYTES`. A value set in this process wins."""
    if keep_freed is None:
        keep_freed = not use_gpu and batch_image_bytes >= KEEP_FREED_FROM_BYTES
    return {k: os.environ.get(k, v) for k, v in TRAIN_WORKER_MALLOC.items()} if keep_freed else {}


_MALLOPT_PARAM = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_ARENA_MAX": -8}  # glibc's M_*


def keep_freed_in_this_process(keep_freed: bool | None, use_gpu: bool, batch_image_bytes: int) -> bool:
    """The settings `train_worker_env` gives a new process, applied to this running one through
    glibc's `mallopt(3)`, for the allocations from now on: for the model evaluation the driver runs
    itself (`report.evaluate_checkpoint`), ~1.85x faster at 224 px on a CPU (benchmarks/README.md,
    twenty-second session). A setting in this process's environment was applied when it started
    and is left alone. -> whether the settings are in force (False: the rule says no, or the C
    library has no `mallopt`, as on macOS)."""
    env = train_worker_env(keep_freed, use_gpu, batch_image_bytes)
    if not env:
        return False
    todo = {k: v for k, v in env.items() if k not in os.environ}
    if not todo:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    # mallopt takes a C int: the trim threshold's 2**31 is 2**31 - 1 here
    return all(mallopt(_MALLOPT_PARAM[k], min(int(v), 2**31 - 1)) == 1 for k, v in todo.items())


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Train's controller, from the driver's env
_OFF_BY_US = "False"  # Train reads it as off (lower-cased, not "1"/"true"); a user's "0" is left alone


def skip_preemption_watcher(scaling: ScalingConfig, nodes: list[float] | None = None) -> bool:
    """Ray Train starts a preemption-watcher actor for every run, to react to nodes being drained.
    On a fixed single-node cluster its only node going takes the job with it, so there it is one
    more process (~1.5 CPU-seconds to start, then awake 100 times a second) for nothing: turn it
    off, unless the user chose either way. Returns whether it was turned off. `nodes`: CPUs per
    node (default: the cluster's alive nodes)."""
    ours = os.environ.get(PREEMPTION_WATCHER) == _OFF_BY_US
    if PREEMPTION_WATCHER in os.environ and not ours:
        return False
    if scaling.autoscaling or len(nodes if nodes is not None else node_cpus()) != 1:
        os.environ.pop(PREEMPTION_WATCHER, None)  # an earlier run in this process turned it off
        return False
    os.environ[PREEMPTION_WATCHER] = _OFF_BY_US
    return True


def wait_for_free_cpu(timeout_s: float = 10.0) -> None:
    """Wait, briefly, until the cluster shows a free CPU. A finished trainer's placement group is
    released asynchronously; a Ray Data job started before that warns that it "will hang"."""
    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass
class Placement:
    num_workers: int | tuple[int, int]
    cpus_per_worker: float
    gpus_per_worker: float


def spare_cpus(workers: int, cpus_per_worker: float, resources: dict[str, float] | None = None) -> int:
    """Whole CPUs of the cluster (`resources`: its totals, default Ray's) that `workers` training
    workers of `cpus_per_worker` leave to Ray Data; at least one (`plan` keeps one free)."""
    res = resources if resources is not None else ray.cluster_resources()
    return max(1, int(float(res.get("CPU", 0)) - workers * cpus_per_worker))


def node_cpus(resources: dict[str, float] | None = None) -> list[float]:
    """CPUs of each alive node; with `resources` given (a cluster's totals), that as one node."""
    if resources is not None:
        return [float(resources.get("CPU", 0))]
    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def data_cpu_left(nodes: list[float], bundles: int, cpus_per_bundle: float,
                  reserve: float = DATA_CPU_RESERVE) -> bool:
    """Whether some node keeps `reserve` CPUs free however Ray places `bundles` worker bundles of
    `cpus_per_bundle` CPUs. A Ray Data task needs its CPU on one node: a cluster-wide spare CPU
    split as half a CPU on each of two nodes runs no task, and the job waits forever. A node is
    blocked once it holds more than (cpus - reserve) / cpus_per_bundle bundles; if blocking every
    node takes more bundles than there are, one node stays free."""
    to_block = 0
    for cpus in nodes:
        if cpus < reserve - 1e-9:
            continue  # too small to run a Ray Data task even when empty
        k = math.floor((cpus - reserve) / cpus_per_bundle + 1e-9) + 1
        if k * cpus_per_bundle > cpus + 1e-9:
            return True  # workers can never fill this node past its reserve
        to_block += k
    return bundles < to_block


def largest_fit(nodes: list[float], bundles: int, cpus_per_bundle: float,
                reserve: float = DATA_CPU_RESERVE) -> float:
    """`cpus_per_bundle`, lowered in quarter-CPU steps until `data_cpu_left` holds; 0 if even a
    quarter CPU per bundle does not leave one."""
    cpw = cpus_per_bundle
    while cpw >= 0.25 and not data_cpu_left(nodes, bundles, cpw, reserve):
        cpw -= 0.25
    return cpw if cpw >= 0.25 else 0.0


def plan(scaling: ScalingConfig, resources: dict[str, float] | None = None,
         nodes: list[float] | None = None) -> Placement:
    """Resources per worker, checked against the whole cluster (not what is free right now:
    a busy cluster is worth waiting for, one too small is not). `nodes`: CPUs per node (default:
    the cluster's alive nodes, or `resources` as one node)."""
    if scaling.autoscaling:  # the autoscaler adds nodes on demand: request, don't compare
        return Placement(scaling.num_workers, scaling.cpus_per_worker or 1.0, 1.0 if scaling.use_gpu else 0.0)
    res = resources if resources is not None else ray.cluster_resources()
    nodes = nodes if nodes is not None else node_cpus(resources)
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    n = scaling.min_workers  # elastic runs must fit their minimum; they grow into what is there
    most = scaling.max_workers  # size for the largest group; the smallest must fit at least
    if scaling.use_gpu and n > gpus:
        raise ResourceError(f"scaling.num_workers={n} with scaling.use_gpu=true needs {n} GPUs; the cluster has "
                            f"{gpus:g}. Lower scaling.num_workers or add GPU nodes.")
    if scaling.cpus_per_worker is not None:
        cpw = scaling.cpus_per_worker
        if n * cpw > cpus:
            raise ResourceError(f"scaling.num_workers={n} x scaling.cpus_per_worker={cpw:g} needs {n * cpw:g} CPUs; "
                                f"the cluster has {cpus:g}. Lower either, or add nodes.")
        if not data_cpu_left(nodes, most, cpw):
            log.warning("%d workers x %g CPUs can leave no node with a whole free CPU for Ray Data tasks (nodes: "
                        "%s CPUs); if the run waits for resources, lower scaling.cpus_per_worker", most, cpw,
                        ", ".join(f"{c:g}" for c in nodes))
    else:
        # whole CPUs where they fit beside one CPU for Ray Data, else an even quarter-CPU share,
        # lowered until some node keeps a whole CPU for Ray Data wherever the workers land
        spare = cpus - DATA_CPU_RESERVE
        cpw = largest_fit(nodes, most, 1.0 if spare >= most else max(math.floor(spare / most * 4) / 4, 0.25))
        if n * cpw > spare or spare <= 0 or cpw == 0:
            raise ResourceError(f"scaling.num_workers={n} does not fit a cluster of {cpus:g} CPUs (each worker "
                                "needs a quarter CPU at least, and Ray Data one CPU on one node). Lower "
                                "scaling.num_workers or add nodes.")
    return Placement(scaling.num_workers, cpw, 1.0 if scaling.use_gpu else 0.0)
