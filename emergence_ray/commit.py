"""Which checkpoint Train's controller has committed: a callback that runs in the controller, and
the reader the driver uses when it is asked to stop.

This module is what the controller unpickles with the callback, so it imports only Ray Train and
`storage`: anything heavier here (the data pipeline, scikit-learn) would be imported by every
run's controller before it starts the workers, on the start-up path."""

from __future__ import annotations

import ray.train

from emergence_ray import storage

COMMITTED = "committed.json"  # the last checkpoint Train's controller has committed (CommitRecorder)


class CommitRecorder(ray.train.UserCallback):
    """Runs in Train's controller after each report has been registered: the checkpoint manager
    handles a report first (it saves its snapshot, the state a re-run resumes from), then user
    callbacks. So what this writes is committed, and a driver that is asked to stop can wait for
    the epoch in flight to get here (`trainer.wait_for_commit`)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def after_report(self, run_context, metrics: list[dict], checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is not None:
            storage.write_json(storage.join(self.run_dir, COMMITTED),
                               {"epoch": metrics[0].get("epoch"), "checkpoint": checkpoint.path})


def committed(run_dir: str) -> dict | None:
    try:
        return storage.read_json(storage.join(run_dir, COMMITTED))
    except (OSError, ValueError):
        return None
