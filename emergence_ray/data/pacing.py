"""Ray Data's scheduling loop, paced: at most 50 steps a second in every execution of a streamed split.

Ray Data's streaming executor runs a loop that waits for its tasks (`ray.wait`, up to 0.1 s),
reads their outputs and dispatches more. When the decode is ahead of the reader (training slower
than decode: the usual case on CPU), a backpressure policy stops it reading the outputs of
finished tasks; its wait on them then returns at once, and the loop spins without pause: 0.15 to
0.5 of a core on 2 cores, taken from training (benchmarks/README.md, seventeenth session). Sleeping
out the rest of 20 ms between steps frees that CPU; each step still handles every finished task.
"""

from __future__ import annotations

import time


DATA_EXECUTOR_STEP_S = 0.02  # the shortest time from one step of Ray Data's scheduling loop to the next


class PaceDataExecutor:
    """A Ray Data execution callback: between two steps of an execution's scheduling loop it
    sleeps out the rest of `DATA_EXECUTOR_STEP_S`, so the loop makes at most 50 steps a second.
    Unpaced, it spins whenever the decode is ahead of training: a backpressured operator's tasks
    have all finished and their outputs wait unread, so its `ray.wait` on them returns at once
    (benchmarks/README.md, seventeenth session). Each step handles every finished task and
    dispatches all it may, so 50 a second is far more than the blocks of a stream need, and Ray
    Data's own loop waits up to 0.1 s for a task. Ray Data makes one per execution, in the process
    that runs it: a training worker reading a whole split, or its split coordinator actor. The four
    methods are Ray Data's execution callback protocol (ray 2.60); `pace_data_executor` installs it."""

    def __init__(self):
        self.last = 0.0

    def before_execution_starts(self, executor) -> None:
        pass

    def on_execution_step(self, executor) -> None:
        rest = self.last + DATA_EXECUTOR_STEP_S - time.monotonic()
        if rest > 0:
            time.sleep(rest)  # releases the GIL too, for the training step in the same process
        self.last = time.monotonic()

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass


def pace_data_executor(context) -> None:
    """Pace the scheduling loop of every execution of datasets made with this Ray `DataContext`
    (`PaceDataExecutor`). Ray Data's only hook for this is undocumented:
    `DataContext.custom_execution_callback_classes`, with the protocol of its private
    `ExecutionCallback` (kept to here; tests/test_streaming.py fails when Ray changes either)."""
    if PaceDataExecutor not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(PaceDataExecutor)
