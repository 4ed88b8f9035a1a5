"""What the episode loop tells its subscribers: one frozen dataclass per thing that happened.

The loop (`runner.EpisodeRunner`) emits these events; the recorder (the safety audit trail on disk),
the console progress, the daemon's event stream, its metrics and the evaluation's tally subscribe to
them. Each event carries typed fields, and `LoopEventHandler` routes each event type to one typed
method, so renaming or adding an event is a type error and a test failure
(`tests/test_events.py` checks that the recorder handles every type) instead of a record silently
missing from the audit trail.

Events are in-process objects (they hold frames, parsed chunks, limiter verdicts). Where they cross a
process boundary they are converted in one place each: `daemon.events.event_json` for the API's event
stream and the journal, `recording.EpisodeRecorder` for the episode on disk (runtime/EPISODE_FORMAT.md).
`kind` is the name an event has on those boundaries (and in logs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, NoReturn, Protocol

from vlm2vla_edge.runtime.actions import ActionChunk
from vlm2vla_edge.runtime.errors import Vlm2VlaError
from vlm2vla_edge.runtime.policy.interface import StageOutput, StepResult
from vlm2vla_edge.runtime.robot.base import ArmState, Frame, MoveResult
from vlm2vla_edge.runtime.safety import ChunkVerdict, SafeCommand
from vlm2vla_edge.runtime.verifier.base import Verdict

Outcome = Literal["success", "failed", "aborted", "error"]


@dataclass(frozen=True, slots=True)
class EpisodeResult:
    """How one episode ended, with its progress and the latency of every stage call (seconds)."""

    outcome: Outcome
    detail: str
    subtasks: tuple[str, ...] = ()
    completed_subtasks: int = 0
    steps: int = 0
    retries: int = 0
    duration_s: float = 0.0
    stage_latency_s: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class _LoopEvent:
    kind: ClassVar[str]
    t: float  # seconds since the episode start (monotonic clock)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpisodeStarted(_LoopEvent):
    kind: ClassVar[str] = "episode_start"
    instruction: str
    bundle_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SubtasksPlanned(_LoopEvent):
    """The episode's subtask list: generated (`output` holds the model's text), or given by the caller
    (`output` is None)."""

    kind: ClassVar[str] = "subtasks"
    subtasks: tuple[str, ...]
    output: StageOutput | None
    frame: Frame
    state: ArmState


@dataclass(frozen=True, slots=True, kw_only=True)
class SubtasksRejected(_LoopEvent):
    """The model's subtask list was unusable; the episode fails next (nothing to attempt)."""

    kind: ClassVar[str] = "subtasks"
    error: str
    raw_text: str | None
    frame: Frame
    state: ArmState


@dataclass(frozen=True, slots=True, kw_only=True)
class StepPlanned(_LoopEvent):
    """A motion plan and an action chunk for one attempt at a subtask; `postprocessed` is the chunk the
    limiter is given next (re-aggregated, or interpolated from waypoints)."""

    kind: ClassVar[str] = "step"
    subtask_index: int
    subtask: str
    retry: bool
    step: StepResult
    postprocessed: ActionChunk
    frame: Frame
    state: ArmState


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRejected(_LoopEvent):
    """The motion plan or the action chunk was unusable (did not parse, or hit its token budget); the
    attempt counts as failed without moving the arm."""

    kind: ClassVar[str] = "step"
    subtask_index: int
    subtask: str
    retry: bool
    error: str
    raw_text: str | None
    frame: Frame
    state: ArmState


@dataclass(frozen=True, slots=True, kw_only=True)
class SafetyChecked(_LoopEvent):
    """The limiter's verdict on the post-processed chunk (approved commands and every decision)."""

    kind: ClassVar[str] = "safety"
    subtask_index: int
    verdict: ChunkVerdict


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandsExecuted(_LoopEvent):
    """What the arm did with the approved commands: one result per command sent (fewer than `commands`
    when a move stopped short), and the arm's state after them."""

    kind: ClassVar[str] = "executed"
    subtask_index: int
    commands: tuple[SafeCommand, ...]
    results: tuple[MoveResult, ...]
    state: ArmState


@dataclass(frozen=True, slots=True, kw_only=True)
class StepVerified(_LoopEvent):
    """The verdict on one attempt (the verifier's, or the runner's own failed one for unusable output or a
    wholly rejected chunk), with the frame and state after the action."""

    kind: ClassVar[str] = "verified"
    subtask_index: int
    subtask: str
    verdict: Verdict
    frame: Frame
    state: ArmState


@dataclass(frozen=True, slots=True, kw_only=True)
class EpisodeEnded(_LoopEvent):
    """Always the last event of an episode, whatever ended it."""

    kind: ClassVar[str] = "episode_end"
    result: EpisodeResult


LoopEvent = (
    EpisodeStarted
    | SubtasksPlanned
    | SubtasksRejected
    | StepPlanned
    | StepRejected
    | SafetyChecked
    | CommandsExecuted
    | StepVerified
    | EpisodeEnded
)


def assert_never(value: NoReturn) -> NoReturn:
    """mypy's exhaustiveness check of a `match` over `LoopEvent` (`typing.assert_never` needs Python 3.11;
    the robot's computer may run 3.10): a case left out makes `value` not `NoReturn` there, a type error."""
    raise AssertionError(f"not a loop event: {value!r}")


class EpisodeHalt(Vlm2VlaError):
    """Raised by a subscriber the episode cannot go on without (the recorder on a full disk): the loop
    stops before the next arm command and the episode ends with outcome "error" and this message."""


class EpisodeSubscriber(Protocol):
    def on_event(self, event: LoopEvent) -> None:
        """Called synchronously from the loop; must be quick and must not raise (errors are logged),
        except `EpisodeHalt`, which ends the episode."""


class LoopEventHandler:
    """Base of subscribers: `on_event` calls the one method of the event's type; each does nothing here,
    so a subscriber overrides only the events it cares about."""

    def on_event(self, event: LoopEvent) -> None:
        match event:
            case EpisodeStarted():
                self.on_episode_started(event)
            case SubtasksPlanned():
                self.on_subtasks_planned(event)
            case SubtasksRejected():
                self.on_subtasks_rejected(event)
            case StepPlanned():
                self.on_step_planned(event)
            case StepRejected():
                self.on_step_rejected(event)
            case SafetyChecked():
                self.on_safety_checked(event)
            case CommandsExecuted():
                self.on_commands_executed(event)
            case StepVerified():
                self.on_step_verified(event)
            case EpisodeEnded():
                self.on_episode_ended(event)
            case _:
                assert_never(event)

    def on_episode_started(self, event: EpisodeStarted) -> None:
        pass

    def on_subtasks_planned(self, event: SubtasksPlanned) -> None:
        pass

    def on_subtasks_rejected(self, event: SubtasksRejected) -> None:
        pass

    def on_step_planned(self, event: StepPlanned) -> None:
        pass

    def on_step_rejected(self, event: StepRejected) -> None:
        pass

    def on_safety_checked(self, event: SafetyChecked) -> None:
        pass

    def on_commands_executed(self, event: CommandsExecuted) -> None:
        pass

    def on_step_verified(self, event: StepVerified) -> None:
        pass

    def on_episode_ended(self, event: EpisodeEnded) -> None:
        pass
