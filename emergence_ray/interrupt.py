"""Ctrl-C (SIGINT) and SIGTERM as one exception, so every command ends the same clean way.

    with handling():          # SIGINT / SIGTERM raise Interrupted in the main thread
        ...
    except Interrupted as err: err.exit_code   # 130 / 143, the shell's 128 + signal number

`Interrupted` derives from KeyboardInterrupt: code that cleans up on Ctrl-C (finally blocks,
`except KeyboardInterrupt`) cleans up on SIGTERM too, and `except Exception` never swallows it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def install() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (main thread only; elsewhere this does nothing).
    `ray.init` replaces the SIGTERM handler with one that exits with the signal number: call
    this again after connecting, or read SystemExit(15) as SIGTERM (cli.py does both)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """`install()` for the block, then the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    install()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

