"""The paper's closed loop, one episode at a time.

    capture o0 -> subtasks (fixed for the episode)
    for each subtask:
        capture -> motion plan -> action chunk -> parse -> post-process -> safety limiter
        -> execute on the arm -> capture -> verify -> next subtask, or retry (bounded, hotter sampling)

Policy, arm, camera, verifier and limiter come in through their interfaces; the recorder, the live
progress printer and the daemon's event stream are subscribers (`EpisodeSubscriber`) of the typed
events in `runtime/events.py`, so the loop itself neither writes files nor prints. Whatever happens,
`finally` stops the arm; cancel and e-stop are observed between decode steps and between motion
segments.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from pydantic import Field

from vlm2vla_edge.runtime.config import StrictModel
from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError
from vlm2vla_edge.runtime.events import (
    CommandsExecuted,
    EpisodeEnded,
    EpisodeHalt,
    EpisodeResult,
    EpisodeStarted,
    EpisodeSubscriber,
    LoopEvent,
    Outcome,
    SafetyChecked,
    StepPlanned,
    StepRejected,
    StepVerified,
    SubtasksPlanned,
    SubtasksRejected,
)
from vlm2vla_edge.runtime.parser import ParseError
from vlm2vla_edge.runtime.policy.interface import (
    GenerationCancelled,
    Observation,
    Policy,
    PolicyOutputError,
    StepResult,
)
from vlm2vla_edge.runtime.postprocess import postprocess_chunk
from vlm2vla_edge.runtime.robot.base import Arm, ArmState, Camera, DeviceError, Frame, MoveResult
from vlm2vla_edge.runtime.safety import ChunkVerdict, EStopEngaged, SafetyLimiter, SafetyViolation
from vlm2vla_edge.runtime.verifier.base import Verdict, VerificationRequest, Verifier

log = logging.getLogger(__name__)


class RunnerConfig(StrictModel):
    """Budgets of one episode."""

    max_retries_per_subtask: int = Field(
        3, ge=0, le=20, description="Failed attempts allowed before the episode fails."
    )
    max_steps: int = Field(40, ge=1, le=1000, description="Policy steps allowed in one episode, all subtasks together.")
    episode_timeout_s: float = Field(600.0, gt=0, description="Wall-clock budget of one episode.")
    camera_timeout_s: float = Field(2.0, gt=0, le=60, description="Longest wait for one camera frame.")
    max_subtasks: int = Field(8, ge=1, le=8, description="Subtasks beyond this are dropped (v1 grammar: 8).")


@dataclass(frozen=True, slots=True)
class SceneHooks:
    """Optional knowledge the loop can pass on: a scene description for text-only policies (the simulator
    writes one; a real robot has none) and where the gripper appears in the image (verifier hint)."""

    describe: Callable[[], str] | None = None
    gripper_pixel: Callable[[ArmState], tuple[float, float] | None] | None = None


@dataclass(slots=True)
class _Progress:
    """Where the episode stands: what `EpisodeResult` reports however the episode ends."""

    subtasks: tuple[str, ...] = ()
    done: int = 0  # subtasks verified
    steps: int = 0  # policy steps taken (attempts), all subtasks together
    retries: int = 0  # failed attempts
    latency_s: dict[str, list[float]] = field(
        default_factory=lambda: {"subtasks": [], "motion": [], "action": [], "execute": [], "verify": []}
    )


class _Stop(Exception):
    """Internal: leave the loop with an outcome."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class EpisodeRunner:
    """Runs episodes on one policy, arm, camera, verifier and limiter. One episode at a time;
    `cancel()` and `estop()` may be called from any thread."""

    def __init__(
        self,
        policy: Policy,
        arm: Arm,
        camera: Camera,
        verifier: Verifier,
        limiter: SafetyLimiter,
        config: RunnerConfig | None = None,
        hooks: SceneHooks | None = None,
        subscribers: list[EpisodeSubscriber] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.arm = arm
        self.camera = camera
        self.verifier = verifier
        self.limiter = limiter
        self.config = config or RunnerConfig()
        self.hooks = hooks or SceneHooks()
        self.subscribers = list(subscribers or [])
        self._clock = clock
        self._cancel = threading.Event()
        self._stop_reason: str | None = None
        self._busy = threading.Lock()
        self._t0 = 0.0
        if not policy.needs_image and self.hooks.describe is None:
            raise UserError(
                "this model bundle is text-only and needs a scene description, which only the simulator provides; "
                "use a vision bundle on a real robot"
            )

    # --- control from other threads ----------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the episode as soon as possible (between decode steps or motion segments); arm holds."""
        self._stop_reason = self._stop_reason or reason
        self._cancel.set()
        self.arm.stop()

    def estop(self, reason: str = "e-stop") -> None:
        """Latch the limiter's e-stop (nothing moves until its reset), halt the arm, end the episode."""
        self.limiter.estop(reason)
        self.cancel(f"e-stop: {reason}")

    @property
    def running(self) -> bool:
        return self._busy.locked()

    # --- the loop ------------------------------------------------------------------------------------

    def run(self, instruction: str, subtasks: Sequence[str] | None = None) -> EpisodeResult:
        """One episode. `subtasks` skips the subtask stage and works through the given list instead (the
        per-subtask evaluation starts a policy on one subtask from an expert's state)."""
        instruction = " ".join(instruction.split())
        if not instruction:
            raise UserError("the instruction is empty")
        if not self._busy.acquire(blocking=False):
            raise UserError("an episode is already running")
        self._cancel.clear()
        self._stop_reason = None
        self._t0 = self._clock()
        progress = _Progress()
        result: EpisodeResult | None = None
        try:
            self._emit(EpisodeStarted(t=self._elapsed(), instruction=instruction, bundle_id=self.policy.bundle_id))
            if self.limiter.engaged:
                raise _Stop("aborted", f"the e-stop is engaged ({self.limiter.estop_reason}); reset it first")
            result = self._episode(instruction, progress, subtasks)
        except _Stop as stop:
            result = self._result(stop.outcome, stop.detail, progress)
        except (GenerationCancelled, EStopEngaged) as exc:
            result = self._result("aborted", self._stop_reason or str(exc), progress)
        except PolicyOutputError as exc:  # no usable subtask list: nothing to attempt
            result = self._result("failed", str(exc), progress)
        except EpisodeHalt as exc:
            log.error("episode halted by a subscriber error=%r", str(exc))
            result = self._result("error", str(exc), progress)
        except (DeviceError, Vlm2VlaError) as exc:
            log.error("episode error=%r", str(exc))
            result = self._result("error", f"{type(exc).__name__}: {exc}", progress)
        except Exception as exc:  # a bug must still end with the arm stopped and the episode recorded
            log.exception("episode crashed")
            result = self._result("error", f"internal error: {type(exc).__name__}: {exc}", progress)
        finally:
            try:
                self.arm.stop()
            except Exception as exc:  # noqa: BLE001 - keep going: the outcome must still be reported
                log.error("arm stop failed error=%r", str(exc))
            if result is None:  # KeyboardInterrupt / SystemExit: still tell the subscribers
                result = self._result("aborted", "interrupted", progress)
            self._emit(EpisodeEnded(t=self._elapsed(), result=result))
            self._busy.release()
        return result

    def _episode(
        self, instruction: str, progress: _Progress, given: Sequence[str] | None = None
    ) -> EpisodeResult:
        cfg = self.config
        frame, state = self._observe()
        if given is not None:
            subtasks = tuple(given)[: cfg.max_subtasks]
            if not subtasks:
                raise UserError("the given subtask list is empty")
            progress.subtasks = subtasks
            self._emit(SubtasksPlanned(t=self._elapsed(), subtasks=subtasks, output=None, frame=frame, state=state))
        else:
            began = self._clock()
            try:
                planned = self.policy.subtasks(self._observation(frame), instruction, cancel=self._cancel)
            except PolicyOutputError as exc:  # recorded (raw text included) before the episode ends as failed
                progress.latency_s["subtasks"].append(self._clock() - began)
                self._emit(
                    SubtasksRejected(t=self._elapsed(), error=str(exc), raw_text=exc.text, frame=frame, state=state)
                )
                raise
            progress.latency_s["subtasks"].append(self._clock() - began)
            subtasks = tuple(planned.subtasks)[: cfg.max_subtasks]
            progress.subtasks = subtasks
            self._emit(
                SubtasksPlanned(t=self._elapsed(), subtasks=subtasks, output=planned.output, frame=frame, state=state)
            )

        for index, subtask in enumerate(subtasks):
            next_subtask = subtasks[index + 1] if index + 1 < len(subtasks) else None
            failures = 0
            while True:
                self._check_budget(progress)
                progress.steps += 1
                verdict = self._attempt(instruction, index, subtask, next_subtask, failures > 0, progress.latency_s)
                if verdict.success:
                    progress.done = index + 1
                    break
                failures += 1
                progress.retries += 1
                if failures > cfg.max_retries_per_subtask:
                    raise _Stop(
                        "failed",
                        f"subtask {index + 1} '{subtask}' failed {failures} times; last verdict: {verdict.reason}",
                    )
        return self._result("success", f"all {len(subtasks)} subtasks verified", progress)

    def _attempt(
        self,
        instruction: str,
        index: int,
        subtask: str,
        next_subtask: str | None,
        retry: bool,
        latencies: dict[str, list[float]],
    ) -> Verdict:
        """One step of one subtask; returns the verifier's verdict (a failed one for unusable output)."""
        frame, pre_state = self._observe()
        began = self._clock()
        try:
            step: StepResult = self.policy.step(
                self._observation(frame), instruction, subtask, retry=retry, cancel=self._cancel
            )
        except (PolicyOutputError, ParseError) as exc:  # the grammar prevents most; a token budget can still cut
            # the failed generation took time too: leaving it out would flatter the latency percentiles
            failed_stage = getattr(exc, "stage", "action")
            latencies["motion" if failed_stage == "motion" else "action"].append(self._clock() - began)
            text = getattr(exc, "text", None)
            self._emit(StepRejected(
                t=self._elapsed(), subtask_index=index, subtask=subtask, retry=retry, error=str(exc), raw_text=text,
                frame=frame, state=pre_state,
            ))
            return self._unverified(f"unusable model output: {exc}")
        elapsed = self._clock() - began
        motion_s = step.motion_output.timings.get("total_s")
        action_s = step.action_output.timings.get("total_s")
        latencies["motion"].append(motion_s if motion_s is not None else elapsed / 2)
        latencies["action"].append(action_s if action_s is not None else elapsed / 2)
        chunk = postprocess_chunk(
            step.chunk, self.policy.action_language, self.limiter.robot.limits, pre_state.gripper_open
        )
        self._emit(StepPlanned(
            t=self._elapsed(), subtask_index=index, subtask=subtask, retry=retry, step=step, postprocessed=chunk,
            frame=frame, state=pre_state,
        ))
        verdict_of_limiter = self.limiter.check_chunk(chunk, pre_state.position)
        self._emit(SafetyChecked(t=self._elapsed(), subtask_index=index, verdict=verdict_of_limiter))
        began = self._clock()
        results = self._execute(verdict_of_limiter)
        latencies["execute"].append(self._clock() - began)
        post_frame, post_state = self._observe()
        self._emit(CommandsExecuted(
            t=self._elapsed(), subtask_index=index, commands=verdict_of_limiter.commands, results=tuple(results),
            state=post_state,
        ))
        if verdict_of_limiter.rejected and not verdict_of_limiter.commands:
            verdict = self._unverified(f"safety limiter rejected the chunk: {verdict_of_limiter.reason}")
        else:
            request = VerificationRequest(
                instruction=instruction,
                subtask=subtask,
                next_subtask=next_subtask,
                motion_plan=step.motion.text,
                pre_image=frame.image,
                post_image=post_frame.image,
                pre_state=pre_state,
                post_state=post_state,
                commanded_translation=_executed_translation(verdict_of_limiter, results),
                gripper_change=_gripper_change(pre_state, verdict_of_limiter, results),
                gripper_pixel=self.hooks.gripper_pixel(post_state) if self.hooks.gripper_pixel else None,
                scene_after=self.hooks.describe() if self.hooks.describe else None,
            )
            began = self._clock()
            verdict = self.verifier.verify(request, cancel=self._cancel)
            latencies["verify"].append(self._clock() - began)
            if verdict.cancelled:
                raise GenerationCancelled("cancelled during verification")
            if verdict_of_limiter.rejected and verdict.success:
                # Part of the chunk was refused; the verifier judged what did run. Keep its verdict, but say so.
                verdict = dataclasses.replace(
                    verdict, reason=f"{verdict.reason} (chunk partly rejected: {verdict_of_limiter.reason})"
                )
        self._emit(StepVerified(
            t=self._elapsed(), subtask_index=index, subtask=subtask, verdict=verdict, frame=post_frame, state=post_state
        ))
        return verdict

    def _execute(self, verdict: ChunkVerdict) -> list[MoveResult]:
        results: list[MoveResult] = []
        for command in verdict.commands:
            self._raise_if_cancelled()
            try:
                result = self.arm.execute(command, cancel=self._cancel)
            except SafetyViolation as exc:
                if isinstance(exc, EStopEngaged) or self.limiter.engaged:
                    raise
                raise DeviceError(f"arm refused a command: {exc}") from exc
            results.append(result)
            if not result.completed:
                self._raise_if_cancelled()
                break  # stopped short (the driver said why in result.note): verify what happened
        return results

    # --- helpers -----------------------------------------------------------------------------------

    def _raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise GenerationCancelled(self._stop_reason or "cancelled")

    def _observe(self) -> tuple[Frame, ArmState]:
        self._raise_if_cancelled()
        frame = self.camera.read(timeout_s=self.config.camera_timeout_s)
        return frame, self.arm.read_state()

    def _observation(self, frame: Frame) -> Observation:
        if self.policy.needs_image:
            return Observation(image=frame.image)
        assert self.hooks.describe is not None  # checked in __init__
        return Observation(image=frame.image, scene=self.hooks.describe())

    def _check_budget(self, progress: _Progress) -> None:
        self._raise_if_cancelled()
        if progress.steps >= self.config.max_steps:
            raise _Stop("failed", f"step budget of {self.config.max_steps} steps used up")
        if self._clock() - self._t0 > self.config.episode_timeout_s:
            raise _Stop("failed", f"time budget of {self.config.episode_timeout_s:.0f} s used up")

    def _unverified(self, reason: str) -> Verdict:
        return Verdict(success=False, reason=reason, verifier="runner", latency_s=0.0, attempts=0)

    def _result(self, outcome: Outcome, detail: str, progress: _Progress) -> EpisodeResult:
        return EpisodeResult(
            outcome=outcome,
            detail=detail,
            subtasks=progress.subtasks,
            completed_subtasks=progress.done,
            steps=progress.steps,
            retries=progress.retries,
            duration_s=self._elapsed(),
            stage_latency_s={k: list(v) for k, v in progress.latency_s.items()},
        )

    def _elapsed(self) -> float:
        """Seconds since the episode start: every event's `t`."""
        return self._clock() - self._t0

    def _emit(self, event: LoopEvent) -> None:
        """Every subscriber sees the event; an `EpisodeHalt` is raised after all of them did (never
        for `EpisodeEnded`: the episode is over by then)."""
        kind = event.kind
        halt: EpisodeHalt | None = None
        for subscriber in self.subscribers:
            try:
                subscriber.on_event(event)
            except EpisodeHalt as exc:
                if isinstance(event, EpisodeEnded):
                    log.error("subscriber %s failed on %s error=%r", type(subscriber).__name__, kind, str(exc))
                else:
                    halt = halt or exc
            except Exception:  # logged, not raised: a broken printer must not stop a robot mid-episode
                log.exception("subscriber %s failed on %s", type(subscriber).__name__, kind)
        if halt is not None:
            raise halt


def _executed_translation(verdict: ChunkVerdict, results: list[MoveResult]) -> tuple[float, float, float]:
    total = [0.0, 0.0, 0.0]
    for command, _ in zip(verdict.commands, results):
        for axis, value in enumerate(command.delta):
            total[axis] += value
    return (total[0], total[1], total[2])


def _gripper_change(pre: ArmState, verdict: ChunkVerdict, results: list[MoveResult]) -> Literal["close", "open"] | None:
    executed = [c for c, r in zip(verdict.commands, results) if r.completed]
    if not executed:
        return None
    last = executed[-1].gripper_open
    if last == pre.gripper_open:
        return None
    return "open" if last else "close"

