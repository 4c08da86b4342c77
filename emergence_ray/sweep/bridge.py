"""Between a trial's Train run and Tune: reports, checkpoints, and which Train run a trial continues.

A trial is a Tune function that runs one Train run (`TorchTrainer.fit()`) of the job. The Train
controller hands rank 0's report of every epoch, with its checkpoint's path, to the trial through
a Ray queue (`ToTune`, a Train callback); the trial function passes it on with `tune.report`, so
ASHA and PBT see every epoch. Under PBT the report also carries a Tune checkpoint (a copy of the
epoch's checkpoint plus `source.json`: which trial and Train run made it, at which epoch), because
PBT's exploit hands a trial the donor's Tune checkpoint.

`continue_run` reads that checkpoint when a trial (re)starts: none, or one of its own, means the
trial's own Train run, which resumes from its last epoch; a donor's means a new Train run, named
from the donor and epoch (stable across a restored sweep), that starts from a copy of the donor's
checkpoint (`exploit.continue_with` keeps the trial's new lr / weight decay).
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.util.queue import Empty, Queue

from emergence_ray import checkpoint, storage

SOURCE = "source.json"
EXPLOITED_FROM = "exploited_from"  # folder of a Train run that starts from a donor's checkpoint


class ToTune(ray.train.UserCallback):
    """Runs in the Train controller: every report of rank 0 (and its checkpoint's path) to the trial."""

    def __init__(self, q: Queue):
        self.queue = q

    def after_report(self, run_context, metrics: list[dict], checkpoint: ray.train.Checkpoint | None) -> None:
        self.queue.put({**metrics[0], "_checkpoint": checkpoint.path if checkpoint else None})


def continue_run(sweep: str, trials_dir: str, trial_id: str) -> tuple[str, str | None]:
    """-> (Train run name, checkpoint directory it starts from or None) for this trial now."""
    own = f"{sweep}-{trial_id}"
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return own, None
    with ckpt.as_directory() as d:
        source = json.loads((Path(d) / SOURCE).read_text())
        if source["trial_id"] == trial_id:
            return source["run"], None  # its own run resumes from its own last epoch
        name = f"{own}-from-{source['trial_id']}-e{source['epoch']}"
        start = storage.join(trials_dir, name, EXPLOITED_FROM)
        if not storage.exists(storage.join(start, checkpoint.FILENAME)):
            storage.makedirs(start)
            storage.write_text(storage.join(start, SOURCE), json.dumps(source))
            storage.write_bytes(storage.join(start, checkpoint.FILENAME),
                                (Path(d) / checkpoint.FILENAME).read_bytes())
    return name, start


def fit_reporting(trainer, q: Queue, extra: dict[str, Any], tune_checkpoints: bool, trial_id: str):
    """Fit `trainer` in a thread; pass each report from `q` to Tune (with a Tune checkpoint when
    `tune_checkpoints`). -> the Train Result."""
    out: dict[str, Any] = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the trial's thread below
            out["error"] = err

    thread = threading.Thread(target=fit, daemon=True, name="train-fit")
    thread.start()
    while thread.is_alive() or not q.empty():
        try:
            item = q.get(timeout=1.0)
        except (Empty, queue.Empty):
            continue
        path = item.pop("_checkpoint")
        metrics = {**item, **extra}
        if not (tune_checkpoints and path):
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ray.train.Checkpoint(path).to_directory(tmp)
            source = {"trial_id": trial_id, "run": extra["train_run"], "epoch": item["epoch"]}
            (Path(tmp) / SOURCE).write_text(json.dumps(source))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]
