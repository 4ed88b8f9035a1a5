"""DAgger: label the states a policy visited with the expert's correction, and add them to a dataset.

Behaviour cloning trains a policy only on the states the expert visits; once the policy drifts off them
(a chunk 3 cm short, a gripper closed on nothing) it meets states no label covers, and errors compound.
DAgger (Ross et al., 2011) closes the loop: run the policy, ask the expert what it would do in every
state the policy reached, add those labels to the dataset, retrain. `vlm2vla-edge data dagger` does the
middle step on recorded policy episodes (`do --local --sim`, `eval --record`, the daemon), so the same
command serves the simulator and a real robot:

- **Simulator episodes** (`expert="sim"`): the episode's seed and instruction give the initial scene;
  replaying the commands the arm executed (the recorded `executed` targets, reached points and gripper
  changes) rebuilds the world of every later step. Each rebuilt state is checked against the recording
  (gripper position and state, and the scene text of a text-only policy's prompt); a state that does not
  match is reported and not labelled. The scripted expert then says, from that state, which subtask it
  is on and where it would go next (`StateExpert`), written as the `relabel` dataset writes its labels:
  the waypoint plan ("Move to the carrot: (-0.11, -0.06, -0.12), gripper open.") and chunk, or in a
  steps language the expert's next chunk and its direction phrase. The subtask list is labelled once per
  episode.
- **A real robot** has no simulator to ask: a person takes over where the policy went wrong and records
  the correction by teleoperation, starting from the state the policy left. Those episodes are ordinary
  demonstrations and get the local annotator's labels (`relabel`'s own `LocalAnnotator` and
  `build_samples`), tagged as corrections.

Provenance: every sample's `episode` and `step` name the recorded episode and its steps.jsonl line; the
dataset's `sources` list each episode with `annotator` "dagger:sim-expert" or "correction:local".

While labelling, the policy's own output at each state is compared with the expert's (subtask list,
current subtask, plan offset, chunk move, gripper), so a user sees at which stage the policy goes wrong.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field

from vlm2vla_edge.runtime.action_text import format_action_chunk, format_subtasks, rounded_offset
from vlm2vla_edge.runtime.actions import Action, ActionChunk, Vec3
from vlm2vla_edge.runtime.config import ActionLanguage, RobotConfig
from vlm2vla_edge.runtime.episode import EpisodeFormatError, EpisodeMeta, EpisodeReader, StepRecord
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, PromptTemplates
from vlm2vla_edge.runtime.scene_text import scene_in_units
from vlm2vla_edge.runtime.sim.expert import ScriptedExpert, Waypoint
from vlm2vla_edge.runtime.sim.render import SCENE_DECIMALS
from vlm2vla_edge.runtime.sim.scene import CATALOGUE, Scene
from vlm2vla_edge.runtime.sim.tasks import ALL_LANGUAGES, CompositeTask, PickTask, PlaceTask, Task, sample_episode
from vlm2vla_edge.runtime.sim.world import SimWorld
from vlm2vla_edge.train.data.chunks import ChunkLimits, build_chunk, settings_dict, waypoint_plan_text
from vlm2vla_edge.train.data.dataset import Sample, SourceEpisode, episode_content_hash
from vlm2vla_edge.train.data.dataset_append import DatasetAppender
from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples, find_episodes
from vlm2vla_edge.train.data.wording import motion_plan_text

EXPERT_ANNOTATOR = "dagger:sim-expert"
CORRECTION_ANNOTATOR = "correction:local"


class DaggerInputError(UserError):
    """An episode cannot be labelled the way asked (not a policy episode, no seed, no known objects)."""


# ---------------------------------------------------------------------------------------------- the expert


@dataclass(frozen=True)
class ExpertRules:
    """When the expert counts the gripper as being at a key point: when the offset to it, at the scene text's
    resolution (`decimals`, centimetres), is zero. A policy that copies a stated offset lands exactly there
    (both sides round the same way, `rounded_offset`), and a state the scene text cannot tell from the
    point is one where the expert's next move is the next subtask's."""

    decimals: int = SCENE_DECIMALS


@dataclass(frozen=True)
class ExpertMove:
    """What the scripted expert does next from a state: the subtask it is on and the waypoint it goes to."""

    subtasks: tuple[str, ...]
    index: int
    goal: Vec3
    gripper_open: bool

    @property
    def subtask(self) -> str:
        return self.subtasks[self.index]


class StateExpert:
    """The scripted expert's next waypoint from any state of a pick/place task.

    `ScriptedExpert.plan` plans a part of a task from its start (above, grasp, lift, and for a placement
    above the container, release). Here the part and the point in it are read from the state: the first
    part whose goal does not hold yet; nothing held: "Move to" the object's approach point with the
    gripper open (also when it closed on nothing: the correction opens it), or, open and within
    `arrive_m` of the approach column, "Grasp" it; holding the object: "Lift" it straight up by the
    expert's lift height from where it was grasped, then "Move to" the container's approach point, then,
    there, "Release" it. Goals are clipped to the workspace as the expert's own moves are.
    """

    def __init__(self, robot: RobotConfig, rules: ExpertRules = ExpertRules()) -> None:
        self.expert = ScriptedExpert(robot)
        self.rules = rules
        box = robot.workspace
        self._lo = np.array((box.x.min, box.y.min, max(box.z.min, robot.z_floor)))
        self._hi = np.array((box.x.max, box.y.max, box.z.max))

    def subtasks(self, task: Task) -> tuple[str, ...]:
        return tuple(self.expert.subtask_names(task))

    def next_move(self, task: Task, world: SimWorld, grasped_at: Vec3 | None) -> ExpertMove | str:
        """The expert's move from `world` (`grasped_at`: where the gripper tip was when the held object was
        grasped), or a reason why the expert has none (the task is done, a wrong object is held)."""
        names = self.subtasks(task)
        first = 0
        for part in task.parts if isinstance(task, CompositeTask) else (task,):
            count = 5 if isinstance(part, PlaceTask) else 3
            if not part.success(world):
                found = self._part_move(part, world, grasped_at)
                if isinstance(found, str):
                    return found
                phase, goal, gripper_open = found
                clipped = tuple(float(v) for v in np.clip(np.asarray(goal, dtype=float), self._lo, self._hi))
                return ExpertMove(names, first + phase, clipped, gripper_open)  # type: ignore[arg-type]
            first += count
        return "the task is already done"

    def _part_move(self, part: Task, world: SimWorld, grasped_at: Vec3 | None) -> tuple[int, Vec3, bool] | str:
        if not isinstance(part, (PickTask, PlaceTask)):
            return f"the expert plans pick and place tasks, not {type(part).__name__}"
        scene, points, heights = world.scene, self.expert.points, self.expert.heights
        table = scene.region.table_z
        tip = world.ee_position
        item = scene[part.item]
        if scene.held is not None and scene.held != part.item:
            return f"the gripper holds the {scene.held}, which this part of the task does not move"
        if scene.held is None:
            above, grasp = points.above(item, table), points.grasp(item, table)
            if world.gripper_open and self._over(tip, above) and self._not_higher(tip, above):
                return 1, grasp, False
            return 0, above, True
        base = grasped_at if grasped_at is not None else (tip[0], tip[1], points.grasp(item, table)[2])
        lift = (base[0], base[1], base[2] + heights.lift_m)
        if isinstance(part, PickTask):
            return 2, (tip[0], tip[1], max(lift[2], tip[2])), False
        container = scene[part.target]
        drop = points.above(container, table)
        if self._over(tip, drop) and self._not_higher(tip, drop):
            return 4, (drop[0], drop[1], drop[2] - heights.release_drop_m), True
        if self._over(tip, lift) and not self._not_higher(lift, tip):
            return 2, (tip[0], tip[1], lift[2]), False
        return 3, drop, False

    def _over(self, tip: Vec3, point: Vec3) -> bool:
        """The horizontal offset from the tip to the point reads zero at the rules' resolution."""
        dx, dy, _ = rounded_offset(tip, point, self.rules.decimals)
        return dx == 0 and dy == 0

    def _not_higher(self, tip: Vec3, point: Vec3) -> bool:
        """The tip is not above the point at the rules' resolution."""
        return rounded_offset(tip, point, self.rules.decimals)[2] >= 0


# ---------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class ExpertLabel:
    """The expert's answer in one state, in the dataset's action language."""

    move: ExpertMove
    plan: str
    chunk: ActionChunk
    chunk_text: str

    @property
    def offset(self) -> Vec3:
        return self.chunk.total_translation()


def label_move(move: ExpertMove, position: Vec3, gripper_open: bool, language: ActionLanguage,
               limits: ChunkLimits, expert: ScriptedExpert) -> ExpertLabel:
    """Plan and chunk of an expert move, worded as `relabel` words a demonstration's windows.

    Waypoint language: one action to the goal (`rounded_offset`, as the scene text states key points) and
    `waypoint_plan_text`. Steps language: the expert's own first chunk toward the goal
    (`ScriptedExpert.first_chunk`), re-aggregated and rounded like a recorded window (`build_chunk`), and
    `motion_plan_text`."""
    before = 1.0 if gripper_open else 0.0
    after = 1.0 if move.gripper_open else 0.0
    if language.actions == "waypoints":
        offset = rounded_offset(position, move.goal, language.decimals)
        chunk = ActionChunk((Action(offset[0], offset[1], offset[2], after),))
        event = None if before == after else ("open" if move.gripper_open else "close")
        plan = waypoint_plan_text(move.subtask, offset, event, language.decimals, gripper_open=move.gripper_open,
                                  units=language.units)
        return ExpertLabel(move, plan, chunk, format_action_chunk(chunk, language))
    steps = expert.first_chunk(position, gripper_open, Waypoint(move.goal, move.gripper_open))
    deltas = np.array([(a.dx, a.dy, a.dz) for a in steps], dtype=float)
    grippers = np.array([a.gripper == 1.0 for a in steps], dtype=bool)
    chunk = build_chunk(deltas, grippers, gripper_open, language, limits)
    event = None if chunk[-1].gripper == before else ("open" if chunk[-1].gripper == 1.0 else "close")
    plan = motion_plan_text(chunk.total_translation(), event)
    return ExpertLabel(move, plan, chunk, format_action_chunk(chunk, language))


# ---------------------------------------------------------------------------------------------- policy episodes


@dataclass
class PolicyState:
    """One state the policy stood in (a motion record, or an action record whose output was unusable) and
    what the policy answered there; `executed` are the arm commands that followed it."""

    record: StepRecord
    subtask_index: int | None
    subtask: str | None
    plan: str | None = None
    chunk: list[list[float]] | None = None
    error: str | None = None
    executed: list = field(default_factory=list)


@dataclass
class PolicyEpisode:
    """A recorded policy episode, read as the states it visited."""

    path: Path
    meta: EpisodeMeta
    first: StepRecord  # the subtasks record (the initial state)
    subtasks: list[str] | None  # the policy's list; None when it gave none
    states: list[PolicyState]


def read_policy_episode(path: Path) -> PolicyEpisode:
    """Group a policy episode's records (runtime/recording.py) into visited states; `DaggerInputError`
    when it is not a policy episode."""
    try:
        reader = EpisodeReader(path)
        records = reader.steps()
    except EpisodeFormatError as exc:
        raise DaggerInputError(str(exc)) from None
    meta = reader.meta
    first = next((r for r in records if r.stage == "subtasks"), None)
    states: list[PolicyState] = []
    current: PolicyState | None = None
    for record in records:
        if record.stage == "motion":
            current = PolicyState(record, record.subtask_index, record.subtask, plan=record.motion_plan)
            states.append(current)
        elif record.stage == "action":
            if current is not None and current.chunk is None and current.error is None and not current.executed:
                current.chunk = record.parsed_actions
                current.error = record.error
                current.executed = list(record.executed or [])
            else:  # an unusable model output: the state was visited, nothing was executed
                states.append(
                    PolicyState(record, record.subtask_index, record.subtask, error=record.error or "no output")
                )
            current = None
        elif record.stage == "verify":
            current = None
    if first is None or (not states and meta.source != "policy"):
        source = meta.source or "unknown"
        raise DaggerInputError(
            f"{path} is not a policy episode (source '{source}', no subtask or motion records): dagger labels the "
            "states a policy visited; label demonstrations with `data relabel`, or pass teleoperated corrections "
            "with --corrections")
    return PolicyEpisode(path, meta, first, first.subtasks or None, states)


def scene_from_prompt(prompt: str | None, templates: PromptTemplates = DEFAULT_PROMPTS) -> str | None:
    """The scene text a text-only policy was given, cut out of its recorded prompt (None if there is none)."""
    if not prompt:
        return None
    head, _, tail = templates.scene.partition("{scene}")
    start = prompt.find(head)
    if start < 0 or not tail:
        return None
    start += len(head)
    end = prompt.find(tail, start)
    return prompt[start:end] if end > start else None


# ---------------------------------------------------------------------------------------------- rebuilding the sim


def task_from_instruction(instruction: str) -> Task | None:
    """The suite task an instruction asks for, from the simulator objects it names in order: an item
    followed by a container is a placement, an item alone a pick, several parts a composite."""
    from vlm2vla_edge.runtime.sim.session import objects_mentioned

    names = objects_mentioned(instruction)
    parts: list[Task] = []
    i = 0
    while i < len(names):
        name = names[i]
        if CATALOGUE[name].graspable:
            following = names[i + 1] if i + 1 < len(names) else None
            if following is not None and not CATALOGUE[following].graspable:
                parts.append(PlaceTask(name, following))
                i += 2
                continue
            parts.append(PickTask(name))
        i += 1
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else CompositeTask(tuple(parts))


def sim_candidates(meta: EpisodeMeta) -> list[tuple[str, Scene, Task]]:
    """(how, initial scene, task) the simulator may have started the episode from, most likely first:
    an evaluation episode is the suite's episode of its seed (in the language its instruction is in); a
    `do --sim` run laid out the objects its instruction names (`scene_for_instruction`)."""
    from vlm2vla_edge.runtime.sim.session import scene_for_instruction

    seed = (meta.extra or {}).get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DaggerInputError(
            f"episode {meta.episode_id} has no simulator seed in meta.json extra: --expert sim rebuilds the simulator "
            "from it, so only simulator episodes can be labelled this way; on a real robot record a person's "
            "corrections and pass them with --corrections")
    instruction = " ".join(meta.instruction.split())
    found: list[tuple[str, Scene, Task]] = []
    for language in ALL_LANGUAGES:
        episode = sample_episode(seed, language=language)
        if episode.task.instruction() == instruction:
            found.append((f"suite episode {seed} ({language})", episode.scene, episode.task))
            break
    task = task_from_instruction(instruction)
    if task is not None:
        entry = (f"table for the instruction, seed {seed}", scene_for_instruction(instruction, seed), task)
        found.insert(0 if "eval_task_kind" not in (meta.extra or {}) else len(found), entry)
    if not found:
        raise DaggerInputError(f"episode {meta.episode_id}: the instruction '{instruction}' names no object of the "
                               "simulator, so the expert has no task to plan")
    return found


class Replay:
    """The simulator world of a policy episode, stepped along its executed commands."""

    def __init__(self, robot: RobotConfig, scene: Scene) -> None:
        self.world = SimWorld(robot, scene.copy(), realtime=False)
        self.grasped_at: Vec3 | None = None

    def mismatch(self, record: StepRecord, scene_text: str | None) -> str | None:
        """Why the rebuilt state differs from the recorded one (None: it matches)."""
        world = self.world
        if record.ee_position is not None and not math.dist(world.ee_position, record.ee_position) <= 1e-6:
            return "gripper position differs from the recording"
        if record.gripper_open is not None and record.gripper_open != world.gripper_open:
            return "gripper open/closed differs from the recording"
        # The prompt states the scene in the model's units (PromptTemplates.scene_units): metres or centimetres.
        described = world.describe()
        if scene_text is not None and scene_text not in (described, scene_in_units(described, "cm")):
            return "scene text differs from the recorded observation"
        return None

    def execute(self, executed: Iterable) -> str | None:
        """Apply recorded arm commands (reached point, then the gripper change of a completed move)."""
        world = self.world
        for command in executed:
            reached = command.reached
            if reached is None or any(not math.isfinite(v) for v in reached):
                return "a recorded command has no reached position"
            joints = world.kinematics.ik_joints(reached)
            if joints is None:
                return "a recorded reached position has no inverse kinematics solution"
            world.set_joints(joints, (float(reached[0]), float(reached[1]), float(reached[2])))
            if command.completed and command.gripper_open is not None and command.gripper_open != world.gripper_open:
                held_before = world.scene.held
                world.set_gripper(command.gripper_open)
                if world.scene.held is not None and held_before is None:
                    self.grasped_at = world.ee_position
                elif world.scene.held is None:
                    self.grasped_at = None
        return None


# ---------------------------------------------------------------------------------------------- disagreement


class Disagreement(BaseModel):
    """Where the policy's own output differed from the expert's label, by stage."""

    episodes: int = 0
    subtask_lists: int = Field(default=0, description="Episodes whose subtask list is not the expert's.")
    states: int = Field(default=0, description="Labelled states.")
    current_subtask: int = Field(
        default=0, description="States where the policy worked on another subtask than the expert."
    )
    unusable: int = Field(default=0, description="States where the policy's output did not parse.")
    plans_compared: int = 0
    plan_offset: int = Field(default=0, description="Plans whose offset is more than `offset_cm` from the expert's.")
    plans_without_offset: int = 0
    chunks_compared: int = 0
    chunk_move: int = Field(
        default=0, description="Chunks whose summed move is more than `offset_cm` from the expert's."
    )
    gripper: int = Field(default=0, description="Chunks ending with another gripper value than the expert's.")
    offset_cm: float = 2.0
    by_subtask: dict[str, list[int]] = Field(
        default_factory=dict, description="Per kind of the expert's subtask: [states, states where the policy was off]."
    )

    def add(self, other: "Disagreement") -> None:
        for name in type(self).model_fields:
            if name == "by_subtask":
                for kind, (n, off) in other.by_subtask.items():
                    mine = self.by_subtask.setdefault(kind, [0, 0])
                    mine[0], mine[1] = mine[0] + n, mine[1] + off
            elif name != "offset_cm":
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def lines(self) -> list[str]:
        def share(n: int, of: int) -> str:
            return f"{n}/{of}" + (f" ({100 * n / of:.0f}%)" if of else "")

        cm = f"{self.offset_cm:g} cm"
        rows = [
            ("subtask list not the expert's", share(self.subtask_lists, self.episodes), "episodes"),
            ("working on another subtask", share(self.current_subtask, self.states), "states"),
            ("output unusable", share(self.unusable, self.states), "states"),
            (f"plan offset > {cm}", share(self.plan_offset, self.plans_compared), "plans"
             + (f" (+{self.plans_without_offset} without an offset)" if self.plans_without_offset else "")),
            (f"chunk move > {cm}", share(self.chunk_move, self.chunks_compared), "chunks"),
            ("gripper not the expert's", share(self.gripper, self.chunks_compared), "chunks"),
        ]
        lines = [f"{what:<31} {figure:>12} {unit}" for what, figure, unit in rows]
        if self.by_subtask:
            kinds = ", ".join(f"{kind} {off}/{n}" for kind, (n, off) in self.by_subtask.items())
            lines.append(f"states the policy was off in, by the expert's subtask: {kinds}")
        return lines


_OFFSET = re.compile(r"\((-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\)")


def plan_offset(plan: str | None, units: str = "m") -> Vec3 | None:
    """The "(dx, dy, dz)" a waypoint plan states, in metres (the plan writes `units`), if it states one."""
    found = _OFFSET.search(plan or "")
    per_metre = 100.0 if units == "cm" else 1.0
    return None if found is None else (float(found[1]) / per_metre, float(found[2]) / per_metre,
                                       float(found[3]) / per_metre)


def subtask_kind(subtask: str) -> str:
    """'move to object', 'grasp', 'lift', 'move to container' or 'release' of one of the expert's subtasks."""
    verb, name = subtask.split(" ", 1)[0].lower(), subtask.rsplit(" ", 1)[-1]
    if verb == "move":
        return "move to container" if name in CATALOGUE and not CATALOGUE[name].graspable else "move to object"
    return verb


def compare(state: PolicyState, label: ExpertLabel, tally: Disagreement, units: str = "m") -> None:
    """Count where the policy's answer in `state` differs from the expert's `label` (plans written in `units`)."""
    before = (tally.current_subtask, tally.unusable, tally.plan_offset, tally.chunk_move, tally.gripper)
    _compare(state, label, tally, units)
    after = (tally.current_subtask, tally.unusable, tally.plan_offset, tally.chunk_move, tally.gripper)
    counts = tally.by_subtask.setdefault(subtask_kind(label.move.subtask), [0, 0])
    counts[0] += 1
    counts[1] += int(after != before)


def _compare(state: PolicyState, label: ExpertLabel, tally: Disagreement, units: str) -> None:
    tally.states += 1
    if state.subtask != label.move.subtask:
        tally.current_subtask += 1
    if state.chunk is None:
        tally.unusable += 1
        return
    limit = tally.offset_cm / 100
    theirs = plan_offset(state.plan, units)
    ours = plan_offset(label.plan, units)
    if theirs is not None and ours is not None:
        tally.plans_compared += 1
        tally.plan_offset += int(math.dist(theirs, ours) > limit)
    elif state.plan is not None:
        tally.plans_without_offset += int(ours is not None)
    if state.chunk:
        tally.chunks_compared += 1
        move = tuple(sum(a[axis] for a in state.chunk) for axis in range(3))
        tally.chunk_move += int(math.dist(move, label.offset) > limit)
        tally.gripper += int((state.chunk[-1][3] >= 0.5) != (label.chunk[-1].gripper >= 0.5))


# ---------------------------------------------------------------------------------------------- the run


class EpisodeOutcome(BaseModel):
    """How one episode was labelled."""

    episode: str
    kind: Literal["policy", "correction"]
    states: int = 0
    labelled: int = 0
    samples: int = 0
    skipped: dict[str, int] = Field(default_factory=dict, description="States not labelled, by reason.")
    rebuilt_from: str | None = None
    disagreement: Disagreement = Field(default_factory=Disagreement)
    note: str | None = Field(default=None, description="Why the whole episode was not used.")


class DaggerReport(BaseModel):
    dataset: str
    samples_before: int
    samples_added: dict[str, int]
    samples_after: int
    episodes: list[EpisodeOutcome]
    disagreement: Disagreement


def label_policy_episode(
    episode: PolicyEpisode, expert: StateExpert, language: ActionLanguage, limits: ChunkLimits,
    copy_image: Callable[[str, Path], str] | None = None,
) -> tuple[list[Sample], EpisodeOutcome]:
    """The expert's labels of every state of one simulator policy episode, and how the policy compared."""
    meta = episode.meta
    episode_id = meta.episode_id or episode.path.name
    outcome = EpisodeOutcome(episode=episode_id, kind="policy", states=len(episode.states))
    skipped: Counter[str] = Counter()
    first_scene = scene_from_prompt(episode.first.prompt)
    if first_scene is None and episode.states:
        first_scene = scene_from_prompt(episode.states[0].record.prompt)
    candidates = sim_candidates(meta)
    chosen = None
    for how, scene, task in candidates:
        replay = Replay(expert.expert.robot, scene)
        if replay.mismatch(episode.first, first_scene) is None:
            chosen = (how, replay, task)
            break
    if chosen is None:
        how, scene, task = candidates[0]
        chosen = (how, Replay(expert.expert.robot, scene), task)
    how, replay, task = chosen
    outcome.rebuilt_from = how
    names = expert.subtasks(task)

    def image(record: StepRecord) -> str | None:
        if copy_image is None or record.image is None:
            return None
        return copy_image(episode_id, episode.path / record.image)

    samples: list[Sample] = []
    tally = outcome.disagreement
    # The rebuilt world is only the recorded one while every earlier state matched: after a mismatch the
    # replay goes on from the recorded arm positions, but the objects may no longer be where they were.
    diverged: str | None = None
    initial = replay.mismatch(episode.first, first_scene)
    if initial is None:
        tally.episodes = 1
        tally.subtask_lists = int(list(names) != (episode.subtasks or []))
        world = replay.world
        samples.append(Sample(
            id=f"{episode_id}/{episode.first.index:06d}/subtasks", episode=episode_id, step=episode.first.index,
            stage="subtasks", instruction=meta.instruction, subtasks=list(names), target=format_subtasks(names),
            image=image(episode.first), scene=world.describe(),
        ))
    else:
        skipped[f"initial state: {initial}"] += 1
        diverged = "an earlier state did not match the recording"
    for state in episode.states:
        record = state.record
        reason = diverged or replay.mismatch(record, scene_from_prompt(record.prompt))
        if reason is not None and diverged is None:
            diverged = "an earlier state did not match the recording"
        if reason is None:
            found = expert.next_move(task, replay.world, replay.grasped_at)
            if isinstance(found, str):
                reason = found
            else:
                world = replay.world
                try:
                    label = label_move(found, world.ee_position, world.gripper_open, language, limits, expert.expert)
                except ValueError as exc:  # the language cannot write this move (e.g. beyond its value range)
                    reason = f"the expert's move cannot be written in the action language: {exc}"
                else:
                    compare(state, label, tally, language.units)
                    common = dict(
                        episode=episode_id, step=record.index, instruction=meta.instruction, subtask=label.move.subtask,
                        subtask_index=label.move.index, subtasks=list(names), image=image(record),
                        scene=world.describe(),
                    )
                    samples.append(Sample(id=f"{episode_id}/{record.index:06d}/motion", stage="motion",
                                          target=label.plan, **common))
                    samples.append(Sample(id=f"{episode_id}/{record.index:06d}/action", stage="action",
                                          motion_plan=label.plan, target=label.chunk_text, **common))
                    outcome.labelled += 1
        if reason is not None:
            skipped[reason] += 1
        if diverged is None:
            failed = replay.execute(state.executed)
            diverged = f"the replay stopped: {failed}" if failed else None
    outcome.skipped = dict(skipped)
    outcome.samples = len(samples)
    return samples, outcome


@dataclass
class DaggerOptions:
    robot: RobotConfig
    language: ActionLanguage
    aux: bool = False  # corrections: relabel's auxiliary direction questions
    rules: ExpertRules = ExpertRules()


ProgressFn = Callable[[int, int, Path, EpisodeOutcome], None]


def run_dagger(
    policy_episodes: Sequence[Path],
    dataset: Path,
    options: DaggerOptions,
    *,
    corrections: Sequence[Path] = (),
    progress: ProgressFn | None = None,
) -> DaggerReport:
    """Label `policy_episodes` with the simulator's expert and `corrections` with the local annotator, and
    add the samples to `dataset` (created if absent; appended to, atomically, if present)."""
    language, robot = options.language, options.robot
    limits = ChunkLimits.for_robot(robot, language)
    expert = StateExpert(robot, options.rules)
    annotator = LocalAnnotator(language, robot)
    read = [read_policy_episode(p) for p in policy_episodes]  # every input is checked before anything is written
    for episode in read:
        sim_candidates(episode.meta)
    settings = {"dagger": {"expert_rules": {"decimals": options.rules.decimals}, **settings_dict(
        annotator.segment_rules, annotator.wording, limits)}}
    target = DatasetAppender(dataset, language, EXPERT_ANNOTATOR if read else CORRECTION_ANNOTATOR, settings)
    before = target.previous_count
    outcomes: list[EpisodeOutcome] = []
    added: Counter[str] = Counter()
    total = len(read) + len(corrections)
    try:
        for number, episode in enumerate(read, start=1):
            episode_id = episode.meta.episode_id or episode.path.name
            if episode_id in target.existing_episodes:
                outcome = EpisodeOutcome(episode=episode_id, kind="policy", note=f"already in {dataset}")
            else:
                samples, outcome = label_policy_episode(episode, expert, language, limits, target.copy_image)
                if samples:
                    target.add_episode(SourceEpisode(
                        episode=episode_id, path=str(episode.path.resolve()),
                        content_hash=episode_content_hash(episode.path), annotator=EXPERT_ANNOTATOR,
                        samples=len(samples)), samples)
                    added.update(s.stage for s in samples)
                else:
                    target.skip(episode_id, "no state could be labelled")
            outcomes.append(outcome)
            if progress:
                progress(number, total, episode.path, outcome)
        for number, (path, result) in enumerate(annotator.label_all(corrections), start=len(read) + 1):
            if not isinstance(result, str) and _is_policy_episode(path):
                result = (
                    "a policy episode, not a teleoperated correction: pass it as EPISODES to label it with the expert"
                )
            outcome = EpisodeOutcome(episode=path.name, kind="correction")
            if isinstance(result, str):
                outcome.note = result
                target.skip(path.name, result)
            elif result.trajectory.episode_id in target.existing_episodes:
                outcome.note = f"already in {dataset}"
            else:
                samples = build_samples(result, target.writer, aux=options.aux)
                target.add_episode(SourceEpisode(
                    episode=result.trajectory.episode_id, path=str(path.resolve()),
                    content_hash=episode_content_hash(path), annotator=CORRECTION_ANNOTATOR,
                    samples=len(samples)), samples)
                added.update(s.stage for s in samples)
                outcome.states = outcome.labelled = len(result.windows)
                outcome.samples = len(samples)
            outcomes.append(outcome)
            if progress:
                progress(number, total, path, outcome)
        if not added:
            raise DaggerInputError("no state of the given episodes could be labelled (see the lines above); "
                                   f"{dataset} is unchanged")
        info = target.finish()
    except BaseException:
        target.abort()
        raise
    overall = Disagreement()
    for outcome in outcomes:
        overall.add(outcome.disagreement)
    return DaggerReport(dataset=str(dataset), samples_before=before, samples_added=dict(added),
                        samples_after=sum(info.counts.values()), episodes=outcomes, disagreement=overall)


def held_out_episodes(paths: Sequence[Path]) -> list[str]:
    """Episodes whose simulator seed lies in the evaluation's held-out range: training on their states would
    make later held-out figures optimistic (the same scenes, now with labels)."""
    from vlm2vla_edge.runtime.evaluation import HELD_OUT_SEED

    found = []
    for path in paths:
        try:
            seed = (EpisodeReader(path).meta.extra or {}).get("seed")
        except EpisodeFormatError:
            continue
        if isinstance(seed, int) and not isinstance(seed, bool) and seed >= HELD_OUT_SEED:
            found.append(path.name)
    return found


def _is_policy_episode(path: Path) -> bool:
    try:
        return EpisodeReader(path).meta.source == "policy"
    except EpisodeFormatError:
        return False


def find_policy_episodes(sources: Sequence[os.PathLike[str] | str]) -> list[Path]:
    """Episode folders of every source (an episode, or a folder of them, e.g. `eval --record`'s OUT/episodes
    or OUT itself)."""
    paths: list[Path] = []
    for source in sources:
        root = Path(source)
        if root.is_dir() and not (root / "meta.json").is_file() and (root / "episodes").is_dir():
            root = root / "episodes"
        paths += find_episodes(root)
    return list(dict.fromkeys(paths))


__all__ = [
    "CORRECTION_ANNOTATOR",
    "EXPERT_ANNOTATOR",
    "DaggerInputError",
    "DaggerOptions",
    "DaggerReport",
    "Disagreement",
    "EpisodeOutcome",
    "ExpertLabel",
    "ExpertMove",
    "ExpertRules",
    "PolicyEpisode",
    "PolicyState",
    "Replay",
    "StateExpert",
    "find_policy_episodes",
    "held_out_episodes",
    "label_move",
    "label_policy_episode",
    "plan_offset",
    "read_policy_episode",
    "run_dagger",
    "scene_from_prompt",
    "sim_candidates",
    "task_from_instruction",
]
