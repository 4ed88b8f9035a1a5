"""Subscribers of the episode loop: the on-disk recorder and the live console progress.

The recorder turns loop events into the episode format (runtime/EPISODE_FORMAT.md): one record per
generation stage ("subtasks", "motion", "action" with its safety decisions and executed commands) and
one per verification ("verify", with the post-action frame). Each record is flushed and fsync'd
as it is written, so a crash loses at most the step in flight. A write that fails (disk full, I/O
error) halts the episode (`EpisodeHalt`): the robot does not go on unrecorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from vlm2vla_edge.runtime.episode import (
    EpisodeWriteError,
    EpisodeWriter,
    ExecutedCommand,
    SafetyRecord,
    StepRecord,
    VerifierRecord,
)
from vlm2vla_edge.runtime.events import (
    CommandsExecuted,
    EpisodeEnded,
    EpisodeHalt,
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
from vlm2vla_edge.runtime.robot.base import ArmState, Frame

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _PendingAction:
    """The action record of a step, held back until the limiter's decisions and the executed commands
    are known (it is written when `CommandsExecuted` arrives, or with an error if the episode ends first)."""

    state: ArmState
    image: str | None
    prompt: str
    raw_text: str
    motion_plan: str
    parsed_actions: list[list[float]]
    timings: dict[str, float]
    subtask_index: int
    subtask: str
    extra: dict[str, Any]
    safety: list[SafetyRecord] | None = None

    def fields(self) -> dict[str, Any]:
        """The `StepRecord` fields it fills (the state goes in as the pose)."""
        return {
            "prompt": self.prompt, "raw_text": self.raw_text, "motion_plan": self.motion_plan,
            "parsed_actions": self.parsed_actions, "timings": self.timings, "subtask_index": self.subtask_index,
            "subtask": self.subtask, "extra": self.extra, "safety": self.safety, "image": self.image,
        }


class EpisodeRecorder(LoopEventHandler):
    """Writes every loop event of one episode with an `EpisodeWriter`, and finishes it with the outcome.

    It is the safety audit trail, so it handles every event type itself (`tests/test_events.py` fails
    when one falls through to the base class's no-op)."""

    def __init__(self, writer: EpisodeWriter, record_frames: bool = True) -> None:
        self.writer = writer
        self.record_frames = record_frames
        self._pending_action: _PendingAction | None = None

    def on_event(self, event: LoopEvent) -> None:
        try:
            super().on_event(event)
        except EpisodeWriteError as exc:
            raise EpisodeHalt(f"the episode cannot be recorded: {exc}") from exc

    # --- events ------------------------------------------------------------------------------------

    def on_episode_started(self, event: EpisodeStarted) -> None:
        """Nothing to write: `EpisodeWriter.create` already wrote meta.json with the instruction."""

    def on_subtasks_planned(self, event: SubtasksPlanned) -> None:
        output = event.output  # None: the list was given, not generated
        self._append(
            stage="subtasks",
            state=event.state,
            image=self._frame(event.frame),
            prompt=output.prompt if output is not None else None,
            raw_text=output.raw_text if output is not None else None,
            subtasks=list(event.subtasks),
            timings=output.timings if output is not None else None,
        )

    def on_subtasks_rejected(self, event: SubtasksRejected) -> None:
        self._append(
            stage="subtasks", state=event.state, image=self._frame(event.frame),
            error=event.error, raw_text=event.raw_text,
        )

    def on_step_rejected(self, event: StepRejected) -> None:
        self._append(
            stage="action", state=event.state, image=self._frame(event.frame), error=event.error,
            raw_text=event.raw_text, subtask_index=event.subtask_index, subtask=event.subtask,
            extra={"retry": event.retry},
        )

    def on_step_planned(self, event: StepPlanned) -> None:
        step = event.step
        image = self._frame(event.frame)
        self._append(
            stage="motion",
            state=event.state,
            image=image,
            prompt=step.motion_output.prompt,
            raw_text=step.motion_output.raw_text,
            motion_plan=step.motion.text,
            timings=step.motion_output.timings,
            subtask_index=event.subtask_index,
            subtask=event.subtask,
            extra={"retry": event.retry},
        )
        self._pending_action = _PendingAction(
            state=event.state,
            image=image,
            prompt=step.action_output.prompt,
            raw_text=step.action_output.raw_text,
            motion_plan=step.motion.text,
            parsed_actions=step.chunk.as_lists(),
            timings=step.action_output.timings,
            subtask_index=event.subtask_index,
            subtask=event.subtask,
            extra={"retry": event.retry, "postprocessed": event.postprocessed.as_lists()},
        )

    def on_safety_checked(self, event: SafetyChecked) -> None:
        pending = self._pending_action
        if pending is None:
            return
        verdict = event.verdict
        # the chunk's list already holds every command's own decisions
        pending.safety = [SafetyRecord(**d.to_dict()) for d in verdict.decisions]
        pending.extra["safety_rejected"] = verdict.rejected
        if verdict.reason:
            pending.extra["safety_reason"] = verdict.reason

    def on_commands_executed(self, event: CommandsExecuted) -> None:
        pending, self._pending_action = self._pending_action, None
        if pending is None:
            return
        executed = [
            ExecutedCommand(
                target=command.target,
                gripper_open=command.gripper_open,
                completed=result.completed,
                reached=result.reached,
                error_m=result.error_m,
                duration_s=result.duration_s,
                note=result.note,
            )
            for command, result in zip(event.commands, event.results)
        ]
        commands = event.commands
        self._append(stage="action", state=pending.state, executed=executed,
                     action=commands[0].source.as_list() if commands else None, **pending.fields())

    def on_step_verified(self, event: StepVerified) -> None:
        self._append(
            stage="verify",
            state=event.state,
            image=self._frame(event.frame, tag="after"),
            subtask_index=event.subtask_index,
            subtask=event.subtask,
            verifier=VerifierRecord(**event.verdict.to_dict()),
        )

    def on_episode_ended(self, event: EpisodeEnded) -> None:
        result = event.result
        if self._pending_action is not None:  # stopped between the limiter and execution
            pending, self._pending_action = self._pending_action, None
            try:
                self._append(stage="action", state=pending.state, error="not executed: " + result.detail,
                             **pending.fields())
            except EpisodeWriteError as exc:  # the outcome below matters more than this record
                log.error("episode=%s event=record_failed stage=action error=%r", self.writer.episode_id, str(exc))
        meta_extra = {
            "subtasks": list(result.subtasks),
            "completed_subtasks": result.completed_subtasks,
            "steps": result.steps,
            "retries": result.retries,
            "duration_s": result.duration_s,
        }
        try:
            self.writer.finish(result.outcome, result.detail, extra=meta_extra)
        except EpisodeWriteError as exc:  # meta.json keeps outcome null: the episode reads as interrupted
            log.error(
                "episode=%s event=finish_failed outcome=%s error=%r", self.writer.episode_id, result.outcome, str(exc)
            )

    # --- helpers -----------------------------------------------------------------------------------

    def _frame(self, frame: Frame | None, tag: str | None = None) -> str | None:
        if frame is None or not self.record_frames:
            return None
        return self.writer.write_frame(frame.image, tag=tag)

    def _append(self, *, stage: str, state: ArmState | None, image: str | None = None, **fields: Any) -> None:
        images = {}
        if image is not None and image.endswith("_after.jpg"):
            images, image = {"after": image}, None
        record = StepRecord(
            index=self.writer.next_index,
            t=self.writer.elapsed(),
            wall_time=time.time(),
            ee_position=state.position if state else None,
            ee_rpy=state.rpy if state else None,
            gripper_open=state.gripper_open if state else None,
            stage=stage,
            image=image,
            images=images,
            **fields,
        )
        self.writer.append_step(record)


class ProgressPrinter(LoopEventHandler):
    """Live one-line-per-event progress for a terminal (subtasks, plans, actions, safety, verdicts)."""

    def __init__(self, out: TextIO | None = None, echo: Callable[[str], None] | None = None) -> None:
        self._echo = echo or (lambda line: print(line, file=out, flush=True))

    def _line(self, t: float, text: str) -> None:
        self._echo(f"[{t:6.1f}s] {text}")

    def on_episode_started(self, event: EpisodeStarted) -> None:
        self._line(event.t, f"instruction: {event.instruction}  (model {event.bundle_id})")

    def on_subtasks_planned(self, event: SubtasksPlanned) -> None:
        self._line(event.t, "subtasks: " + " -> ".join(event.subtasks))

    def on_subtasks_rejected(self, event: SubtasksRejected) -> None:
        self._line(event.t, f"subtasks: model output rejected: {event.error}")

    def on_step_planned(self, event: StepPlanned) -> None:
        retry = " (retry)" if event.retry else ""
        plan = event.step.motion.text
        self._line(event.t, f"subtask {event.subtask_index + 1}{retry} '{event.subtask}': plan: {plan}")
        self._line(event.t, f"  actions: {_short(event.step.action_output.raw_text)}")

    def on_step_rejected(self, event: StepRejected) -> None:
        retry = " (retry)" if event.retry else ""
        self._line(event.t, f"subtask {event.subtask_index + 1}{retry}: model output rejected: {event.error}")

    def on_safety_checked(self, event: SafetyChecked) -> None:
        verdict = event.verdict
        notes = [f"{x.rule} {x.verdict}" for x in verdict.decisions]
        if notes or verdict.rejected:
            reason = f" ({verdict.reason})" if verdict.reason else ""
            self._line(event.t, f"  safety: {', '.join(notes) or 'rejected'}{reason}")

    def on_step_verified(self, event: StepVerified) -> None:
        v = event.verdict
        via = v.verifier + (f" after {v.fallback_from} failed" if v.fallback_from else "")
        self._line(event.t, f"  verdict: {'done' if v.success else 'not done'} ({via}): {v.reason}")

    def on_episode_ended(self, event: EpisodeEnded) -> None:
        self._line(event.t, f"outcome: {event.result.outcome}: {event.result.detail}")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
