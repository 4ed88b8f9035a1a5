"""The wiring of a policy episode: the verified bundle's policy (`load_policy`), the connected station it
acts on (`open_station`: simulated or real arm, camera, the limiter in front of the arm, scene hooks) and
the episode's meta.json (`episode_meta`).

One place for it because three runs share it: a one-off `do --local` (`local_run`), the daemon that
holds the policy and station across episodes (`daemon/`), and evaluation and benchmarks. It is the layer
that may know the simulator; the runner, policy, robot and safety modules never do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from vlm2vla_edge.runtime.config import PolicyConfig, RobotConfig, load_config
from vlm2vla_edge.runtime.episode import EpisodeMeta
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.runner import SceneHooks

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy
    from vlm2vla_edge.runtime.policy.interface import Policy
    from vlm2vla_edge.runtime.robot.base import Arm, Camera
    from vlm2vla_edge.runtime.safety import SafetyLimiter
    from vlm2vla_edge.runtime.sim.session import SimSession


def load_policy(
    bundle_path: Path, config: PolicyConfig, echo: Callable[[str], None] = print, *, adapter: str | None = None
) -> "LlamaPolicy":
    """The llama.cpp policy of a verified bundle (the caller closes it); a base + adapters bundle starts
    with `adapter` (None: its default) and holds all its adapters."""
    from vlm2vla_edge.runtime.policy.bundle import load_bundle
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy

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
    return LlamaPolicy.from_bundle(bundle, config, adapter=adapter)


def episode_meta(
    instruction: str, robot: RobotConfig, station: "Station", policy: "Policy", seed: int | None = None
) -> EpisodeMeta:
    """The meta.json of a new policy episode on this station."""
    return EpisodeMeta(
        instruction=instruction,
        source="policy",
        robot_name=robot.name,
        robot_model=robot.model,
        camera=station.camera_name,
        # The parser turns every action into metres, whatever units the model writes them in (cm in v2):
        # the episode records what was commanded, so its values are metres.
        action_units="m",
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
    from vlm2vla_edge.runtime.robot.devices import DevicesConfig
    from vlm2vla_edge.runtime.robot.factory import make_arm, make_camera
    from vlm2vla_edge.runtime.robot.kinematics import WX250sKinematics

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
