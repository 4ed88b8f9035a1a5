"""One row of the reliability report: how many runs of one kind of trouble were tried, and how many the
robot survived (every safety condition held). Shared by the fault, fuzz, load and access suites."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    category: str  # "fault", "fuzz", "load", "access"
    name: str  # the scenario, e.g. "camera_timeout"
    tried: int = 0
    survived: int = 0
    unsafe_commands: int = 0  # arm commands that ran when they must not have (after a fault or a stop)
    failures: list[str] = field(default_factory=list)  # one line per run that did not survive: why

    def record(self, ok: bool, why: str) -> None:
        """Count one run; `why` says what went wrong when it did not survive."""
        self.tried += 1
        if ok:
            self.survived += 1
        else:
            self.failures.append(why)
