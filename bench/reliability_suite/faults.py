"""Fault injection against the real daemon: each scenario breaks one part mid-episode (or at start) and
checks the four things a robot owner needs after any fault:

1. the arm is stopped safely: `stop()` was called after the fault, nothing is moving, and no arm
   command ran after the fault (those that did are counted as `unsafe_commands`);
2. the daemon still serves: `/v1/health` and `/v1/status` answer, and once the fault is gone the next
   task runs;
3. the task status carries a clear error: outcome "error" or "failed" with a detail naming the fault;
4. the episode is recorded: `EpisodeReader` reads the folder and finds an outcome.

Faults are injected at the interfaces, never by patching the code under test: wrappers around the
`Arm` and `Camera` (a command refused, the arm's link lost, a camera that times out or is unplugged),
the Gemini verifier against the local fake Gemini server (hanging, HTTP 500, garbage), a model bundle
that is missing or corrupted, a disk that fills up under the episode writer (ENOSPC from the one
low-level write the episode files go through), and SIGKILL of a daemon process mid-episode.

In-process scenarios run the product's `Daemon` and `ApiServer` on the non-real-time simulator
with a scripted policy (a second or two each); the model and SIGKILL scenarios start real daemon
processes (`vlm2vla-edge serve`, `python -m vlm2vla_edge.testing.fake_daemon`) and take longer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal
from unittest import mock

from vlm2vla_edge.runtime import episode as episode_module
from vlm2vla_edge.runtime import files as files_module
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonClient, DaemonUnavailable
from vlm2vla_edge.runtime.daemon.server import ApiServer
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.episode import EpisodeFormatError, EpisodeReader
from vlm2vla_edge.runtime.robot.base import (
    Arm,
    ArmState,
    Camera,
    CommandRefusedError,
    DeviceError,
    DeviceNotConnectedError,
    Frame,
    MoveResult,
)
from vlm2vla_edge.runtime.runner import RunnerConfig
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.runtime.sim.session import make_sim_session
from vlm2vla_edge.runtime.station import Station
from vlm2vla_edge.runtime.verifier.base import Verifier
from vlm2vla_edge.runtime.verifier.credentials import ApiKey
from vlm2vla_edge.runtime.verifier.fallback import FallbackVerifier
from vlm2vla_edge.runtime.verifier.gemini import GeminiConfig, GeminiVerifier
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier
from vlm2vla_edge.testing.daemon_process import DaemonProcess, write_config
from vlm2vla_edge.testing.gemini_server import FakeGeminiServer, Reply
from vlm2vla_edge.testing.policies import ScriptedPolicy

from .tally import Tally

INSTRUCTION = "put the carrot on the plate"
#: Two moves per chunk, out and back, so an episode has several arm commands to interrupt.
ACTIONS = ("[[0.03, 0, -0.02, 1], [0.03, 0, 0, 1]]", "[[-0.03, 0, 0.02, 0], [-0.03, 0, 0, 0]]")
RUNNER = RunnerConfig(max_retries_per_subtask=1, max_steps=10, camera_timeout_s=0.2)
#: Bounds on waits; generous, because a shared machine under load can be many times slower than idle.
TASK_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
_FAKE_KEY = "AIzaFAKE-reliability-0123456789abcdef"


# ---------------------------------------------------------------------------------------------- fault wrappers


class FaultyCamera(Camera):
    """A camera that, from its `fail_at`-th read on, times out (no frame within the timeout) or is unplugged."""

    def __init__(self, inner: Camera, fail_at: int, mode: Literal["timeout", "unplug"]) -> None:
        self.inner, self.fail_at, self.mode = inner, fail_at, mode
        self.reads = 0
        self.fault_at: float | None = None  # monotonic time of the first failed read
        self._healed = False

    def connect(self) -> None:
        self.inner.connect()

    def disconnect(self) -> None:
        self.inner.disconnect()

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected and not (self.mode == "unplug" and self.failing)

    @property
    def failing(self) -> bool:
        return self.fault_at is not None and not self._healed

    def heal(self) -> None:
        """The cable is back / the driver recovered."""
        self._healed = True

    def read(self, timeout_s: float = 1.0) -> Frame:
        self.reads += 1
        if self.reads >= self.fail_at and self.fault_at is None:
            self.fault_at = time.monotonic()
        if self.failing:
            if self.mode == "unplug":
                raise DeviceNotConnectedError("the camera was unplugged (USB device gone)")
            time.sleep(timeout_s)  # a driver waits its full budget before giving up
            raise DeviceError(f"no frame from the camera within {timeout_s:g} s (camera timed out)")
        return self.inner.read(timeout_s)


class WatchedArm(Arm):
    """Wraps an arm: records every stop and move, and can refuse a command or lose its link at the n-th move."""

    def __init__(
        self, inner: Arm, fail_at_move: int | None = None, mode: Literal["refuse", "disconnect"] = "refuse"
    ) -> None:
        self.inner, self.fail_at_move, self.mode = inner, fail_at_move, mode
        self.moves = 0
        self.moving = False
        self.stop_times: list[float] = []
        self.move_times: list[float] = []
        self.fault_at: float | None = None
        self.dropped = False

    # --- observation, for the checks
    def stopped_since(self, t: float | None) -> bool:
        return t is not None and any(s >= t for s in self.stop_times)

    def moves_since(self, t: float | None) -> int:
        return 0 if t is None else sum(m > t for m in self.move_times)

    def reconnect(self) -> None:
        self.dropped = False
        self.fail_at_move = None

    # --- the Arm interface
    def connect(self) -> None:
        self.inner.connect()

    def disconnect(self) -> None:
        self.inner.disconnect()

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected and not self.dropped

    def _link(self) -> None:
        if self.dropped:
            raise DeviceNotConnectedError("lost the connection to the arm (its USB adapter was unplugged)")

    def read_state(self) -> ArmState:
        self._link()
        return self.inner.read_state()

    def stop(self) -> None:
        self.stop_times.append(time.monotonic())
        self._link()  # a lost link fails the stop too: the caller must survive that
        self.inner.stop()

    def go_home(self) -> None:
        self._link()
        self.inner.go_home()

    def go_sleep(self) -> None:
        self._link()
        self.inner.go_sleep()

    def _move_to(self, target: tuple[float, float, float], cancel: threading.Event | None) -> MoveResult:
        self._link()
        self.moves += 1
        if self.fail_at_move is not None and self.moves == self.fail_at_move:
            self.fault_at = time.monotonic()
            if self.mode == "disconnect":
                self.dropped = True
                self._link()
            raise CommandRefusedError("the elbow servo reported an overload; the arm refused the command")
        self.move_times.append(time.monotonic())
        self.moving = True
        try:
            return self.inner._move_to(target, cancel)
        finally:
            self.moving = False

    def _set_gripper(self, open_: bool) -> None:
        self._link()
        self.inner._set_gripper(open_)


class DiskFull:
    """ENOSPC for every episode-file write once `fill()` is called (the first one half-written, as a real
    disk does); `free()` makes room again. Patches the one low-level write the episode files go through."""

    def __init__(self) -> None:
        self.full = False
        self.refused = 0
        self._real = files_module.write_all

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False

    def _write_all(self, fd: int, data: bytes) -> None:
        if self.full:
            self.refused += 1
            if self.refused == 1 and len(data) > 1:
                os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._real(fd, data)

    @contextlib.contextmanager
    def installed(self) -> Iterator["DiskFull"]:
        with mock.patch.object(episode_module, "write_all", self._write_all), \
                mock.patch.object(files_module, "write_all", self._write_all):
            yield self


# ---------------------------------------------------------------------------------------------- the daemon


@dataclass
class Harness:
    """The product's daemon on the simulator, served over a Unix socket in this process."""

    daemon: Daemon
    client: DaemonClient
    arm: WatchedArm
    camera: Camera
    episodes: Path

    def run_task(self, instruction: str = INSTRUCTION) -> dict[str, Any]:
        """Submit, wait for the end, return the task as the API reports it."""
        task = self.client.submit(instruction)
        return self.wait(task["id"])

    def wait(self, task_id: str, timeout_s: float = TASK_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            task = self.client.task(task_id)
            if task["state"] == "finished":
                return task
            time.sleep(0.02)
        raise TimeoutError(f"task {task_id} did not finish within {timeout_s:g} s")

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return list(self.client.events(task_id, read_timeout_s=30.0))


def _policy(on_step: Callable[[int, threading.Event | None], None] | None = None) -> ScriptedPolicy:
    return ScriptedPolicy(actions=ACTIONS, on_step=on_step)


@contextlib.contextmanager
def _daemon(
    workdir: Path,
    *,
    arm: Callable[[Arm], WatchedArm] = WatchedArm,
    camera: Callable[[Camera], Camera] = lambda c: c,
    verifier: Verifier | None = None,
    policy: ScriptedPolicy | None = None,
) -> Iterator[Harness]:
    robot = load_robot_config()
    session = make_sim_session(robot, seed=0, realtime=False)
    watched, cam = arm(session.arm), camera(session.camera)
    station = Station(watched, cam, session.limiter, session.hooks, "sim", sim=session)
    config = DaemonConfig(socket_path=workdir / "d.sock", shutdown_timeout_s=5.0)
    daemon = Daemon(
        policy or _policy(), station, verifier or HeuristicVerifier(), robot=robot,
        episodes_dir=workdir / "episodes", config=config, runner_config=RUNNER,
    )
    server = ApiServer(daemon, config, unix_path=workdir / "d.sock").start()
    try:
        yield Harness(daemon, DaemonClient(workdir / "d.sock", timeout_s=30.0), watched, cam, workdir / "episodes")
    finally:
        with contextlib.suppress(Exception):
            daemon.shutdown("fault scenario over")
        server.close()
        session.close()


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="vlm2vla-fault-") as tmp:  # short: a socket path has ~100 chars
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------- the checks


class Checks:
    """Collects the conditions of one run; `record` adds them to the tally as one run."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def that(self, ok: bool, why: str) -> bool:
        if not ok:
            self.failed.append(why)
        return ok

    def record(self, tally: Tally, label: str) -> None:
        tally.record(not self.failed, f"{label}: " + "; ".join(self.failed))


def _health(client: DaemonClient) -> tuple[int, dict[str, Any]] | None:
    try:
        status, body = client.request("GET", "/v1/health")
    except DaemonUnavailable:
        return None
    return status, body if isinstance(body, dict) else {}


def _check_serving(checks: Checks, client: DaemonClient, healthy: bool | None = None) -> None:
    """Health and status answer (and health says what it should, when `healthy` is given)."""
    health = _health(client)
    if not checks.that(health is not None, "the daemon no longer answers /v1/health"):
        return
    assert health is not None
    if healthy is not None:
        checks.that((health[0] == 200) == healthy, f"/v1/health answered {health[0]} {health[1]}")
    try:
        client.status()
    except (DaemonUnavailable, DaemonApiError) as exc:
        checks.that(False, f"/v1/status failed: {exc}")


def _check_error(
    checks: Checks, task: dict[str, Any], words: tuple[str, ...], outcomes: tuple[str, ...] = ("error", "failed")
) -> None:
    result = task.get("result") or {}
    detail = str(result.get("detail", ""))
    checks.that(result.get("outcome") in outcomes, f"outcome {result.get('outcome')!r}, expected one of {outcomes}")
    checks.that(any(w.lower() in detail.lower() for w in words), f"the task's detail {detail!r} names none of {words}")


def _check_recorded(checks: Checks, episodes: Path, task_id: str, min_steps: int = 1) -> EpisodeReader | None:
    try:
        reader = EpisodeReader(episodes / task_id)
        steps = len(reader.steps())
    except EpisodeFormatError as exc:
        checks.that(False, f"the episode cannot be read: {exc}")
        return None
    checks.that(reader.outcome is not None, "the episode has no outcome")
    checks.that(steps >= min_steps, f"the episode holds {steps} steps, expected at least {min_steps}")
    return reader


def _check_arm_stopped(checks: Checks, arm: WatchedArm, fault_at: float | None, tally: Tally) -> None:
    checks.that(fault_at is not None, "the fault was never triggered (the episode ended before it)")
    checks.that(arm.stopped_since(fault_at), "the arm was not told to stop after the fault")
    checks.that(not arm.moving, "the arm is still moving")
    after = arm.moves_since(fault_at)
    tally.unsafe_commands += after
    checks.that(after == 0, f"{after} arm commands ran after the fault")


def _check_next_task_runs(checks: Checks, h: Harness) -> None:
    """Once the fault is gone, the same daemon runs the next task to a normal end."""
    try:
        task = h.run_task()
    except (DaemonApiError, DaemonUnavailable, TimeoutError) as exc:
        checks.that(False, f"the next task could not run: {exc}")
        return
    outcome = (task.get("result") or {}).get("outcome")
    checks.that(
        outcome in ("success", "failed"), f"the next task ended {outcome!r}: {(task.get('result') or {}).get('detail')}"
    )


def _check_refused(checks: Checks, client: DaemonClient, status: int, words: tuple[str, ...]) -> None:
    """A new task is refused with `status` and a message naming the trouble (no episode is started)."""
    try:
        task = client.submit(INSTRUCTION)
    except DaemonApiError as exc:
        checks.that(exc.status == status, f"a new task was refused with {exc.status}, expected {status}: {exc.message}")
        checks.that(
            any(w.lower() in exc.message.lower() for w in words), f"the refusal {exc.message!r} names none of {words}"
        )
        return
    checks.that(False, f"a new task was accepted ({task['id']}) although the fault is still there")


# ---------------------------------------------------------------------------------------------- scenarios: devices


def _camera_fault(name: str, mode: Literal["timeout", "unplug"], workdir: Path | None) -> Tally:
    tally = Tally("fault", name)
    checks = Checks()
    with _workdir(workdir) as folder:
        # Read 1 is the subtask planner's, 2 the first step's, 3 the frame after its chunk: 4 is mid-episode.
        with _daemon(folder, camera=lambda c: FaultyCamera(c, fail_at=4, mode=mode)) as h:
            camera = h.camera
            assert isinstance(camera, FaultyCamera)
            task = h.run_task()
            _check_arm_stopped(checks, h.arm, camera.fault_at, tally)
            _check_error(checks, task, ("camera",), outcomes=("error",))
            _check_recorded(checks, h.episodes, task["id"])
            if mode == "unplug":
                _check_serving(checks, h.client, healthy=False)
                _check_refused(checks, h.client, 503, ("camera",))
            else:
                _check_serving(checks, h.client)
            camera.heal()
            _check_serving(checks, h.client, healthy=True)
            _check_next_task_runs(checks, h)
    checks.record(tally, name)
    return tally


def camera_timeout(workdir: Path | None = None) -> Tally:
    """The camera stops delivering frames mid-episode (each read waits its timeout, then fails)."""
    return _camera_fault("camera_timeout", "timeout", workdir)


def camera_unplug(workdir: Path | None = None) -> Tally:
    """The camera's USB cable comes out mid-episode; health must say so and new tasks are refused."""
    return _camera_fault("camera_unplug", "unplug", workdir)


def _arm_fault(name: str, mode: Literal["refuse", "disconnect"], workdir: Path | None) -> Tally:
    tally = Tally("fault", name)
    checks = Checks()
    with _workdir(workdir) as folder:
        with _daemon(folder, arm=lambda a: WatchedArm(a, fail_at_move=2, mode=mode)) as h:
            task = h.run_task()
            _check_arm_stopped(checks, h.arm, h.arm.fault_at, tally)
            words = ("overload", "refused") if mode == "refuse" else ("connection", "not connected")
            _check_error(checks, task, words, outcomes=("error",))
            _check_recorded(checks, h.episodes, task["id"])
            if mode == "disconnect":
                _check_serving(checks, h.client, healthy=False)
                _check_refused(checks, h.client, 503, ("arm",))
                status = h.client.status()
                checks.that(
                    "error" in (status.get("arm") or {}),
                    f"status does not say the arm is unreadable: {status.get('arm')}",
                )
            h.arm.reconnect()
            _check_serving(checks, h.client, healthy=True)
            _check_next_task_runs(checks, h)
    checks.record(tally, name)
    return tally


def arm_command_failure(workdir: Path | None = None) -> Tally:
    """The arm refuses a command mid-chunk (a servo fault)."""
    return _arm_fault("arm_command_failure", "refuse", workdir)


def arm_disconnect(workdir: Path | None = None) -> Tally:
    """The arm's link drops mid-chunk: every later call fails, stop() included."""
    return _arm_fault("arm_disconnect", "disconnect", workdir)


# ---------------------------------------------------------------------------------------------- scenarios: verifier


def _verifier_fault(
    name: str, reply: Reply, words: tuple[str, ...], workdir: Path | None, timeout_s: float = 10.0
) -> Tally:
    """The Gemini verifier fails on every call. With the fallback (the runtime's default) the heuristic
    verifier decides and every verdict records why Gemini was skipped; without it, the episode fails
    with Gemini's error in the task's detail."""
    tally = Tally("fault", name)
    config = GeminiConfig(
        model="gemini-test", retries=0, backoff_initial_s=0.01, backoff_max_s=0.02,
        breaker_failures=100,
    )
    with FakeGeminiServer(default=reply) as server:
        config = config.model_copy(update={"base_url": server.base_url, "timeout_s": timeout_s})
        for fallback in (True, False):
            checks = Checks()
            gemini = GeminiVerifier(config, ApiKey(_FAKE_KEY, "test"))
            verifier: Verifier = FallbackVerifier(gemini, HeuristicVerifier()) if fallback else gemini
            label = f"{name} ({'with' if fallback else 'without'} fallback)"
            with _workdir(workdir / ("fallback" if fallback else "strict") if workdir else None) as folder:
                with _daemon(folder, verifier=verifier) as h:
                    task = h.run_task()
                    last_move = h.arm.move_times[-1] if h.arm.move_times else None
                    _check_arm_stopped(checks, h.arm, last_move, tally)
                    _check_serving(checks, h.client, healthy=True)
                    reader = _check_recorded(checks, h.episodes, task["id"])
                    verdicts = [s.verifier for s in (reader.steps() if reader else []) if s.verifier is not None]
                    checks.that(bool(verdicts), "no verdict was recorded")
                    checks.that(
                        all(any(w in (v.error or "") for w in words) for v in verdicts),
                        f"recorded verdicts do not all carry the fault ({words}): {[v.error for v in verdicts]}",
                    )
                    if fallback:
                        events = [e for e in h.events(task["id"]) if e["kind"] == "verified"]
                        checks.that(
                            bool(events) and all(e.get("fallback_from") == "gemini" for e in events),
                            "the task's events do not show the fallback from gemini",
                        )
                        checks.that(
                            bool(events) and all(any(w in (e.get("error") or "") for w in words) for e in events),
                            f"the task's events do not say why gemini failed ({words})",
                        )
                        outcome = (task.get("result") or {}).get("outcome")
                        checks.that(
                            outcome in ("success", "failed"), f"with the fallback the episode ended {outcome!r}"
                        )
                    else:
                        _check_error(checks, task, words, outcomes=("failed",))
            checks.record(tally, label)
    return tally


def verifier_timeout(workdir: Path | None = None) -> Tally:
    """Gemini never answers within the request's time limit."""
    return _verifier_fault("verifier_timeout", Reply.slow(5.0), ("timed out",), workdir, timeout_s=0.5)


def verifier_http_500(workdir: Path | None = None) -> Tally:
    """Gemini answers HTTP 500 to every request."""
    return _verifier_fault("verifier_http_500", Reply.error(500, "backend exploded"), ("500",), workdir)


def verifier_garbage(workdir: Path | None = None) -> Tally:
    """Gemini answers 200 with text that is not the JSON verdict asked for."""
    return _verifier_fault(
        "verifier_garbage", Reply.text("Sure! The robot did great {{{"), ("invalid answer",), workdir
    )


# ---------------------------------------------------------------------------------------------- scenario: disk full


def episodes_disk_full(workdir: Path | None = None) -> Tally:
    """The disk fills up while the second step is being recorded: the episode must stop (a robot does not
    run unrecorded), what was written stays readable, new tasks are refused until there is room again."""
    tally = Tally("fault", "episodes_disk_full")
    checks = Checks()
    disk = DiskFull()
    filled_at: list[float] = []

    def fill_on_second_step(index: int, cancel: threading.Event | None) -> None:
        if index == 1:
            filled_at.append(time.monotonic())
            disk.fill()

    with _workdir(workdir) as folder, disk.installed():
        with _daemon(folder, policy=_policy(on_step=fill_on_second_step)) as h:
            task = h.run_task()
            _check_arm_stopped(checks, h.arm, filled_at[0] if filled_at else None, tally)
            _check_error(checks, task, ("no space left",), outcomes=("error",))
            reader = _check_recorded(checks, h.episodes, task["id"])
            if reader is not None:
                checks.that(reader.outcome in ("error", "interrupted"), f"the episode reads as {reader.outcome!r}")
            _check_serving(checks, h.client)
            _check_refused(checks, h.client, 507, ("no space left",))
            disk.free()
            _check_next_task_runs(checks, h)
    checks.record(tally, "episodes_disk_full")
    return tally


# ---------------------------------------------------------------------------------------------- scenarios: processes


def _gguf(path: Path, n_floats: int = 4096) -> Path:
    """A small valid GGUF (one F32 tensor): what a bundle's checks need, not a model llama.cpp could run."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    head = (
        b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + string("general.architecture") + struct.pack("<I", 8) + string("test")
    )
    head += string("w") + struct.pack("<I", 1) + struct.pack("<Q", n_floats) + struct.pack("<IQ", 0, 0)
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + bytes(range(256)) * (n_floats * 4 // 256))
    return path


def _bundle(folder: Path) -> Path:
    from vlm2vla_edge.runtime.policy.bundle import write_bundle

    source = _gguf(folder / "source.gguf")
    bundle = write_bundle(folder / "bundle", text_model=source, name="fault-test", base_model="none", quant_type="F32")
    return bundle.text_model


def _serve_bad_model(checks: Checks, folder: Path, bundle: Path, words: tuple[str, ...]) -> None:
    """`vlm2vla-edge serve` on a bad bundle: it must come up, say why it is unhealthy (to systemd too),
    refuse tasks, keep the e-stop working, keep the watchdog fed (no restart loop), and stop cleanly."""
    config = write_config(folder, sim_realtime=False)
    proc = DaemonProcess.start(
        ["-m", "vlm2vla_edge.runtime.cli", "serve", "--config", str(config), "--bundle", str(bundle)],
        folder / "d.sock", watchdog_usec=2_000_000,
    )
    try:
        try:
            proc.wait_for("READY=1", timeout_s=START_TIMEOUT_S)
        except AssertionError as exc:
            checks.that(False, f"the daemon did not come up: {str(exc).strip()[-300:]}")
            return
        client = DaemonClient(folder / "d.sock", timeout_s=30)
        health = _health(client)
        checks.that(health is not None and health[0] == 503, f"/v1/health answered {health}")
        detail = str((health or (0, {}))[1].get("detail", ""))
        checks.that(any(w in detail for w in words), f"/v1/health's detail {detail!r} names none of {words}")
        status = client.status()
        checks.that(status.get("state") == "unhealthy", f"status state {status.get('state')!r}")
        checks.that(any(w in str(status.get("error")) for w in words), f"status error {status.get('error')!r}")
        _check_refused(checks, client, 503, ("model",))
        checks.that(any(w in m for m in proc.messages for w in words) and any("STATUS=" in m for m in proc.messages),
                    f"systemd's STATUS= does not say why: {proc.messages}")
        client.estop("fault scenario: e-stop without a model")
        checks.that(client.status()["estop"]["engaged"], "the e-stop did not latch without a model")
        client.reset()
        before = sum(m == "WATCHDOG=1" for m in proc.messages)
        proc.read_messages(3.0)  # a ping every second
        checks.that(sum(m == "WATCHDOG=1" for m in proc.messages) > before,
                    "no watchdog pings while unhealthy: systemd would restart the daemon in a loop")
        checks.that(not any((folder / "episodes").glob("*/meta.json")), "an episode was started without a model")
    finally:
        code, _, err = proc.terminate(timeout_s=60)
    checks.that(code == 0, f"the daemon exited {code} on SIGTERM: {err.strip()[-300:]}")


def model_missing(workdir: Path | None = None) -> Tally:
    """The configured bundle folder is not there at start."""
    tally = Tally("fault", "model_missing")
    checks = Checks()
    with _workdir(workdir) as folder:
        _serve_bad_model(checks, folder, folder / "no-such-bundle", ("does not exist",))
    checks.record(tally, "model_missing")
    return tally


def model_corrupted(workdir: Path | None = None) -> Tally:
    """The bundle's GGUF was cut short (a failed copy), or changed so its sha256 no longer matches."""
    tally = Tally("fault", "model_corrupted")
    for kind in ("truncated", "sha256"):
        checks = Checks()
        with _workdir(workdir / kind if workdir else None) as folder:
            model = _bundle(folder)
            data = bytearray(model.read_bytes())
            if kind == "truncated":
                model.write_bytes(bytes(data[: len(data) // 2]))
                words: tuple[str, ...] = ("truncated", "bytes but the manifest says")
            else:
                data[-1] ^= 0xFF
                model.write_bytes(bytes(data))
                words = ("does not match the manifest",)
            _serve_bad_model(checks, folder, model.parent, words)
        checks.record(tally, f"model_corrupted ({kind})")
    return tally


def sigkill_restart(workdir: Path | None = None) -> Tally:
    """SIGKILL of the daemon mid-episode, then a restart: the episode on disk reads and is marked
    interrupted, the new daemon serves and runs the next task."""
    tally = Tally("fault", "sigkill_restart")
    checks = Checks()
    with _workdir(workdir) as folder:
        config = write_config(folder)  # the real-time simulator: an episode lasts seconds
        sock = folder / "d.sock"
        first = DaemonProcess.fake(config, sock, step_s=0.3, watchdog_usec=None)
        try:
            first.wait_for("READY=1", timeout_s=START_TIMEOUT_S)
            task = DaemonClient(sock, timeout_s=30).submit(INSTRUCTION)
            steps = folder / "episodes" / task["id"] / "steps.jsonl"
            deadline = time.monotonic() + TASK_TIMEOUT_S
            while time.monotonic() < deadline and steps.read_bytes().count(b"\n") < 2:
                time.sleep(0.02)
            os.killpg(first.process.pid, signal.SIGKILL)
        finally:
            first.terminate()
        try:
            reader = EpisodeReader(folder / "episodes" / task["id"])
            checks.that(len(reader.steps()) >= 2, f"the killed episode holds {len(reader.steps())} steps")
            checks.that(reader.outcome == "interrupted", f"the killed episode reads as {reader.outcome!r}")
        except EpisodeFormatError as exc:
            checks.that(False, f"the killed episode cannot be read: {exc}")
        second = DaemonProcess.fake(config, sock, step_s=0.0, watchdog_usec=None)
        try:
            second.wait_for("READY=1", timeout_s=START_TIMEOUT_S)
            meta = json.loads((folder / "episodes" / task["id"] / "meta.json").read_text())
            checks.that(
                meta.get("outcome") == "interrupted",
                f"after the restart meta.json says outcome {meta.get('outcome')!r}",
            )
            checks.that(bool(meta.get("outcome_detail")), "the interrupted episode has no detail")
            client = DaemonClient(sock, timeout_s=30)
            _check_serving(checks, client, healthy=True)
            status = client.status()
            checks.that(status["state"] == "idle" and "position" in (status.get("arm") or {}),
                        f"the restarted daemon is {status['state']} with arm {status.get('arm')}")
            again = client.submit(INSTRUCTION)
            deadline = time.monotonic() + TASK_TIMEOUT_S
            while time.monotonic() < deadline and client.task(again["id"])["state"] != "finished":
                time.sleep(0.05)
            outcome = (client.task(again["id"]).get("result") or {}).get("outcome")
            checks.that(outcome in ("success", "failed"), f"the next task after the restart ended {outcome!r}")
        except (AssertionError, DaemonApiError, DaemonUnavailable, OSError, ValueError) as exc:
            checks.that(False, f"the restart failed: {exc}")
        finally:
            code, _, err = second.terminate(timeout_s=60)
        checks.that(code == 0, f"the restarted daemon exited {code}: {err.strip()[-300:]}")
    checks.record(tally, "sigkill_restart")
    return tally


# ---------------------------------------------------------------------------------------------- all of them

#: In-process scenarios (seconds each) and those that start daemon processes (longer).
FAST = (camera_timeout, camera_unplug, arm_command_failure, arm_disconnect, verifier_timeout, verifier_http_500,
        verifier_garbage, episodes_disk_full)
PROCESS = (model_missing, model_corrupted, sigkill_restart)


def run_faults(include_processes: bool = True) -> list[Tally]:
    """Every fault scenario, one `Tally` each; a scenario that crashes is a failed run, not a crash here."""
    tallies = []
    for scenario in FAST + (PROCESS if include_processes else ()):
        try:
            tallies.append(scenario())
        except Exception as exc:  # noqa: BLE001 - the report must list every scenario
            tally = Tally("fault", scenario.__name__)
            tally.record(False, f"{scenario.__name__}: the scenario crashed: {type(exc).__name__}: {exc}")
            tallies.append(tally)
    return tallies
