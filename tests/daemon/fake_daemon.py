"""Test-only entry point: the real daemon (`Daemon` + `serve`) on the simulator, with a scripted policy.

The product builds its daemon from a model bundle (`serve_from_config`); the tests need episodes whose
length and outcome they control, so this script injects `ScriptedPolicy` (each step "generates" for
`--step-s` seconds, checking the cancel flag like the decoder does) and a verifier that fails any
instruction containing "fail". Everything else — station, runner, recorder, API, signals, sd_notify —
is the product's code path.

    python tests/daemon/fake_daemon.py --config runtime.yaml --step-s 0.3
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fakes package

from fakes.policies import ScriptedPolicy  # noqa: E402

from vlm2vla_edge.runtime.config import load_robot_config, load_runtime_config  # noqa: E402
from vlm2vla_edge.runtime.daemon.server import serve  # noqa: E402
from vlm2vla_edge.runtime.daemon.service import Daemon  # noqa: E402
from vlm2vla_edge.runtime.station import open_station  # noqa: E402
from vlm2vla_edge.runtime.logs import configure_logging  # noqa: E402
from vlm2vla_edge.runtime.policy.interface import GenerationCancelled  # noqa: E402
from vlm2vla_edge.runtime.verifier.base import VerificationRequest, Verdict, Verifier, cancelled_verdict  # noqa: E402


class InstructionVerifier(Verifier):
    """Success unless the instruction says "fail"; a verdict only after the arm really moved."""

    name = "test"

    def verify(self, request: VerificationRequest, cancel: threading.Event | None = None) -> Verdict:
        if cancel is not None and cancel.is_set():
            return cancelled_verdict(self.name, 0.0, attempts=0)
        moved = sum(abs(a - b) for a, b in zip(request.pre_state.position, request.post_state.position)) > 1e-4
        ok = moved and "fail" not in request.instruction
        return Verdict(success=ok, reason="moved" if moved else "did not move", verifier=self.name, latency_s=0.0)


def slow_generation(step_s: float):
    def hook(index: int, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.wait(step_s):
            raise GenerationCancelled("cancelled mid-generation")

    return hook


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--step-s", type=float, default=0.0)
    args = parser.parse_args()
    configure_logging("INFO")
    settings = load_runtime_config(args.config)
    robot = load_robot_config(settings.robot)
    policy = ScriptedPolicy(
        actions=("[[0.03, 0, -0.02, 1], [0.03, 0, 0, 1]]", "[[-0.03, 0, 0.02, 0], [-0.03, 0, 0, 0]]"),
        on_step=slow_generation(args.step_s),
        cycle=True,  # out and back in turn: many episodes in one daemon never walk the arm to the box's edge
    )
    with open_station(robot, sim=True, seed=settings.sim_seed, realtime=settings.sim_realtime) as station:
        daemon = Daemon(
            policy, station, InstructionVerifier(), robot=robot, episodes_dir=settings.episodes_dir,
            config=settings.daemon, runner_config=settings.runner, record_frames=settings.record_frames,
        )
        code = serve(daemon, settings.daemon)
        # Where the arm ended up, for the SIGTERM test (the process's last line on stdout).
        state = station.arm.read_state()
        print(f"final_joints={list(state.joints)}", flush=True)
        return code


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
