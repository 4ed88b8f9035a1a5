"""The header, demonstration, path, by-stage figures and other records as typed data (the Subtasks
section is `timeline`): the templates only lay it out.

Number formats live in `units`; markup and escaping live in the Jinja2 templates. Every string in
these views is plain text, escaped when a template prints it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from vlm2vla_edge.runtime.episode import StepRecord
from vlm2vla_edge.runtime.report.frames import Frame, FrameEmbedder
from vlm2vla_edge.runtime.report.grouping import (
    EpisodeView,
    StageFigures,
    chunk_rejected,
    safety_decisions,
    stage_figures,
    strongest_verdict,
)
from vlm2vla_edge.runtime.report.path import Box, executed_paths, path_points, safety_marks, wants_zoom
from vlm2vla_edge.runtime.report.svg import Node, path_svg
from vlm2vla_edge.runtime.report.units import (
    Quantity,
    Units,
    finite,
    format_count,
    format_duration,
    format_gripper,
    format_utc,
    plural,
    shorten,
)

# ------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    episode_id: str
    instruction: str
    outcome: str
    detail: str
    truncated: bool
    unfinished: bool
    frames_missing: bool
    facts: list[tuple[str, str]]
    extra_json: str | None
    extra_fields: int


def header(view: EpisodeView, frames: FrameEmbedder) -> Header:
    reader, meta = view.reader, view.reader.meta
    decisions = view.decisions()
    clamps = sum(d.verdict == "clamp" for d in decisions)
    rejects = sum(d.verdict == "reject" for d in decisions)
    rejected_chunks = sum(1 for a in view.attempts if a.action is not None and chunk_rejected(a.action))
    facts: list[tuple[str, str]] = []
    if view.attempts or view.planning:
        steps = sum(1 for a in view.attempts if a.motion is not None or a.action is not None)
        facts.append(("policy steps", str(steps)))
        facts.append(("retries", str(sum(a.retry for a in view.attempts))))
        subtasks = view.subtasks
        done = view.completed_subtasks()
        facts.append(("subtasks done", f"{len(done)} / {len(subtasks)}" if subtasks else "– (no plan)"))
    if view.demo:
        facts.append(("demonstration steps", str(len(view.demo))))
    refused = f" ({plural(rejected_chunks, 'chunk')} refused)" if rejected_chunks else ""
    facts.append(("safety", f"{plural(clamps, 'clamp')}, {plural(rejects, 'rejection')}{refused}"))
    verifiers = view.verifier_names()
    if verifiers or view.attempts:
        facts.append(("verifier", ", ".join(verifiers) or "–"))
    facts.append(("model bundle", meta.bundle_id or "– (no model)"))
    facts.append(("robot", " / ".join(x for x in (meta.robot_name, meta.robot_model) if x) or "–"))
    seed = meta.extra.get("seed")
    if seed is not None:
        facts.append(("seed", str(seed)))
    facts.append(("duration", _duration(view)))
    facts.append(("started", format_utc(meta.start_wall_time)))
    facts.append(("source", meta.source or "–"))
    if meta.camera:
        facts.append(("camera", meta.camera))
    if meta.grammar_version:
        facts.append(("grammar", meta.grammar_version))
    times = [st.t for st in view.steps if finite(st.t)]
    facts.append(("records", f"{len(view.steps)}" + (f" (last at t = {format_duration(max(times))})" if times else "")))
    never = "never finished: the process stopped before recording an outcome" if meta.outcome is None else ""
    extra = json.dumps(meta.extra, indent=2, ensure_ascii=False, default=str) if meta.extra else None
    return Header(reader.episode_id, meta.instruction, reader.outcome, meta.outcome_detail or never, reader.truncated,
                  meta.outcome is None, frames.any_missing(view.steps), facts, extra, len(meta.extra))


def _duration(view: EpisodeView) -> str:
    meta = view.reader.meta
    if meta.start_wall_time is not None and meta.end_wall_time is not None and finite(meta.start_wall_time) \
            and finite(meta.end_wall_time):
        return format_duration(meta.end_wall_time - meta.start_wall_time)
    listed = meta.extra.get("duration_s")
    if isinstance(listed, (int, float)) and finite(float(listed)):
        return format_duration(float(listed))
    times = [s.t for s in view.steps if finite(s.t)]
    return f"≥ {format_duration(max(times))} (unfinished)" if times else "–"


# ------------------------------------------------------------------------------------------- figures by stage


@dataclass(frozen=True)
class FigureRow:
    """One row of a by-stage table: n, mean, median, max and total in the figure's unit, and the bar width."""

    stage: str
    name: str
    n: int
    mean: str
    median: str
    max: str
    total: str
    bar_px: int


@dataclass(frozen=True)
class FigureTables:
    durations: list[FigureRow]
    counts: list[FigureRow]


def figure_tables(view: EpisodeView) -> FigureTables | None:
    """Durations and counts in separate tables, each bar scaled to the longest mean of its own unit."""
    rows: dict[Quantity, list[StageFigures]] = defaultdict(list)
    for row in stage_figures(view):
        rows[row.quantity].append(row)
    if not rows:
        return None
    out: dict[Quantity, list[FigureRow]] = {}
    for quantity, group in rows.items():
        fmt = format_duration if quantity is Quantity.DURATION else format_count
        longest = max(max(r.values) for r in group) or 1.0
        out[quantity] = [
            FigureRow(r.stage, r.name, len(r.values), fmt(statistics.fmean(r.values)),
                      fmt(statistics.median(r.values)), fmt(max(r.values)), fmt(sum(r.values)),
                      round(max(1.0, 160 * statistics.fmean(r.values) / longest)))
            for r in group
        ]
    return FigureTables(out.get(Quantity.DURATION, []), out.get(Quantity.COUNT, []))



# ------------------------------------------------------------------------------------------- demonstration


#: Frames shown in the strip of a demonstration (sampled evenly, first and last always included).
MAX_STRIP_FRAMES = 48
#: Rows of the demonstration step table; longer ones show the first and last rows.
MAX_TABLE_ROWS = 400


@dataclass(frozen=True)
class DemoRow:
    index: int
    t: str
    ee: str
    cells: tuple[str, str, str] | None  # dx, dy, dz; None when the step recorded no action
    gripper: str
    cls: str
    executed: str
    note: str


@dataclass(frozen=True)
class Demo:
    strip_note: str
    strip: list[Frame]
    rows: list[DemoRow | None]  # None: where the rows not listed would be
    not_listed: int


def demo(steps: list[StepRecord], frames: FrameEmbedder, units: Units) -> Demo:
    with_image = [s for s in steps if s.image]
    shown = sample(with_image, MAX_STRIP_FRAMES)
    note = f" (every {len(with_image) / len(shown):.1f}th of {len(with_image)})" if len(shown) < len(with_image) else ""
    strip = [frames.frame(s.image, f"#{s.index} · {format_duration(s.t)}"
                          + (f" · {format_gripper(s.gripper_open)}" if s.gripper_open is not None else ""))
             for s in shown]
    cut = len(steps) > MAX_TABLE_ROWS
    listed = steps[: MAX_TABLE_ROWS // 2] + steps[-MAX_TABLE_ROWS // 2:] if cut else steps
    rows: list[DemoRow | None] = []
    for n, s in enumerate(listed):
        if cut and n == MAX_TABLE_ROWS // 2:
            rows.append(None)
        a = (list(s.action or []) + [math.nan] * 4)[:4] if s.action else None
        decisions = safety_decisions(s)
        safety = "; ".join(f"{d.rule} {d.verdict}" for d in decisions)
        ok = "" if not s.executed else ("✓" if all(c.completed for c in s.executed) else "stopped")
        cells = (units.num(a[0], True), units.num(a[1], True), units.num(a[2], True)) if a else None
        rows.append(DemoRow(s.index, format_duration(s.t), units.vec(s.ee_position), cells,
                            format_gripper(a[3]) if a else "", strongest_verdict({d.verdict for d in decisions}), ok,
                            safety or s.error or ""))
    return Demo(note, strip, rows, len(steps) - MAX_TABLE_ROWS if cut else 0)


def sample(items: list[StepRecord], limit: int) -> list[StepRecord]:
    """At most `limit` items, evenly spaced, the first and the last always included."""
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


# ------------------------------------------------------------------------------------------- path and the rest


@dataclass(frozen=True)
class PathPart:
    plots: list[Node]
    box_note: str
    summary: str | None


def path_part(steps: list[StepRecord], box: Box | None, units: Units) -> PathPart:
    points, marks, chunks = path_points(steps), safety_marks(steps), executed_paths(steps)
    views = [((0, 1), "Top view (x–y)", False), ((0, 2), "Side view (x–z)", False)]
    if wants_zoom(points, marks, box):
        views += [((0, 1), "Top view, zoomed to the path", True), ((0, 2), "Side view, zoomed to the path", True)]
    plots = [path_svg(points, marks, chunks, box, units, axes, title, zoom=zoom) for axes, title, zoom in views]
    box_note = (f"dashed box: {box.source}; red dotted line: lowest allowed height (z floor)" if box
                else "workspace unknown (no matching robot config): axes fit the recorded data")
    summary = None
    if len(points) >= 2:
        travel = sum(math.dist(a.pos, b.pos) for a, b in zip(points, points[1:]))
        summary = (f"{len(points)} recorded positions · path length {units.num(travel)} {units.label} · "
                   f"start {units.vec(points[0].pos)} → end {units.vec(points[-1].pos)} {units.label} · "
                   "hover a point for its step")
    return PathPart(plots, box_note, summary)


@dataclass(frozen=True)
class OtherRow:
    index: int
    t: str
    stage: str
    text: str


def other_rows(steps: list[StepRecord]) -> list[OtherRow]:
    return [OtherRow(s.index, format_duration(s.t), s.stage or "(none)",
                     shorten(s.raw_text or s.error or s.subtask or "", 200)) for s in steps]
