"""One episode in this process (`vlm2vla-edge do --local`): load the bundle, set up the robot (simulated
or real), run the loop with live progress, and record the episode.

The daemon will hold these same pieces across episodes; here they live for one run and are always
released (arm stopped, model freed) on the way out.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlm2vla_edge.runtime.config import PolicyConfig, RobotConfig, load_config
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeWriter
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.recording import EpisodeRecorder, ProgressPrinter
from vlm2vla_edge.runtime.runner import EpisodeResult, EpisodeRunner, RunnerConfig, SceneHooks
from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig, make_verifier


@dataclass(frozen=True)
class LocalRunOptions:
    instruction: str
    bundle: Path
    robot: RobotConfig
    policy: PolicyConfig
    episodes_dir: Path
    sim: bool = True
    seed: int = 0
    devices: Path | None = None  # YAML with `arm:` and `camera:` sections (real hardware)
    verifier: VerifierConfig = VerifierConfig()
    runner: RunnerConfig = RunnerConfig()
    realtime: bool = False
    record_frames: bool = True


@dataclass(frozen=True)
class LocalRunResult:
    result: EpisodeResult
    episode_dir: Path


def run_local(options: LocalRunOptions, echo: Callable[[str], None] = print) -> LocalRunResult:
    """Run one episode end to end; Ctrl-C cancels it cleanly (arm stopped, episode recorded)."""
    from vlm2vla_edge.runtime.policy.bundle import load_bundle
    from vlm2vla_edge.runtime.policy.engine import Policy

    bundle = load_bundle(options.bundle)
    echo(f"loading model bundle {bundle.manifest.name} ({bundle.text_model.name})...")
    with contextlib.closing(Policy.from_bundle(bundle, options.policy)) as policy:
        with _robot(options) as (arm, camera, limiter, hooks, camera_name):
            writer = EpisodeWriter.create(
                options.episodes_dir,
                EpisodeMeta(
                    instruction=options.instruction,
                    source="policy",
                    robot_name=options.robot.name,
                    robot_model=options.robot.model,
                    camera=camera_name,
                    action_units=policy.action_language.units,
                    grammar_version=policy.action_language.grammar_version,
                    bundle_id=policy.bundle_id,
                    extra={"seed": options.seed} if options.sim else {},
                ),
            )
            runner = EpisodeRunner(
                policy, arm, camera, make_verifier(options.verifier), limiter,
                config=options.runner, hooks=hooks,
                subscribers=[EpisodeRecorder(writer, options.record_frames), ProgressPrinter(echo=echo)],
            )
            with _cancel_on_interrupt(runner):
                result = runner.run(options.instruction)
            return LocalRunResult(result, writer.path)


@contextlib.contextmanager
def _robot(options: LocalRunOptions) -> Iterator[tuple]:
    """(arm, camera, limiter, hooks, camera name), connected; disconnected on exit whatever happens."""
    from vlm2vla_edge.runtime.safety import SafetyLimiter

    if options.sim:
        from vlm2vla_edge.runtime.sim.session import make_sim_session

        session = make_sim_session(options.robot, options.seed, options.instruction, realtime=options.realtime)
        try:
            yield session.arm, session.camera, session.limiter, session.hooks, "sim"
        finally:
            session.close()
        return
    if options.devices is None:
        raise UserError("a real robot needs --devices FILE (YAML with 'arm:' and 'camera:' sections), or use --sim")
    from vlm2vla_edge.runtime.robot.devices import DevicesConfig, make_arm, make_camera
    from vlm2vla_edge.runtime.sim.kinematics import WX250sKinematics

    devices = load_config(options.devices, DevicesConfig)
    arm, camera = make_arm(devices.arm, options.robot), make_camera(devices.camera)
    limiter = SafetyLimiter(options.robot, reachable=WX250sKinematics(options.robot).reachable)
    arm.connect()
    try:
        camera.connect()
        try:
            yield arm, camera, limiter, SceneHooks(), devices.camera.kind
        finally:
            camera.disconnect()
    finally:
        arm.disconnect()


@contextlib.contextmanager
def _cancel_on_interrupt(runner: EpisodeRunner) -> Iterator[None]:
    """Ctrl-C (SIGINT) cancels the episode instead of killing the process mid-move."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        runner.cancel("interrupted by the user (Ctrl-C)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
