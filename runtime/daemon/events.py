"""Loop events as JSON for the API's event stream, and the per-task log that streams them.

The episode loop calls subscribers synchronously, so `TaskEventLog.on_event` only converts the event
and appends it under a lock: it never waits on a client. Streaming clients read from the log at their
own pace with bounded waits; a client that stops reading or goes away costs the loop nothing. Frames
(images) are never sent; prompts are not either (they can be long and are in the recorded episode).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vlm2vla_edge.runtime.events import (
    CommandsExecuted,
    EpisodeEnded,
    EpisodeResult,
    EpisodeStarted,
    LoopEvent,
    SafetyChecked,
    StepPlanned,
    StepRejected,
    StepVerified,
    SubtasksPlanned,
    SubtasksRejected,
    assert_never,
)
from vlm2vla_edge.runtime.robot.base import ArmState


def _num(value: float) -> float | None:
    """JSON has no NaN/Infinity: such values become null."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def _vec(values: Any) -> list[float | None]:
    return [_num(v) for v in values]


def _state(state: ArmState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    return {"position": _vec(state.position), "gripper_open": bool(state.gripper_open)}


def result_json(result: EpisodeResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome,
        "detail": result.detail,
        "subtasks": list(result.subtasks),
        "completed_subtasks": result.completed_subtasks,
        "steps": result.steps,
        "retries": result.retries,
        "duration_s": _num(result.duration_s),
    }


def event_json(event: LoopEvent) -> dict[str, Any]:
    """The JSON-safe view of one loop event: what a person watching needs, nothing bulky or secret.

    The one conversion for the API's event stream (and the journal lines): `kind` names the event on
    the wire, and the rejected variants of "subtasks" and "step" carry `error` instead of the output.
    """
    out: dict[str, Any] = {"kind": event.kind, "t": _num(event.t)}
    match event:
        case EpisodeStarted():
            out.update(instruction=event.instruction, bundle_id=event.bundle_id)
        case SubtasksPlanned():
            out.update(subtasks=list(event.subtasks), state=_state(event.state))
        case SubtasksRejected():
            out.update(subtasks=[], state=_state(event.state), error=event.error)
        case StepPlanned():
            step = event.step
            out.update(
                subtask_index=event.subtask_index,
                subtask=event.subtask,
                retry=event.retry,
                motion_plan=step.motion.text,
                action_text=step.action_output.raw_text,
                actions=step.chunk.as_lists(),
                postprocessed=event.postprocessed.as_lists(),
                state=_state(event.state),
            )
        case StepRejected():
            out.update(
                subtask_index=event.subtask_index, subtask=event.subtask, retry=event.retry, error=event.error,
                state=_state(event.state),
            )
        case SafetyChecked():
            chunk = event.verdict
            out.update(
                subtask_index=event.subtask_index,
                rejected=bool(chunk.rejected),
                reason=chunk.reason,
                decisions=[x.to_dict() for x in chunk.decisions],  # holds every command's own decisions too
                commands=[{"target": _vec(c.target), "gripper_open": c.gripper_open} for c in chunk.commands],
            )
        case CommandsExecuted():
            out.update(
                subtask_index=event.subtask_index,
                moves=[
                    {
                        "completed": r.completed, "reached": _vec(r.reached), "duration_s": _num(r.duration_s),
                        "note": r.note,
                    }
                    for r in event.results
                ],
                state=_state(event.state),
            )
        case StepVerified():
            verdict = event.verdict
            out.update(
                subtask_index=event.subtask_index,
                subtask=event.subtask,
                success=bool(verdict.success),
                reason=verdict.reason,
                verifier=verdict.verifier,
                fallback_from=verdict.fallback_from,
                error=verdict.error,  # why the verifier (or the one fallen back from) failed; already redacted
            )
        case EpisodeEnded():
            out.update(result_json(event.result))
        case _:
            assert_never(event)
    return out


@dataclass
class _Slot:
    events: deque[dict[str, Any]]
    first: int = 0  # sequence number of events[0]
    closed: bool = False
    condition: threading.Condition = field(default_factory=threading.Condition)


class TaskEventLog:
    """Events of one task, numbered from 0; bounded (the oldest go first), closed at the episode's end."""

    def __init__(self, capacity: int) -> None:
        self._slot = _Slot(deque(maxlen=capacity))

    def on_event(self, event: LoopEvent) -> None:
        self.append(event_json(event), close=isinstance(event, EpisodeEnded))

    def append(self, item: dict[str, Any], close: bool = False) -> None:
        slot = self._slot
        with slot.condition:
            if len(slot.events) == slot.events.maxlen:
                slot.first += 1
            slot.events.append(item)
            slot.closed = slot.closed or close
            slot.condition.notify_all()

    def close(self) -> None:
        with self._slot.condition:
            self._slot.closed = True
            self._slot.condition.notify_all()

    def read(self, since: int, timeout_s: float) -> tuple[list[tuple[int, dict[str, Any]]], int, bool]:
        """Events numbered >= `since` (waiting up to `timeout_s` for one), the next number to ask for,
        and whether the log is closed. Events dropped for capacity are skipped."""
        slot = self._slot
        with slot.condition:
            if since >= slot.first + len(slot.events) and not slot.closed:
                slot.condition.wait(timeout_s)
            start = max(since, slot.first)
            items = [(n, slot.events[n - slot.first]) for n in range(start, slot.first + len(slot.events))]
            return items, slot.first + len(slot.events), slot.closed
