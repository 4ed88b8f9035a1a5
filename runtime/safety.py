"""Safety limiter for arm commands: the only producer of `SafeCommand`, the only thing an arm executes.

Sits between the parser and every arm, the simulator included. Limits come from the robot config
alone (`RobotConfig`); nothing in model output or instruction text can loosen them, and there is no
switch to turn a rule off: each rule clamps or rejects (`RuleMode`). Every decision carries a reason
that is logged and recorded in the episode. The e-stop latches until an explicit `reset()`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from vlm2vla_edge.runtime.actions import Action
from vlm2vla_edge.runtime.errors import Vlm2VlaError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.safety import SafetyLimiter

Vec3 = tuple[float, float, float]
Verdict = Literal["pass", "clamp", "reject"]

# Only this module holds the token that makes a SafeCommand constructible.
_LIMITER_TOKEN = object()


class SafetyViolation(Vlm2VlaError):
    """A command was refused by the limiter at execution time (replayed, rate-limited, ...)."""


class EStopEngaged(SafetyViolation):
    """The e-stop is latched: nothing moves until `SafetyLimiter.reset()`."""


@dataclass(frozen=True, slots=True)
class SafetyDecision:
    """One rule's verdict on one action (index) or on the whole chunk (index None)."""

    rule: str  # e.g. "workspace", "table_floor", "action_translation", "chunk_length", "gripper", ...
    verdict: Verdict
    reason: str  # one human-readable sentence with the numbers involved
    index: int | None = None  # position of the action in its chunk; None for chunk-level rules

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "verdict": self.verdict, "reason": self.reason, "index": self.index}


class SafeCommand:
    """A limiter-approved arm command: move the end effector from `start` to `target`, then set the gripper.

    Only `SafetyLimiter` can create one (the constructor demands a token private to this module), and
    `authorize()` must succeed right before execution: it re-checks the e-stop latch, spends the
    command (each is executed at most once) and applies the rate limit.
    """

    __slots__ = ("start", "target", "gripper_open", "source", "decisions", "_limiter", "_spent", "_lock")

    def __init__(
        self,
        *,
        token: object,
        limiter: "SafetyLimiter",
        start: Vec3,
        target: Vec3,
        gripper_open: bool,
        source: Action,
        decisions: tuple[SafetyDecision, ...],
    ) -> None:
        if token is not _LIMITER_TOKEN:
            raise TypeError("a SafeCommand can only be created by the SafetyLimiter")
        self.start = start
        self.target = target
        self.gripper_open = gripper_open
        self.source = source
        self.decisions = decisions
        self._limiter = limiter
        self._spent = False
        self._lock = threading.Lock()

    @property
    def delta(self) -> Vec3:
        return (self.target[0] - self.start[0], self.target[1] - self.start[1], self.target[2] - self.start[2])

    @property
    def clamped(self) -> bool:
        return any(d.verdict == "clamp" for d in self.decisions)

    def authorize(self, now: float | None = None) -> float:
        """Check the latch, spend the command, and return how many seconds to wait (rate limit).

        Raises `EStopEngaged` while the e-stop is latched, `SafetyViolation` for a spent command or a
        rate violation under the 'reject' rule.
        """
        with self._lock:
            if self._spent:
                raise SafetyViolation("this command was already executed; commands cannot be replayed")
            wait = self._limiter._authorize(self, time.monotonic() if now is None else now)
            self._spent = True
            return wait

    def to_dict(self) -> dict[str, object]:
        return {
            "start": list(self.start),
            "target": list(self.target),
            "gripper_open": self.gripper_open,
            "source": self.source.as_list(),
            "decisions": [d.to_dict() for d in self.decisions],
        }

    def __repr__(self) -> str:
        return f"SafeCommand(start={self.start}, target={self.target}, gripper_open={self.gripper_open})"


# The SafetyLimiter class follows (implementation in progress).
