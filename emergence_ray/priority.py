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

`lower_data_executor` moves the other way, for one thread: the scheduling loop of Ray Data's
executor for a streamed split (in the training worker that reads a whole split, or in Ray Data's
split coordinator actor). That loop busy-polls whenever the decode pipeline is ahead of training
(backpressured, nothing to wait on): 0.15-0.5 of a core on 2 cores, taken from the training step
beside it (benchmarks/README.md, seventeenth session). At nice 19 it runs on idle CPU only.
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



DATA_EXECUTOR_NICE = 19


class LowerDataExecutor:
    """A Ray Data execution callback: its first call from the scheduling loop of an execution
    moves the thread it runs on (that loop's) to nice `DATA_EXECUTOR_NICE`. Ray Data makes one per
    execution, in the process that runs it: a training worker reading a whole split, or Ray Data's
    split coordinator actor for `streaming_split`. The four methods are Ray Data's execution
    callback protocol (ray 2.60); `lower_data_executor` installs the class."""

    def __init__(self):
        self.lowered = False

    def before_execution_starts(self, executor) -> None:
        pass

    def on_execution_step(self, executor) -> None:
        if not self.lowered:
            self.lowered = True
            lower_this_thread(DATA_EXECUTOR_NICE)

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass


def lower_this_thread(nice: int) -> int:
    """Move the calling thread (not its process: Linux keeps a nice value per thread) to nice
    `nice` when that is lower in priority than where it is; return its nice value afterwards."""
    tid = threading.get_native_id() if sys.platform.startswith("linux") else 0
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass
    return os.getpriority(os.PRIO_PROCESS, tid)


def lower_data_executor(context) -> None:
    """Run the executions of datasets made with this Ray `DataContext` with their scheduling
    loop at nice 19 (`LowerDataExecutor`). Ray Data's only hook for this is undocumented:
    `DataContext.custom_execution_callback_classes`, with the protocol of its private
    `ExecutionCallback` (kept to here; tests/test_streaming.py fails when Ray changes either)."""
    if LowerDataExecutor not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(LowerDataExecutor)
