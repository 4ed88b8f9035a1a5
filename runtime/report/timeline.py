"""The Subtasks section as typed data: the plan, then per subtask its attempts (motion, action, verdict).

Decisions live here (which frames an attempt shows, which table row a limiter decision colours, what
a crash left missing); number formats live in `units`; markup and escaping live in the templates
(`timeline.html.j2`, `attempt.html.j2`). Every string here is plain text, escaped when printed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vlm2vla_edge.runtime.episode import ExecutedCommand, StepRecord
from vlm2vla_edge.runtime.report.frames import Frame, FrameEmbedder
from vlm2vla_edge.runtime.report.grouping import (
    Attempt,
    EpisodeView,
    chunk_rejected,
    safety_decisions,
    strongest_verdict,
)
from vlm2vla_edge.runtime.report.units import (
    Figure,
    Units,
    finite,
    finite_vec,
    format_duration,
    format_gripper,
    plural,
    shorten,
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


_STATE_BADGE = {
    "done": Badge("done", "done"), "failed": Badge("notdone", "not done"), "pending": Badge("pending", "not reached"),
}


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
                           _STATE_BADGE[state],
                           [attempt(a, n, frames, units) for n, a in enumerate(attempts, start=1)]))
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
        number, a.retry, format_duration(first.t), first.index, records[-1].index,
        "/".join(r.stage or "" for r in records),
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
    listed = record.extra.get("postprocessed")  # recorded when post-processing changed the chunk
    post = listed if isinstance(listed, list) and all(isinstance(a, list) for a in listed) else None
    parsed = record.parsed_actions
    same = post is not None and parsed is not None and _same_chunk(parsed, post)
    tables = []
    if parsed is not None:
        title = "parsed actions" + (" (= post-processed)" if same else "")
        tables.append(action_table(title, parsed, by_index if (same or post is None) else {}, units))
    if post is not None and not same:
        tables.append(action_table("after post-processing (what the limiter checked)", post, by_index, units))
    rejected = chunk_rejected(record)
    reason = record.extra.get("safety_reason")
    return Action(
        error, texts(record, "raw action output"), tables, bool(decisions) or rejected,
        ("partly refused" if record.executed else "refused") if rejected else None,
        reason if isinstance(reason, str) else "",
        [Decision(f"action {d.index + 1}" if d.index is not None else "chunk", d.rule, d.verdict, d.reason)
         for d in decisions],
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


def executed(c: ExecutedCommand, units: Units) -> Executed:
    done = "✓" if c.completed else ("stopped" if c.completed is False else "–")
    return Executed("" if c.completed is not False else "reject", units.vec(c.target), units.vec(c.reached),
                    f"{c.error_m * 1000:.1f}" if c.error_m is not None and finite(c.error_m) else "–",
                    format_duration(c.duration_s),
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
    extras = " · ".join(f"{k}: {shorten(val)}" for k, val in (v.model_extra or {}).items())
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



@dataclass(frozen=True)
class Timeline:
    planning: list[Planning]
    subtasks: list[Subtask]


def timeline(view: EpisodeView, frames: FrameEmbedder, units: Units) -> Timeline:
    """The section's data; frames are embedded (and counted against the budget) in page order."""
    return Timeline([planning(r, frames) for r in view.planning], subtasks(view, frames, units))
