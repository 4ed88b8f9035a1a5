"""What each part of the page shows, as typed data: the templates only lay it out.

Decisions live here (which frames an attempt shows, which table row a limiter decision colours,
what a crash left missing); formatting of numbers lives in `units`; markup and escaping live in the
Jinja2 templates. Every string in these views is plain text, escaped when a template prints it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vlm2vla_edge.runtime.episode import StepRecord
from vlm2vla_edge.runtime.report.frames import Frame, FrameEmbedder
from vlm2vla_edge.runtime.report.grouping import (
    Attempt, EpisodeView, StageFigures, chunk_rejected, safety_decisions, stage_figures, strongest_verdict,
)
from vlm2vla_edge.runtime.report.path import Box, executed_paths, path_points, safety_marks, wants_zoom
from vlm2vla_edge.runtime.report.svg import Node, path_svg
from vlm2vla_edge.runtime.report.units import (
    Figure, Quantity, Units, finite, finite_vec, format_count, format_duration, format_gripper, format_utc, plural,
)


@dataclass(frozen=True)
class Badge:
    cls: str  # CSS suffix: b-<cls>
    text: str


@dataclass(frozen=True)
class Texts:
    """A generation's texts: raw output, its recorded figures (each with its unit), the prompt."""

    raw_label: str
    raw_text: str | None
    figures: list[Figure]
    prompt: str | None


def texts(record: StepRecord, raw_label: str = "raw model output", raw: bool = True) -> Texts:
    figures = [Figure.recorded(k, v) for k, v in (record.timings or {}).items()]
    return Texts(raw_label, record.raw_text if raw else None, figures, record.prompt)


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


# ------------------------------------------------------------------------------------------- subtasks


@dataclass(frozen=True)
class Planning:
    index: int
    frame: Frame
    error: str | None
    subtasks: list[str]
    texts: Texts


@dataclass(frozen=True)
class ActionRow:
    cls: str  # "", "clamp" or "reject"
    cells: tuple[str, str, str, str]  # dx, dy, dz, |d|
    gripper: str
    flag: str


@dataclass(frozen=True)
class ActionTable:
    title: str
    rows: list[ActionRow]


@dataclass(frozen=True)
class Decision:
    where: str
    rule: str
    verdict: str
    reason: str


@dataclass(frozen=True)
class Executed:
    cls: str
    target: str
    reached: str
    error_mm: str
    time: str
    gripper: str
    done: str
    note: str


@dataclass(frozen=True)
class Action:
    error: tuple[str, str, str] | None  # (box class, what, message)
    texts: Texts
    tables: list[ActionTable]
    safety: bool  # whether the safety block shows
    refused: str | None  # "refused" / "partly refused" when the limiter refused the chunk
    refused_reason: str
    decisions: list[Decision]
    executed: list[Executed] | None  # None: nothing recorded; []: nothing sent to the arm


@dataclass(frozen=True)
class Verdict:
    badge: Badge | None  # None: no verdict recorded
    via: str = ""
    bits: list[str] = field(default_factory=list)
    reason: str = ""
    error: str | None = None
    extras: str = ""


@dataclass(frozen=True)
class AttemptPart:
    number: int
    retry: bool
    t: str
    first: int
    last: int
    stages: str
    moved: str | None  # "ee (..) → (..) cm, moved 3.1 cm"
    frames: list[Frame]
    motion_plan: str | None
    motion_texts: Texts | None
    action: Action | None
    verdict: Verdict | None
    missing: list[str]  # stages a crash left out; empty when the attempt is whole or ended by an error


@dataclass(frozen=True)
class Subtask:
    number: str
    name: str
    state: str  # "done" | "failed" | "pending"
    badge: Badge
    attempts: list[AttemptPart]


_STATE_BADGE = {"done": Badge("done", "done"), "failed": Badge("notdone", "not done"), "pending": Badge("pending", "not reached")}


def planning(record: StepRecord, frames: FrameEmbedder) -> Planning:
    return Planning(record.index, frames.frame(record.image, f"o0 · record #{record.index}"), record.error,
                    list(record.subtasks or []), texts(record))


def subtasks(view: EpisodeView, frames: FrameEmbedder, units: Units) -> list[Subtask]:
    listed, done = view.subtasks, view.completed_subtasks()
    out = []
    for index, attempts in view.attempts_by_subtask():
        name = listed[index] if index is not None and index < len(listed) else next(
            (a.subtask for a in attempts if a.subtask), None)
        state = "done" if index in done else "failed" if attempts else "pending"
        out.append(Subtask(f"{index + 1}. " if index is not None else "", name or "(unnamed subtask)", state,
                           _STATE_BADGE[state], [attempt(a, n, frames, units) for n, a in enumerate(attempts, start=1)]))
    return out


def attempt(a: Attempt, number: int, frames: FrameEmbedder, units: Units) -> AttemptPart:
    records = a.records
    first = records[0]
    start = next((r.ee_position for r in records if finite_vec(r.ee_position)), None)
    end = a.verify.ee_position if a.verify and finite_vec(a.verify.ee_position) else None
    moved = None
    if start is not None and end is not None:
        distance = units.num(math.dist(start[:3], end[:3]))
        moved = f"ee {units.vec(start)} → {units.vec(end)} {units.label}, moved {distance} {units.label}"
    shown = [frames.frame(next((r.image for r in records if r.image), None), "before")]
    if a.verify is not None or (a.action is not None and not a.action.error):
        shown.append(frames.frame(a.verify.images.get("after") if a.verify else None, "after"))
    for r in records:
        for tag, name in r.images.items():
            if not (tag == "after" and r is a.verify):
                shown.append(frames.frame(name, f"{tag} (#{r.index})"))
    motion_texts = None
    if a.motion is not None:
        own_raw = a.motion.raw_text is not None and a.motion.raw_text != a.motion.motion_plan
        motion_texts = texts(a.motion, "raw motion output") if own_raw else texts(a.motion, raw=False)
    crashed = a.verify is None and not (a.action is not None and a.action.error)
    return AttemptPart(
        number, a.retry, format_duration(first.t), first.index, records[-1].index, "/".join(r.stage or "" for r in records),
        moved, shown, (a.motion.motion_plan or "") if a.motion else None, motion_texts,
        action(a.action, units) if a.action else None, verdict(a.verify) if a.verify else None,
        a.missing_stages if crashed else [],
    )


def action(record: StepRecord, units: Units) -> Action:
    error = None
    if record.error:
        warn = record.error.startswith("not executed")
        error = ("warnbox", "Not executed", record.error) if warn else ("errbox", "Unusable model output", record.error)
    decisions = safety_decisions(record)
    by_index: dict[int | None, set[str]] = defaultdict(set)
    for d in decisions:
        by_index[d.index].add(d.verdict)
    post = record.extra.get("postprocessed")
    post_ok = isinstance(post, list) and all(isinstance(a, list) for a in post)
    parsed = record.parsed_actions
    same = post_ok and parsed is not None and _same_chunk(parsed, post)
    tables = []
    if parsed is not None:
        title = "parsed actions" + (" (= post-processed)" if same else "")
        tables.append(action_table(title, parsed, by_index if (same or not post_ok) else {}, units))
    if post_ok and not same:
        tables.append(action_table("after post-processing (what the limiter checked)", post, by_index, units))
    rejected = chunk_rejected(record)
    reason = record.extra.get("safety_reason")
    return Action(
        error, texts(record, "raw action output"), tables, bool(decisions) or rejected,
        ("partly refused" if record.executed else "refused") if rejected else None,
        reason if isinstance(reason, str) else "",
        [Decision(f"action {d.index + 1}" if d.index is not None else "chunk", d.rule, d.verdict, d.reason) for d in decisions],
        None if record.executed is None else [executed(c, units) for c in record.executed],
    )


def action_table(title: str, actions: list[Any], verdicts: dict[int | None, set[str]], units: Units) -> ActionTable:
    rows = []
    whole_chunk = {"reject"} & verdicts.get(None, set())  # a chunk rule refused every action
    for i, a in enumerate(actions):
        v = verdicts.get(i, set()) | whole_chunk
        vals = (list(a) + [math.nan] * 4)[:4]
        norm = math.sqrt(sum(x * x for x in vals[:3])) if all(finite(x) for x in vals[:3]) else math.nan
        flag = " ⚠ " + "/".join(sorted(v - {"pass"})) if v - {"pass"} else ""
        cells = (units.num(vals[0], True), units.num(vals[1], True), units.num(vals[2], True), units.num(norm))
        rows.append(ActionRow(strongest_verdict(v), cells, format_gripper(vals[3]), flag))
    return ActionTable(title, rows)


def executed(c: Any, units: Units) -> Executed:
    done = "✓" if c.completed else ("stopped" if c.completed is False else "–")
    return Executed("" if c.completed is not False else "reject", units.vec(c.target), units.vec(c.reached),
                    f"{c.error_m * 1000:.1f}" if finite(c.error_m) else "–", format_duration(c.duration_s),
                    format_gripper(c.gripper_open), done, c.note)


def verdict(record: StepRecord) -> Verdict:
    v = record.verifier
    if v is None:
        return Verdict(None)
    if v.cancelled:
        badge = Badge("none", "cancelled")
    elif v.success is None:
        badge = Badge("none", "no decision")
    else:
        badge = Badge("done", "done") if v.success else Badge("notdone", "not done")
    via = (v.verifier or "verifier") + (f" after {v.fallback_from} failed" if v.fallback_from else "")
    bits = [f"latency {format_duration(v.latency_s)}"]
    if v.attempts is not None:
        bits.append(plural(v.attempts, "attempt"))
    extras = " · ".join(f"{k}: {short(val)}" for k, val in (v.model_extra or {}).items())
    return Verdict(badge, via, bits, v.reason, v.error, extras)


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


def short(value: object, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def figure_tables(view: EpisodeView) -> dict[Quantity, list[FigureRow]]:
    """Durations and counts in separate tables, each bar scaled to the longest mean of its own unit."""
    rows: dict[Quantity, list[StageFigures]] = defaultdict(list)
    for row in stage_figures(view):
        rows[row.quantity].append(row)
    out = {}
    for quantity, group in rows.items():
        fmt = format_duration if quantity is Quantity.DURATION else format_count
        longest = max(max(r.values) for r in group) or 1.0
        out[quantity] = [
            FigureRow(r.stage, r.name, len(r.values), fmt(statistics.fmean(r.values)), fmt(statistics.median(r.values)),
                      fmt(max(r.values)), fmt(sum(r.values)), round(max(1.0, 160 * statistics.fmean(r.values) / longest)))
            for r in group
        ]
    return out



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
    return [OtherRow(s.index, format_duration(s.t), s.stage or "(none)", short(s.raw_text or s.error or s.subtask or "", 200))
            for s in steps]
