"""Logging set-up: one line per event, `key=value` fields, readable in a terminal and in journald.

Modules log with `logging.getLogger(__name__)` and put machine-readable fields in the message
(`rule=workspace verdict=clamp ...`); nothing here ever formats a secret.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str | int = "INFO", stream=None) -> None:
    """Route the project's logs to stderr (journald captures it under systemd); idempotent."""
    root = logging.getLogger("vlm2vla_edge")
    root.setLevel(level)
    if not any(getattr(h, "_vlm2vla", False) for h in root.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
        handler._vlm2vla = True  # type: ignore[attr-defined]
        root.addHandler(handler)
