"""One episode in this process (`vlm2vla-edge do --local`): load the bundle, set up the robot (simulated
or real), run the loop with live progress, and record the episode.

The daemon (`runtime/daemon/`) holds these same pieces (`load_policy`, `open_station`, `episode_meta`)
across episodes; here they live for one run and are always released (arm stopped, model freed) on
the way out.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from vlm2vla_edge.runtime.config import PolicyConfig, RobotConfig, load_config
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeWriter
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.recording import EpisodeRecorder, ProgressPrinter
from vlm2vla_edge.runtime.runner import EpisodeResult, EpisodeRunner, RunnerConfig, SceneHooks
from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig, make_verifier

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.policy.engine import Policy
    from vlm2vla_edge.runtime.policy.interface import Policy as PolicyInterface
    from vlm2vla_edge.runtime.robot.base import Arm, Camera
    from vlm2vla_edge.runtime.safety import SafetyLimiter
    from vlm2vla_edge.runtime.sim.session import SimSession


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
    adapter: str | None = None  # a base + adapters bundle's adapter (skill); None: the bundle's default


@dataclass(frozen=True)
class LocalRunResult:
    result: EpisodeResult
    episode_dir: Path


def run_local(options: LocalRunOptions, echo: Callable[[str], None] = print) -> LocalRunResult:
    """Run one episode end to end; Ctrl-C cancels it cleanly (arm stopped, episode recorded)."""
    with contextlib.closing(load_policy(options.bundle, options.policy, echo, adapter=options.adapter)) as policy:
        with open_station(
            options.robot, sim=options.sim, seed=options.seed, instruction=options.instruction,
            devices=options.devices, realtime=options.realtime,
        ) as station:
            writer = EpisodeWriter.create(
                options.episodes_dir,
                episode_meta(options.instruction, options.robot, station, policy, seed=options.seed if options.sim else None),
            )
            runner = EpisodeRunner(
                policy, station.arm, station.camera, make_verifier(options.verifier), station.limiter,
                config=options.runner, hooks=station.hooks,
                subscribers=[EpisodeRecorder(writer, options.record_frames), ProgressPrinter(echo=echo)],
            )
            with on_interrupt(lambda: runner.cancel(INTERRUPTED)):
                result = runner.run(options.instruction)
            return LocalRunResult(result, writer.path)


def load_policy(
    bundle_path: Path, config: PolicyConfig, echo: Callable[[str], None] = print, *, adapter: str | None = None
) -> "Policy":
    """The llama.cpp policy of a verified bundle (the caller closes it); a base + adapters bundle starts
    with `adapter` (None: its default) and holds all its adapters."""
    from vlm2vla_edge.runtime.policy.bundle import load_bundle
    from vlm2vla_edge.runtime.policy.engine import Policy

    bundle = load_bundle(bundle_path)
    if bundle.adapters:
        chosen = bundle.adapter(adapter).name
        echo(
            f"loading model bundle {bundle.manifest.name} ({bundle.text_model.name} + LoRA adapter '{chosen}'"
            + (f"; also {', '.join(n for n in bundle.adapters if n != chosen)}" if len(bundle.adapters) > 1 else "")
            + ")..."
        )
    else:
        if adapter is not None:
            bundle.adapter(adapter)  # BundleError: a merged bundle has no adapters
        echo(f"loading model bundle {bundle.manifest.name} ({bundle.text_model.name})...")
    return Policy.from_bundle(bundle, config, adapter=adapter)


def episode_meta(
    instruction: str, robot: RobotConfig, station: "Station", policy: "PolicyInterface", seed: int | None = None
) -> EpisodeMeta:
    """The meta.json of a new policy episode on this station."""
    return EpisodeMeta(
        instruction=instruction,
        source="policy",
        robot_name=robot.name,
        robot_model=robot.model,
        camera=station.camera_name,
        action_units=policy.action_language.units,
        grammar_version=policy.action_language.grammar_version,
        bundle_id=policy.bundle_id,
        # Only the engine's policy has run-time adapters; fakes and merged-model policies may lack the attribute.
        adapter=getattr(policy, "adapter", None),
        extra={"seed": seed} if seed is not None else {},
    )


@dataclass
class Station:
    """The connected robot an episode runs on: arm, camera, the limiter in front of the arm, scene hooks."""

    arm: "Arm"
    camera: "Camera"
    limiter: "SafetyLimiter"
    hooks: SceneHooks
    camera_name: str
    sim: "SimSession | None" = None

    def set_table_for(self, instruction: str, seed: int) -> bool:
        """Simulator only: when the scene lacks an object the instruction names, lay out a new scene that
        holds them (what a person does before the next task on a real table). True if the scene changed."""
        if self.sim is None:
            return False
        from vlm2vla_edge.runtime.sim.session import objects_mentioned, scene_for_instruction

        world = self.sim.world
        if all(name in world.scene.objects for name in objects_mentioned(instruction)):
            return False
        world.scene = scene_for_instruction(instruction, seed)
        self.sim.instruction, self.sim.seed, self.sim.task = instruction, seed, None
        return True


@contextlib.contextmanager
def open_station(
    robot: RobotConfig,
    *,
    sim: bool,
    seed: int = 0,
    instruction: str | None = None,
    devices: Path | None = None,
    realtime: bool = False,
) -> Iterator[Station]:
    """A connected station (simulated or real); disconnected on exit whatever happens."""
    from vlm2vla_edge.runtime.safety import SafetyLimiter

    if sim:
        from vlm2vla_edge.runtime.sim.session import make_sim_session

        session = make_sim_session(robot, seed, instruction, realtime=realtime)
        try:
            yield Station(session.arm, session.camera, session.limiter, session.hooks, "sim", sim=session)
        finally:
            session.close()
        return
    if devices is None:
        raise UserError("a real robot needs --devices FILE (YAML with 'arm:' and 'camera:' sections), or use --sim")
    from vlm2vla_edge.runtime.robot.devices import DevicesConfig, make_arm, make_camera
    from vlm2vla_edge.runtime.sim.kinematics import WX250sKinematics

    config = load_config(devices, DevicesConfig)
    arm, camera = make_arm(config.arm, robot), make_camera(config.camera)
    limiter = SafetyLimiter(robot, reachable=WX250sKinematics(robot).reachable)
    arm.connect()
    try:
        camera.connect()
        try:
            yield Station(arm, camera, limiter, SceneHooks(), config.camera.kind)
        finally:
            camera.disconnect()
    finally:
        arm.disconnect()


INTERRUPTED = "interrupted by the user (Ctrl-C)"


@contextlib.contextmanager
def on_interrupt(callback: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C (SIGINT) calls `callback` instead of killing the process mid-move (main thread only;
    elsewhere signals cannot be handled and nothing changes). The previous handler comes back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        callback()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
