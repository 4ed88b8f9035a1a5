"""Cut a demonstration into segments at gripper events and turns.

Everything here is deterministic and local: the same episode always gives the same segments. The
cloud annotator uses the same segments, chunks and checks, and only rewrites the wording.

**Segments.** A demonstration is cut after every gripper event (the step whose commanded gripper
differs from the gripper state before it: the event rides on the last step of a move, as the simulator's
expert and teleoperators do it), and inside the spans between events wherever the direction of travel
turns by more than `SegmentRules.turn_deg` (`approach_turn_deg` in a span that ends with a gripper
event, so the final approach to a grasp or a release is a segment of its own). Directions are compared over short
windows of path (`SegmentRules.window_m` behind and ahead), so teleoperation jitter does not cut; pieces shorter than
`SegmentRules.min_segment_m` are merged into a neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlm2vla_edge.train.data.trajectory import GripperEvent, Trajectory


@dataclass(frozen=True)
class SegmentRules:
    """Where a demonstration is cut."""

    turn_deg: float = 45.0  # a turn sharper than this between the path behind and ahead starts a segment
    approach_turn_deg: float = 15.0  # the same before a gripper event, so the final approach is its own segment
    window_m: float = 0.01  # path length over which the directions behind and ahead are measured
    min_segment_m: float = 0.015  # shorter pieces (and pieces of fewer than 1 step) merge into a neighbour
    still_m: float = 1e-4  # a step shorter than this has no direction


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of a trajectory; `event` is the gripper event on its last row, if any."""

    start: int
    end: int
    event: GripperEvent | None
    displacement: tuple[float, float, float]

    def __len__(self) -> int:
        return self.end - self.start


def gripper_events(traj: Trajectory) -> dict[int, GripperEvent]:
    """Rows whose commanded gripper differs from the gripper state before them."""
    events: dict[int, GripperEvent] = {}
    for i in range(len(traj)):
        if traj.gripper_cmd[i] != traj.gripper_before[i]:
            events[i] = "open" if traj.gripper_cmd[i] else "close"
    return events


def _direction(deltas: np.ndarray, rows: range, length_m: float) -> np.ndarray | None:
    """Unit direction of the path over `rows` (in that order) until `length_m` of path is covered."""
    total = np.zeros(3)
    path = 0.0
    for r in rows:
        total += deltas[r]
        path += float(np.linalg.norm(deltas[r]))
        if path >= length_m:
            break
    norm = float(np.linalg.norm(total))
    return total / norm if norm > 1e-9 else None


def segment(traj: Trajectory, rules: SegmentRules = SegmentRules()) -> list[Segment]:
    """Segments at gripper events and direction turns (see the module docstring)."""
    events = gripper_events(traj)
    n = len(traj)
    cuts = sorted({0, n, *(i + 1 for i in events if i + 1 < n)})
    pieces: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        turn = min(rules.turn_deg, rules.approach_turn_deg) if (b - 1) in events else rules.turn_deg
        pieces.extend(_split_span(traj.deltas, a, b, turn, rules))
    pieces = _merge_short(traj, pieces, set(events), rules)
    return [
        Segment(a, b, events.get(b - 1), tuple(float(v) for v in traj.deltas[a:b].sum(axis=0)))  # type: ignore[arg-type]
        for a, b in pieces
    ]


def _split_span(deltas: np.ndarray, a: int, b: int, turn_deg: float, rules: SegmentRules) -> list[tuple[int, int]]:
    cos_turn = math.cos(math.radians(turn_deg))
    out: list[tuple[int, int]] = []
    start = a
    for t in range(a + 1, b):
        if float(np.linalg.norm(deltas[t])) < rules.still_m:
            continue
        if float(np.linalg.norm(deltas[start:t].sum(axis=0))) < rules.window_m:
            continue  # the segment so far is too short to have a direction
        behind = _direction(deltas, range(t - 1, start - 1, -1), rules.window_m)
        ahead = _direction(deltas, range(t, b), rules.window_m)
        if behind is not None and ahead is not None and float(behind @ ahead) < cos_turn:
            out.append((start, t))
            start = t
    out.append((start, b))
    return out


def _merge_short(
    traj: Trajectory, pieces: list[tuple[int, int]], event_rows: set[int], rules: SegmentRules
) -> list[tuple[int, int]]:
    """Merge pieces shorter than min_segment_m into a neighbour within the same gripper span."""
    pieces = list(pieces)
    changed = True
    while changed and len(pieces) > 1:
        changed = False
        for k, (a, b) in enumerate(pieces):
            if float(np.linalg.norm(traj.deltas[a:b].sum(axis=0))) >= rules.min_segment_m:
                continue
            # Neighbours in the same span: the previous one unless it ends with a gripper event.
            prev_ok = k > 0 and (pieces[k - 1][1] - 1) not in event_rows
            next_ok = k + 1 < len(pieces) and (b - 1) not in event_rows
            if prev_ok:
                pieces[k - 1 : k + 1] = [(pieces[k - 1][0], b)]
            elif next_ok:
                pieces[k : k + 2] = [(a, pieces[k + 1][1])]
            else:
                continue
            changed = True
            break
    return pieces
