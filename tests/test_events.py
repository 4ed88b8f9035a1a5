"""The loop's typed events: every type is routed to its own handler, the recorder (the safety audit
trail) handles every one of them, and the API's event stream keeps its JSON fields."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest

from vlm2vla_edge.runtime import events
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.client import format_event
from vlm2vla_edge.runtime.daemon.events import event_json
from vlm2vla_edge.runtime.events import (
    CommandsExecuted,
    EpisodeEnded,
    EpisodeResult,
    EpisodeStarted,
    LoopEvent,
    LoopEventHandler,
    SafetyChecked,
    StepPlanned,
    StepRejected,
    StepVerified,
    SubtasksPlanned,
    SubtasksRejected,
)
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan
from vlm2vla_edge.runtime.policy.interface import StageOutput, StepResult
from vlm2vla_edge.runtime.recording import EpisodeRecorder, ProgressPrinter
from vlm2vla_edge.runtime.robot.base import ArmState, Frame, MoveResult
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.verifier.base import Verdict

EVENT_TYPES: tuple[type, ...] = get_args(LoopEvent)
HANDLERS = sorted(name for name in vars(LoopEventHandler) if name.startswith("on_") and name != "on_event")


def test_every_event_class_is_in_the_union() -> None:
    # A new event class left out of `LoopEvent` would reach no typed handler.
    # (by name: `slots=True` leaves the pre-slots copy of each class among the subclasses too)
    assert {cls.__name__ for cls in events._LoopEvent.__subclasses__()} == {cls.__name__ for cls in EVENT_TYPES}
    assert all(dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen for cls in EVENT_TYPES)


def _placeholder(cls: type) -> LoopEvent:
    """An instance whose fields are all None: enough to see where `on_event` routes it."""
    return cls(**{f.name: None for f in dataclasses.fields(cls)})


def _routes(subscriber_class: type[LoopEventHandler]) -> dict[type, str]:
    """Which handler method `on_event` calls for each event type (the handlers themselves do not run)."""
    called: list[str] = []
    probe_class = type("Probe", (subscriber_class,), {
        name: (lambda self, event, name=name: called.append(name)) for name in HANDLERS
    })
    probe = object.__new__(probe_class)  # no __init__: the handlers are stubs
    routes = {}
    for cls in EVENT_TYPES:
        called.clear()
        probe.on_event(_placeholder(cls))
        assert len(called) == 1, f"{cls.__name__} reached {called}"
        routes[cls] = called[0]
    return routes


def test_each_event_type_has_its_own_handler() -> None:
    routes = _routes(LoopEventHandler)
    assert sorted(routes.values()) == HANDLERS  # one method per type, none shared, none unused


def _unhandled(subscriber_class: type[LoopEventHandler]) -> list[str]:
    """Event types the class leaves to the base class's no-op."""
    return [
        f"{cls.__name__} ({name})"
        for cls, name in _routes(subscriber_class).items()
        if getattr(subscriber_class, name) is getattr(LoopEventHandler, name)
    ]


def test_the_recorder_handles_every_event_type() -> None:
    # The recorder is the safety audit trail: an event type it left to the base class's no-op
    # would silently be missing from every recorded episode.
    assert _unhandled(EpisodeRecorder) == []


def test_a_missing_recorder_handler_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(EpisodeRecorder, "on_safety_checked")
    assert _unhandled(EpisodeRecorder) == ["SafetyChecked (on_safety_checked)"]


# --- the API's event stream ----------------------------------------------------------------------------


def _samples() -> list[LoopEvent]:
    """One real event of each type, as the loop emits them."""
    robot = load_robot_config()
    limiter = SafetyLimiter(robot, reachable=lambda *_: True)
    frame = Frame(image=np.zeros((8, 8, 3), np.uint8), timestamp=0.0, index=0)
    state = ArmState(position=(0.3, 0.0, 0.2), rpy=(0.0, 0.0, 0.0), gripper_open=True)
    chunk = parse_action_chunk("[[0.2, 0, 0, 1]]")
    step = StepResult(
        motion=parse_motion_plan("Move primarily forward"), chunk=chunk,
        motion_output=StageOutput("motion", "motion?", "Move primarily forward", {"total_s": 0.1}),
        action_output=StageOutput("action", "action?", "[[0.2, 0, 0, 1]]", {"total_s": 0.1}),
    )
    verdict = limiter.check_chunk(chunk, state.position)
    moves = tuple(MoveResult(True, c.target, 0.0, 0.5) for c in verdict.commands)
    checked = Verdict(success=True, reason="moved", verifier="heuristic", latency_s=0.01, fallback_from="gemini")
    result = EpisodeResult("success", "all 1 subtasks verified", ("Go",), 1, 1, 0, 2.0, {"action": [0.1]})
    return [
        EpisodeStarted(t=0.0, instruction="go", bundle_id="bundle"),
        SubtasksPlanned(t=0.1, subtasks=("Go",), output=None, frame=frame, state=state),
        SubtasksRejected(t=0.1, error="cut off", raw_text='["G', frame=frame, state=state),
        StepPlanned(t=0.2, subtask_index=0, subtask="Go", retry=False, step=step, postprocessed=chunk,
                    frame=frame, state=state),
        StepRejected(t=0.2, subtask_index=0, subtask="Go", retry=True, error="did not parse", raw_text="[[",
                     frame=frame, state=state),
        SafetyChecked(t=0.3, subtask_index=0, verdict=verdict),
        CommandsExecuted(t=0.4, subtask_index=0, commands=verdict.commands, results=moves, state=state),
        StepVerified(t=0.5, subtask_index=0, subtask="Go", verdict=checked, frame=frame, state=state),
        EpisodeEnded(t=2.0, result=result),
    ]


# The stream's fields by event, in order (clients and `format_event` read them; change them knowingly).
WIRE_FIELDS = {
    EpisodeStarted: ["kind", "t", "instruction", "bundle_id"],
    SubtasksPlanned: ["kind", "t", "subtasks", "state"],
    SubtasksRejected: ["kind", "t", "subtasks", "state", "error"],
    StepPlanned: ["kind", "t", "subtask_index", "subtask", "retry", "motion_plan", "action_text", "actions",
                  "postprocessed", "state"],
    StepRejected: ["kind", "t", "subtask_index", "subtask", "retry", "error", "state"],
    SafetyChecked: ["kind", "t", "subtask_index", "rejected", "reason", "decisions", "commands"],
    CommandsExecuted: ["kind", "t", "subtask_index", "moves", "state"],
    StepVerified: ["kind", "t", "subtask_index", "subtask", "success", "reason", "verifier", "fallback_from", "error"],
    EpisodeEnded: [
        "kind", "t", "outcome", "detail", "subtasks", "completed_subtasks", "steps", "retries", "duration_s",
    ],
}


def test_the_event_stream_keeps_its_json_fields() -> None:
    samples = _samples()
    assert {type(e) for e in samples} == set(EVENT_TYPES) == set(WIRE_FIELDS)
    for event in samples:
        assert list(event_json(event)) == WIRE_FIELDS[type(event)], type(event).__name__
    by_type = {type(e): event_json(e) for e in samples}
    assert by_type[SubtasksRejected]["kind"] == "subtasks" and by_type[SubtasksRejected]["subtasks"] == []
    assert by_type[StepRejected]["kind"] == "step" and by_type[StepRejected]["error"] == "did not parse"
    assert by_type[StepPlanned]["actions"] == [[0.2, 0.0, 0.0, 1.0]]
    assert by_type[StepPlanned]["state"] == {"position": [0.3, 0.0, 0.2], "gripper_open": True}
    clamped = by_type[SafetyChecked]
    assert clamped["rejected"] is False and [d["verdict"] for d in clamped["decisions"]] == ["clamp"]
    assert by_type[CommandsExecuted]["moves"][0]["completed"] is True
    assert by_type[EpisodeEnded]["outcome"] == "success" and by_type[EpisodeEnded]["steps"] == 1


def test_the_daemon_client_prints_what_the_local_printer_prints() -> None:
    # `do` through the daemon shows the streamed JSON with `format_event`; `do --local` shows the
    # loop's events with `ProgressPrinter`. The two must not drift apart.
    for event in _samples():
        local: list[str] = []
        ProgressPrinter(echo=local.append).on_event(event)
        assert format_event(event_json(event)) == local, type(event).__name__
