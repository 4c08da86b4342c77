"""Logging set-up shared by the CLI and the training workers. Imports neither torch nor Ray, so
that the CLI can reject a bad config before paying for either.

Our lines go to stdout through `_GuardedHandler`: while the driver draws a progress bar
(`progress.display`), each line is written between the bar's hide and redraw, so a log line never
shares the bar's line. Ray's known-noise loggers are quieted here too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("emergence_ray")
_noop: Callable[[], None] = lambda: None  # noqa: E731
_guard: list[Callable[[], None]] = [_noop, _noop]  # (before a line, after it)

# Ray loggers that warn on every normal run about a choice this service makes on purpose, raised
# to ERROR (anything else Ray says still shows): Ray Data's "Progress bars disabled" (the driver
# draws one bar for the run; Ray Data's per-dataset bars would fight it), and the embedded Ray's
# "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" (it stays enabled;
# README says so). tests/test_progress.py fails when either warning shows again.
QUIETED = ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup")


class _GuardedHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        before, after = _guard
        before()
        try:
            super().emit(record)
        finally:
            after()


@contextlib.contextmanager
def set_output_guard(before: Callable[[], None], after: Callable[[], None]) -> Iterator[None]:
    """Call `before` / `after` around every line our logger writes, while the block runs."""
    _guard[:] = [before, after]
    try:
        yield
    finally:
        _guard[:] = [_noop, _noop]


def setup_logging() -> None:
    """Our INFO lines on stdout (forwarded to the driver); Ray's own loggers untouched, except Ray
    Train's report logger, which logs every report at INFO (too chatty), and `QUIETED`."""
    if not log.handlers:
        handler = _GuardedHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.ERROR)
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    if spec is not None and spec.origin:
        # that logger is named after its file: ray/train/v2/_internal/execution/context.py
        context = Path(spec.origin).parent / "train" / "v2" / "_internal" / "execution" / "context.py"
        logging.getLogger(str(context)).setLevel(logging.WARNING)
