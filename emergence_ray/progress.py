"""The training progress display: rank 0 writes where it is, the driver draws it.

Rank 0 (`RankProgress`, fed by `engine.train_epoch`'s `on_step`) writes `progress.json` into the
run directory a few times a second and at the last step of every epoch. The driver (`display`,
around `TorchTrainer.fit()`) reads it and, when a person watches a terminal, draws one bar over
the whole run's steps, so it advances within an epoch.

The bar is a `ray.experimental.tqdm_ray` bar owned by the driver: Ray's log forwarding clears
it before it prints a worker's line and redraws it after, and the driver's own log lines go the
same way (`logs.set_output_guard`), so a log line never lands on the bar's line. Without a
terminal (CI, `ray job submit` logs) there is no bar: rank 0's per-epoch lines are the record,
forwarded by Ray as plain lines (no colour codes when stdout is not a terminal either).

    with display(run_dir):
        result = trainer.fit()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from emergence_ray import logs, storage

log = logging.getLogger("emergence_ray")
PROGRESS_FILE = "progress.json"
WRITE_EVERY_S = 0.25  # rank 0: often enough for a smooth bar, rare enough to cost nothing per step
POLL_S = 0.2  # driver: how often the bar looks at the file


class RankProgress:
    """Rank 0's progress file (local run directories only) and its step lines every
    `log_every_s` seconds."""

    def __init__(self, run_dir: str, total_epochs: int, steps_per_epoch: int, log_every_s: float):
        self.path = storage.join(run_dir, PROGRESS_FILE)
        self.local = not storage.is_uri(run_dir)
        self.total_epochs, self.steps = total_epochs, steps_per_epoch
        self.log_every_s = log_every_s
        self.epoch, self.last_write, self.last_log = 0, 0.0, time.monotonic()

    def step(self, step: int) -> None:
        now = time.monotonic()
        # the last step of an epoch always: a short epoch would otherwise never show its end
        if self.local and (now - self.last_write >= WRITE_EVERY_S or step + 1 >= self.steps):
            self.last_write = now
            write_atomic(self.path, {"epoch": self.epoch, "epochs": self.total_epochs,
                                     "step": step + 1, "steps": self.steps})
        if now - self.last_log >= self.log_every_s:
            self.last_log = now
            log.info("epoch %d/%d  step %d/%d", self.epoch + 1, self.total_epochs, step + 1, self.steps)


def write_atomic(path: str, obj: dict) -> None:
    """Write then rename, so the driver never reads half a file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_progress(path: str) -> dict | None:
    try:
        p = json.loads(Path(path).read_text())
        return p if {"epoch", "epochs", "step", "steps"} <= p.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def bar_position(p: dict) -> tuple[int, int, str]:
    """(steps done in the whole run, steps in the whole run, description) from a progress record."""
    steps = max(1, int(p["steps"]))
    done = int(p["epoch"]) * steps + min(int(p["step"]), steps)
    return done, int(p["epochs"]) * steps, f"epoch {int(p['epoch']) + 1}/{p['epochs']}"


def wants_bar(run_dir: str) -> bool:
    return sys.stderr.isatty() and not storage.is_uri(run_dir)


class _Bar:
    """The driver's bar, fed from the progress file by a thread. Ray's log printer draws nothing
    between its hide and unhide calls around a worker line, but this thread is not that printer:
    it draws only under the manager's lock and never while the bars are hidden."""

    def __init__(self, path: str, manager):
        self.path, self.manager, self.bar, self.shown = path, manager, None, None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(POLL_S):
            self.refresh()
        self.refresh()

    def refresh(self) -> None:
        p = read_progress(self.path)
        if p is None or bar_position(p) == self.shown:
            return
        n, total, desc = bar_position(p)
        with self.manager.lock:
            if self.manager.in_hidden_state:
                return  # a log line is being printed; draw on the next poll
            if self.bar is None:
                from ray.experimental import tqdm_ray

                # flush_interval_s=0: every change is drawn (this thread already paces them)
                self.bar = tqdm_ray.tqdm(total=total, desc=desc, unit="step", flush_interval_s=0)
            self.bar.total, self.bar.n = total, n
            self.bar.set_description(desc)  # draws
            self.shown = (n, total, desc)

    def close(self) -> None:
        if self.bar is not None:
            with self.manager.lock:
                self.bar.close()


@contextlib.contextmanager
def display(run_dir: str) -> Iterator[None]:
    """Draw the run's progress bar while the block runs, when stderr is a terminal; without
    one, keep Ray's forwarded worker lines free of colour codes."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray's log printer as it prints
    if not wants_bar(run_dir):
        yield
        return
    from ray.experimental import tqdm_ray

    manager = tqdm_ray.instance()  # the one Ray's log printer hides and redraws around worker lines
    bar = _Bar(storage.join(run_dir, PROGRESS_FILE), manager)
    thread = threading.Thread(target=bar.run, name="emergence-ray-progress", daemon=True)
    with logs.set_output_guard(manager.hide_bars, manager.unhide_bars):
        thread.start()
        try:
            yield
        finally:
            bar.done.set()
            thread.join(timeout=2)
            bar.close()
