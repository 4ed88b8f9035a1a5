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
from typing import Any, Callable, TextIO

from vlm2vla_edge.runtime.episode import (
    EpisodeWriteError,
    EpisodeWriter,
    ExecutedCommand,
    SafetyRecord,
    StepRecord,
    VerifierRecord,
)
from vlm2vla_edge.runtime.policy.interface import StageOutput, StepResult
from vlm2vla_edge.runtime.robot.base import ArmState, Frame
from vlm2vla_edge.runtime.runner import EpisodeHalt, EpisodeResult, RunnerEvent

log = logging.getLogger(__name__)


class EpisodeRecorder:
    """Writes every loop event of one episode with an `EpisodeWriter`, and finishes it with the outcome."""

    def __init__(self, writer: EpisodeWriter, record_frames: bool = True) -> None:
        self.writer = writer
        self.record_frames = record_frames
        self._pending_action: dict[str, Any] | None = None

    def on_event(self, event: RunnerEvent) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is None:
            return
        try:
            handler(event.data)
        except EpisodeWriteError as exc:
            raise EpisodeHalt(f"the episode cannot be recorded: {exc}") from exc

    # --- events ------------------------------------------------------------------------------------

    def _on_subtasks(self, data: dict[str, Any]) -> None:
        if "error" in data:
            self._append(
                stage="subtasks", state=data["state"], image=self._frame(data["frame"]),
                error=data["error"], raw_text=data.get("raw_text"),
            )
            return
        output: StageOutput | None = data["output"]  # None: the list was given, not generated
        self._append(
            stage="subtasks",
            state=data["state"],
            image=self._frame(data["frame"]),
            prompt=output.prompt if output is not None else None,
            raw_text=output.raw_text if output is not None else None,
            subtasks=list(data["subtasks"]),
            timings=output.timings if output is not None else None,
        )

    def _on_step(self, data: dict[str, Any]) -> None:
        state: ArmState = data["state"]
        image = self._frame(data["frame"])
        common = {"subtask_index": data["subtask_index"], "subtask": data["subtask"], "extra": {"retry": data["retry"]}}
        if "error" in data:
            self._append(stage="action", state=state, image=image, error=data["error"], raw_text=data.get("raw_text"), **common)
            return
        step: StepResult = data["step"]
        self._append(
            stage="motion",
            state=state,
            image=image,
            prompt=step.motion_output.prompt,
            raw_text=step.motion_output.raw_text,
            motion_plan=step.motion.text,
            timings=step.motion_output.timings,
            **common,
        )
        # The action record waits for the limiter's decisions and the executed commands.
        self._pending_action = {
            "state": state,
            "image": image,
            "prompt": step.action_output.prompt,
            "raw_text": step.action_output.raw_text,
            "motion_plan": step.motion.text,
            "parsed_actions": step.chunk.as_lists(),
            "timings": step.action_output.timings,
            "subtask_index": data["subtask_index"],
            "subtask": data["subtask"],
            "extra": {"retry": data["retry"], "postprocessed": data["postprocessed"].as_lists()},
        }

    def _on_safety(self, data: dict[str, Any]) -> None:
        if self._pending_action is None:
            return
        verdict = data["verdict"]
        decisions = list(verdict.decisions)  # the chunk's list already holds every command's own decisions
        self._pending_action["safety"] = [SafetyRecord(**d.to_dict()) for d in decisions]
        self._pending_action["extra"]["safety_rejected"] = verdict.rejected
        if verdict.reason:
            self._pending_action["extra"]["safety_reason"] = verdict.reason

    def _on_executed(self, data: dict[str, Any]) -> None:
        pending, self._pending_action = self._pending_action, None
        if pending is None:
            return
        executed = []
        for command, result in zip(data["commands"], data["results"]):
            executed.append(
                ExecutedCommand(
                    target=command.target,
                    gripper_open=command.gripper_open,
                    completed=result.completed,
                    reached=result.reached,
                    error_m=result.error_m,
                    duration_s=result.duration_s,
                    note=result.note,
                )
            )
        state = pending.pop("state")
        commands = data["commands"]
        self._append(stage="action", state=state, executed=executed,
                     action=commands[0].source.as_list() if commands else None, **pending)

    def _on_verified(self, data: dict[str, Any]) -> None:
        verdict = data["verdict"]
        image = self._frame(data["frame"], tag="after")
        self._append(
            stage="verify",
            state=data["state"],
            image=image,
            subtask_index=data["subtask_index"],
            subtask=data["subtask"],
            verifier=VerifierRecord(**verdict.to_dict()),
        )

    def _on_episode_end(self, data: dict[str, Any]) -> None:
        if self._pending_action is not None:  # stopped between the limiter and execution
            pending, self._pending_action = self._pending_action, None
            state = pending.pop("state")
            try:
                self._append(stage="action", state=state, error="not executed: " + data["detail"], **pending)
            except EpisodeWriteError as exc:  # the outcome below matters more than this record
                log.error("episode=%s event=record_failed stage=action error=%r", self.writer.episode_id, str(exc))
        result: EpisodeResult = data["result"]
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
            log.error("episode=%s event=finish_failed outcome=%s error=%r", self.writer.episode_id, result.outcome, str(exc))

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


class ProgressPrinter:
    """Live one-line-per-event progress for a terminal (subtasks, plans, actions, safety, verdicts)."""

    def __init__(self, out: TextIO | None = None, echo: Callable[[str], None] | None = None) -> None:
        self._echo = echo or (lambda line: print(line, file=out, flush=True))

    def on_event(self, event: RunnerEvent) -> None:
        d, t = event.data, f"[{event.t:6.1f}s]"
        if event.kind == "episode_start":
            self._echo(f"{t} instruction: {d['instruction']}  (model {d['bundle_id']})")
        elif event.kind == "subtasks":
            if "error" in d:
                self._echo(f"{t} subtasks: model output rejected: {d['error']}")
            else:
                self._echo(f"{t} subtasks: " + " -> ".join(d["subtasks"]))
        elif event.kind == "step":
            retry = " (retry)" if d["retry"] else ""
            if "error" in d:
                self._echo(f"{t} subtask {d['subtask_index'] + 1}{retry}: model output rejected: {d['error']}")
                return
            step: StepResult = d["step"]
            self._echo(f"{t} subtask {d['subtask_index'] + 1}{retry} '{d['subtask']}': plan: {step.motion.text}")
            self._echo(f"{t}   actions: {_short(step.action_output.raw_text)}")
        elif event.kind == "safety":
            verdict = d["verdict"]
            notes = [f"{x.rule} {x.verdict}" for x in verdict.decisions]
            if notes or verdict.rejected:
                self._echo(f"{t}   safety: {', '.join(notes) or 'rejected'}" + (f" ({verdict.reason})" if verdict.reason else ""))
        elif event.kind == "verified":
            v = d["verdict"]
            via = v.verifier + (f" after {v.fallback_from} failed" if v.fallback_from else "")
            self._echo(f"{t}   verdict: {'done' if v.success else 'not done'} ({via}): {v.reason}")
        elif event.kind == "episode_end":
            self._echo(f"{t} outcome: {d['outcome']}: {d['detail']}")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
