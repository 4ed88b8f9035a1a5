"""One self-contained HTML page per episode: what the robot saw, planned, did, and how it ended.

A person debugging a run wants to look, not read logs: the frames before and after each attempt,
the plan and action texts, what the safety limiter changed, what the verifier decided, and where
the end effector went. The page is built from the episode folder alone (EPISODE_FORMAT.md), so it
works for runtime episodes, simulator demonstrations, imported datasets and crashed runs alike.

Why it is built this way:

- **Offline and self-contained.** Robots and the laptops next to them often have no network: the
  frames are inlined as `data:` URIs (the recorded JPEG bytes, never re-encoded), the path plot is
  inline SVG, the style is inline CSS, and there is no JavaScript at all. A Content-Security-Policy
  forbids scripts and remote loads, so a page that is mailed around cannot phone home.
- **Model output is hostile input.** Every text from the model, the instruction or the files is
  HTML-escaped; the CSP is a second line of defence should an escape ever be missed.
- **Any subset of stages.** A policy run writes subtasks/motion/action/verify records, a
  demonstration writes `demo` records, a crash leaves the last attempt half written: the page shows
  what is there and says what is missing rather than failing.
- **Bounded size.** Images are embedded up to a byte budget; long demonstrations get a sampled
  frame strip, so a 1000-step import does not produce a page a browser cannot open.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from vlm2vla_edge.runtime.config import RobotConfig, load_robot_config, preset_names
from vlm2vla_edge.runtime.episode import KNOWN_STAGES, EpisodeFormatError, EpisodeReader, SafetyRecord, StepRecord
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.files import atomic_write

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

#: One image larger than this is not embedded (a camera frame is tens of kB; this is a broken file).
MAX_IMAGE_BYTES = 4 << 20
#: Embedded image bytes per page; beyond it frames show as placeholders (keeps the page openable).
MAX_TOTAL_IMAGE_BYTES = 48 << 20
#: Frames shown in the strip of a demonstration (sampled evenly, first and last always included).
MAX_STRIP_FRAMES = 48
#: Rows of the demonstration step table; longer ones show the first and last rows.
MAX_TABLE_ROWS = 400

_JPEG_MAGIC = b"\xff\xd8\xff"
_POLICY_STAGES = ("motion", "action", "verify")


def e(value: object) -> str:
    """HTML-escaped text (quotes too, so it is also safe inside attribute values)."""
    return html.escape("" if value is None else str(value), quote=True)


# ================================================================================ episode structure


@dataclass
class Attempt:
    """One policy step on one subtask: its motion, action and verify records (any may be missing)."""

    subtask_index: int | None
    subtask: str | None
    motion: StepRecord | None = None
    action: StepRecord | None = None
    verify: StepRecord | None = None

    @property
    def records(self) -> list[StepRecord]:
        return [r for r in (self.motion, self.action, self.verify) if r is not None]

    @property
    def retry(self) -> bool:
        return any(bool(r.extra.get("retry")) for r in self.records)

    @property
    def success(self) -> bool | None:
        """The verifier's decision; None when there is none (no verify record, or no decision)."""
        if self.verify is None or self.verify.verifier is None:
            return None
        return self.verify.verifier.success

    def accepts(self, record: StepRecord) -> bool:
        """Whether `record` continues this attempt (same subtask, its stage not seen yet, in order)."""
        if record.subtask_index != self.subtask_index:
            return False
        if record.stage == "action":
            return self.action is None and self.verify is None
        if record.stage == "verify":
            return self.verify is None
        return False


@dataclass
class EpisodeView:
    """The episode regrouped for display: planning records, attempts, demonstration steps, the rest."""

    reader: EpisodeReader
    steps: list[StepRecord]
    planning: list[StepRecord] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    demo: list[StepRecord] = field(default_factory=list)
    other: list[StepRecord] = field(default_factory=list)

    @classmethod
    def build(cls, reader: EpisodeReader) -> "EpisodeView":
        view = cls(reader=reader, steps=reader.steps())
        current: Attempt | None = None
        for record in view.steps:
            if record.stage == "subtasks":
                view.planning.append(record)
            elif record.stage == "demo":
                view.demo.append(record)
            elif record.stage in _POLICY_STAGES:
                if record.stage == "motion" or current is None or not current.accepts(record):
                    current = Attempt(record.subtask_index, record.subtask)
                    view.attempts.append(current)
                setattr(current, record.stage, record)
            else:
                view.other.append(record)
        return view

    @property
    def subtasks(self) -> list[str]:
        """The planned subtask list: from the last usable planning record, else from meta.extra."""
        for record in reversed(self.planning):
            if record.subtasks:
                return list(record.subtasks)
        listed = self.reader.meta.extra.get("subtasks")
        if isinstance(listed, list) and all(isinstance(s, str) for s in listed):
            return list(listed)
        return []

    def completed_subtasks(self) -> set[int]:
        return {a.subtask_index for a in self.attempts if a.success and a.subtask_index is not None}

    def decisions(self) -> list[SafetyRecord]:
        return [d for record in self.steps for d in safety_decisions(record)]

    def verifier_names(self) -> list[str]:
        names: list[str] = []
        for attempt in self.attempts:
            v = attempt.verify.verifier if attempt.verify else None
            if v is None:
                continue
            for name in (v.fallback_from, v.verifier):
                if name and name not in names:
                    names.append(name)
        return names


def safety_decisions(record: StepRecord) -> list[SafetyRecord]:
    """The record's limiter decisions, exact duplicates dropped (the recorder may list a decision twice)."""
    seen: set[tuple[Any, ...]] = set()
    out: list[SafetyRecord] = []
    for decision in record.safety or ():
        key = (decision.rule, decision.verdict, decision.reason, decision.index)
        if key not in seen:
            seen.add(key)
            out.append(decision)
    return out


def chunk_rejected(record: StepRecord) -> bool:
    return bool(record.extra.get("safety_rejected")) or any(d.verdict == "reject" for d in safety_decisions(record))


# ================================================================================ numbers and units


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _finite_vec(vec: Sequence[float] | None) -> bool:
    return vec is not None and len(vec) >= 3 and all(_finite(v) for v in vec[:3])


@dataclass(frozen=True)
class Units:
    """How positions and deltas are shown: centimetres for episodes in metres, else the recorded unit."""

    scale: float
    label: str

    @classmethod
    def of(cls, action_units: str) -> "Units":
        return cls(100.0, "cm") if action_units == "m" else cls(1.0, action_units)

    def num(self, value: float | None, signed: bool = False, digits: int = 1) -> str:
        if not _finite(value):
            return "–"
        return f"{value * self.scale:{'+' if signed else ''}.{digits}f}"

    def vec(self, vec: Sequence[float] | None) -> str:
        if vec is None:
            return "–"
        return "(" + ", ".join(self.num(v) for v in vec[:3]) + ")"


def _seconds(value: float | None) -> str:
    if not _finite(value):
        return "–"
    assert value is not None
    if abs(value) < 1.0:
        return f"{value * 1000:.0f} ms" if abs(value) >= 0.01 else f"{value * 1000:.1f} ms"
    if abs(value) < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def _gripper(value: float | bool | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "open" if value else "closed"
    if value == 1.0:
        return "open"
    if value == 0.0:
        return "closed"
    return f"{value:g}"


def _utc(ts: float | None) -> str:
    if not _finite(ts):
        return "–"
    assert ts is not None
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "–"


# ================================================================================ frames


class FrameEmbedder:
    """Turns recorded frame names into <img> tags with the file's bytes inlined, within a byte budget."""

    def __init__(self, reader: EpisodeReader, budget: int = MAX_TOTAL_IMAGE_BYTES) -> None:
        self.reader = reader
        self.budget = budget
        self.embedded = 0
        self.missing: list[str] = []
        self._cache: dict[str, str] = {}

    def data_uri(self, name: str) -> tuple[str | None, str]:
        """(data URI, "") or (None, why it is not shown)."""
        if name in self._cache:
            return self._cache[name], ""
        try:
            path = self.reader.frame_path(name)
        except EpisodeFormatError:
            return None, "path outside the episode"
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                return None, f"too large ({size // 1024} kB)"
            if self.embedded + size > self.budget:
                return None, "omitted: report image budget reached"
            data = path.read_bytes()
        except FileNotFoundError:
            self.missing.append(name)
            return None, "missing"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        if not data.startswith(_JPEG_MAGIC):
            return None, "not a JPEG file"
        self.embedded += len(data)
        uri = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
        self._cache[name] = uri
        return uri, ""

    def figure(self, name: str | None, caption: str, extra_class: str = "") -> str:
        """A captioned thumbnail (click to enlarge: CSS focus, no script), or a placeholder saying why not."""
        cls = f"frame {extra_class}".strip()
        if not name:
            return f'<figure class="{cls}"><div class="noimg">no frame recorded</div><figcaption>{e(caption)}</figcaption></figure>'
        uri, why = self.data_uri(name)
        if uri is None:
            return (
                f'<figure class="{cls}"><div class="noimg">frame {e(why)}<br><code>{e(name)}</code></div>'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        return (
            f'<figure class="{cls}"><img tabindex="0" src="{uri}" alt="{e(caption)}" title="{e(name)} (click to enlarge)">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )


# ================================================================================ robot workspace


@dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    floor: float | None = None  # lowest allowed z (table + clearance)
    table: float | None = None
    source: str = ""


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


def _workspace(robot: RobotConfig | None, units: str) -> Box | None:
    if robot is None or units != "m":
        return None
    w = robot.workspace
    return Box((w.x.min, w.y.min, w.z.min), (w.x.max, w.y.max, w.z.max), robot.z_floor, robot.table_z,
               f"workspace of robot config '{robot.name}'")


# ================================================================================ path plot (SVG)


@dataclass(frozen=True)
class PathPoint:
    index: int
    stage: str
    pos: tuple[float, float, float]
    gripper_open: bool | None


@dataclass(frozen=True)
class Mark:
    kind: str  # "clamp" | "reject"
    pos: tuple[float, float, float]
    text: str


_GRIPPER_COLOUR = {True: "#2b7bd9", False: "#e0662a", None: "#8a8f98"}


def path_points(steps: Iterable[StepRecord]) -> list[PathPoint]:
    """One point per step with a finite recorded end-effector position, in file order."""
    return [
        PathPoint(s.index, s.stage or "", tuple(float(v) for v in s.ee_position[:3]), s.gripper_open)  # type: ignore[misc]
        for s in steps
        if _finite_vec(s.ee_position)
    ]


def safety_marks(steps: Iterable[StepRecord]) -> list[Mark]:
    """Where the limiter changed or refused a command: at the clamped target, else at the step's position."""
    marks: list[Mark] = []
    for s in steps:
        decisions = safety_decisions(s)
        if not decisions:
            continue
        start = s.ee_position if _finite_vec(s.ee_position) else None
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
            if kind == "clamp" and index is not None and 0 <= index < len(executed) and _finite_vec(executed[index].target):
                pos = executed[index].target
            pos = pos or start
            if pos is None:
                continue
            where = f"action {index + 1}" if index is not None else "chunk"
            text = f"step #{s.index} {where}: " + "; ".join(f"{d.rule} {d.verdict}: {d.reason}" for d in group)
            marks.append(Mark(kind, tuple(float(v) for v in pos[:3]), text))  # type: ignore[arg-type]
    return marks


def executed_paths(steps: Iterable[StepRecord]) -> list[list[tuple[float, float, float]]]:
    """Per action record: its start and the positions each executed command reached (the path inside a chunk)."""
    paths = []
    for s in steps:
        if not s.executed or not _finite_vec(s.ee_position):
            continue
        path = [tuple(float(v) for v in s.ee_position[:3])]
        for cmd in s.executed:
            point = cmd.reached if _finite_vec(cmd.reached) else cmd.target if _finite_vec(cmd.target) else None
            if point is not None:
                path.append(tuple(float(v) for v in point[:3]))
        if len(path) > 2:  # one command is already drawn by the step-to-step path
            paths.append(path)  # type: ignore[arg-type]
    return paths


def _nice_step(span: float) -> float:
    raw = span / 5
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


#: Presentation attributes of the plot's parts, inline so the SVG looks the same in any viewer,
#: also when copied out of the page (classes stay for the page's CSS and for tests).
_SVG_STYLE = {
    "area": 'fill="#fcfcfd" stroke="#e3e6ea"',
    "grid": 'stroke="#eef0f3"',
    "tick": 'font-size="10" fill="#6b7280" font-family="sans-serif"',
    "axis": 'font-size="11" fill="#374151" font-family="sans-serif"',
    "ptitle": 'font-size="12.5" font-weight="600" fill="#1d2330" font-family="sans-serif"',
    "workspace": 'stroke="#9aa3ae" stroke-width="1.2" stroke-dasharray="5 4"',
    "table": 'stroke="#8b6b4a" stroke-width="2"',
    "floor": 'stroke="#c62828" stroke-width="1" stroke-dasharray="2 3"',
    "ee-path": 'fill="none" stroke="#d9dde3" stroke-width="6" stroke-linejoin="round" stroke-linecap="round"',
    "ee-seg": 'fill="none" stroke-width="2.2" stroke-linejoin="round" stroke-linecap="round"',
    "exec-path": 'fill="none" stroke="#1d2330" stroke-width="0.8" stroke-dasharray="2 2"',
    "start": 'fill="#1f8a4c" stroke="#fff" stroke-width="1.5"',
    "end": 'fill="#1d2330" stroke="#fff" stroke-width="1.5"',
    "mark-clamp": 'fill="#f5b428" stroke="#8a5a00" stroke-width="1"',
    "mark-reject": 'fill="none" stroke="#c62828" stroke-width="2.6"',
}

#: A path smaller than this fraction of the workspace (on both axes of a view) gets zoomed views too.
ZOOM_BELOW = 0.3


class _View:
    """Maps two coordinates of the base frame to SVG pixels with one scale (true proportions)."""

    def __init__(self, axes: tuple[int, int], lo: Sequence[float], hi: Sequence[float], max_w: float, max_h: float):
        self.axes = axes
        self.lo, self.hi = (lo[axes[0]], lo[axes[1]]), (hi[axes[0]], hi[axes[1]])
        span_u, span_v = self.hi[0] - self.lo[0], self.hi[1] - self.lo[1]
        self.s = min(max_w / span_u, max_h / span_v)
        self.w, self.h = span_u * self.s, span_v * self.s
        self.ml, self.mt, self.mr, self.mb = 52.0, 30.0, 14.0, 40.0

    @property
    def width(self) -> float:
        return self.ml + self.w + self.mr

    @property
    def height(self) -> float:
        return self.mt + self.h + self.mb

    def uv(self, u: float, v: float) -> tuple[float, float]:
        return self.ml + (u - self.lo[0]) * self.s, self.mt + (self.hi[1] - v) * self.s

    def xy(self, pos: Sequence[float]) -> tuple[float, float]:
        return self.uv(pos[self.axes[0]], pos[self.axes[1]])

    def pts(self, positions: Iterable[Sequence[float]]) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in (self.xy(p) for p in positions))

    def hline(self, v: float, cls: str, title: str = "") -> str:
        """A line across the plot at height v (nothing when v is outside the view)."""
        if not self.lo[1] <= v <= self.hi[1]:
            return ""
        (x0, y), (x1, _) = self.uv(self.lo[0], v), self.uv(self.hi[0], v)
        tip = f"<title>{e(title)}</title>" if title else ""
        return f'<line class="{cls}" {_SVG_STYLE[cls]} x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}">{tip}</line>'

    def box_edges(self, lo: Sequence[float], hi: Sequence[float], title: str) -> str:
        """The rectangle lo-hi (base-frame corners), each edge clipped to the view, so a zoomed view shows
        the limits that are near the path and no lines over the axes."""
        (u0, v0), (u1, v1) = (lo[self.axes[0]], lo[self.axes[1]]), (hi[self.axes[0]], hi[self.axes[1]])
        cu0, cu1 = max(u0, self.lo[0]), min(u1, self.hi[0])
        cv0, cv1 = max(v0, self.lo[1]), min(v1, self.hi[1])
        if cu0 > cu1 or cv0 > cv1:
            return ""
        edges = []
        for v in (v0, v1):  # horizontal edges
            if self.lo[1] <= v <= self.hi[1]:
                edges.append((self.uv(cu0, v), self.uv(cu1, v)))
        for u in (u0, u1):  # vertical edges
            if self.lo[0] <= u <= self.hi[0]:
                edges.append((self.uv(u, cv0), self.uv(u, cv1)))
        d = "".join(f"M{a[0]:.1f},{a[1]:.1f}L{b[0]:.1f},{b[1]:.1f}" for a, b in edges)
        return f'<path class="workspace" {_SVG_STYLE["workspace"]} fill="none" d="{d}"><title>{e(title)}</title></path>' if d else ""


def _extent(points: list[PathPoint], marks: list[Mark]) -> tuple[list[float], list[float]] | None:
    coords = [p.pos for p in points] + [m.pos for m in marks]
    if not coords:
        return None
    return [min(c[i] for c in coords) for i in range(3)], [max(c[i] for c in coords) for i in range(3)]


def _bounds(points: list[PathPoint], marks: list[Mark], box: Box | None, zoom: bool = False) -> tuple[list[float], list[float]]:
    """The region a view shows: the workspace and the data (or, zoomed, the data alone), padded."""
    extent = _extent(points, marks)
    lo, hi = extent if extent else ([0.0] * 3, [0.0] * 3)
    lo, hi = list(lo), list(hi)
    if box is not None and not zoom:
        lo = [min(lo[i], box.lo[i]) for i in range(3)] if extent else list(box.lo)
        hi = [max(hi[i], box.hi[i]) for i in range(3)] if extent else list(box.hi)
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
    extent = _extent(points, marks)
    if box is None or extent is None or len(points) < 2:
        return False
    lo, hi = extent
    small = [(hi[i] - lo[i]) < ZOOM_BELOW * (box.hi[i] - box.lo[i]) for i in range(3)]
    return all(small)


def path_svg(points: list[PathPoint], marks: list[Mark], chunks: list[list[tuple[float, float, float]]],
             box: Box | None, units: Units, axes: tuple[int, int], title: str, zoom: bool = False) -> str:
    """One view of the end-effector path: workspace box, path coloured by gripper, start/end, safety marks."""
    names = "xyz"
    lo, hi = _bounds(points, marks, box, zoom)
    view = _View(axes, lo, hi, 420, 300)
    st = _SVG_STYLE
    out = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {view.width:.0f} {view.height:.0f}" '
        f'width="{view.width:.0f}" height="{view.height:.0f}" role="img" aria-label="{e(title)}">',
        f'<text class="ptitle" {st["ptitle"]} x="{view.ml:.0f}" y="18">{e(title)}</text>',
        f'<rect class="area" {st["area"]} x="{view.ml:.1f}" y="{view.mt:.1f}" width="{view.w:.1f}" height="{view.h:.1f}"/>',
    ]
    # Grid and ticks in display units.
    for k, axis in enumerate(axes):
        step = _nice_step(hi[axis] - lo[axis])
        tick = math.ceil(lo[axis] / step) * step
        while tick <= hi[axis] + 1e-12:
            if k == 0:
                x, _ = view.uv(tick, view.lo[1])
                out.append(f'<line class="grid" {st["grid"]} x1="{x:.1f}" y1="{view.mt:.1f}" x2="{x:.1f}" y2="{view.mt + view.h:.1f}"/>')
                out.append(f'<text class="tick" {st["tick"]} x="{x:.1f}" y="{view.mt + view.h + 14:.1f}" '
                           f'text-anchor="middle">{units.num(tick, digits=0 if step * units.scale >= 1 else 1)}</text>')
            else:
                _, y = view.uv(view.lo[0], tick)
                out.append(f'<line class="grid" {st["grid"]} x1="{view.ml:.1f}" y1="{y:.1f}" x2="{view.ml + view.w:.1f}" y2="{y:.1f}"/>')
                out.append(f'<text class="tick" {st["tick"]} x="{view.ml - 6:.1f}" y="{y + 4:.1f}" '
                           f'text-anchor="end">{units.num(tick, digits=0 if step * units.scale >= 1 else 1)}</text>')
            tick += step
    out.append(f'<text class="axis" {st["axis"]} x="{view.ml + view.w / 2:.1f}" y="{view.height - 6:.1f}" text-anchor="middle">'
               f'{names[axes[0]]} ({e(units.label)})</text>')
    out.append(f'<text class="axis" {st["axis"]} x="14" y="{view.mt + view.h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {view.mt + view.h / 2:.1f})">{names[axes[1]]} ({e(units.label)})</text>')
    # Workspace box, and in the side view the table and the lowest allowed height.
    if box is not None:
        out.append(view.box_edges(box.lo, box.hi, box.source))
        if axes[1] == 2:
            if box.table is not None:
                out.append(view.hline(box.table, "table", f"table z = {units.num(box.table)} {units.label}"))
            if box.floor is not None:
                out.append(view.hline(box.floor, "floor", f"z floor = {units.num(box.floor)} {units.label}"))
    # The path: a halo polyline through every recorded position, then runs coloured by gripper state.
    if points:
        out.append(f'<polyline class="ee-path" {st["ee-path"]} points="{view.pts(p.pos for p in points)}"/>')
        run: list[PathPoint] = [points[0]]
        for prev, point in zip(points, points[1:]):
            if prev.gripper_open != run[0].gripper_open:
                out.append(_run(view, run))
                run = [run[-1]]
            run.append(point)
        out.append(_run(view, run))
        for chunk in chunks:
            out.append(f'<polyline class="exec-path" {st["exec-path"]} points="{view.pts(chunk)}"/>')
        for point in points:
            x, y = view.xy(point.pos)
            out.append(f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{_GRIPPER_COLOUR[point.gripper_open]}">'
                       f"<title>step #{point.index} {e(point.stage)}: {units.vec(point.pos)} {e(units.label)}, "
                       f"gripper {_gripper(point.gripper_open)}</title></circle>")
        (sx, sy), (ex, ey) = view.xy(points[0].pos), view.xy(points[-1].pos)
        out.append(f'<circle class="start" {st["start"]} cx="{sx:.1f}" cy="{sy:.1f}" r="6">'
                   f"<title>start (step #{points[0].index})</title></circle>")
        out.append(f'<rect class="end" {st["end"]} x="{ex - 5:.1f}" y="{ey - 5:.1f}" width="10" height="10">'
                   f"<title>end (step #{points[-1].index})</title></rect>")
        for mark in marks:  # last, so a limiter decision is never hidden under another marker
            x, y = view.xy(mark.pos)
            if mark.kind == "reject":
                out.append(f'<path class="mark-reject" {st["mark-reject"]} d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}'
                           f'M{x - 5:.1f},{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}"><title>{e(mark.text)}</title></path>')
            else:
                out.append(f'<path class="mark-clamp" {st["mark-clamp"]} d="M{x:.1f},{y - 6:.1f}L{x + 6:.1f},{y:.1f}'
                           f'L{x:.1f},{y + 6:.1f}L{x - 6:.1f},{y:.1f}Z"><title>{e(mark.text)}</title></path>')
    else:
        out.append(f'<text class="tick" {st["tick"]} x="{view.ml + view.w / 2:.1f}" y="{view.mt + view.h / 2:.1f}" '
                   'text-anchor="middle">no end-effector positions recorded</text>')
    out.append("</svg>")
    return "".join(out)


def _run(view: _View, run: list[PathPoint]) -> str:
    state = run[0].gripper_open
    cls = {True: "open", False: "closed", None: "unknown"}[state]
    return (f'<polyline class="ee-seg {cls}" {_SVG_STYLE["ee-seg"]} stroke="{_GRIPPER_COLOUR[state]}" '
            f'points="{view.pts(p.pos for p in run)}"/>')


# ================================================================================ latency


@dataclass(frozen=True)
class LatencyRow:
    stage: str
    metric: str
    values: tuple[float, ...]


def latency_rows(view: EpisodeView) -> list[LatencyRow]:
    """Per stage and timing name: the recorded step timings, verifier latencies and arm execution times."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in view.steps:
        stage = s.stage or "(none)"
        for name, value in (s.timings or {}).items():
            if _finite(value):
                rows[(stage, name)].append(float(value))
        if s.verifier is not None and _finite(s.verifier.latency_s):
            rows[(stage, f"verifier {s.verifier.verifier or ''}".strip())].append(float(s.verifier.latency_s))  # type: ignore[arg-type]
        durations = [c.duration_s for c in s.executed or () if _finite(c.duration_s)]
        if durations:
            rows[(stage, "arm execution (all commands)")].append(float(sum(durations)))  # type: ignore[arg-type]
    order = {name: i for i, name in enumerate(KNOWN_STAGES)}
    keys = sorted(rows, key=lambda key: order.get(key[0], len(order)))  # stable: first-seen order within a stage
    return [LatencyRow(stage, metric, tuple(rows[(stage, metric)])) for stage, metric in keys]


# ================================================================================ HTML


_CSS = """
:root{--ok:#1f8a4c;--warn:#c77700;--bad:#c62828;--mute:#6b7280;--line:#e3e6ea;--bg:#f6f7f9;--card:#fff;
--open:#2b7bd9;--closed:#e0662a}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1d2330;background:var(--bg)}main{max-width:1180px;margin:0 auto;padding:18px 22px 60px}
h1{font-size:21px;margin:4px 0 6px;word-break:break-word}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid var(--line);
padding-bottom:4px}h3{font-size:15px;margin:0}code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:12.5px}pre{white-space:pre-wrap;word-break:break-word;background:#f1f3f5;border-radius:6px;padding:7px 9px;margin:4px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px;margin:10px 0}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;color:#fff;vertical-align:middle}
.b-success,.b-done{background:var(--ok)}.b-failed,.b-notdone{background:var(--warn)}.b-error,.b-reject{background:var(--bad)}
.b-aborted{background:#6d4aa8}.b-interrupted,.b-none,.b-pending{background:var(--mute)}.b-clamp{background:#e39b12}
.b-retry{background:#4b5563}.detail{color:#374151;margin:4px 0 10px}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:6px 16px;margin:8px 0}
.facts div{font-size:13px}.facts b{display:block;color:var(--mute);font-weight:500;font-size:11.5px;text-transform:uppercase;
letter-spacing:.03em}.warnbox{background:#fff4e5;border:1px solid #f0b35a;border-radius:8px;padding:8px 12px;margin:8px 0}
.errbox{background:#fdecec;border:1px solid #ee9a9a;border-radius:8px;padding:8px 12px;margin:6px 0}
.subtask{border-left:4px solid var(--mute)}.subtask.done{border-left-color:var(--ok)}.subtask.failed{border-left-color:var(--warn)}
.attempt{border-top:1px dashed var(--line);margin-top:10px;padding-top:10px}.attempt-head{color:var(--mute);font-size:12.5px;
margin-bottom:6px}.attempt-body{display:flex;gap:14px;flex-wrap:wrap}.frames{display:flex;gap:8px;flex:0 0 auto;align-items:flex-start}
.info{flex:1 1 420px;min-width:300px}figure{margin:0}figure.frame img,.noimg{width:200px;height:auto;border-radius:6px;
border:1px solid var(--line);display:block;cursor:zoom-in;background:#ddd}figure.frame img:focus{position:fixed;z-index:9;
left:50%;top:50%;transform:translate(-50%,-50%);width:auto;height:auto;max-width:94vw;max-height:94vh;
box-shadow:0 0 0 100vmax rgba(0,0,0,.6);cursor:zoom-out;outline:none}.noimg{height:150px;display:flex;align-items:center;
justify-content:center;text-align:center;color:var(--mute);font-size:12px;padding:6px;cursor:default}
figcaption{font-size:11.5px;color:var(--mute);text-align:center;margin-top:2px}.strip figure.frame img,.strip .noimg{width:128px}
.strip .noimg{height:96px}.strip{display:flex;flex-wrap:wrap;gap:6px}
.label{color:var(--mute);font-size:11.5px;text-transform:uppercase;letter-spacing:.03em;margin-top:8px}
table{border-collapse:collapse;margin:4px 0;font-size:12.5px}th,td{border-bottom:1px solid var(--line);padding:3px 8px;
text-align:right;vertical-align:top}th{color:var(--mute);font-weight:600;background:#fafbfc}td.l,th.l{text-align:left}
tr.clamp td{background:#fff6e0}tr.reject td{background:#fde8e8}tr.dclamp td:first-child{border-left:3px solid #e39b12}
tr.dreject td:first-child{border-left:3px solid var(--bad)}.g-open{color:var(--open);font-weight:600}
.g-closed{color:var(--closed);font-weight:600}details summary{cursor:pointer;color:var(--mute);font-size:12.5px}
.plots{display:flex;flex-wrap:wrap;gap:12px}svg.plot{background:#fff;border:1px solid var(--line);border-radius:8px;max-width:100%;height:auto}
.legend{font-size:12px;color:#374151;display:flex;gap:14px;flex-wrap:wrap;margin:6px 0}.sw{display:inline-block;width:16px;
height:4px;vertical-align:middle;margin-right:4px;border-radius:2px}.bar{height:8px;background:#9db7dc;border-radius:4px;min-width:1px}
div.timings{color:var(--mute);margin:2px 0}
nav.toc{font-size:12.5px;color:var(--mute)}nav.toc a{color:#2b5ea8;margin-right:12px}footer{color:var(--mute);font-size:12px;margin-top:30px}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class _Renderer:
    """Builds the page; one instance per report (it owns the frame budget)."""

    def __init__(self, reader: EpisodeReader, robot: RobotConfig | None) -> None:
        self.reader = reader
        self.meta = reader.meta
        self.view = EpisodeView.build(reader)
        self.units = Units.of(self.meta.action_units)
        self.frames = FrameEmbedder(reader)
        if robot is None:
            robot = robot_config_for(self.meta.robot_name)
        self.box = _workspace(robot, self.meta.action_units)

    # --- page --------------------------------------------------------------------------------------

    def page(self) -> str:
        body = [self.header()]
        sections: list[tuple[str, str, str]] = []  # (id, title, html)
        if self.view.planning or self.view.attempts:
            sections.append(("timeline", "Subtasks", self.timeline()))
        if self.view.demo:
            sections.append(("demo", f"Demonstration steps ({len(self.view.demo)})", self.demo()))
        sections.append(("path", "End-effector path", self.path()))
        latency = self.latency()
        if latency:
            sections.append(("latency", "Latency by stage", latency))
        if self.view.other:
            sections.append(("other", f"Other records ({len(self.view.other)})", self.other()))
        body.append('<nav class="toc">' + "".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title, _ in sections) + "</nav>")
        for sid, title, content in sections:
            body.append(f'<section id="{sid}"><h2>{e(title)}</h2>{content}</section>')
        missing = f" · {len(self.frames.missing)} frame file(s) missing" if self.frames.missing else ""
        body.append(
            f"<footer>Episode folder <code>{e(self.reader.path)}</code> · {len(self.view.steps)} records · "
            f"{self.frames.embedded // 1024} kB of frames embedded{missing} · made by vlm2vla-edge; "
            "self-contained, no network, no scripts.</footer>"
        )
        title = f"{self.meta.instruction} — {self.reader.outcome} — episode {self.reader.episode_id}"
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="no-referrer"><title>{e(title)}</title><style>{_CSS}</style></head>'
            f"<body><main>{''.join(body)}</main></body></html>\n"
        )

    # --- header ------------------------------------------------------------------------------------

    def header(self) -> str:
        meta, view, reader = self.meta, self.view, self.reader
        outcome = reader.outcome
        decisions = view.decisions()
        clamps = sum(d.verdict == "clamp" for d in decisions)
        rejects = sum(d.verdict == "reject" for d in decisions)
        rejected_chunks = sum(1 for a in view.attempts if a.action is not None and chunk_rejected(a.action))
        facts: list[tuple[str, str]] = []
        subtasks = view.subtasks
        if view.attempts or view.planning:
            steps = sum(1 for a in view.attempts if a.motion is not None or a.action is not None)
            facts.append(("policy steps", str(steps)))
            facts.append(("retries", str(sum(a.retry for a in view.attempts))))
            done = view.completed_subtasks()
            facts.append(("subtasks done", f"{len(done)} / {len(subtasks)}" if subtasks else "– (no plan)"))
        if view.demo:
            facts.append(("demonstration steps", str(len(view.demo))))
        facts.append(("safety", f"{clamps} clamp{'s' if clamps != 1 else ''}, {rejects} rejection{'s' if rejects != 1 else ''}"
                      + (f" ({rejected_chunks} chunk{'s' if rejected_chunks != 1 else ''} refused)" if rejected_chunks else "")))
        verifiers = view.verifier_names()
        if verifiers or view.attempts:
            facts.append(("verifier", ", ".join(verifiers) or "–"))
        facts.append(("model bundle", meta.bundle_id or "– (no model)"))
        robot = " / ".join(x for x in (meta.robot_name, meta.robot_model) if x) or "–"
        facts.append(("robot", robot))
        seed = meta.extra.get("seed")
        if seed is not None:
            facts.append(("seed", str(seed)))
        facts.append(("duration", self.duration()))
        facts.append(("started", _utc(meta.start_wall_time)))
        facts.append(("source", meta.source or "–"))
        if meta.camera:
            facts.append(("camera", meta.camera))
        if meta.grammar_version:
            facts.append(("grammar", meta.grammar_version))
        times = [st.t for st in view.steps if _finite(st.t)]
        facts.append(("records", f"{len(view.steps)}" + (f" (last at t = {_seconds(max(times))})" if times else "")))
        out = [
            '<header class="card">',
            f'<div class="label">episode {e(reader.episode_id)}</div>',
            f"<h1>{e(meta.instruction)}</h1>",
            f'<div><span class="badge b-{e(outcome)}">{e(outcome)}</span></div>',
            f'<div class="detail">{e(meta.outcome_detail or ("never finished: the process stopped before recording an outcome" if meta.outcome is None else ""))}</div>',
        ]
        if reader.truncated:
            out.append('<div class="warnbox"><b>Truncated (crash).</b> The last line of steps.jsonl was cut off mid-write '
                       "and is not shown: the episode ends with the step that was in flight.</div>")
        elif meta.outcome is None:
            out.append('<div class="warnbox"><b>Unfinished.</b> meta.json has no outcome: the run crashed, lost power, '
                       "or is still running.</div>")
        if self.frames_missing_somewhere():
            out.append('<div class="warnbox">Some frame files named in steps.jsonl are missing; they show as placeholders.</div>')
        out.append('<div class="facts">' + "".join(f"<div><b>{e(k)}</b>{e(v)}</div>" for k, v in facts) + "</div>")
        if meta.extra:
            text = json.dumps(meta.extra, indent=2, ensure_ascii=False, default=str)
            out.append(f"<details><summary>meta.extra ({len(meta.extra)} fields)</summary><pre>{e(text)}</pre></details>")
        out.append("</header>")
        return "".join(out)

    def frames_missing_somewhere(self) -> bool:
        for s in self.view.steps:
            for name in [s.image, *s.images.values()]:
                if name:
                    try:
                        if not self.reader.frame_path(name).is_file():
                            return True
                    except EpisodeFormatError:
                        return True
        return False

    def duration(self) -> str:
        meta = self.meta
        if _finite(meta.start_wall_time) and _finite(meta.end_wall_time):
            return _seconds(meta.end_wall_time - meta.start_wall_time)  # type: ignore[operator]
        listed = meta.extra.get("duration_s")
        if isinstance(listed, (int, float)) and _finite(float(listed)):
            return _seconds(float(listed))
        times = [s.t for s in self.view.steps if _finite(s.t)]
        return f"≥ {_seconds(max(times))} (unfinished)" if times else "–"

    # --- subtasks timeline -------------------------------------------------------------------------

    def timeline(self) -> str:
        view = self.view
        out: list[str] = [self.planning(record) for record in view.planning]
        if not view.planning:
            out.append('<div class="warnbox">No subtask-planning record: the attempts below are shown without the plan.</div>')
        subtasks = view.subtasks
        groups: dict[int | None, list[Attempt]] = defaultdict(list)
        for attempt in view.attempts:
            groups[attempt.subtask_index].append(attempt)
        done = view.completed_subtasks()
        order: list[int | None] = list(range(len(subtasks)))
        order += sorted((k for k in groups if k is not None and k not in order), key=int)
        if None in groups:
            order.append(None)
        for index in order:
            attempts = groups.get(index, [])
            name = subtasks[index] if index is not None and index < len(subtasks) else next(
                (a.subtask for a in attempts if a.subtask), None)
            if index in done:
                state, badge = "done", '<span class="badge b-done">done</span>'
            elif attempts:
                state, badge = "failed", '<span class="badge b-notdone">not done</span>'
            else:
                state, badge = "pending", '<span class="badge b-pending">not reached</span>'
            number = f"{index + 1}. " if index is not None else ""
            count = f' <small class="mono">{len(attempts)} attempt{"s" if len(attempts) != 1 else ""}</small>' if attempts else ""
            out.append(f'<div class="card subtask {state}"><h3>{e(number)}{e(name or "(unnamed subtask)")} {badge}{count}</h3>')
            for n, attempt in enumerate(attempts, start=1):
                out.append(self.attempt(attempt, n))
            out.append("</div>")
        return "".join(out)

    def planning(self, record: StepRecord) -> str:
        out = ['<div class="card"><h3>Subtask planning</h3><div class="attempt-body">']
        out.append(f'<div class="frames">{self.frames.figure(record.image, f"o0 · record #{record.index}")}</div><div class="info">')
        if record.error:
            out.append(f'<div class="errbox"><b>Model output rejected:</b> {e(record.error)}</div>')
        if record.subtasks:
            out.append('<div class="label">plan</div><ol>' + "".join(f"<li>{e(s)}</li>" for s in record.subtasks) + "</ol>")
        out.append(self.texts(record))
        out.append("</div></div></div>")
        return "".join(out)

    def texts(self, record: StepRecord, raw_label: str = "raw model output") -> str:
        out = []
        if record.raw_text is not None:
            out.append(f'<div class="label">{e(raw_label)}</div><pre>{e(record.raw_text)}</pre>')
        if record.timings:
            out.append('<div class="mono timings">timings: '
                       + e(" · ".join(f"{k} {_seconds(v)}" for k, v in record.timings.items())) + "</div>")
        if record.prompt:
            out.append(f"<details><summary>prompt ({len(record.prompt)} characters)</summary><pre>{e(record.prompt)}</pre></details>")
        return "".join(out)

    def attempt(self, attempt: Attempt, number: int) -> str:
        records = attempt.records
        first = records[0]
        flags = ' <span class="badge b-retry">retry</span>' if attempt.retry else ""
        stages = "/".join(r.stage or "" for r in records)
        head = (f'<div class="attempt-head">Attempt {number}{flags} · t = {_seconds(first.t)} · '
                f"records #{first.index}–#{records[-1].index} ({e(stages)})")
        start = next((r.ee_position for r in records if _finite_vec(r.ee_position)), None)
        end = attempt.verify.ee_position if attempt.verify and _finite_vec(attempt.verify.ee_position) else None
        if start is not None and end is not None:
            moved = math.dist(start[:3], end[:3])
            head += f" · ee {self.units.vec(start)} → {self.units.vec(end)} {e(self.units.label)}, moved {self.units.num(moved)} {e(self.units.label)}"
        head += "</div>"
        before = next((r.image for r in records if r.image), None)
        figures = [self.frames.figure(before, "before")]
        if attempt.verify is not None or (attempt.action is not None and not attempt.action.error):
            after = attempt.verify.images.get("after") if attempt.verify else None
            figures.append(self.frames.figure(after, "after"))
        for r in records:
            for tag, name in r.images.items():
                if not (tag == "after" and r is attempt.verify):
                    figures.append(self.frames.figure(name, f"{tag} (#{r.index})"))
        info: list[str] = []
        if attempt.motion is not None:
            info.append(f'<div class="label">motion plan</div><pre>{e(attempt.motion.motion_plan or "")}</pre>')
            if attempt.motion.raw_text is not None and attempt.motion.raw_text != attempt.motion.motion_plan:
                info.append(self.texts(attempt.motion, "raw motion output"))
            else:
                info.append(self.texts(_without_raw(attempt.motion)))
        if attempt.action is not None:
            info.append(self.action(attempt.action))
        if attempt.verify is not None:
            info.append(self.verdict(attempt.verify))
        if attempt.verify is None and not (attempt.action is not None and attempt.action.error):
            missing = [stage for stage in _POLICY_STAGES if getattr(attempt, stage) is None]
            info.append(f'<div class="warnbox">No {e(" / ".join(missing))} record for this attempt '
                        "(the episode ended or crashed in the middle of it).</div>")
        return (f'<div class="attempt">{head}<div class="attempt-body"><div class="frames">{"".join(figures)}</div>'
                f'<div class="info">{"".join(info)}</div></div></div>')

    def action(self, record: StepRecord) -> str:
        out: list[str] = []
        if record.error:
            cls = "warnbox" if record.error.startswith("not executed") else "errbox"
            what = "Not executed" if cls == "warnbox" else "Unusable model output"
            out.append(f'<div class="{cls}"><b>{what}:</b> {e(record.error)}</div>')
        out.append(self.texts(record, "raw action output"))
        decisions = safety_decisions(record)
        by_index: dict[int | None, set[str]] = defaultdict(set)
        for d in decisions:
            by_index[d.index].add(d.verdict)
        post = record.extra.get("postprocessed")
        post_ok = isinstance(post, list) and all(isinstance(a, list) for a in post)
        parsed = record.parsed_actions
        same = post_ok and parsed is not None and _same_chunk(parsed, post)
        if parsed is not None:
            title = "parsed actions" + (" (= post-processed)" if same else "")
            out.append(self.action_table(title, parsed, by_index if (same or not post_ok) else {}))
        if post_ok and not same:
            out.append(self.action_table("after post-processing (what the limiter checked)", post, by_index))
        if decisions or chunk_rejected(record):
            out.append(self.safety(record, decisions))
        if record.executed is not None:
            out.append(self.executed(record))
        return "".join(out)

    def action_table(self, title: str, actions: list[list[float]], verdicts: dict[int | None, set[str]]) -> str:
        u = self.units
        rows = []
        whole_chunk = {"reject"} & verdicts.get(None, set())  # a chunk rule refused every action
        for i, a in enumerate(actions):
            v = verdicts.get(i, set()) | whole_chunk
            cls = "reject" if "reject" in v else "clamp" if "clamp" in v else ""
            vals = (list(a) + [math.nan] * 4)[:4]
            norm = math.sqrt(sum(x * x for x in vals[:3])) if all(_finite(x) for x in vals[:3]) else math.nan
            g = _gripper(vals[3])
            flag = " ⚠ " + "/".join(sorted(v - {"pass"})) if v - {"pass"} else ""
            rows.append(f'<tr class="{cls}"><td>{i + 1}</td><td>{u.num(vals[0], True)}</td><td>{u.num(vals[1], True)}</td>'
                        f'<td>{u.num(vals[2], True)}</td><td>{u.num(norm)}</td><td class="l g-{e(g)}">{e(g)}{e(flag)}</td></tr>')
        lbl = e(u.label)
        return (f'<div class="label">{e(title)}</div><table><tr><th>#</th><th>dx {lbl}</th><th>dy {lbl}</th><th>dz {lbl}</th>'
                f'<th>|d| {lbl}</th><th class="l">gripper</th></tr>{"".join(rows)}</table>')

    def safety(self, record: StepRecord, decisions: list[SafetyRecord]) -> str:
        rows = []
        for d in decisions:
            where = f"action {d.index + 1}" if d.index is not None else "chunk"
            badge = f'<span class="badge b-{e(d.verdict)}">{e(d.verdict)}</span>'
            rows.append(f'<tr class="d{e(d.verdict)}"><td class="l">{e(where)}</td><td class="l mono">{e(d.rule)}</td>'
                        f'<td class="l">{badge}</td><td class="l">{e(d.reason)}</td></tr>')
        head = ""
        if chunk_rejected(record):
            reason = record.extra.get("safety_reason")
            what = "partly refused" if record.executed else "refused"
            head = (f'<div class="errbox"><b>Chunk {what} by the safety limiter</b>'
                    f'{": " + e(reason) if isinstance(reason, str) and reason else ""}</div>')
        table = (f'<table><tr><th class="l">applies to</th><th class="l">rule</th><th class="l">verdict</th>'
                 f'<th class="l">reason</th></tr>{"".join(rows)}</table>') if rows else ""
        return f'<div class="label">safety decisions</div>{head}{table}'

    def executed(self, record: StepRecord) -> str:
        u, lbl = self.units, e(self.units.label)
        commands = record.executed or []
        if not commands:
            return '<div class="label">executed commands</div><div class="mono">none (nothing was sent to the arm)</div>'
        rows = []
        for i, c in enumerate(commands):
            err = f"{c.error_m * 1000:.1f}" if _finite(c.error_m) else "–"  # type: ignore[operator]
            done = "✓" if c.completed else ("stopped" if c.completed is False else "–")
            rows.append(f'<tr class="{"" if c.completed is not False else "reject"}"><td>{i + 1}</td><td class="mono">{u.vec(c.target)}</td>'
                        f'<td class="mono">{u.vec(c.reached)}</td><td>{err}</td><td>{_seconds(c.duration_s)}</td>'
                        f'<td class="l g-{_gripper(c.gripper_open)}">{_gripper(c.gripper_open)}</td><td class="l">{done}</td>'
                        f'<td class="l">{e(c.note)}</td></tr>')
        return (f'<div class="label">executed commands</div><table><tr><th>#</th><th>target {lbl}</th><th>reached {lbl}</th>'
                f'<th>error mm</th><th>time</th><th class="l">gripper</th><th class="l">done</th><th class="l">note</th></tr>'
                f'{"".join(rows)}</table>')

    def verdict(self, record: StepRecord) -> str:
        v = record.verifier
        if v is None:
            return '<div class="label">verifier</div><div class="mono">no verdict recorded</div>'
        if v.cancelled:
            badge = '<span class="badge b-none">cancelled</span>'
        elif v.success is None:
            badge = '<span class="badge b-none">no decision</span>'
        else:
            badge = f'<span class="badge b-{"done" if v.success else "notdone"}">{"done" if v.success else "not done"}</span>'
        via = e(v.verifier or "verifier") + (f" after {e(v.fallback_from)} failed" if v.fallback_from else "")
        bits = [f"latency {_seconds(v.latency_s)}"]
        if v.attempts is not None:
            bits.append(f"{v.attempts} attempt{'s' if v.attempts != 1 else ''}")
        out = [f'<div class="label">verifier verdict</div><div>{badge} <span class="mono">{via} · {" · ".join(bits)}</span></div>',
               f"<div>{e(v.reason)}</div>"]
        if v.error:
            out.append(f'<div class="errbox"><b>Verifier error:</b> {e(v.error)}</div>')
        extras = v.model_extra or {}
        if extras:
            out.append('<div class="mono">' + e(" · ".join(f"{k}: {_short(val)}" for k, val in extras.items())) + "</div>")
        return "".join(out)

    # --- demonstration -----------------------------------------------------------------------------

    def demo(self) -> str:
        steps, u, lbl = self.view.demo, self.units, e(self.units.label)
        with_image = [s for s in steps if s.image]
        shown = _sample(with_image, MAX_STRIP_FRAMES)
        out = []
        if shown:
            note = f" (every {len(with_image) / len(shown):.1f}th of {len(with_image)})" if len(shown) < len(with_image) else ""
            out.append(f'<div class="label">frames{e(note)}</div><div class="strip">')
            for s in shown:
                caption = f"#{s.index} · {_seconds(s.t)}" + (f" · {_gripper(s.gripper_open)}" if s.gripper_open is not None else "")
                out.append(self.frames.figure(s.image, caption))
            out.append("</div>")
        rows = []
        cut = len(steps) > MAX_TABLE_ROWS
        listed = steps[: MAX_TABLE_ROWS // 2] + steps[-MAX_TABLE_ROWS // 2:] if cut else steps
        for n, s in enumerate(listed):
            if cut and n == MAX_TABLE_ROWS // 2:
                rows.append(f'<tr><td colspan="9" class="l">… {len(steps) - MAX_TABLE_ROWS} steps not listed …</td></tr>')
            a = (list(s.action or []) + [math.nan] * 4)[:4] if s.action else None
            decisions = safety_decisions(s)
            verdicts = {d.verdict for d in decisions}
            cls = "reject" if "reject" in verdicts else "clamp" if "clamp" in verdicts else ""
            safety = "; ".join(f"{d.rule} {d.verdict}" for d in decisions)
            ok = "" if not s.executed else ("✓" if all(c.completed for c in s.executed) else "stopped")
            rows.append(
                f'<tr class="{cls}"><td>{s.index}</td><td>{_seconds(s.t)}</td><td class="mono">{u.vec(s.ee_position)}</td>'
                + (f"<td>{u.num(a[0], True)}</td><td>{u.num(a[1], True)}</td><td>{u.num(a[2], True)}</td>"
                   f'<td class="l g-{_gripper(a[3])}">{_gripper(a[3])}</td>' if a else '<td colspan="4">–</td>')
                + f'<td class="l">{ok}</td><td class="l">{e(safety or s.error or "")}</td></tr>'
            )
        out.append(f'<div class="label">steps</div><table><tr><th>#</th><th>t</th><th>ee {lbl}</th><th>dx {lbl}</th>'
                   f'<th>dy {lbl}</th><th>dz {lbl}</th><th class="l">gripper</th><th class="l">executed</th>'
                   f'<th class="l">safety / error</th></tr>{"".join(rows)}</table>')
        return "".join(out)

    # --- path --------------------------------------------------------------------------------------

    def path(self) -> str:
        steps = self.view.steps
        points = path_points(steps)
        marks = safety_marks(steps)
        chunks = executed_paths(steps)
        views = [path_svg(points, marks, chunks, self.box, self.units, (0, 1), "Top view (x–y)"),
                 path_svg(points, marks, chunks, self.box, self.units, (0, 2), "Side view (x–z)")]
        if wants_zoom(points, marks, self.box):
            views += [path_svg(points, marks, chunks, self.box, self.units, (0, 1), "Top view, zoomed to the path", zoom=True),
                      path_svg(points, marks, chunks, self.box, self.units, (0, 2), "Side view, zoomed to the path", zoom=True)]
        box_note = (f"dashed box: {self.box.source}; red dotted line: lowest allowed height (z floor)" if self.box
                    else "workspace unknown (no matching robot config): axes fit the recorded data")
        legend = (
            f'<div class="legend"><span><span class="sw" style="background:var(--open)"></span>gripper open</span>'
            f'<span><span class="sw" style="background:var(--closed)"></span>gripper closed</span>'
            f'<span>● start ■ end</span><span>◆ safety clamp</span><span style="color:var(--bad)">✕ safety rejection</span>'
            f"<span>dotted: commands inside a chunk</span><span>{e(box_note)}</span></div>"
        )
        summary = ""
        if len(points) >= 2:
            travel = sum(math.dist(a.pos, b.pos) for a, b in zip(points, points[1:]))
            summary = (f'<div class="mono">{len(points)} recorded positions · path length {self.units.num(travel)} '
                       f"{e(self.units.label)} · start {self.units.vec(points[0].pos)} → end {self.units.vec(points[-1].pos)} "
                       f"{e(self.units.label)} · hover a point for its step</div>")
        return f'{legend}<div class="plots">{"".join(views)}</div>{summary}'

    # --- latency and the rest ----------------------------------------------------------------------

    def latency(self) -> str:
        rows = latency_rows(self.view)
        if not rows:
            return ""
        longest = max((max(r.values) for r in rows if r.values), default=0.0) or 1.0
        out = []
        for r in rows:
            values = r.values
            mean = statistics.fmean(values)
            width = max(1.0, 160 * mean / longest)
            out.append(
                f'<tr><td class="l">{e(r.stage)}</td><td class="l mono">{e(r.metric)}</td><td>{len(values)}</td>'
                f"<td>{_seconds(mean)}</td><td>{_seconds(statistics.median(values))}</td><td>{_seconds(max(values))}</td>"
                f'<td>{_seconds(sum(values))}</td><td class="l"><div class="bar" style="width:{width:.0f}px"></div></td></tr>'
            )
        return ('<table><tr><th class="l">stage</th><th class="l">timing</th><th>n</th><th>mean</th><th>median</th><th>max</th>'
                f'<th>total</th><th class="l">mean</th></tr>{"".join(out)}</table>')

    def other(self) -> str:
        rows = []
        for s in self.view.other:
            rows.append(f'<tr><td>{s.index}</td><td>{_seconds(s.t)}</td><td class="l mono">{e(s.stage or "(none)")}</td>'
                        f'<td class="l">{e(_short(s.raw_text or s.error or s.subtask or "", 200))}</td></tr>')
        return ('<table><tr><th>#</th><th>t</th><th class="l">stage</th><th class="l">text</th></tr>'
                f'{"".join(rows)}</table>')


def _without_raw(record: StepRecord) -> StepRecord:
    return record.model_copy(update={"raw_text": None})


def _same_chunk(a: list[list[float]], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if len(x) != len(y):
            return False
        for p, q in zip(x, y):
            if not (p == q or (isinstance(p, float) and isinstance(q, float) and math.isnan(p) and math.isnan(q))):
                return False
    return True


def _sample(items: list[StepRecord], limit: int) -> list[StepRecord]:
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def _short(value: object, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ================================================================================ public API


def render_report(reader: EpisodeReader, robot: RobotConfig | None = None) -> str:
    """The report page for an episode as one HTML string.

    `robot` draws its workspace box in the path plot; by default the packaged robot preset named
    in the episode's meta is used when there is one, else the axes fit the data.
    """
    return _Renderer(reader, robot).page()


def write_report(episode_dir: Path, out: Path | None = None) -> Path:
    """Write the episode's report (default `episode_dir/report.html`) atomically and return its path.

    Raises `UserError` when `episode_dir` is not a readable episode or the report cannot be written.
    """
    episode_dir = Path(episode_dir)
    reader = EpisodeReader(episode_dir)  # EpisodeFormatError (a UserError) for a folder that is not an episode
    page = render_report(reader)
    target = Path(out) if out is not None else episode_dir / REPORT_FILE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, page.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write the report {target}: {exc.strerror or exc}") from exc
    log.info("event=report_written episode=%s path=%s bytes=%d", reader.episode_id, target, len(page))
    return target
