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

Ray Data's decode actors go the other way (`yield_this_thread`, `data.decode_niceness`): their
threads run below the training worker beside them, so that a worker never waits in the run queue
behind a decode that is ahead of it, while the decode still takes every cycle the worker leaves.
"""

from __future__ import annotations

import logging
import os
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


def yield_this_thread(target: int) -> int:
    """Raise the calling thread's nice value to `target` (never lower it: that needs privileges, and
    a thread Ray started at 15 already yields); return its nice value afterwards. Linux names a
    thread by its native id here; elsewhere this changes nothing."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # no such process on this OS (a thread id is not a pid outside Linux)
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
