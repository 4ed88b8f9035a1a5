"""Post-processing between the parser and the safety limiter.

`reaggregate` is the VLM2VLA paper's: a model that writes millimetre steps makes the arm stutter
(every action is one arm command with its own acceleration and settling), so consecutive small deltas
are summed until the sum is worth a command (2.5 cm along any axis, or 5 cm in length), which keeps
the path's end point and gripper timing while cutting the number of commands.

`interpolate_waypoints` serves action languages whose actions are relative goals (`ActionLanguage.actions
== "waypoints"`): the model copies one offset instead of counting down a sequence of small steps (which
a small model measurably fails to learn), and the runtime walks the straight line in robot-sized steps.
It never lengthens a move and never moves further than the robot's chunk budget; the limiter still
checks every resulting command.
"""

from __future__ import annotations

import math
from fractions import Fraction

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import ActionLanguage, PostProcess, StepLimits


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


#: Steps and budgets are used at this fraction of the robot's limits, so float rounding never makes the
#: limiter clamp a move the post-processor sized to fit (the scripted expert uses the same margin).
LIMIT_MARGIN = 0.98


def interpolate_waypoints(chunk: ActionChunk, max_step_m: float, max_path_m: float, gripper: float) -> ActionChunk:
    """Cut each waypoint action into equal straight steps of at most `max_step_m`, and stop the chunk's
    path at `max_path_m` (both times `LIMIT_MARGIN`). `gripper` is the gripper's value before the chunk
    (1.0 open, 0.0 closed): the steps on the way to a waypoint keep the gripper as it is.

    A gripper change rides on the last step of its waypoint, as in the demonstrations; when the path
    budget ends before a waypoint is reached, the chunk ends there without that waypoint's gripper
    change (the goal was not reached, so neither is the moment to open or close). A zero-length action
    is one (gripper) command.
    """
    if max_step_m <= 0 or max_path_m <= 0:
        raise ValueError("max_step_m and max_path_m must be positive")
    step_m, budget = max_step_m * LIMIT_MARGIN, max_path_m * LIMIT_MARGIN
    out: list[Action] = []
    used = 0.0
    for action in chunk:
        if not action.is_finite():
            raise ValueError(f"cannot interpolate a chunk holding a non-finite value: {action}")
        length = action.norm()
        if length == 0.0:
            out.append(action)
            gripper = action.gripper
            continue
        reach = min(length, budget - used)
        if reach <= 1e-9:
            break
        n = max(1, math.ceil(reach / step_m - 1e-9))
        scale = reach / length / n
        arrived = reach >= length - 1e-12
        for i in range(n):
            last = i == n - 1
            g = action.gripper if (last and arrived) else gripper
            out.append(Action(action.dx * scale, action.dy * scale, action.dz * scale, g))
        used += reach
        if not arrived:
            break
        gripper = action.gripper
    return ActionChunk(tuple(out))


def postprocess_chunk(
    chunk: ActionChunk, language: ActionLanguage, limits: StepLimits, gripper_open: bool
) -> ActionChunk:
    """Everything between the parser and the limiter, as the bundle's action language asks: re-aggregation,
    then, for waypoint actions, interpolation within the robot's `limits` from the gripper's current state."""
    processed = reaggregate(chunk, language.postprocess)
    if language.actions == "waypoints":
        processed = interpolate_waypoints(
            processed, limits.max_translation_per_action_m, limits.max_translation_per_chunk_m,
            gripper=1.0 if gripper_open else 0.0,
        )
    return processed
