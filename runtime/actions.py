"""Typed objects for what the policy says: action chunks, subtask lists and motion plans.

These are the only forms in which model output travels past the parser. They are immutable so that
a chunk recorded in an episode is the chunk that was checked by the safety limiter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

#: A point or a translation in the robot base frame, metres (x, y, z).
Vec3 = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Action:
    """One end-effector move in the robot base frame: translation deltas (metres) and a gripper value.

    `gripper` is canonical: 1.0 = open, 0.0 = closed (the parser maps the bundle's text values to
    these). Any other value is for the safety limiter to reject or snap.
    """

    dx: float
    dy: float
    dz: float
    gripper: float

    def translation(self) -> Vec3:
        return (self.dx, self.dy, self.dz)

    def norm(self) -> float:
        """Euclidean length of the translation, in metres."""
        return math.sqrt(self.dx * self.dx + self.dy * self.dy + self.dz * self.dz)

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.dx, self.dy, self.dz, self.gripper))

    def as_list(self) -> list[float]:
        return [self.dx, self.dy, self.dz, self.gripper]


@dataclass(frozen=True, slots=True)
class ActionChunk:
    """An ordered, non-empty sequence of actions produced by one action-stage generation."""

    actions: tuple[Action, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.actions, tuple):
            object.__setattr__(self, "actions", tuple(self.actions))

    def __len__(self) -> int:
        return len(self.actions)

    def __iter__(self) -> Iterator[Action]:
        return iter(self.actions)

    def __getitem__(self, index: int) -> Action:
        return self.actions[index]

    def total_translation(self) -> tuple[float, float, float]:
        """Sum of the deltas: where the chunk would take the end effector if executed unchanged."""
        return (
            sum(a.dx for a in self.actions),
            sum(a.dy for a in self.actions),
            sum(a.dz for a in self.actions),
        )

    def path_length(self) -> float:
        """Sum of per-action translation norms, in metres."""
        return sum(a.norm() for a in self.actions)

    def as_lists(self) -> list[list[float]]:
        return [a.as_list() for a in self.actions]


@dataclass(frozen=True, slots=True)
class SubtaskList:
    """The plan for an episode, produced once from the first image and the instruction."""

    subtasks: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.subtasks, tuple):
            object.__setattr__(self, "subtasks", tuple(self.subtasks))

    def __len__(self) -> int:
        return len(self.subtasks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.subtasks)

    def __getitem__(self, index: int) -> str:
        return self.subtasks[index]


@dataclass(frozen=True, slots=True)
class MotionPlan:
    """A one-line natural-language description of the next motion ("move primarily down ...")."""

    text: str
