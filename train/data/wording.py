"""Word a motion in the motion-plan language, and check a plan (e.g. a cloud annotator's) against the motion.

**Motion wording** (`WordingRules`), in the robot base frame: +x forward, -x backward, +y to the
left, -y to the right, +z up, -z down. The axis with the largest displacement is the primary one
("Move primarily down"); every other axis whose displacement is at least `comparable_ratio` of the
primary one is added plainly ("and to the right"), one at least `secondary_ratio` of it as slight
("and slightly forward"); smaller ones are not named. Then the rounded path length ("about 8 cm") and
the gripper event of the window (", then close the gripper"). Below `still_m` there is no direction:
"Stay in place" (with the gripper event when there is one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vlm2vla_edge.runtime.action_text import format_motion_plan
from vlm2vla_edge.train.data.trajectory import GripperEvent

#: Base-frame direction words per axis: (positive, negative).
AXIS_WORDS: tuple[tuple[str, str], ...] = (("forward", "backward"), ("to the left", "to the right"), ("up", "down"))


@dataclass(frozen=True)
class WordingRules:
    """How a displacement becomes words (see the module docstring)."""

    secondary_ratio: float = 0.25
    comparable_ratio: float = 0.6
    still_m: float = 0.005
    distance: bool = True  # add "about N cm"
    contradiction_m: float = 0.01  # a named direction opposed by more than this contradicts the motion
    primary_named_m: float = 0.02  # above this the plan must name the primary direction


def direction_phrase(displacement: Sequence[float], rules: WordingRules = WordingRules()) -> str | None:
    """'Move primarily down and slightly to the right', or None when the move is below `still_m`."""
    d = np.asarray(displacement, dtype=float)
    mags = np.abs(d)
    primary = int(np.argmax(mags))
    if mags[primary] < rules.still_m:
        return None

    def word(axis: int) -> str:
        return AXIS_WORDS[axis][0 if d[axis] > 0 else 1]

    parts = [f"Move primarily {word(primary)}"]
    for axis in sorted((a for a in range(3) if a != primary), key=lambda a: -mags[a]):
        ratio = mags[axis] / mags[primary]
        if ratio >= rules.comparable_ratio:
            parts.append(f"and {word(axis)}")
        elif ratio >= rules.secondary_ratio:
            parts.append(f"and slightly {word(axis)}")
    return " ".join(parts)


def motion_plan_text(
    displacement: Sequence[float], event: GripperEvent | None, rules: WordingRules = WordingRules()
) -> str:
    """The motion plan of a window: direction, distance and gripper event (module docstring)."""
    phrase = direction_phrase(displacement, rules)
    gripper = {"close": "close the gripper", "open": "open the gripper", None: None}[event]
    if phrase is None:
        text = f"Stay in place and {gripper}" if gripper else "Stay in place"
    else:
        text = phrase
        if rules.distance:
            cm = max(1, round(float(np.linalg.norm(displacement)) * 100))
            text += f", about {cm} cm"
        if gripper:
            text += f", then {gripper}"
    return format_motion_plan(text)


_DIRECTION_PATTERNS: tuple[tuple[str, int, int], ...] = (
    (r"\b(?:up|upwards?|upward|raise|rise|higher)\b", 2, +1),
    (r"\b(?:down|downwards?|lower|descend)\b", 2, -1),
    (r"\b(?:forwards?|ahead|away from the robot)\b", 0, +1),
    (r"\b(?:backwards?|back|toward the robot|towards the robot)\b", 0, -1),
    (r"\bleft\b", 1, +1),
    (r"\bright\b", 1, -1),
)


def named_directions(text: str) -> set[tuple[int, int]]:
    """(axis, sign) of every base-frame direction a motion text names."""
    lowered = text.lower()
    return {(axis, sign) for pattern, axis, sign in _DIRECTION_PATTERNS if re.search(pattern, lowered)}


def plan_contradiction(
    plan: str, displacement: Sequence[float], event: GripperEvent | None, rules: WordingRules = WordingRules()
) -> str | None:
    """Why a motion plan contradicts the recorded motion of its window, or None when it does not.

    A plan contradicts when it names a direction the gripper moves against by more than
    `contradiction_m` ("up" while dz < -1 cm), when it does not name the primary direction of a move
    longer than `primary_named_m`, or when it names the opposite gripper event and not the real one.
    """
    d = np.asarray(displacement, dtype=float)
    named = named_directions(plan)
    for axis, sign in sorted(named):
        if sign * d[axis] < -rules.contradiction_m:
            said = AXIS_WORDS[axis][0 if sign > 0 else 1]
            moved = AXIS_WORDS[axis][0 if d[axis] > 0 else 1]
            return f"the plan says '{said}' but the gripper moves {abs(d[axis]) * 100:.1f} cm {moved}"
    primary = int(np.argmax(np.abs(d)))
    if abs(d[primary]) >= rules.primary_named_m and (primary, int(np.sign(d[primary]))) not in named:
        main = AXIS_WORDS[primary][0 if d[primary] > 0 else 1]
        return f"the plan does not name the main direction ({main}, {abs(d[primary]) * 100:.1f} cm)"
    lowered = plan.lower()
    says_close = re.search(r"\b(?:close|closes|closing|grasp|grip|grab)\b", lowered) is not None
    says_open = re.search(r"\b(?:open|opens|opening|release|let go)\b", lowered) is not None
    if event == "close" and says_open and not says_close:
        return "the plan opens the gripper but the recording closes it"
    if event == "open" and says_close and not says_open:
        return "the plan closes the gripper but the recording opens it"
    return None
