"""Chunk windows: the action chunks (and their motion plans) a demonstration is cut into for training.

**Action chunks.** The recorded deltas of a window (raw moves longer than the robot's per-action
limit split first), re-aggregated with the paper's `reaggregate`, emitted moves longer than the
per-action limit split again (the gripper change stays on the last piece), and rounded to the
language's decimals with the rounding error carried into the next action, so a chunk ends where the
recording does to within half a unit of the last decimal. A window is as long as fits in the robot's
chunk length and path budget and does not cross a segment end.

Waypoint action languages (one absolute-offset action per chunk) get their own windows
(`waypoint_windows`): from each row where the runtime's loop stands to the end of its segment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from vlm2vla_edge.runtime.action_text import format_action_chunk, format_motion_plan, format_number, rounded_offset
from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import ActionLanguage, RobotConfig
from vlm2vla_edge.runtime.postprocess import reaggregate
from vlm2vla_edge.train.data.segment import Segment, SegmentRules
from vlm2vla_edge.train.data.trajectory import GripperEvent, Trajectory
from vlm2vla_edge.train.data.wording import WordingRules, direction_phrase, motion_plan_text


@dataclass(frozen=True)
class ChunkLimits:
    """What one action chunk may hold: the language's and the robot's limits, the stricter of each."""

    max_actions: int = 10
    max_action_m: float = 0.05
    max_chunk_path_m: float = 0.20

    @classmethod
    def for_robot(cls, robot: RobotConfig, language: ActionLanguage) -> "ChunkLimits":
        limits = robot.limits
        return cls(
            max_actions=min(limits.max_chunk_length, language.max_steps),
            max_action_m=min(limits.max_translation_per_action_m, language.max_abs_value_m),
            max_chunk_path_m=limits.max_translation_per_chunk_m,
        )


@dataclass(frozen=True)
class Window:
    """The rows [start, end) one action chunk covers, the chunk's text and the wording of its motion."""

    start: int
    end: int
    segment: int
    chunk: ActionChunk
    chunk_text: str
    displacement: tuple[float, float, float]  # of the chunk as written (rounded)
    event: GripperEvent | None
    plan: str


def _split_action(action: Action, max_m: float, previous_gripper: float) -> list[Action]:
    n = max(1, math.ceil(action.norm() / max_m - 1e-9))
    if n == 1:
        return [action]
    return [
        Action(action.dx / n, action.dy / n, action.dz / n, action.gripper if i == n - 1 else previous_gripper)
        for i in range(n)
    ]


def _round_chunk(actions: list[Action], decimals: int) -> list[Action]:
    """Round translations to `decimals`, carrying each rounding error into the next action; drop no-ops."""
    out: list[Action] = []
    carry = [0.0, 0.0, 0.0]
    for i, a in enumerate(actions):
        want = [v + c for v, c in zip(a.translation(), carry)]
        rounded = [round(v, decimals) + 0.0 for v in want]
        carry = [w - r for w, r in zip(want, rounded)]
        if not any(rounded) and out and out[-1].gripper == a.gripper and i < len(actions) - 1:
            continue  # a no-op; its remainder is still carried
        out.append(Action(rounded[0], rounded[1], rounded[2], a.gripper))
    if out and not any(out[-1].translation()) and len(out) > 1 and out[-2].gripper == out[-1].gripper:
        out.pop()
    return out


def build_chunk(
    deltas: np.ndarray, grippers: np.ndarray, gripper_before: bool, language: ActionLanguage, limits: ChunkLimits
) -> ActionChunk:
    """The action chunk of recorded rows: split, re-aggregated, split again, rounded (module docstring)."""
    raw: list[Action] = []
    previous = 1.0 if gripper_before else 0.0
    for d, g in zip(deltas, grippers):
        action = Action(float(d[0]), float(d[1]), float(d[2]), 1.0 if g else 0.0)
        raw.extend(_split_action(action, limits.max_action_m, previous))
        previous = action.gripper
    merged = reaggregate(ActionChunk(tuple(raw)), language.postprocess)
    split: list[Action] = []
    previous = 1.0 if gripper_before else 0.0
    for action in merged:
        split.extend(_split_action(action, limits.max_action_m * 0.999, previous))
        previous = action.gripper
    return ActionChunk(tuple(_round_chunk(split, language.decimals)))


def _fits(chunk: ActionChunk, limits: ChunkLimits) -> bool:
    return 0 < len(chunk) <= limits.max_actions and chunk.path_length() <= limits.max_chunk_path_m + 1e-9


def windows(
    traj: Trajectory,
    segments: list[Segment],
    language: ActionLanguage,
    limits: ChunkLimits,
    wording: WordingRules = WordingRules(),
) -> list[Window]:
    """Consecutive chunk windows over each segment, each the longest prefix that fits the limits."""
    out: list[Window] = []
    for k, seg in enumerate(segments):
        start = seg.start
        while start < seg.end:
            # Grow the window row by row while its chunk still fits (a chunk only grows with its window).
            end = start + 1
            chunk = build_chunk(traj.deltas[start:end], traj.gripper_cmd[start:end],
                                bool(traj.gripper_before[start]), language, limits)
            while end < seg.end:
                candidate = build_chunk(traj.deltas[start:end + 1], traj.gripper_cmd[start:end + 1],
                                        bool(traj.gripper_before[start]), language, limits)
                if not _fits(candidate, limits):
                    break
                end, chunk = end + 1, candidate
            if not _fits(chunk, limits):  # one raw row too long for one chunk: keep its first part
                chunk = ActionChunk(chunk.actions[: limits.max_actions])
            text = format_action_chunk(chunk, language)
            moved = chunk.total_translation()
            event = None
            if any(chunk[i].gripper != (chunk[i - 1].gripper if i else (1.0 if traj.gripper_before[start] else 0.0))
                   for i in range(len(chunk))):
                event = "open" if chunk[-1].gripper == 1.0 else "close"
            out.append(Window(start, end, k, chunk, text, moved, event, motion_plan_text(moved, event, wording)))
            start = end
    return out


def waypoint_plan_text(
    name: str | None, displacement: Sequence[float], event: GripperEvent | None, decimals: int,
    rules: WordingRules = WordingRules(), *, gripper_open: bool | None = None, units: str = "m",
) -> str:
    """The motion plan of a waypoint window: the subtask (which names its object) and the offset to reach,
    in the numbers the action chunk will copy (in `units`, as the chunk), e.g. "Move to the lemon: (-0.18, -0.16,
    -0.06)." or
    "Grasp the lemon: (0, 0, -0.08), then close the gripper." Naming the object before its numbers is
    what lets a small model find the right object's line in the scene (a December 2026 probe: 40/40 held-out
    states right within ~25 steps; numbers alone were not bound to their object). A move without a
    gripper event states the gripper it keeps (`gripper_open`: "..., gripper open."), in the scene's own
    first words: without it the action stage had to infer the gripper value, and after a release it often
    closed on arrival, so every later grasp closed on nothing. A subtask the plan grammar cannot hold
    (non-ASCII, too long) is replaced by the direction phrase."""
    offset = "(" + ", ".join(format_number(float(v), decimals, units) for v in displacement) + ")"
    # The endings the runtime reads back (runtime.action_text.PLAN_GRIPPER_ENDINGS), without the full stop.
    gripper = {"close": ", then close the gripper", "open": ", then open the gripper", None: ""}[event]
    if event is None and gripper_open is not None:
        gripper = ", gripper open" if gripper_open else ", gripper closed"
    head = (name or "").strip().rstrip(".")
    for lead in (head, direction_phrase(displacement, rules) or "Stay in place"):
        if lead:
            try:
                return format_motion_plan(f"{lead}: {offset}{gripper}.")
            except ValueError:
                continue  # the plan grammar cannot hold this lead (non-ASCII, too long): try the next
    return format_motion_plan(f"Move: {offset}{gripper}.")


def waypoint_rows(traj: Trajectory, seg: Segment, budget_m: float) -> list[int]:
    """The rows of a segment where a waypoint policy's loop stands: its start, and each point where the path
    from the start first reaches another chunk budget (the runtime walks at most one budget per step).
    Other rows would teach answers the observation cannot tell apart (half-way up a lift looks like its
    start), and the loop never stands there."""
    rows = [seg.start]
    travelled, next_stop = 0.0, budget_m
    for row in range(seg.start, seg.end - 1):
        travelled += float(np.linalg.norm(traj.deltas[row]))
        if travelled >= next_stop - 1e-6:
            rows.append(row + 1)
            next_stop += budget_m
    return rows


def waypoint_windows(
    traj: Trajectory, segments: list[Segment], language: ActionLanguage, segment_names: Sequence[str | None],
    limits: ChunkLimits,
) -> list[Window]:
    """Windows of a waypoint action language: a one-action chunk from each row where the loop stands
    (`waypoint_rows`) to the end of its segment (where the arm went, not where it was told to go), with
    the segment's final gripper value."""
    from vlm2vla_edge.runtime.postprocess import LIMIT_MARGIN

    out: list[Window] = []
    for k, seg in enumerate(segments):
        end_gripper = 1.0 if traj.gripper_cmd[seg.end - 1] else 0.0
        event = seg.event
        for row in waypoint_rows(traj, seg, limits.max_chunk_path_m * LIMIT_MARGIN):
            rounded = rounded_offset(traj.positions[row], traj.positions[seg.end], language.decimals)
            chunk = ActionChunk((Action(rounded[0], rounded[1], rounded[2], end_gripper),))
            # The gripper event belongs to the window only when the gripper is not already where it ends.
            before = 1.0 if traj.gripper_before[row] else 0.0
            window_event = event if before != end_gripper else None
            text = format_action_chunk(chunk, language)
            plan = waypoint_plan_text(segment_names[k], rounded, window_event, language.decimals,
                                      gripper_open=end_gripper == 1.0, units=language.units)
            out.append(Window(row, seg.end, k, chunk, text, rounded, window_event, plan))
    return out


def settings_dict(segment_rules: SegmentRules, wording: WordingRules, limits: ChunkLimits) -> dict[str, object]:
    """The rules as plain data, recorded in dataset.json."""
    return {"segment": asdict(segment_rules), "wording": asdict(wording), "chunk_limits": asdict(limits)}
