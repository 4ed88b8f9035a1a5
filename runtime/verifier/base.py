"""The step verifier's interface: after each executed action chunk, did the current subtask succeed?

The episode loop moves to the next subtask on `success`, and retries the subtask otherwise. A
verifier never raises for an unavailable backend or a bad answer: it returns a failed `Verdict`
with `error` set, so "unsure" always reads as "not done" (the conservative choice), and a wrapper
(`FallbackVerifier`) can hand the same request to another verifier.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from vlm2vla_edge.runtime.robot.base import ArmState

#: What the last executed command did to the gripper: closed it, opened it, or left it as it was (None).
GripperChange = Literal["close", "open"]


def _check_image(name: str, image: object) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be an H x W x 3 uint8 array, got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty ({image.shape})")


@dataclass(frozen=True, slots=True)
class VerificationRequest:
    """Everything a verifier may look at for one step; never the simulator's ground truth."""

    instruction: str  # the user's task, e.g. "put the carrot in the pan"
    subtask: str  # the subtask the step was meant to finish, e.g. "grasp the carrot"
    next_subtask: str | None  # the one after it (a "move to" must leave the gripper ready for it)
    motion_plan: str | None  # the policy's motion-plan text for this step, when it produced one
    pre_image: np.ndarray = field(repr=False)  # H x W x 3 uint8 RGB, before the chunk
    post_image: np.ndarray = field(repr=False)  # same camera, same size, after the chunk
    pre_state: ArmState
    post_state: ArmState
    # Sum of the executed (post-safety) end-effector deltas of the chunk, metres, base frame.
    commanded_translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gripper_change: GripperChange | None = None
    # Where the gripper appears in the post image, as (u, v) fractions of width and height, when the
    # caller can project it (the simulator can; an uncalibrated camera cannot). Narrows image checks.
    gripper_pixel: tuple[float, float] | None = None
    # The scene text after the chunk, when the loop has one (the simulator's description, the same
    # observation a text-only policy reads): it names each object's offset from the gripper.
    scene_after: str | None = None

    def __post_init__(self) -> None:
        if not self.subtask.strip():
            raise ValueError("subtask must not be empty")
        _check_image("pre_image", self.pre_image)
        _check_image("post_image", self.post_image)
        if self.pre_image.shape != self.post_image.shape:
            raise ValueError(f"pre_image {self.pre_image.shape} and post_image {self.post_image.shape} differ in size")
        if len(self.commanded_translation) != 3 or not all(math.isfinite(v) for v in self.commanded_translation):
            raise ValueError(f"commanded_translation must be 3 finite numbers, got {self.commanded_translation}")
        if self.gripper_change not in (None, "close", "open"):
            raise ValueError(f"gripper_change must be 'close', 'open' or None, got {self.gripper_change!r}")
        if self.gripper_pixel is not None and not all(0.0 <= v <= 1.0 for v in self.gripper_pixel):
            raise ValueError(f"gripper_pixel must be (u, v) fractions in [0, 1], got {self.gripper_pixel}")

    @property
    def achieved_translation(self) -> tuple[float, float, float]:
        """End-effector displacement the arm reports between the two states, metres."""
        pre, post = self.pre_state.position, self.post_state.position
        return (post[0] - pre[0], post[1] - pre[1], post[2] - pre[2])


@dataclass(frozen=True, slots=True)
class Verdict:
    """A verifier's decision on one step, recorded in the episode as `to_dict()`."""

    success: bool
    reason: str  # one sentence: the evidence (never a secret)
    verifier: str  # which verifier decided: "gemini", "heuristic", ...
    latency_s: float  # wall time of the whole decision, fallback included
    # Verification attempts spent on this verdict, across verifiers: cloud requests sent (retries
    # included) plus one for a local verifier.
    attempts: int = 1
    fallback_from: str | None = None  # the verifier that failed first, when a fallback decided
    error: str | None = None  # why the verifier (or the one fallen back from) failed; redacted
    cancelled: bool = False  # the caller's cancel flag stopped the verification: no decision

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready fields for `steps.jsonl`."""
        return asdict(self)


class Verifier(ABC):
    """Decides whether the current subtask succeeded. One caller at a time."""

    #: Short identifier recorded in every verdict this verifier produces.
    name: str = "verifier"

    @abstractmethod
    def verify(self, request: VerificationRequest, cancel: threading.Event | None = None) -> Verdict:
        """Judge one step; returns a failed verdict with `error` set rather than raising for backend faults."""

    def unavailable_reason(self) -> str | None:
        """Why this verifier cannot answer now (no key, circuit open), or None when it can; never a secret."""
        return None

    def redact(self, text: str) -> str:
        """Remove this verifier's secrets from a text before it is logged or recorded."""
        return text


def cancelled_verdict(verifier: str, latency_s: float, attempts: int) -> Verdict:
    """The verdict for a verification stopped by the caller's cancel flag (not a failure of the backend)."""
    return Verdict(
        success=False,
        reason="verification cancelled",
        verifier=verifier,
        latency_s=latency_s,
        attempts=attempts,
        cancelled=True,
    )
