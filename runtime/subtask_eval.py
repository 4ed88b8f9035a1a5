"""Per-subtask success from the expert's states: each subtask of a task, started where the scripted expert
leaves the scene, run by the policy alone and scored by the simulator's ground truth.

A whole-episode success rate multiplies the success of every subtask, so one weak subtask hides how good
the others are. Here subtask k of a held-out episode starts from the state the expert reaches after its
first k waypoints (one waypoint per subtask: `ScriptedExpert.subtask_names`); the runner then works on
that one subtask with the given name (the subtask stage is skipped), with its usual verifier, retries and
limiter, and the simulator says whether the subtask's goal holds afterwards:

==================  =================================================================================
move to an object   gripper within `arrive_cm` of the object's approach point, horizontally and in height
grasp               the object is held
lift                the object is held with its bottom at least the suite's lift height over the table
move to container   the held object's centre is over the container's footprint
release             the object rests in/on the container
==================  =================================================================================
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel

from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig
from vlm2vla_edge.runtime.sim.expert import ScriptedExpert
from vlm2vla_edge.runtime.sim.scene import KeyPoints
from vlm2vla_edge.runtime.sim.tasks import LIFT_HEIGHT_M, CompositeTask, Language, PickTask, PlaceTask, Task

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.policy.interface import Policy
    from vlm2vla_edge.runtime.sim.session import SimSession
    from vlm2vla_edge.runtime.sim.world import SimWorld
    from vlm2vla_edge.runtime.verifier.base import Verifier


class SubtaskRun(BaseModel):
    seed: int
    index: int
    subtask: str
    kind: str
    success: bool
    runner_outcome: str
    steps: int
    detail: str


class SubtaskReport(BaseModel):
    runs: list[SubtaskRun]
    by_kind: dict[str, float]
    overall: float | None
    wall_s: float

    def table(self) -> str:
        counts: dict[str, list[bool]] = defaultdict(list)
        for run in self.runs:
            counts[run.kind].append(run.success)
        lines = ["per-subtask success from the expert's states:"]
        for kind, values in counts.items():
            lines.append(f"  {kind:<18}{sum(values):>4}/{len(values):<4} {100 * sum(values) / len(values):5.0f}%")
        if self.overall is not None:
            successes = sum(r.success for r in self.runs)
            lines.append(f"  {'all':<18}{successes:>4}/{len(self.runs):<4} {100 * self.overall:5.0f}%")
        return "\n".join(lines)


def _goals(task: Task) -> list[tuple[str, Callable[["SimWorld"], bool]]]:
    """(kind, ground-truth check) per expert waypoint, in order."""
    points = KeyPoints()
    goals: list[tuple[str, Callable[[SimWorld], bool]]] = []
    for part in task.parts if isinstance(task, CompositeTask) else (task,):
        assert isinstance(part, (PickTask, PlaceTask))
        item = part.item

        def arrived(world: "SimWorld", name: str = item) -> bool:
            goal = points.above(world.scene[name], world.scene.region.table_z)
            here = world.ee_position
            return math.hypot(here[0] - goal[0], here[1] - goal[1]) <= 0.03 and abs(here[2] - goal[2]) <= 0.03

        def grasped(world: "SimWorld", name: str = item) -> bool:
            return world.scene.held == name

        def lifted(world: "SimWorld", name: str = item) -> bool:
            return world.scene.lifted(name, LIFT_HEIGHT_M)

        goals += [("move to object", arrived), ("grasp", grasped), ("lift", lifted)]
        if isinstance(part, PlaceTask):
            target = part.target

            def over(world: "SimWorld", name: str = item, container: str = target) -> bool:
                obj = world.scene[name]
                return world.scene.held == name and world.scene[container].contains_xy(obj.position[0], obj.position[1])

            def released(world: "SimWorld", name: str = item, container: str = target) -> bool:
                return world.scene.rests_in(name, container)

            goals += [("move to container", over), ("release", released)]
    return goals


def run_subtask_eval(
    policy: "Policy",
    robot: RobotConfig,
    seeds: list[int],
    language: Language,
    make_session: Callable[[RobotConfig, int, Language], "SimSession"],
    verifier: "Verifier",
    runner_config: RunnerConfig | None = None,
    echo: Callable[[str], None] = print,
) -> SubtaskReport:
    """Every subtask of every seed's task, each from a fresh simulated robot brought there by the expert."""
    started = time.monotonic()
    expert = ScriptedExpert(robot)
    runs: list[SubtaskRun] = []
    for seed in seeds:
        probe = make_session(robot, seed, language)
        task = probe.task
        probe.close()
        if task is None:
            raise ValueError(f"seed {seed} gave no suite task")
        names, goals = expert.subtask_names(task), _goals(task)
        for index, (name, (kind, reached)) in enumerate(zip(names, goals)):
            session = make_session(robot, seed, language)
            try:
                with_arm = session.arm
                for chunk in expert.waypoint_chunks(task, session.world, index):
                    verdict = session.limiter.check_chunk(chunk, with_arm.read_state().position)
                    for command in verdict.commands:
                        with_arm.execute(command)
                runner = EpisodeRunner(policy, session.arm, session.camera, verifier, session.limiter,
                                       config=runner_config, hooks=session.hooks)
                result = runner.run(session.instruction, subtasks=[name])
                success = bool(reached(session.world))
            finally:
                session.close()
            runs.append(SubtaskRun(seed=seed, index=index, subtask=name, kind=kind, success=success,
                                   runner_outcome=result.outcome, steps=result.steps, detail=result.detail))
            echo(f"  seed {seed} subtask {index + 1}/{len(names)} {name!r}: {'ok' if success else 'FAIL'} "
                 f"({result.steps} steps, runner {result.outcome})")
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for run in runs:
        by_kind[run.kind].append(run.success)
    return SubtaskReport(
        runs=runs,
        by_kind={k: sum(v) / len(v) for k, v in by_kind.items()},
        overall=sum(r.success for r in runs) / len(runs) if runs else None,
        wall_s=time.monotonic() - started,
    )


__all__ = ["SubtaskReport", "SubtaskRun", "run_subtask_eval"]
