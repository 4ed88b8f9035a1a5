"""The VLM2VLA paper's post-processing: re-aggregate a chunk's tiny moves into meaningful ones.

A model that writes millimetre steps makes the arm stutter: every action is one arm command with its
own acceleration and settling. The paper sums consecutive small deltas until the sum is worth a
command (2.5 cm along any axis, or 5 cm in length), which keeps the path's end point and gripper
timing while cutting the number of commands.
"""

from __future__ import annotations

import math
from fractions import Fraction

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import PostProcess


def reaggregate(chunk: ActionChunk, pp: PostProcess) -> ActionChunk:
    """Merge consecutive small moves of a chunk; return the chunk unchanged when `pp.enabled` is False.

    The rule, applied in order over the actions:

    1. Actions are accumulated into a group while they share one gripper value.
    2. A group is emitted as one action as soon as its summed translation reaches
       `pp.per_direction_threshold_m` in magnitude along any axis, or `pp.absolute_threshold_m` in
       Euclidean length; the next action starts a new group.
    3. When the gripper value changes, the group so far is emitted first (with its own gripper value),
       so the gripper opens or closes at the same point of the path as in the original chunk.
    4. At the end the remainder is emitted.
    5. A group whose own translation sums to exactly zero is dropped when its gripper value is the one
       the previous emitted action already commands (it would be a no-op); otherwise, also with zero
       translation, it is emitted, because it is a gripper command (the first group always is).

    Non-finite values raise `ValueError` (the parser never produces them).

    Sums are exact (fractions), and each emitted value is the float nearest to what is still owed
    (the exact sum so far minus what was already emitted), so rounding never accumulates: the exact
    total of the emitted translations differs from that of the input by at most half an ulp of the
    last emitted value on each axis.
    """
    if not pp.enabled or len(chunk) == 0:
        return chunk
    emitted: list[Action] = []
    owed = [Fraction(0)] * 3  # exact input sum so far minus exact sum of emitted values, per axis
    group_sum = [Fraction(0)] * 3  # exact sum of the current group's own inputs
    group_gripper: float | None = None

    def emit() -> None:
        nonlocal owed, group_sum, group_gripper
        assert group_gripper is not None
        is_gripper_command = not emitted or emitted[-1].gripper != group_gripper
        if any(group_sum) or is_gripper_command:
            values = [float(v) for v in owed]
            emitted.append(Action(values[0], values[1], values[2], group_gripper))
            owed = [o - Fraction(v) for o, v in zip(owed, values)]
        group_sum = [Fraction(0)] * 3
        group_gripper = None

    for action in chunk:
        if not action.is_finite():
            raise ValueError(f"cannot re-aggregate a chunk holding a non-finite value: {action}")
        if group_gripper is not None and action.gripper != group_gripper:
            emit()
        group_gripper = action.gripper
        deltas = [Fraction(v) for v in action.translation()]
        owed = [o + d for o, d in zip(owed, deltas)]
        group_sum = [g + d for g, d in zip(group_sum, deltas)]
        if _reached(owed, pp):
            emit()
    if group_gripper is not None:
        emit()
    return ActionChunk(tuple(emitted))


def _reached(owed: list[Fraction], pp: PostProcess) -> bool:
    values = [float(v) for v in owed]
    return (
        any(abs(v) >= pp.per_direction_threshold_m for v in values)
        or math.sqrt(sum(v * v for v in values)) >= pp.absolute_threshold_m
    )
