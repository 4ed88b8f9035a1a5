"""Load on a running daemon, and the daemons the fuzz, load and access suites talk to.

`load_during_episode` starts the real daemon (`Daemon` + `serve`, real-time simulator) as a subprocess
with `LoopPolicy`, a scripted policy whose episode keeps the arm moving for about a minute, and, while
that episode runs: sends status/health requests from several threads, fires concurrent task
submissions (all refused while busy; exactly one accepted once idle), then measures the e-stop under
continued load from `POST /v1/estop` to the arm's last move. The subprocess records the time of every
simulated arm move in a small shared file (`--moves-file`), so "arm halted" is measured, not inferred.

    python -m reliability_suite.load --serve --config runtime.yaml [--step-s S] [--verifier never|done|config]

runs that daemon by hand (with bench/ on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2vla_edge.runtime.config import ActionLanguage, load_robot_config
from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonClient, DaemonUnavailable
from vlm2vla_edge.runtime.daemon.server import ApiServer
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.interface import (
    GenerationCancelled,
    Observation,
    StageOutput,
    StepResult,
    SubtasksResult,
)
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.runtime.station import open_station
from vlm2vla_edge.runtime.verifier.base import Verdict, VerificationRequest, Verifier, cancelled_verdict

from .tally import Tally

BENCH = Path(__file__).resolve().parents[1]
ESTOP_TARGET_MS = 50.0


# --- the scripted episode -----------------------------------------------------------------------


class LoopPolicy:
    """Answers at once (after `step_s` of interruptible "generation") with a back-and-forth chunk, so
    the arm keeps moving inside the workspace for as long as the verifier lets the episode run."""

    needs_image = True
    action_language = ActionLanguage()
    bundle_id = "reliability-loop"
    CHUNK = "[[0.03, 0, 0, 1], [-0.03, 0, 0, 1]]"
    MOTION = "Move forward and back"

    def __init__(self, step_s: float = 0.0, subtasks: int = 1) -> None:
        self.step_s = step_s
        self._subtasks = "[" + ", ".join(f'"Move back and forth {i + 1}"' for i in range(subtasks)) + "]"

    def subtasks(
        self, observation: Observation, instruction: str, *, cancel: threading.Event | None = None
    ) -> SubtasksResult:
        return SubtasksResult(parse_subtasks(self._subtasks), StageOutput("subtasks", "", self._subtasks))

    def step(self, observation: Observation, instruction: str, subtask: str, *, retry: bool = False,
             cancel: threading.Event | None = None) -> StepResult:
        if cancel is not None and (cancel.wait(self.step_s) if self.step_s > 0 else cancel.is_set()):
            raise GenerationCancelled("cancelled mid-generation")
        return StepResult(
            motion=parse_motion_plan(self.MOTION),
            chunk=parse_action_chunk(self.CHUNK, self.action_language),
            motion_output=StageOutput("motion", "", self.MOTION),
            action_output=StageOutput("action", "", self.CHUNK),
        )


class FixedVerifier(Verifier):
    """Always the same verdict: `done=False` keeps an episode retrying (long episodes), True ends it."""

    name = "fixed"

    def __init__(self, done: bool) -> None:
        self.done = done

    def verify(self, request: VerificationRequest, cancel: threading.Event | None = None) -> Verdict:
        if cancel is not None and cancel.is_set():
            return cancelled_verdict(self.name, 0.0, attempts=0)
        return Verdict(success=self.done, reason="scripted verdict", verifier=self.name, latency_s=0.0)


# --- an in-process daemon (fuzzing: fast, non-real-time simulator) ------------------------------


@contextlib.contextmanager
def daemon_in_process(folder: Path, config: DaemonConfig | None = None) -> Iterator[tuple[Daemon, Path]]:
    """The product's `Daemon` and `ApiServer` (Unix socket) in this process, on a non-real-time simulator
    whose episodes (one subtask, verified at once) end within milliseconds."""
    robot = load_robot_config()
    config = config or DaemonConfig(socket_path=folder / "d.sock")
    assert config.socket_path is not None
    with open_station(robot, sim=True, seed=0, realtime=False) as station:
        daemon = Daemon(LoopPolicy(), station, FixedVerifier(done=True), robot=robot,
                        episodes_dir=folder / "episodes", config=config, record_frames=False)
        server = ApiServer(daemon, config, unix_path=config.socket_path).start()
        try:
            yield daemon, config.socket_path
        finally:
            daemon.shutdown("fuzz finished")
            server.close()


# --- raw HTTP (requests http.client cannot send) -----------------------------------------------


@dataclass
class RawResponse:
    status: int | None  # None: no status line came back
    headers: dict[str, str]
    body: bytes
    error: str | None = None  # what went wrong on the client side (timeout, reset, ...)
    elapsed_s: float = 0.0


def raw_exchange(
    address: Path | tuple[str, int], data: bytes, timeout_s: float = 5.0, *, half_close: bool = False,
    head: bool = False,
) -> RawResponse:
    """Send `data` as-is on a fresh connection and read one response (headers, then the body by
    Content-Length, or up to the close; an event stream, or the answer to a HEAD, not past its headers)."""
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    began = time.monotonic()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    received = b""
    try:
        sock.connect(str(address) if isinstance(address, Path) else address)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the server may answer (413) and close before taking everything
        if half_close:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        top, _, body = received.partition(b"\r\n\r\n")
        lines = top.decode("iso-8859-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not head and "text/event-stream" not in headers.get("content-type", ""):
            length = headers.get("content-length")
            want = int(length) if length is not None and length.isdigit() else None
            while want is None or len(body) < want:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            body = body[:want] if want is not None else body
        return RawResponse(status, headers, body, None, time.monotonic() - began)
    except (OSError, ValueError) as exc:
        top, _, body = received.partition(b"\r\n\r\n")
        first = top.split(b"\r\n", 1)[0].split(b" ")
        status = int(first[1]) if len(first) >= 2 and first[1].isdigit() else None
        return RawResponse(status, {}, body, f"{type(exc).__name__}: {exc}", time.monotonic() - began)
    finally:
        sock.close()


def clean_error(response: RawResponse, head: bool = False) -> str | None:
    """Why `response` is not a clean answer (None when it is): any 5xx, no answer, or an error status
    whose body is not the API's JSON error object (an answer to HEAD has no body)."""
    if response.status is None:
        got = f"; got {response.body[:150]!r} without a status line" if response.body else ""
        return f"no response ({response.error or 'connection closed'}{got})"
    # 501: a method the server does not know; 505: an HTTP version it does not speak (RFC 9110)
    if response.status >= 500 and response.status not in (501, 505):
        return f"HTTP {response.status}: {response.body[:200]!r}"
    if response.status >= 400 and not head:
        try:
            data = json.loads(response.body.decode("utf-8"))
            ok = (
                isinstance(data, dict)
                and isinstance(data.get("error"), dict)
                and data["error"].get("status") == response.status
            )
        except (UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            return f"HTTP {response.status} without a JSON error body: {response.body[:200]!r}"
    return None


# --- the daemon as a subprocess (load, access) ------------------------------------------------


def write_runtime_config(folder: Path, verifier: dict[str, Any] | None = None, daemon: dict[str, Any] | None = None,
                         **fields: Any) -> Path:
    data: dict[str, Any] = {
        "episodes_dir": str(folder / "episodes"),
        "sim": True,
        "sim_realtime": True,
        "record_frames": False,
        "verifier": verifier or {"kind": "heuristic"},
        "runner": {"max_retries_per_subtask": 20, "max_steps": 1000},
        "daemon": {"socket_path": str(folder / "d.sock"), "watchdog": False, **(daemon or {})},
        **fields,
    }
    path = folder / "runtime.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class MovesFile:
    """The time (`time.monotonic`, one clock for all processes) of the simulated arm's latest move."""

    SIZE = 8

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            path.write_bytes(b"\0" * self.SIZE)
        self._file = open(path, "r+b")  # noqa: SIM115 - kept open for the mmap's life
        self._map = mmap.mmap(self._file.fileno(), self.SIZE)

    def write(self, t: float) -> None:
        struct.pack_into("d", self._map, 0, t)

    def last_move(self) -> float:
        return struct.unpack_from("d", self._map, 0)[0]

    def close(self) -> None:
        self._map.close()
        self._file.close()


@dataclass
class DaemonSubprocess:
    """`python -m reliability_suite.load --serve` with its log going to `log_path`."""

    process: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path
    moves: MovesFile

    @classmethod
    def start(
        cls,
        config: Path,
        socket_path: Path,
        *,
        step_s: float = 0.1,
        subtasks: int = 8,
        verifier: str = "never",
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> "DaemonSubprocess":
        folder = config.parent
        moves = MovesFile(folder / "moves.bin")
        log_path = folder / "daemon.log"
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), environment.get("PYTHONPATH", "")) if p)
        environment.pop("NOTIFY_SOCKET", None)
        environment.pop("WATCHDOG_USEC", None)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "reliability_suite.load", "--serve", "--config", str(config),
                 "--step-s", str(step_s), "--subtasks", str(subtasks), "--verifier", verifier,
                 "--moves-file", str(moves.path)],
                stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
            )
        proc = cls(process, socket_path, log_path, moves)
        deadline = time.monotonic() + ready_timeout_s
        client = DaemonClient(socket_path, timeout_s=2)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the daemon exited ({process.returncode}): {proc.log()[-2000:]}")
            with contextlib.suppress(DaemonUnavailable, DaemonApiError):
                if socket_path.exists() and client.health()["ok"]:
                    return proc
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"the daemon did not answer within {ready_timeout_s} s")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (a kill after the timeout returns -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            code = -9
        self.moves.close()
        return code


def _serve_main(args: argparse.Namespace) -> int:
    """The subprocess: the product's daemon on the real-time simulator with `LoopPolicy`."""
    from vlm2vla_edge.runtime.daemon.server import serve
    from vlm2vla_edge.runtime.logs import configure_logging
    from vlm2vla_edge.runtime.runtime_config import load_runtime_config
    from vlm2vla_edge.runtime.verifier.fallback import make_verifier

    configure_logging("DEBUG" if args.verifier == "config" else "INFO")
    if args.verifier == "config":  # the key-leak scan: every library's log lines too (HTTP clients, SDK)
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    settings = load_runtime_config(args.config)
    robot = load_robot_config(settings.robot)
    verifier = (
        make_verifier(settings.verifier) if args.verifier == "config" else FixedVerifier(done=args.verifier == "done")
    )
    moves = MovesFile(Path(args.moves_file)) if args.moves_file else None
    with open_station(robot, sim=True, seed=settings.sim_seed, realtime=settings.sim_realtime) as station:
        if moves is not None and station.sim is not None:
            world = station.sim.world
            original = world.set_joints

            def set_joints(joints: tuple[float, ...], ee: Any = None) -> None:
                original(joints, ee)
                moves.write(time.monotonic())

            world.set_joints = set_joints  # type: ignore[method-assign]
        daemon = Daemon(
            LoopPolicy(args.step_s, args.subtasks), station, verifier, robot=robot, episodes_dir=settings.episodes_dir,
            config=settings.daemon, runner_config=settings.runner, record_frames=settings.record_frames,
        )
        return serve(daemon, settings.daemon)


# --- the load test ---------------------------------------------------------------------------


@dataclass
class LoadStats:
    """Latencies measured by `load_during_episode`, milliseconds."""

    status_ms: list[float] = field(default_factory=list)
    estop_answered_ms: list[float] = field(default_factory=list)
    arm_halted_ms: list[float] = field(default_factory=list)
    running_seen: int = 0  # status answers that showed the episode running

    def lines(self) -> list[str]:
        out = []
        for name, values in (("status/health request", self.status_ms), ("e-stop answered", self.estop_answered_ms),
                             ("e-stop arm halted", self.arm_halted_ms)):
            if values:
                out.append(f"{name}: n {len(values)}, p50 {pct(values, 50):.2f} ms, p99 {pct(values, 99):.2f} ms, "
                           f"max {max(values):.2f} ms (mean {statistics.fmean(values):.2f})")
        return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _wait_state(client: DaemonClient, states: set[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        if status["state"] in states:
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon stayed {status['state']!r}, not {sorted(states)}")
        time.sleep(0.02)


def _concurrent_submits(socket_path: Path, n: int) -> tuple[int, int, list[str]]:
    """`n` submissions released at once; (accepted, refused with 409, other outcomes)."""
    barrier = threading.Barrier(n)
    results: list[str] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        client = DaemonClient(socket_path, timeout_s=10)
        barrier.wait()
        try:
            client.submit(f"move back and forth {i}")
            outcome = "202"
        except DaemonApiError as exc:
            outcome = str(exc.status) if exc.status == 409 else f"HTTP {exc.status}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - a refused connection is a finding
            outcome = f"{type(exc).__name__}: {exc}"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    accepted = results.count("202")
    busy = results.count("409")
    return accepted, busy, [r for r in results if r not in ("202", "409")]


class _Hammer:
    """Threads sending status and health requests until stopped; counts what failed."""

    def __init__(self, socket_path: Path, threads: int, limit: int | None, stats: LoadStats, tally: Tally) -> None:
        self.socket_path, self.limit, self.stats, self.tally = socket_path, limit, stats, tally
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _take(self) -> bool:
        with self.lock:
            if self.stop.is_set() or (self.limit is not None and self.sent >= self.limit):
                return False
            self.sent += 1
            return True

    def _run(self) -> None:
        client = DaemonClient(self.socket_path, timeout_s=10)
        n = 0
        while self._take():
            n += 1
            path = "/v1/status" if n % 2 else "/v1/health"
            began = time.perf_counter()
            try:
                status, body = client.request("GET", path)
                ok = status == 200 and isinstance(body, dict)
                why = f"GET {path}: HTTP {status}"
                if ok and path == "/v1/status" and body.get("state") == "running":
                    with self.lock:
                        self.stats.running_seen += 1
            except Exception as exc:  # noqa: BLE001 - counted, reported
                ok, why = False, f"GET {path}: {type(exc).__name__}: {exc}"
            with self.lock:
                self.stats.status_ms.append((time.perf_counter() - began) * 1000)
                self.tally.record(ok, why)

    def __enter__(self) -> "_Hammer":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def load_during_episode(
    status_requests: int = 1000, submits: int = 100, estop_trials: int = 20, *, threads: int = 8,
    folder: Path | None = None, stats: LoadStats | None = None, seed: int = 0,
) -> Tally:
    """Load on a daemon subprocess mid-episode; see the module docstring. Runs: each request, each
    submission and each e-stop trial (survived: halted within `ESTOP_TARGET_MS`)."""
    import tempfile

    stats = stats if stats is not None else LoadStats()
    tally = Tally("load", "requests during an episode")
    rng = random.Random(seed)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reliability-load-")))
        config = write_runtime_config(folder)
        socket_path = folder / "d.sock"
        proc = DaemonSubprocess.start(config, socket_path, step_s=0.05, subtasks=8, verifier="never")
        client = DaemonClient(socket_path, timeout_s=10)
        try:
            task = client.submit("move back and forth")
            _wait_state(client, {"running"}, 10)

            with _Hammer(socket_path, threads, status_requests, stats, tally) as hammer:
                for t in hammer.threads:
                    t.join(300)
            if client.status()["state"] != "running":
                tally.record(False, "the episode was not running any more after the status requests")

            # busy: every submission refused cleanly
            accepted, busy, other = _concurrent_submits(socket_path, submits)
            for _ in range(busy):
                tally.record(True, "")
            for _ in range(accepted):
                tally.record(False, "a submission was accepted while an episode ran")
            for why in other:
                tally.record(False, f"submission while busy: {why}")

            # idle: exactly one of the concurrent submissions wins
            client.cancel(task["id"])
            _wait_state(client, {"idle"}, 15)
            accepted, busy, other = _concurrent_submits(socket_path, submits)
            tally.record(
                accepted == 1, f"{accepted} of {submits} concurrent submissions to an idle daemon were accepted"
            )
            for _ in range(busy):
                tally.record(True, "")
            for why in other:
                tally.record(False, f"submission while idle: {why}")

            # the e-stop, with status/health requests still coming in
            with _Hammer(socket_path, max(2, threads // 2), None, stats, tally):
                for trial in range(estop_trials):
                    try:
                        tally.record(*_estop_trial(client, proc.moves, stats, rng, trial))
                    except Exception as exc:  # noqa: BLE001 - e.g. the e-stop request itself refused
                        tally.record(False, f"e-stop trial {trial}: {type(exc).__name__}: {exc}")
        finally:
            code = proc.stop()
        tally.record(code == 0, f"the daemon exited with {code} after SIGTERM: {proc.log()[-500:]}")
    return tally


def _estop_trial(
    client: DaemonClient, moves: MovesFile, stats: LoadStats, rng: random.Random, trial: int
) -> tuple[bool, str]:
    """One e-stop while the arm moves: (halted within the target?, why not)."""
    state = client.status()["state"]
    if state == "estop":
        client.reset()
        state = "idle"
    if state == "idle":
        client.submit(f"move back and forth, trial {trial}")
    deadline = time.monotonic() + 10
    time.sleep(rng.uniform(0.0, 0.3))  # a random point of the episode...
    while True:  # ...where the arm is mid-move: its last 10 ms segment began less than 12 ms ago
        t0 = time.monotonic()
        if t0 - moves.last_move() < 0.012:
            break
        if t0 > deadline:
            return False, f"trial {trial}: the arm never moved"
        time.sleep(0.0005)
    client.estop(f"reliability load trial {trial}")
    answered = time.monotonic()
    time.sleep(0.15)  # far longer than a segment: a move after the stop would show
    halted = max(0.0, moves.last_move() - t0)
    stats.estop_answered_ms.append((answered - t0) * 1000)
    stats.arm_halted_ms.append(halted * 1000)
    _wait_state(client, {"estop"}, 10)
    client.reset()
    ok = halted * 1000 <= ESTOP_TARGET_MS
    return (
        ok,
        f"trial {trial}: arm halted {halted * 1000:.1f} ms after the e-stop request (target {ESTOP_TARGET_MS:g} ms)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="run the daemon (the load test's subprocess)")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--step-s", type=float, default=0.05)
    parser.add_argument("--subtasks", type=int, default=8)
    parser.add_argument("--verifier", choices=("never", "done", "config"), default="never")
    parser.add_argument("--moves-file")
    args = parser.parse_args(argv)
    if args.serve:
        if args.config is None:
            parser.error("--serve needs --config")
        return _serve_main(args)
    stats = LoadStats()
    tally = load_during_episode(stats=stats)
    print("\n".join(stats.lines()))
    print(f"tried {tally.tried}, survived {tally.survived}; failures: {tally.failures[:5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
