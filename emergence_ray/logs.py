"""Logging set-up shared by the CLI and the training workers. Imports neither torch nor Ray, so
that the CLI can reject a bad config before paying for either."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

log = logging.getLogger("emergence_ray")


def setup_logging() -> None:
    """Our INFO lines on stdout (forwarded to the driver); Ray's own loggers untouched, except Ray
    Train's report logger, which logs every report at INFO: too chatty."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    if spec is not None and spec.origin:
        # that logger is named after its file: ray/train/v2/_internal/execution/context.py
        context = Path(spec.origin).parent / "train" / "v2" / "_internal" / "execution" / "context.py"
        logging.getLogger(str(context)).setLevel(logging.WARNING)
