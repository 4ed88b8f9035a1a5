"""Numbers on the page, each with its unit: durations as durations, counts as counts, lengths in cm.

A step's `timings` mixes seconds (`prefill_s`) with counts (`prefill_tokens`, `decode_batches`) under
one mapping, so the unit has to come from the recorded name. Printing every figure as seconds showed
`prefill_tokens 23.00 s`; a `Figure` carries its `Quantity`, and only the quantity decides the format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Sequence

MISSING = "–"


class Quantity(Enum):
    """What a recorded number measures."""

    DURATION = "duration"  # seconds
    COUNT = "count"  # tokens, batches, resamples: a number of things


#: Name suffixes of durations and the factor to seconds; every other recorded figure is a count.
_DURATION_SUFFIXES = (("_s", 1.0), ("_ms", 1e-3))


@dataclass(frozen=True)
class Figure:
    """One named number with its quantity; `str()` formats it for the page."""

    name: str
    value: float
    quantity: Quantity

    @classmethod
    def recorded(cls, name: str, value: float) -> "Figure":
        """A figure from a step's `timings`: `*_s`/`*_ms` are durations (kept in seconds), the rest counts."""
        for suffix, to_seconds in _DURATION_SUFFIXES:
            if name.endswith(suffix):
                return cls(name, value * to_seconds, Quantity.DURATION)
        return cls(name, value, Quantity.COUNT)

    @classmethod
    def duration(cls, name: str, seconds: float) -> "Figure":
        return cls(name, seconds, Quantity.DURATION)

    def __str__(self) -> str:
        return format_duration(self.value) if self.quantity is Quantity.DURATION else format_count(self.value)


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def finite_vec(vec: Sequence[float] | None) -> bool:
    return vec is not None and len(vec) >= 3 and all(finite(v) for v in vec[:3])


def format_duration(value: float | None) -> str:
    if value is None or not finite(value):
        return MISSING
    if abs(value) < 1.0:
        return f"{value * 1000:.0f} ms" if abs(value) >= 0.01 else f"{value * 1000:.1f} ms"
    if abs(value) < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def format_count(value: float | None) -> str:
    """A count as a whole number; a mean of counts keeps one decimal."""
    if value is None or not finite(value):
        return MISSING
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def format_gripper(value: float | bool | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, bool):
        return "open" if value else "closed"
    if value == 1.0:
        return "open"
    if value == 0.0:
        return "closed"
    return f"{value:g}"


def format_utc(ts: float | None) -> str:
    if ts is None or not finite(ts):
        return MISSING
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return MISSING


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Units:
    """How positions and deltas are shown: centimetres for episodes in metres, else the recorded unit."""

    scale: float
    label: str

    @classmethod
    def of(cls, action_units: str) -> "Units":
        return cls(100.0, "cm") if action_units == "m" else cls(1.0, action_units)

    def num(self, value: float | None, signed: bool = False, digits: int = 1) -> str:
        if value is None or not finite(value):
            return MISSING
        return f"{value * self.scale:{'+' if signed else ''}.{digits}f}"

    def vec(self, vec: Sequence[float] | None) -> str:
        if vec is None:
            return MISSING
        return "(" + ", ".join(self.num(v) for v in vec[:3]) + ")"


def shorten(value: object, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
