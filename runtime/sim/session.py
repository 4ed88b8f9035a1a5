"""A ready-to-run simulated robot: world, arm, camera, limiter and scene hooks for the episode loop.

`vlm2vla-edge do --sim`, the demo and the evaluation harness build their robot here, so each uses
the same limiter set-up (the world's IK as the reachability check, its clock for the rate limit).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.robot.base import ArmState
from vlm2vla_edge.runtime.runner import SceneHooks
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.sim.scene import CATALOGUE, Scene
from vlm2vla_edge.runtime.sim.tasks import NOUNS, Language, Task, sample_episode
from vlm2vla_edge.runtime.sim.world import SimArm, SimCamera, SimWorld

_ARTICLES = re.compile(r"^(the|la|el|le|l'|den|die|das|der)\s*", re.IGNORECASE)


def _fold(text: str) -> str:
    """Lower case without accents, so "plátano" matches "platano"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _name_table() -> list[tuple[str, str]]:
    """(folded noun, catalogue name), longest first so "pan" does not shadow "plátano"-like overlaps."""
    table = {(_fold(name), name) for name in CATALOGUE}
    for nouns in NOUNS.values():
        for name, phrase in nouns.items():
            table.add((_fold(_ARTICLES.sub("", phrase)), name))
    return sorted(table, key=lambda pair: -len(pair[0]))


_NAMES = _name_table()


def objects_mentioned(instruction: str) -> tuple[str, ...]:
    """Catalogue objects an instruction names, in any of the suite's languages, in order of mention."""
    text = _fold(instruction)
    found: list[tuple[int, str]] = []
    taken: list[tuple[int, int]] = []
    for noun, name in _NAMES:
        pattern = re.escape(noun) if not noun.isascii() else rf"(?<![a-z]){re.escape(noun)}(?![a-z])"
        for match in re.finditer(pattern, text):
            span = (match.start(), match.end())
            if any(s < span[1] and span[0] < e for s, e in taken):
                continue  # part of a longer name already matched
            taken.append(span)
            if name not in (n for _, n in found):
                found.append((match.start(), name))
    return tuple(name for _, name in sorted(found))


def scene_for_instruction(instruction: str, seed: int, n_distractors: int | None = None) -> Scene:
    """A table holding every object the instruction names (the rest random from `seed`)."""
    required = objects_mentioned(instruction)
    return Scene.random(seed, required=required, n_distractors=2 if n_distractors is None else n_distractors)


@dataclass
class SimSession:
    world: SimWorld
    arm: SimArm
    camera: SimCamera
    limiter: SafetyLimiter
    hooks: SceneHooks
    seed: int
    instruction: str
    task: Task | None  # the suite task when the instruction came from the suite (evaluation); else None

    def close(self) -> None:
        self.arm.disconnect()
        self.camera.disconnect()


def make_sim_session(
    robot: RobotConfig,
    seed: int = 0,
    instruction: str | None = None,
    *,
    realtime: bool = False,
    n_distractors: int | None = None,
    language: Language | None = None,
) -> SimSession:
    """A connected simulated robot. Without an instruction the suite samples a task from `seed` (in
    `language`, else a random one); with one, the scene holds every object it names (the rest random
    from `seed`)."""
    if instruction is None:
        episode = sample_episode(seed, language=language, n_distractors=n_distractors)
        scene, task, instruction = episode.scene, episode.task, episode.task.instruction()
    else:
        scene, task = scene_for_instruction(instruction, seed, n_distractors), None
    world = SimWorld(robot, scene, realtime=realtime)
    arm, camera = SimArm(world), SimCamera(world)
    arm.connect()
    camera.connect()
    limiter = SafetyLimiter(robot, reachable=world.reachable, clock=world.clock)

    def gripper_pixel(state: ArmState) -> tuple[float, float] | None:
        cam = world.renderer.camera
        u, v = cam.project_point(state.position)
        if not (0 <= u <= cam.width and 0 <= v <= cam.height):
            return None
        return (u / cam.width, v / cam.height)

    hooks = SceneHooks(describe=world.describe, gripper_pixel=gripper_pixel)
    return SimSession(world, arm, camera, limiter, hooks, seed, instruction, task)
