"""One driver per run directory: an OS file lock (`driver.lock` in the run or sweep folder).

    with RunLock(run_dir, "run", name):   # RunLockedError if another driver holds it
        ...                               # train / sweep

`fcntl.flock` on the open file: the kernel drops it when the holder exits or dies (SIGKILL, OOM,
a lost node's driver), so a crashed driver never leaves the run stuck. The holder writes its host,
pid and start time into the file for the message a second driver gets; those are only a label,
the flock is the lock. Local paths and NFS (Linux emulates flock with NFS byte-range locks) are
covered; object-store URIs (s3://, gs://) have no lock: there the lock is skipped with a warning
(README.md, "When things go wrong").
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, UTC
from pathlib import Path

from emergence_ray import storage
from emergence_ray.errors import RunLockedError

log = logging.getLogger("emergence_ray")
FILENAME = "driver.lock"


class RunLock:
    """Exclusive, non-blocking lock of `directory` (created if missing) for this process."""

    def __init__(self, directory: str, what: str = "run", name: str | None = None):
        self.directory, self.what = directory, what
        self.name = name or Path(directory).name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:  # already ours (a second flock on a new descriptor would conflict)
            return self
        if storage.is_uri(self.directory):
            log.warning("%s %r is on %s: no file lock there, so nothing stops a second driver on the same name; "
                        "start each %s once", self.what, self.name, self.directory.split("://")[0] + "://",
                        self.what)
            return self
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        path = Path(self.directory, FILENAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(self._held_message(path)) from None
        # ours now: replace the previous holder's label with ours
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner()).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _held_message(self, path: Path) -> str:
        holder = read_owner(path)
        if holder:
            by = f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
        else:
            by = "another process (it has not written its name yet)"
        return (f"{self.what} {self.name!r} is in use by {by}: {path} is locked. Wait for that command to end "
                f"(or stop it; a re-run then resumes), or choose another run.name")


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def read_owner(path: Path, wait_s: float = 1.0) -> dict | None:
    """The holder's label; it may be a moment behind the flock, so retry briefly."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            data = json.loads(path.read_text() or "null")
            if isinstance(data, dict) and {"host", "pid", "since"} <= data.keys():
                return data
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
