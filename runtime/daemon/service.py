"""The daemon's core, without any HTTP: one loaded policy, one connected station, one episode at a time.

Tasks are episodes submitted by clients. Each runs on its own worker thread through the one
`EpisodeRunner`; its events go to the recorder (on disk), the task's event log (streamed to clients),
the metrics and the journal. `estop()` may come from any thread at any time and latches the limiter;
`shutdown()` (SIGTERM) stops the episode, then parks the arm in its safe pose unless the e-stop is
latched (a latched e-stop means nothing moves, not even to park).

A daemon whose model bundle could not be loaded still runs (`policy=None`, `policy_error` says why):
health and status report it unhealthy with the reason, tasks are refused, and the e-stop keeps
working. Exiting instead would make systemd restart it in a loop that fixes nothing. At start the
daemon records outcome "interrupted" in episodes a killed predecessor left unfinished.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm2vla_edge.runtime import __version__
from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.daemon.events import TaskEventLog, event_json, result_json
from vlm2vla_edge.runtime.daemon.metrics import DaemonMetrics
from vlm2vla_edge.runtime.episode import EpisodeWriteError, EpisodeWriter, mark_interrupted
from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError
from vlm2vla_edge.runtime.events import EpisodeHalt, EpisodeResult, EpisodeSubscriber, LoopEvent
from vlm2vla_edge.runtime.policy.interface import Policy
from vlm2vla_edge.runtime.recording import EpisodeRecorder
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.runtime.station import Station, episode_meta
from vlm2vla_edge.runtime.verifier.base import Verifier

log = logging.getLogger(__name__)

TaskState = Literal["running", "finished"]

#: Bidirectional-text and other invisible format characters that can disguise an instruction.
_DISGUISING = {
    "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
}
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


class DaemonBusy(Vlm2VlaError):
    """An episode is already running (HTTP 409)."""


class EStopLatched(Vlm2VlaError):
    """The e-stop is latched; nothing runs until a reset (HTTP 423)."""


class ServiceStopping(Vlm2VlaError):
    """The daemon is shutting down and takes no new work (HTTP 503)."""


class Unavailable(Vlm2VlaError):
    """No task can run now: no usable model, or the arm or camera is not connected (HTTP 503)."""


class CannotRecord(Vlm2VlaError):
    """The episode folder cannot be created (disk full, read-only disk): no task runs unrecorded (HTTP 507)."""


class InvalidRequest(UserError):
    """A request the API refuses as malformed (HTTP 400)."""


def validate_instruction(text: object, max_chars: int) -> str:
    """The instruction as the runner will see it, or `InvalidRequest` with the reason in one sentence."""
    if not isinstance(text, str):
        raise InvalidRequest("'instruction' must be a string")
    for ch in text:
        category = unicodedata.category(ch)
        if ch in _DISGUISING or (category in ("Cc", "Cs", "Co", "Cn") and ch not in "\t\n\r"):
            raise InvalidRequest(f"the instruction contains a control or invisible character (U+{ord(ch):04X})")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InvalidRequest("the instruction is empty")
    if len(cleaned) > max_chars:
        raise InvalidRequest(f"the instruction is {len(cleaned)} characters long; the limit is {max_chars}")
    return cleaned


def validate_adapter(name: object, known: tuple[str, ...]) -> str | None:
    """The adapter a task asked for (None: the bundle's default), or `InvalidRequest` naming the choices."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidRequest("'adapter' must be a string (the name of one of the bundle's adapters)")
    if not known:
        raise InvalidRequest(
            f"the loaded model bundle has no adapters (its model is merged), so no adapter '{_printable(name)}'"
        )
    if name not in known:
        raise InvalidRequest(
            f"the loaded model bundle has no adapter '{_printable(name)}'; its adapters: {', '.join(known)}"
        )
    return name


def _printable(text: str, limit: int = 64) -> str:
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def valid_task_id(text: str) -> bool:
    return bool(_TASK_ID.match(text))


@dataclass
class Task:
    """One submitted episode and what became of it."""

    id: str
    instruction: str
    submitted_at: float  # wall time
    events: TaskEventLog
    episode_dir: Path
    adapter: str | None = None  # the bundle's LoRA adapter the task runs with (None: a merged model)
    state: TaskState = "running"
    result: EpisodeResult | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instruction": self.instruction,
            "adapter": self.adapter,
            "state": self.state,
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
            "episode": self.id,
            "result": result_json(self.result) if self.result is not None else None,
        }


class _Fanout:
    """The runner's per-episode subscribers (recorder, event log), swapped in for each task."""

    def __init__(self) -> None:
        self.targets: list[EpisodeSubscriber] = []

    def on_event(self, event: LoopEvent) -> None:
        halt: EpisodeHalt | None = None
        for target in self.targets:
            try:
                target.on_event(event)
            except EpisodeHalt as exc:  # passed on to the runner once every target has the event
                halt = halt or exc
            except Exception:  # logged, not raised: one broken subscriber must not starve the others
                log.exception("subscriber %s failed on %s", type(target).__name__, event.kind)
        if halt is not None:
            raise halt


class _JournalLines:
    """One log line per loop event (journald-friendly, no images, no prompts)."""

    def __init__(self, daemon: "Daemon") -> None:
        self._daemon = daemon

    def on_event(self, event: LoopEvent) -> None:
        data = event_json(event)
        task = self._daemon.current_task_id or "-"
        data.pop("kind", None)
        data.pop("state", None)
        log.info("task=%s event=%s %s", task, event.kind, json.dumps(data, ensure_ascii=False, separators=(",", ":")))


class Daemon:
    """Holds the policy and the station for the daemon's life; runs one task at a time."""

    def __init__(
        self,
        policy: Policy | None,
        station: Station,
        verifier: Verifier,
        *,
        robot: RobotConfig,
        episodes_dir: Path,
        config: DaemonConfig,
        runner_config: RunnerConfig | None = None,
        record_frames: bool = True,
        sim_seed: int = 0,
        metrics: DaemonMetrics | None = None,
        policy_error: str | None = None,
    ) -> None:
        if policy is None and not policy_error:
            raise ValueError("a daemon without a policy needs policy_error: why the model is not loaded")
        self.policy = policy
        self.policy_error = policy_error if policy is None else None
        self.station = station
        self.robot = robot
        self.episodes_dir = Path(episodes_dir)
        self.config = config
        self.record_frames = record_frames
        self.metrics = metrics or DaemonMetrics()
        self._fanout = _Fanout()
        self.runner: EpisodeRunner | None = None if policy is None else EpisodeRunner(
            policy, station.arm, station.camera, verifier, station.limiter,
            config=runner_config, hooks=station.hooks,
            subscribers=[self._fanout, self.metrics, _JournalLines(self)],
        )
        if self.adapters and self.adapter is not None:
            self.metrics.adapter_applied(self.adapter, self.adapters)
        # Episodes a killed predecessor left unfinished (outcome null): say so on disk, once.
        mark_interrupted(self.episodes_dir)
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._current: Task | None = None
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._episodes = 0
        self._sim_seed = sim_seed
        self._adapter_switches = 0
        self._last_switch_s: float | None = None
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()

    # --- tasks ---------------------------------------------------------------------------------

    @property
    def current_task_id(self) -> str | None:
        current = self._current
        return current.id if current is not None and current.state == "running" else None

    @property
    def adapters(self) -> tuple[str, ...]:
        """The loaded bundle's adapters (skills); empty for a merged model or no model."""
        return tuple(getattr(self.policy, "adapters", ()))  # fakes and merged models have none

    @property
    def adapter(self) -> str | None:
        """The adapter applied now."""
        return getattr(self.policy, "adapter", None)

    def submit(self, instruction: str, adapter: str | None = None) -> Task:
        """Start an episode on the worker thread; `DaemonBusy`, `EStopLatched` or `ServiceStopping` if not now.

        `adapter` names one of the bundle's LoRA adapters (None: the bundle's default); switching is done
        here, between episodes, in milliseconds: the base model stays loaded.
        """
        instruction = validate_instruction(instruction, self.config.max_instruction_chars)
        adapter = validate_adapter(adapter, self.adapters)
        with self._lock:
            if self._stopping:
                raise ServiceStopping("the daemon is shutting down")
            if self._current is not None and self._current.state == "running":
                raise DaemonBusy(f"task {self._current.id} is running; wait for it or stop it first")
            if self.station.limiter.engaged:
                raise EStopLatched(f"the e-stop is latched ({self.station.limiter.estop_reason}); reset it first")
            healthy, why = self.health()
            if not healthy or self.policy is None or self.runner is None:
                raise Unavailable(f"cannot run a task: {why}")
            if self.adapters:
                wanted = adapter or getattr(self.policy, "default_adapter", None) or self.adapters[0]
                if wanted != self.adapter:
                    seconds = self.policy.use_adapter(wanted)  # type: ignore[attr-defined]
                    self._adapter_switches += 1
                    self._last_switch_s = seconds
                    self.metrics.adapter_applied(wanted, self.adapters, seconds)
            seed = self._sim_seed + self._episodes
            try:
                writer = EpisodeWriter.create(
                    self.episodes_dir,
                    episode_meta(
                        instruction, self.robot, self.station, self.policy, seed=seed if self.station.sim else None
                    ),
                )
            except EpisodeWriteError as exc:
                cause = exc.__cause__
                reason = (cause.strerror if isinstance(cause, OSError) and cause.strerror else None) or str(exc)
                log.error("event=episode_create_failed error=%r", str(exc))
                raise CannotRecord(
                    f"cannot record a new episode ({reason}); free space in the episodes folder"
                ) from exc
            self._episodes += 1
            if self.station.set_table_for(instruction, seed):
                log.info("event=sim_scene_reset seed=%d", seed)
            task = Task(
                id=writer.episode_id, instruction=instruction, submitted_at=time.time(),
                events=TaskEventLog(self.config.events_per_task), episode_dir=writer.path, adapter=self.adapter,
            )
            self._tasks[task.id] = task
            self._forget_old_tasks()
            self._current = task
            self._fanout.targets = [EpisodeRecorder(writer, self.record_frames), task.events]
            self._worker = threading.Thread(
                target=self._run, args=(task, writer), name=f"episode-{task.id}", daemon=True
            )
            self._worker.start()
        log.info(
            "task=%s event=submitted adapter=%s instruction=%s", task.id, task.adapter or "-",
            json.dumps(instruction, ensure_ascii=False),
        )
        return task

    def _run(self, task: Task, writer: EpisodeWriter) -> None:
        result: EpisodeResult | None = None
        assert self.runner is not None  # submit() refuses tasks without a model
        try:
            result = self.runner.run(task.instruction)
        except Exception as exc:  # runner.run handles the loop's errors; this is a refusal
            log.exception("task=%s event=run_refused", task.id)
            result = EpisodeResult(outcome="error", detail=f"{type(exc).__name__}: {exc}")
            if not writer.finished:
                try:
                    writer.finish("error", result.detail)
                except EpisodeWriteError as finish_exc:  # the task's status still says what happened
                    log.error("task=%s event=finish_failed error=%r", task.id, str(finish_exc))
        finally:
            if result is None:
                result = EpisodeResult(outcome="aborted", detail="interrupted")
            task.result = result
            task.finished_at = time.time()
            task.state = "finished"
            task.events.close()
            writer.close()
            task.done.set()
            log.info("task=%s event=finished outcome=%s", task.id, result.outcome)

    def _forget_old_tasks(self) -> None:
        finished = [t for t in self._tasks.values() if t.state == "finished"]
        for task in finished[: max(0, len(finished) - self.config.tasks_kept)]:
            del self._tasks[task.id]

    def task(self, task_id: str) -> Task | None:
        with self._lock:
            return self._tasks.get(task_id)

    def cancel(self, task_id: str, reason: str = "cancelled by the client") -> Task | None:
        """Stop one running task (the arm holds; nothing latches). None when there is no such task."""
        with self._lock:
            task = self._tasks.get(task_id)
        if task is not None and task.state == "running" and self.runner is not None:
            self.runner.cancel(reason)
            log.info("task=%s event=cancel reason=%s", task.id, json.dumps(reason, ensure_ascii=False))
        return task

    # --- e-stop --------------------------------------------------------------------------------

    def estop(self, reason: str = "e-stop requested over the API") -> None:
        """Latch the limiter and halt the arm now (preempts generation and motion); any thread."""
        if self.runner is not None:
            self.runner.estop(reason)
        else:  # no model, so no episode: latch and halt directly
            self.station.limiter.estop(reason)
            try:
                self.station.arm.stop()
            except Exception as exc:  # noqa: BLE001 - the latch holds whatever the arm says
                log.error("event=estop_arm_stop_failed error=%r", str(exc))
        self.metrics.count_estop()
        log.warning(
            "event=estop task=%s reason=%s", self.current_task_id or "-", json.dumps(reason, ensure_ascii=False)
        )

    def reset(self, wait_s: float = 5.0) -> None:
        """Release the e-stop latch once the stopped episode has ended (`DaemonBusy` if it does not)."""
        current = self._current
        if current is not None and not current.done.wait(wait_s):
            raise DaemonBusy(f"task {current.id} has not stopped yet; cannot reset while it runs")
        self.station.limiter.reset()
        log.warning("event=estop_reset")

    # --- state ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        limiter = self.station.limiter
        current = self._current
        healthy, why = self.health()
        state = "stopping" if self._stopping else "estop" if limiter.engaged else (
            "running" if current is not None and current.state == "running" else "idle" if healthy else "unhealthy"
        )
        try:
            arm = self.station.arm.read_state()
            arm_json: dict[str, Any] | None = {
                "position": [round(v, 4) for v in arm.position], "gripper_open": arm.gripper_open,
            }
        except Exception as exc:  # noqa: BLE001 - status must answer even when the arm does not
            arm_json = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        return {
            "state": state,
            "error": None if healthy else why,
            "estop": {"engaged": limiter.engaged, "reason": limiter.estop_reason},
            "task": current.to_json() if current is not None else None,
            "bundle_id": self.policy.bundle_id if self.policy is not None else None,
            "adapter": self.adapter,
            "adapters": list(self.adapters),
            "adapter_switches": self._adapter_switches,
            "last_adapter_switch_ms": round(self._last_switch_s * 1000, 2) if self._last_switch_s is not None else None,
            "robot": self.robot.name,
            "camera": self.station.camera_name,
            "sim": self.station.sim is not None,
            "arm": arm_json,
            "episodes": self._episodes,
            "uptime_s": round(time.monotonic() - self._started_monotonic, 1),
            "version": __version__,
        }

    def health(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "stopping"
        if self.policy_error is not None:
            return False, f"no model loaded: {self.policy_error}"
        if not self.station.arm.is_connected:
            return False, "the arm is not connected"
        if not self.station.camera.is_connected:
            return False, "the camera is not connected"
        return True, "ok"

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- shutdown ------------------------------------------------------------------------------

    def shutdown(self, reason: str = "daemon stopping") -> None:
        """Refuse new tasks, stop the episode (recorded as aborted), then park the arm in its safe pose."""
        with self._lock:
            self._stopping = True
            current, worker = self._current, self._worker
        if current is not None and current.state == "running" and self.runner is not None:
            log.warning("task=%s event=shutdown_cancel", current.id)
            self.runner.cancel(reason)
        if worker is not None:
            worker.join(self.config.shutdown_timeout_s)
            if worker.is_alive():
                log.error("event=shutdown episode_still_running_after_s=%.1f", self.config.shutdown_timeout_s)
                self.station.arm.stop()
        self.park()

    def park(self) -> None:
        """Move to the configured safe pose; a latched e-stop keeps the arm where it is."""
        pose = self.config.safe_pose_on_shutdown
        limiter = self.station.limiter
        if pose == "hold" or limiter.engaged:
            log.warning("event=safe_pose pose=hold reason=%s", "estop_latched" if limiter.engaged else "configured")
            self.station.arm.stop()
            return
        log.info("event=safe_pose pose=%s", pose)
        try:
            (self.station.arm.go_sleep if pose == "sleep" else self.station.arm.go_home)()
        except Exception as exc:  # noqa: BLE001 - the process still exits cleanly; the arm holds
            log.error("event=safe_pose_failed error=%r", str(exc))
            self.station.arm.stop()
