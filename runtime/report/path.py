"""What the path plot shows, as data: recorded end-effector positions, the limiter's marks, the workspace.

Kept apart from the SVG drawing so the geometry (which points, which box, when to zoom) can be
tested and reused without markup.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from vlm2vla_edge.runtime.config import RobotConfig, load_robot_config, preset_names
from vlm2vla_edge.runtime.episode import SafetyRecord, StepRecord
from vlm2vla_edge.runtime.report.grouping import safety_decisions
from vlm2vla_edge.runtime.report.units import finite_vec

log = logging.getLogger(__name__)

Point = tuple[float, float, float]

#: A path smaller than this fraction of the workspace (on both axes of a view) gets zoomed views too.
ZOOM_BELOW = 0.3


@dataclass(frozen=True)
class PathPoint:
    index: int
    stage: str
    pos: Point
    gripper_open: bool | None


@dataclass(frozen=True)
class Mark:
    kind: str  # "clamp" | "reject"
    pos: Point
    text: str


@dataclass(frozen=True)
class Box:
    lo: Point
    hi: Point
    floor: float | None = None  # lowest allowed z (table + clearance)
    table: float | None = None
    source: str = ""


def _point(vec: Iterable[float]) -> Point:
    x, y, z = (float(v) for v in list(vec)[:3])
    return x, y, z


def path_points(steps: Iterable[StepRecord]) -> list[PathPoint]:
    """One point per step with a finite recorded end-effector position, in file order."""
    return [PathPoint(s.index, s.stage or "", _point(s.ee_position), s.gripper_open)
            for s in steps if s.ee_position is not None and finite_vec(s.ee_position)]


def safety_marks(steps: Iterable[StepRecord]) -> list[Mark]:
    """Where the limiter changed or refused a command: at the clamped target, else at the step's position."""
    marks: list[Mark] = []
    for s in steps:
        decisions = safety_decisions(s)
        if not decisions:
            continue
        start = s.ee_position if finite_vec(s.ee_position) else None
        executed = s.executed or []
        by_index: dict[int | None, list[SafetyRecord]] = defaultdict(list)
        for d in decisions:
            by_index[d.index].append(d)
        for index, group in by_index.items():
            verdicts = {d.verdict for d in group}
            kind = "reject" if "reject" in verdicts else "clamp" if "clamp" in verdicts else None
            if kind is None:
                continue
            pos = None
            target = executed[index].target if index is not None and 0 <= index < len(executed) else None
            if kind == "clamp" and finite_vec(target):
                pos = target
            pos = pos or start
            if pos is None:
                continue
            where = f"action {index + 1}" if index is not None else "chunk"
            text = f"step #{s.index} {where}: " + "; ".join(f"{d.rule} {d.verdict}: {d.reason}" for d in group)
            marks.append(Mark(kind, _point(pos), text))
    return marks


def executed_paths(steps: Iterable[StepRecord]) -> list[list[Point]]:
    """Per action record: its start and the positions each executed command reached (the path inside a chunk)."""
    paths = []
    for s in steps:
        if not s.executed or s.ee_position is None or not finite_vec(s.ee_position):
            continue
        path = [_point(s.ee_position)]
        for cmd in s.executed:
            point = cmd.reached if finite_vec(cmd.reached) else cmd.target if finite_vec(cmd.target) else None
            if point is not None:
                path.append(_point(point))
        if len(path) > 2:  # one command is already drawn by the step-to-step path
            paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- workspace


def robot_config_for(robot_name: str | None) -> RobotConfig | None:
    """The packaged robot preset whose file stem or `name` matches the episode's robot, if any.

    Only packaged presets are considered (a name from a shared episode is never opened as a path).
    """
    if not robot_name:
        return None
    try:
        names = preset_names(RobotConfig)
    except Exception:  # noqa: BLE001 - a broken install must not stop the report
        return None
    for preset in names:
        try:
            config = load_robot_config(preset)
        except Exception as exc:  # noqa: BLE001
            log.debug("event=report_robot_preset_unreadable preset=%s reason=%r", preset, str(exc))
            continue
        if robot_name in (preset, config.name):
            return config
    return None


def workspace_box(robot: RobotConfig | None, units: str) -> Box | None:
    """The robot's workspace, table and z floor; only for episodes in metres (the config's unit)."""
    if robot is None or units != "m":
        return None
    w = robot.workspace
    return Box((w.x.min, w.y.min, w.z.min), (w.x.max, w.y.max, w.z.max), robot.z_floor, robot.table_z,
               f"workspace of robot config '{robot.name}'")


def extent(points: list[PathPoint], marks: list[Mark]) -> tuple[list[float], list[float]] | None:
    coords = [p.pos for p in points] + [m.pos for m in marks]
    if not coords:
        return None
    return [min(c[i] for c in coords) for i in range(3)], [max(c[i] for c in coords) for i in range(3)]


def bounds(points: list[PathPoint], marks: list[Mark], box: Box | None,
           zoom: bool = False) -> tuple[list[float], list[float]]:
    """The region a view shows: the workspace and the data (or, zoomed, the data alone), padded."""
    found = extent(points, marks)
    lo, hi = (list(found[0]), list(found[1])) if found else ([0.0] * 3, [0.0] * 3)
    if box is not None and not zoom:
        lo = [min(lo[i], box.lo[i]) for i in range(3)] if found else list(box.lo)
        hi = [max(hi[i], box.hi[i]) for i in range(3)] if found else list(box.hi)
        if box.table is not None:
            lo[2] = min(lo[2], box.table)
    for i in range(3):  # never a zero span (a path that only moved up and down, or a single point)
        span = hi[i] - lo[i]
        pad = max(span * (0.15 if zoom else 0.06), 0.01 if zoom or box is not None else 0.02)
        lo[i] -= pad
        hi[i] += pad
    return lo, hi


def wants_zoom(points: list[PathPoint], marks: list[Mark], box: Box | None) -> bool:
    """Whether the path is so small against the workspace that the full views hide its shape."""
    found = extent(points, marks)
    if box is None or found is None or len(points) < 2:
        return False
    lo, hi = found
    return all((hi[i] - lo[i]) < ZOOM_BELOW * (box.hi[i] - box.lo[i]) for i in range(3))
