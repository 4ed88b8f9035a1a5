"""Name the subtasks of a segmented demonstration from its instruction's objects.

**Subtasks.** Named from the instruction's objects (`parse_instruction`: English patterns, or the
simulator's multilingual noun table, or generic "the object"/"the target"), by the role of each segment
between gripper events: before a close, "Move to the X" then (last segment) "Grasp the X"; while
holding, "Lift the X" (first segment, when it rises), "Move to the Y", and (last segment, ending with
the release) "Release the X"; holding at the end, "Lift the X"; moves after a release belong to the
release or to the next "Move to ...". Without any gripper event the instruction itself is the one subtask.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from vlm2vla_edge.runtime.action_text import format_subtasks
from vlm2vla_edge.train.data.instruction import ParsedInstruction, TaskPart
from vlm2vla_edge.train.data.segment import Segment
from vlm2vla_edge.train.data.trajectory import Trajectory


def name_subtasks(
    traj: Trajectory, segments: list[Segment], parsed: ParsedInstruction, max_subtasks: int = 8
) -> tuple[list[str], list[int]]:
    """The subtask list and, per segment, the index of its subtask (module docstring: Subtasks)."""
    labels: list[str] = []
    grasps = 0
    holding: TaskPart | None = None
    has_events = any(s.event for s in segments)
    # Group segments into spans that end with a gripper event (or the end of the episode).
    spans: list[list[int]] = [[]]
    for k, seg in enumerate(segments):
        spans[-1].append(k)
        if seg.event is not None:
            spans.append([])
    if not spans[-1]:
        spans.pop()
    by_segment: dict[int, str] = {}
    for span in spans:
        last = segments[span[-1]]
        gripper_open = bool(traj.gripper_before[segments[span[0]].start])
        if not has_events:
            for k in span:
                by_segment[k] = parsed.sentence
        elif last.event == "close":
            part = parsed.parts[min(grasps, len(parsed.parts) - 1)]
            grasps += 1
            holding = part
            for k in span:
                by_segment[k] = f"Grasp {part.obj}" if k == span[-1] else f"Move to {part.obj}"
        elif not gripper_open:  # holding: carry, ending with a release or with the episode
            part = holding or parsed.parts[min(max(grasps - 1, 0), len(parsed.parts) - 1)]
            rises = segments[span[0]].displacement[2] > 0 and _primary_axis(segments[span[0]].displacement) == 2
            for k in span:
                if last.event == "open" and k == span[-1]:
                    by_segment[k] = f"Release {part.obj}"
                elif k == span[0] and (rises or last.event is None):
                    by_segment[k] = f"Lift {part.obj}"
                elif last.event is None:
                    by_segment[k] = f"Lift {part.obj}" if rises else f"Move {part.obj}"
                else:
                    by_segment[k] = f"Move to {part.destination}" if part.destination else f"Move {part.obj}"
            if last.event == "open":
                holding = None
        else:  # open moves not ending in a grasp: after a release, or an open event with nothing held
            previous = by_segment.get(span[0] - 1)
            for k in span:
                by_segment[k] = previous or parsed.sentence
    for k in range(len(segments)):
        labels.append(_clean_subtask(by_segment[k]))
    subtasks: list[str] = []
    index: list[int] = []
    for label in labels:
        if not subtasks or subtasks[-1] != label:
            subtasks.append(label)
        index.append(len(subtasks) - 1)
    return _cap_subtasks(subtasks, index, max_subtasks)


def _primary_axis(d: Sequence[float]) -> int:
    return int(np.argmax(np.abs(np.asarray(d))))


def _clean_subtask(text: str) -> str:
    text = " ".join(re.sub(r'["\\\x00-\x1f\x7f]', " ", text).split())
    return text[:96]


def _cap_subtasks(subtasks: list[str], index: list[int], limit: int) -> tuple[list[str], list[int]]:
    """Merge adjacent subtasks (the pair with the fewest segments) until at most `limit` remain."""
    while len(subtasks) > limit:
        sizes = [index.count(i) for i in range(len(subtasks))]
        k = min(range(len(subtasks) - 1), key=lambda i: sizes[i] + sizes[i + 1])
        merged = f"{subtasks[k]} and {subtasks[k + 1][:1].lower()}{subtasks[k + 1][1:]}"
        subtasks[k : k + 2] = [merged if len(merged) <= 96 else subtasks[k]]
        index = [i if i <= k else i - 1 for i in index]
    format_subtasks(subtasks)  # raises if anything slipped through
    return subtasks, index
