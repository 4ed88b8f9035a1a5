"""Logging set-up: one line per event, `key=value` fields, readable in a terminal and in journald.

Modules log with `logging.getLogger(__name__)` and put machine-readable fields in the message
(`rule=workspace verdict=clamp ...`); nothing here ever formats a secret.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record arrives (it may be replaced after set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)

    def flush(self) -> None:
        self.stream = sys.stderr
        super().flush()


def configure_logging(level: str | int = "INFO") -> None:
    """Route the project's logs to stderr (journald captures it under systemd); idempotent."""
    root = logging.getLogger("vlm2vla_edge")
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
        root.addHandler(handler)
