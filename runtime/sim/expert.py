"""A scripted expert that solves the simulated tasks, and the loop that records its demonstrations.

The expert speaks the model's action language: chunks of `Action(dx, dy, dz, gripper)` in metres,
each move no longer than the robot's per-action limit, each chunk within the chunk length and path
budget, gripper 1 = open, 0 = closed. It plans from the simulator's ground truth (it is a
demonstrator, not a policy). Its chunks go through the `SafetyLimiter` and `Arm.execute` exactly
as a model's would: there is no other path to the arm. Every executed action becomes one step of
a demonstration in the episode format (pose, gripper, commanded action, optionally the camera
frame, and the scene description for text-only models).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from vlm2vla_edge.runtime.actions import Action, ActionChunk, Vec3
from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeWriter, ExecutedCommand, SafetyRecord, StepRecord
from vlm2vla_edge.runtime.robot.base import ArmState, MoveResult
from vlm2vla_edge.runtime.safety import SafeCommand, SafetyLimiter
from vlm2vla_edge.runtime.sim.scene import KeyPoints
from vlm2vla_edge.runtime.sim.tasks import (
    CompositeTask,
    Episode,
    Language,
    PickTask,
    PlaceTask,
    Task,
    sample_episode,
)
from vlm2vla_edge.runtime.sim.world import SimArm, SimWorld

#: Fraction of the per-action limit the expert uses, so float rounding never triggers a clamp.
_STEP_MARGIN = 0.98


@dataclass(frozen=True, slots=True)
class Waypoint:
    """Go to `position` in a straight line, then set the gripper."""

    position: Vec3
    gripper_open: bool


@dataclass(frozen=True, slots=True)
class Heights:
    """The expert's motions that are not a scene key point (`KeyPoints`), metres."""

    lift_m: float = 0.10  # "lift": straight up by this much from the grasp point
    release_drop_m: float = 0.03  # "release": down by this much from the container's approach point, then open


class ScriptedExpert:
    """Plans waypoints from the ground-truth scene and turns them into limiter-sized action chunks."""

    def __init__(self, robot: RobotConfig, heights: Heights | None = None) -> None:
        self.robot = robot
        self.heights = heights or Heights()
        # The fingertips' lowest point is the robot's floor: grasp points never go below it.
        self.points = KeyPoints(min_grasp_z_m=max(robot.workspace.z.min, robot.z_floor) - robot.table_z + 0.001)
        limits = robot.limits
        self.step_m = limits.max_translation_per_action_m * _STEP_MARGIN
        self.chunk_len = limits.max_chunk_length
        self.chunk_path_m = limits.max_translation_per_chunk_m * _STEP_MARGIN
        box = robot.workspace
        self._lo = (box.x.min, box.y.min, max(box.z.min, robot.z_floor))
        self._hi = (box.x.max, box.y.max, box.z.max)

    # --- planning -----------------------------------------------------------------------------

    def chunks(self, task: Task, world: SimWorld) -> Iterator[ActionChunk]:
        """The chunks solving `task`, planned part by part from the world as it is when a part starts."""
        parts = task.parts if isinstance(task, CompositeTask) else (task,)
        for part in parts:
            waypoints = self.plan(part, world)
            start = world.ee_position
            gripper = world.gripper_open
            yield from self._chunk(self._actions(start, gripper, waypoints))

    def plan(self, task: Task, world: SimWorld) -> list[Waypoint]:
        """Waypoints for one simple task (pick or place) from the current state.

        Every waypoint is a scene key point or a fixed move from one, so that each subtask of a
        demonstration ends where the scene text (`describe`) says it should: move to the object's
        `above` point, descend to its `grasp` point and close, lift straight up by `lift_m`, and for a
        placement move to the container's `above` point, descend `release_drop_m` and open.
        """
        scene = world.scene
        h = self.heights
        table = scene.region.table_z
        item = scene[task.item] if isinstance(task, (PickTask, PlaceTask)) else None
        if item is None:
            raise TypeError(f"the expert plans pick and place tasks, not {type(task).__name__}")
        above = self.points.above(item, table)
        grasp = self.points.grasp(item, table)
        lifted = (grasp[0], grasp[1], grasp[2] + h.lift_m)
        pick = [Waypoint(above, True), Waypoint(grasp, False), Waypoint(lifted, False)]
        if not isinstance(task, PlaceTask):  # a PickTask (any other task raised above)
            return pick
        target = scene[task.target]
        drop = self.points.above(target, table)
        release = (drop[0], drop[1], drop[2] - h.release_drop_m)
        return [*pick, Waypoint(drop, False), Waypoint(release, True)]

    def subtask_names(self, task: Task) -> list[str]:
        """The subtask of each waypoint `chunks` goes through, in the annotator's wording: one subtask per
        waypoint ("Move to the carrot", "Grasp the carrot", "Lift the carrot", then for a placement
        "Move to the pot", "Release the carrot")."""
        names: list[str] = []
        for part in task.parts if isinstance(task, CompositeTask) else (task,):
            if not isinstance(part, (PickTask, PlaceTask)):
                raise TypeError(f"the expert plans pick and place tasks, not {type(part).__name__}")
            item = part.item
            names += [f"Move to the {item}", f"Grasp the {item}", f"Lift the {item}"]
            if isinstance(part, PlaceTask):
                names += [f"Move to the {part.target}", f"Release the {item}"]
        return names

    def waypoint_chunks(self, task: Task, world: SimWorld, count: int) -> Iterator[ActionChunk]:
        """The chunks of the first `count` waypoints of `task` (the state where subtask `count` begins)."""
        done = 0
        for part in task.parts if isinstance(task, CompositeTask) else (task,):
            for waypoint in self.plan(part, world):
                if done >= count:
                    return
                yield from self._chunk(self._actions(world.ee_position, world.gripper_open, [waypoint]))
                done += 1

    def first_chunk(self, start: Vec3, gripper_open: bool, waypoint: Waypoint) -> ActionChunk:
        """The first chunk the expert sends from `start` toward `waypoint` (a state's correction: DAgger)."""
        return next(self._chunk(self._actions(start, gripper_open, [waypoint])))

    # --- actions and chunks -------------------------------------------------------------------

    def _actions(self, start: Vec3, gripper_open: bool, waypoints: list[Waypoint]) -> list[Action]:
        """Straight moves cut into equal steps <= step_m; a gripper change rides on the last step of a move."""
        actions: list[Action] = []
        here = np.asarray(start, dtype=float)
        for wp in waypoints:
            goal = np.clip(np.asarray(wp.position, dtype=float), self._lo, self._hi)
            delta = goal - here
            n = max(1, math.ceil(float(np.linalg.norm(delta)) / self.step_m))
            for i in range(n):
                g = wp.gripper_open if i == n - 1 else gripper_open
                d = delta / n
                actions.append(Action(float(d[0]), float(d[1]), float(d[2]), 1.0 if g else 0.0))
            here = goal
            gripper_open = wp.gripper_open
        return actions

    def _chunk(self, actions: list[Action]) -> Iterator[ActionChunk]:
        current: list[Action] = []
        path = 0.0
        for action in actions:
            if current and (len(current) >= self.chunk_len or path + action.norm() > self.chunk_path_m):
                yield ActionChunk(tuple(current))
                current, path = [], 0.0
            current.append(action)
            path += action.norm()
        if current:
            yield ActionChunk(tuple(current))


# --- running and recording ------------------------------------------------------------------------


@dataclass(slots=True)
class DemoResult:
    """How one expert episode went."""

    seed: int
    instruction: str
    success: bool
    partial_credit: float
    steps: int
    rejected: int  # chunks (or commands) the limiter refused
    clamped: int  # commands the limiter changed
    incomplete_moves: int  # moves that did not reach their target
    path: Path | None = None  # the recorded episode folder, when recorded
    notes: list[str] = field(default_factory=list)


def run_expert_episode(
    episode: Episode,
    robot: RobotConfig,
    *,
    record_to: Path | None = None,
    frames: bool = True,
    episode_id: str | None = None,
) -> DemoResult:
    """Run the expert on one episode through limiter and arm; optionally record it under `record_to`."""
    world = SimWorld(robot, episode.scene.copy(), realtime=False)
    arm = SimArm(world)
    limiter = SafetyLimiter(robot, reachable=world.reachable, clock=world.clock)
    expert = ScriptedExpert(robot)
    task = episode.task
    result = DemoResult(
        seed=episode.seed, instruction=task.instruction(), success=False, partial_credit=0.0,
        steps=0, rejected=0, clamped=0, incomplete_moves=0,
    )
    recorder = _Recorder.open(record_to, episode, robot, world, frames, episode_id) if record_to is not None else None
    try:
        with arm:
            stop = False
            for chunk in expert.chunks(task, world):
                verdict = limiter.check_chunk(chunk, arm.read_state().position)
                result.clamped += sum(1 for c in verdict.commands if c.clamped)
                if verdict.rejected:
                    result.rejected += 1
                    result.notes.append(verdict.reason)
                    stop = True
                for command in verdict.commands:
                    before = arm.read_state()
                    frame_image = world.render() if recorder is not None and recorder.frames else None
                    description = world.describe() if recorder is not None else ""
                    move = arm.execute(command)
                    result.steps += 1
                    if not move.completed:
                        result.incomplete_moves += 1
                        result.notes.append(move.note)
                        stop = True
                    if recorder is not None:
                        recorder.step(before, command, move, frame_image, description)
                    if stop:
                        break
                if stop:
                    break
        result.success = task.success(world)
        result.partial_credit = task.partial_credit(world)
        if result.path is None and recorder is not None:
            result.path = recorder.finish(result)
            recorder = None
    finally:
        if recorder is not None:
            recorder.abort()
    return result


class _Recorder:
    """Writes one demonstration in the episode format: one step per executed command."""

    def __init__(self, writer: EpisodeWriter, world: SimWorld, frames: bool) -> None:
        self.writer = writer
        self.world = world
        self.frames = frames
        self.t0 = world.clock()

    @classmethod
    def open(
        cls, root: Path, episode: Episode, robot: RobotConfig, world: SimWorld, frames: bool, episode_id: str | None
    ) -> "_Recorder":
        task = episode.task
        meta = EpisodeMeta(
            instruction=task.instruction(),
            source="sim",
            robot_name=robot.name,
            robot_model=robot.model,
            camera="sim" if frames else None,
            action_units="m",
            extra={
                "seed": episode.seed,
                "language": task.language,
                "instruction_en": task.instruction("en"),
                "task": type(task).__name__,
                "objects": sorted(episode.scene.objects),
            },
        )
        writer = EpisodeWriter.create(root, meta, episode_id or f"sim-{episode.seed:07d}")
        return cls(writer, world, frames)

    def step(
        self, before: ArmState, command: SafeCommand, move: MoveResult, image: np.ndarray | None, description: str
    ) -> None:
        image_name = self.writer.write_frame(image) if image is not None else None
        record = StepRecord(
            index=self.writer.next_index,
            t=self.world.clock() - self.t0,
            wall_time=time.time(),
            ee_position=before.position,
            ee_rpy=before.rpy,
            gripper_open=before.gripper_open,
            action=command.source.as_list(),
            image=image_name,
            stage="demo",
            safety=[SafetyRecord(**d.to_dict()) for d in command.decisions],
            executed=[
                ExecutedCommand(
                    target=command.target, gripper_open=command.gripper_open, completed=move.completed,
                    reached=move.reached, error_m=move.error_m, duration_s=move.duration_s, note=move.note,
                )
            ],
            extra={"scene_description": description},
        )
        self.writer.append_step(record)

    def finish(self, result: DemoResult) -> Path:
        if result.success:
            self.writer.finish("success", f"expert solved the task in {result.steps} steps")
        else:
            detail = "; ".join(result.notes) or f"task not solved (partial credit {result.partial_credit:.2f})"
            self.writer.finish("failed", detail)
        return self.writer.path

    def abort(self) -> None:
        if not self.writer.finished:
            self.writer.finish("error", "the expert run raised an exception")


def expert_episode_id(seed: int) -> str:
    """The folder name of the demonstration of suite episode `seed`."""
    return f"sim-{seed:07d}"


def record_demonstrations(
    out: Path,
    seeds: Sequence[int],
    robot: RobotConfig,
    *,
    languages: Sequence[Language] | None = None,
    frames: bool = True,
    progress: Callable[[str, DemoResult], None] | None = None,
) -> list[DemoResult]:
    """Record the expert on the suite episodes of `seeds` as `out/sim-<seed>` folders. Episode i's
    instruction is in `languages[i % len(languages)]` (None: drawn per episode from its seed);
    `progress(episode_id, result)` follows each one."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, seed in enumerate(seeds):
        language = languages[i % len(languages)] if languages else None
        episode_id = expert_episode_id(seed)
        result = run_expert_episode(
            sample_episode(seed, language=language), robot, record_to=out, frames=frames, episode_id=episode_id
        )
        results.append(result)
        if progress is not None:
            progress(episode_id, result)
    return results
