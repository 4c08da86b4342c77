"""CPU priority of the training worker processes.

Ray starts its worker processes at nice 15 (its `worker_niceness`), so that its own daemons (GCS,
raylet, dashboard, log monitor), which run at nice 0, win every contest for a CPU. A training
worker is the job, not background work: at nice 15 it yields to every nice-0 process on the node
(Ray's daemons, the driver, anything else running there), which a `torchrun` process never does.
`set_niceness` moves every thread of the calling process (the gloo threads that run DDP's
all-reduce included) to the given nice value.

Lowering a nice value needs root or CAP_SYS_NICE (or a RLIMIT_NICE that allows it). Without
that the process stays where Ray put it and rank 0 warns once; the nodes can start their workers
at 0 instead (RAY_worker_niceness=0), as the shipped cluster configs, the dev cluster and the
CLI's embedded Ray do. benchmarks/niceness.py measures the three settings side by side.

`lower_data_executors` moves the other way, for one thread: Ray Data's scheduling thread, which
runs inside a training worker that reads its stream unsplit (one worker: `handoff.TrainSplit`).
That thread busy-polls whenever the decode pipeline is ahead of training (backpressured, nothing
to wait on): 0.15-0.5 of a core on 2 cores, taken from the training step beside it
(benchmarks/README.md, seventeenth session). At nice 19 it runs on idle CPU only.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("emergence_ray")


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the calling thread only
        return [0]


def set_niceness(target: int) -> int:
    """Set every thread of this process to nice `target`, as far as permitted; return the calling
    thread's nice value afterwards."""
    for tid in _threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except PermissionError:
            break
    return os.getpriority(os.PRIO_PROCESS, 0)


def apply_worker_niceness(target: int | None, rank: int) -> None:
    """`scaling.worker_niceness` in a training worker; rank 0 warns once when it cannot be had."""
    if target is None:
        return
    nice = set_niceness(target)
    if nice != target and rank == 0:
        log.warning("training workers run at nice %d, not scaling.worker_niceness=%d: lowering it needs root or "
                    "CAP_SYS_NICE. Start the nodes with RAY_worker_niceness=%d, or set "
                    "scaling.worker_niceness: null to keep Ray's and silence this", nice, target, target)


DATA_EXECUTOR_THREAD = "StreamingExecutor-"  # Ray Data names its scheduling thread so (ray 2.60)
DATA_EXECUTOR_NICE = 19


def lower_data_executors(nice: int = DATA_EXECUTOR_NICE) -> int:
    """Move this process's Ray Data scheduling threads (found by the name Ray gives them; a test
    in tests/test_streaming.py fails when Ray renames them) to nice `nice`, the lowest priority;
    return how many were moved. Linux only: there a thread id is a task that `setpriority` takes,
    elsewhere the same number could name another process."""
    if not sys.platform.startswith("linux"):
        return 0
    moved = 0
    for thread in threading.enumerate():
        if not thread.name.startswith(DATA_EXECUTOR_THREAD) or not thread.native_id:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, thread.native_id) < nice:
                os.setpriority(os.PRIO_PROCESS, thread.native_id, nice)
                moved += 1
        except (ProcessLookupError, PermissionError):  # it ended meanwhile / not ours to change
            continue
    return moved
