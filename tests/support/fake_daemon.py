"""Test-only entry point: the real daemon (`Daemon` + `serve`) on the simulator, with a scripted policy.

The product builds its daemon from a model bundle (`serve_from_config`); the tests need episodes whose
length and outcome they control, so this script injects `ScriptedPolicy` (each step "generates" for
`--step-s` seconds, checking the cancel flag like the decoder does; an instruction containing "until
cancelled" keeps generating until the task is cancelled) and a verifier that fails any instruction
containing "fail". Everything else — station, runner, recorder, API, signals, sd_notify —
is the product's code path.

    python -m vlm2vla_edge.testing.fake_daemon --config runtime.yaml --step-s 0.3
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.server import ApiServer, prepare_socket_path, serve
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.logs import configure_logging
from vlm2vla_edge.runtime.policy.interface import GenerationCancelled, Observation, StepResult
from vlm2vla_edge.runtime.runtime_config import RuntimeConfig, load_runtime_config, server_socket_path
from vlm2vla_edge.runtime.station import Station, open_station
from vlm2vla_edge.runtime.verifier.base import Verdict, VerificationRequest, Verifier, cancelled_verdict
from vlm2vla_edge.testing.policies import ScriptedPolicy

#: An instruction containing this keeps its first step "generating" until the task is cancelled (or the
#: daemon stops), so a test can count on the daemon being busy however slowly the machine runs.
UNTIL_CANCELLED = "until cancelled"
HOLD_LIMIT_S = 120.0  # a forgotten held task still ends


class InstructionVerifier(Verifier):
    """Success unless the instruction says "fail"; a verdict only after the arm really moved."""

    name = "test"

    def verify(self, request: VerificationRequest, cancel: threading.Event | None = None) -> Verdict:
        if cancel is not None and cancel.is_set():
            return cancelled_verdict(self.name, 0.0, attempts=0)
        moved = sum(abs(a - b) for a, b in zip(request.pre_state.position, request.post_state.position)) > 1e-4
        ok = moved and "fail" not in request.instruction
        return Verdict(success=ok, reason="moved" if moved else "did not move", verifier=self.name, latency_s=0.0)


class InstructionPolicy(ScriptedPolicy):
    """The scripted policy, except that an instruction containing `UNTIL_CANCELLED` blocks in `step`."""

    def step(
        self, observation: Observation, instruction: str, subtask: str, *, retry: bool = False,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        if UNTIL_CANCELLED in instruction and cancel is not None and cancel.wait(HOLD_LIMIT_S):
            raise GenerationCancelled("cancelled mid-generation")
        return super().step(observation, instruction, subtask, retry=retry, cancel=cancel)


def slow_generation(step_s: float) -> Callable[[int, threading.Event | None], None]:
    """An `on_step` hook: each step "generates" for `step_s` seconds, checking the cancel flag like the decoder."""

    def hook(index: int, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.wait(step_s):
            raise GenerationCancelled("cancelled mid-generation")

    return hook


@contextlib.contextmanager
def fake_station_daemon(settings: RuntimeConfig, step_s: float = 0.0) -> Iterator[tuple[Daemon, Station]]:
    """The daemon this script serves: scripted policy, instruction verifier, the simulator station of
    `settings`. Whoever serves it shuts it down (`serve` does, on SIGTERM)."""
    robot = load_robot_config(settings.robot)
    policy = InstructionPolicy(
        actions=("[[0.03, 0, -0.02, 1], [0.03, 0, 0, 1]]", "[[-0.03, 0, 0.02, 0], [-0.03, 0, 0, 0]]"),
        on_step=slow_generation(step_s),
        cycle=True,  # out and back in turn: many episodes in one daemon never walk the arm to the box's edge
    )
    with open_station(robot, sim=True, seed=settings.sim_seed, realtime=settings.sim_realtime) as station:
        daemon = Daemon(
            policy, station, InstructionVerifier(), robot=robot, episodes_dir=settings.episodes_dir,
            config=settings.daemon, runner_config=settings.runner, record_frames=settings.record_frames,
        )
        yield daemon, station


@contextlib.contextmanager
def fake_daemon_in_process(config: Path, step_s: float = 0.0) -> Iterator[Daemon]:
    """The fake daemon and its API on the configured Unix socket, in this process (no signals, no
    sd_notify: `serve` needs the main thread): what `main` serves, for tests that need no subprocess."""
    settings = load_runtime_config(config)
    path = server_socket_path(settings.daemon)
    prepare_socket_path(path, settings.daemon.socket_group)
    with fake_station_daemon(settings, step_s) as (daemon, _):
        api = ApiServer(daemon, settings.daemon, unix_path=path).start()
        try:
            yield daemon
        finally:
            try:
                daemon.shutdown("fake daemon finished")  # as `serve` does: the episode stops, the arm parks
            finally:
                api.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--step-s", type=float, default=0.0)
    args = parser.parse_args()
    configure_logging("INFO")
    settings = load_runtime_config(args.config)
    with fake_station_daemon(settings, args.step_s) as (daemon, station):
        code = serve(daemon, settings.daemon)  # until SIGTERM; shuts the daemon down (parks the arm)
        # Where the arm ended up, for the SIGTERM test (the process's last line on stdout).
        state = station.arm.read_state()
        print(f"final_joints={list(state.joints)}", flush=True)
        return code


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
