"""The episode regrouped for display: planning records, attempts (motion/action/verify), demonstration steps.

steps.jsonl is a flat list of records; a reader wants "subtask 2, attempt 3: what it planned, did, and
how the verifier judged it". A crash can leave any attempt half written, so every stage of an attempt
may be missing, and grouping never fails.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from vlm2vla_edge.runtime.episode import KNOWN_STAGES, EpisodeReader, SafetyRecord, StepRecord
from vlm2vla_edge.runtime.report.units import Figure, Quantity, finite

POLICY_STAGES = ("motion", "action", "verify")


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

    @property
    def missing_stages(self) -> list[str]:
        return [stage for stage in POLICY_STAGES if getattr(self, stage) is None]

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
            elif record.stage in POLICY_STAGES:
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

    def attempts_by_subtask(self) -> list[tuple[int | None, list[Attempt]]]:
        """Every planned subtask in plan order (also those never reached), then unplanned indices, then None."""
        groups: dict[int | None, list[Attempt]] = defaultdict(list)
        for attempt in self.attempts:
            groups[attempt.subtask_index].append(attempt)
        order: list[int | None] = list(range(len(self.subtasks)))
        order += sorted(k for k in groups if k is not None and k not in order)
        if None in groups:
            order.append(None)
        return [(index, groups.get(index, [])) for index in order]

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


def strongest_verdict(verdicts: set[str]) -> str:
    """The row class of a set of limiter verdicts: "reject" over "clamp" over nothing."""
    return "reject" if "reject" in verdicts else "clamp" if "clamp" in verdicts else ""


# ------------------------------------------------------------------------------------------- figures by stage


@dataclass(frozen=True)
class StageFigures:
    """Every value of one recorded figure in one stage (one table row), with the figure's quantity."""

    stage: str
    name: str
    quantity: Quantity
    values: tuple[float, ...]


def stage_figures(view: EpisodeView) -> list[StageFigures]:
    """Per stage and figure name: the step timings and counts, verifier latencies and arm execution times."""
    rows: dict[tuple[str, str], list[Figure]] = defaultdict(list)
    for s in view.steps:
        stage = s.stage or "(none)"
        for name, value in (s.timings or {}).items():
            if finite(value):
                rows[(stage, name)].append(Figure.recorded(name, float(value)))
        if s.verifier is not None and s.verifier.latency_s is not None and finite(s.verifier.latency_s):
            name = f"verifier {s.verifier.verifier or ''}".strip()
            rows[(stage, name)].append(Figure.duration(name, float(s.verifier.latency_s)))
        durations = [c.duration_s for c in s.executed or () if c.duration_s is not None and finite(c.duration_s)]
        if durations:
            total = Figure.duration("arm execution", float(sum(durations)))
            rows[(stage, "arm execution (all commands)")].append(total)
    order = {name: i for i, name in enumerate(KNOWN_STAGES)}
    keys = sorted(rows, key=lambda key: order.get(key[0], len(order)))  # stable: first-seen order within a stage
    return [StageFigures(stage, name, rows[(stage, name)][0].quantity, tuple(f.value for f in rows[(stage, name)]))
            for stage, name in keys]
