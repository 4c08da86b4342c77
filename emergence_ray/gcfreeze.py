"""Python's garbage collector in the service's long-lived Ray processes: what start-up made, frozen.

When a node's object store is more than 70% full (Ray's `high_plasma_storage_usage`, as a stream
keeps it: Ray Data's budget is a share of the store), its raylet asks every worker process on
the node to run a full `gc.collect()`, at most every 30 s (`global_gc_min_interval_s`), and
every process also collects every 10 minutes (`local_gc_interval_s`). A full collection walks
every object the process holds, with the GIL held all along: in a process that has imported
torch, Ray and Ray Data (~340k objects) it took 300 ms on 2 cores, during which the training
step, and every DDP rank waiting for it, stood still (benchmarks/README.md, twenty-fifth
session). Objects made at start-up (modules, the model, the optimizer) live as long as the
process, so `gc.freeze()` moves them out of the collector's reach: a collection then walks only
what was made since (1.5-10 ms). Objects freed by reference counting are still freed at once;
only reference cycles among the frozen objects would stay, and start-up makes none that die.

    freeze_startup_objects()   # a training worker, set up, before its first epoch
    freeze_if_actor()          # a Ray Data actor's constructor (decode, predict)
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object this process holds: later collections skip them.
    Call it when a long-lived process has finished starting up -> objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def freeze_if_actor() -> int:
    """`freeze_startup_objects` in a Ray actor, a process that lives for its actor alone; nothing
    in any other process (a script or test calling the class directly: its objects are its own
    to manage) -> objects frozen."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return freeze_startup_objects()
    return 0
