"""`vlm2vla-edge data dagger`: policy episodes recorded through the real runner in the simulator (fake policies,
no model) are labelled with the scripted expert's corrections and added to a dataset."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm2vla_edge.runtime.action_text import format_subtasks
from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeReader, EpisodeWriter
from vlm2vla_edge.runtime.evaluation import EvalConfig, run_eval, select_seeds
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.interface import StageOutput, StepResult, SubtasksResult
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS
from vlm2vla_edge.runtime.recording import EpisodeRecorder
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig
from vlm2vla_edge.runtime.scene_text import scene_in_units
from vlm2vla_edge.runtime.sim.expert import ScriptedExpert, record_demonstrations
from vlm2vla_edge.runtime.sim.tasks import sample_episode
from vlm2vla_edge.runtime.station import episode_meta, open_station
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier
from vlm2vla_edge.testing.policies import SceneCopyPolicy
from vlm2vla_edge.train.data.chunks import ChunkLimits
from vlm2vla_edge.train.data.dagger import (
    EXPERT_ANNOTATOR,
    DaggerOptions,
    StateExpert,
    label_policy_episode,
    read_policy_episode,
    run_dagger,
)
from vlm2vla_edge.train.data.dataset import read_dataset
from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples, relabel

ROBOT = load_robot_config("widowx250s")
WAYPOINTS = load_policy_config("policy_waypoints").action_language
# The demo's templates: the scene in the action language's units (DAgger reads it back out of the prompts).
PROMPTS = DEFAULT_PROMPTS.model_copy(update={"scene_units": WAYPOINTS.units})
EXPERT = ScriptedExpert(ROBOT)


class Prompting:
    """A text-only fake whose recorded prompts are the runtime's real prompts (the scene text inside), as the
    llama.cpp engine records them; `wrong_gripper` closes the gripper at the end of every "Move to"."""

    def __init__(self, names_of: dict[str, list[str]], wrong_gripper: bool = False) -> None:
        self.inner = SceneCopyPolicy(lambda instruction: names_of[instruction], WAYPOINTS)
        self.wrong_gripper = wrong_gripper

    needs_image = False
    bundle_id = "prompting-fake"

    @property
    def action_language(self):
        return WAYPOINTS

    def subtasks(self, observation, instruction, *, cancel=None) -> SubtasksResult:
        result = self.inner.subtasks(observation, instruction, cancel=cancel)
        prompt = PROMPTS.render_subtasks_prompt(instruction, observation.scene)
        output = result.output
        return SubtasksResult(result.subtasks, StageOutput(output.stage, prompt, output.raw_text, {}))

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None) -> StepResult:
        step = self.inner.step(observation, instruction, subtask, retry=retry, cancel=cancel)
        chunk_text = step.action_output.raw_text
        if self.wrong_gripper and subtask.startswith("Move to"):
            chunk_text = re.sub(r", [01]\]\]$", ", 0]]", chunk_text)
        motion_prompt = PROMPTS.render_motion_prompt(instruction, subtask, observation.scene)
        action_prompt = PROMPTS.render_action_prompt(instruction, subtask, step.motion.text, observation.scene)
        return StepResult(
            motion=step.motion, chunk=parse_action_chunk(chunk_text, WAYPOINTS),
            motion_output=StageOutput("motion", motion_prompt, step.motion_output.raw_text, {}),
            action_output=StageOutput("action", action_prompt, chunk_text, {}),
        )


def _names(seeds: list[int]) -> dict[str, list[str]]:
    out = {}
    for seed in seeds:
        task = sample_episode(seed, language="en").task
        out[task.instruction()] = EXPERT.subtask_names(task)
    return out


def _record_eval(out: Path, kind: str, n: int, *, wrong_gripper: bool = False, max_retries: int = 3) -> list[Path]:
    """Policy episodes as `vlm2vla-edge eval --record` writes them."""
    seeds = select_seeds(kind, n)  # type: ignore[arg-type]
    config = EvalConfig(tasks=(kind,), episodes=n, record_dir=out,
                        runner=RunnerConfig(max_steps=12, max_retries_per_subtask=max_retries))
    report = run_eval(
        Prompting(_names(seeds), wrong_gripper), config, echo=lambda _: None, verifier=HeuristicVerifier()
    )
    return [Path(row.episode_dir) for row in report.rows]


@pytest.fixture(scope="module")
def pick_episodes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _record_eval(tmp_path_factory.mktemp("eval") / "episodes", "pick", 2)


@pytest.fixture(scope="module")
def place_episode(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record_eval(tmp_path_factory.mktemp("eval") / "episodes", "place", 1)[0]


def _label(path: Path, language=WAYPOINTS):
    return label_policy_episode(
        read_policy_episode(path), StateExpert(ROBOT), language, ChunkLimits.for_robot(ROBOT, language)
    )


def test_a_policy_that_does_what_the_expert_does_gets_the_expert_labels_and_no_disagreement(
    pick_episodes: list[Path], place_episode: Path
) -> None:
    for path in [*pick_episodes, place_episode]:
        samples, outcome = _label(path)
        assert outcome.rebuilt_from and outcome.rebuilt_from.startswith("suite episode")
        assert outcome.labelled == outcome.states > 0 and not outcome.skipped
        d = outcome.disagreement
        assert (d.subtask_lists, d.current_subtask, d.plan_offset, d.chunk_move, d.gripper, d.unusable) == (0,) * 6
        assert d.plans_compared == outcome.states and all(off == 0 for _, off in d.by_subtask.values())
        reader = EpisodeReader(path)
        records = {r.index: r for r in reader.steps()}
        for sample in samples:
            record = records[sample.step]
            # the rebuilt scene is the one the policy saw (its prompt states it in the model's units)
            assert sample.scene and scene_in_units(sample.scene, WAYPOINTS.units) in record.prompt
            if sample.stage == "subtasks":
                assert sample.target == format_subtasks(record.subtasks)
                continue
            assert sample.subtask == record.subtask  # the expert is on the subtask the (correct) policy worked on
            offset = re.search(r"\(([^)]*)\)", sample.motion_plan or sample.target).group(1)
            if sample.stage == "action":
                assert sample.target.startswith(f"[[{offset}, ")
                parse_action_chunk(sample.target, WAYPOINTS)
            else:
                parse_motion_plan(sample.target)
            # The expert goes to the key points the scene states: the label copies them digit for digit.
            name = sample.subtask.rsplit(" ", 1)[-1]
            scene = scene_in_units(sample.scene, WAYPOINTS.units)  # the scene as the model reads it
            line = re.search(rf"\b{name} (?:on|in) the [a-z]+: above \(([^)]*)\)(?:, grasp \(([^)]*)\))?", scene)
            if sample.subtask.startswith("Move to"):
                assert line and offset == line[1], (scene, offset)
            elif sample.subtask.startswith("Grasp"):
                assert line and offset == line[2], (scene, offset)
    kinds = {s.subtask.split(" ")[0] for p in [*pick_episodes, place_episode] for s in _label(p)[0] if s.subtask}
    assert kinds == {"Move", "Grasp", "Lift", "Release"}


def test_the_first_state_gets_exactly_the_relabelled_demonstration_of_the_same_seed(
    pick_episodes: list[Path], tmp_path: Path
) -> None:
    path = pick_episodes[0]
    seed = EpisodeReader(path).meta.extra["seed"]
    demo = record_demonstrations(tmp_path, [seed], ROBOT, languages=("en",), frames=False)[0]
    assert demo.path is not None
    expected = build_samples(LocalAnnotator(WAYPOINTS, ROBOT).label(EpisodeReader(demo.path)), aux=False)
    ours, _ = _label(path)
    for stage in ("subtasks", "motion", "action"):
        theirs = next(s for s in expected if s.stage == stage)
        mine = next(s for s in ours if s.stage == stage)
        assert (mine.target, mine.subtasks, mine.subtask, mine.motion_plan, mine.scene) == (
            theirs.target, theirs.subtasks, theirs.subtask, theirs.motion_plan, theirs.scene)


def test_a_policy_that_closes_the_gripper_wrongly_gets_the_open_gripper_as_its_correction(tmp_path: Path) -> None:
    path = _record_eval(tmp_path / "episodes", "pick", 1, wrong_gripper=True, max_retries=1)[0]
    samples, outcome = _label(path)
    d = outcome.disagreement
    assert d.gripper >= 1 and d.states == outcome.states
    assert d.by_subtask["move to object"][1] >= 1  # the user sees where: on the way to the object
    reader = EpisodeReader(path)
    closed_on_nothing = [r.index for r in reader.steps() if r.stage == "motion" and r.gripper_open is False]
    assert closed_on_nothing, "the fake should have closed the gripper on nothing"
    for index in closed_on_nothing:
        motion = next(s for s in samples if s.step == index and s.stage == "motion")
        action = next(s for s in samples if s.step == index and s.stage == "action")
        assert motion.subtask.startswith("Move to") and motion.target.endswith("then open the gripper.")
        assert parse_action_chunk(action.target, WAYPOINTS)[-1].gripper == 1.0
    first = next(s for s in samples if s.stage == "action")
    assert parse_action_chunk(first.target, WAYPOINTS)[-1].gripper == 1.0  # where it closed, the expert keeps it open


def test_do_local_sim_episodes_are_rebuilt_from_the_table_their_instruction_laid_out(tmp_path: Path) -> None:
    instruction = "put the carrot in the pot"
    names = {
        instruction: [
            "Move to the carrot",
            "Grasp the carrot",
            "Lift the carrot",
            "Move to the pot",
            "Release the carrot",
        ]
    }
    policy = Prompting(names)
    with open_station(ROBOT, sim=True, seed=7, instruction=instruction) as station:
        writer = EpisodeWriter.create(tmp_path / "eps", episode_meta(instruction, ROBOT, station, policy, seed=7))
        EpisodeRunner(policy, station.arm, station.camera, HeuristicVerifier(), station.limiter, hooks=station.hooks,
                      subscribers=[EpisodeRecorder(writer)]).run(instruction)
    meta = EpisodeReader(writer.path).meta
    assert (meta.action_units, meta.grammar_version) == ("m", WAYPOINTS.grammar_version)  # recorded in metres
    samples, outcome = _label(writer.path)
    assert outcome.rebuilt_from.startswith("table for the instruction") and not outcome.skipped
    assert outcome.labelled == outcome.states >= 5 and outcome.disagreement.current_subtask == 0
    assert next(s for s in samples if s.stage == "subtasks").subtasks == names[instruction]


def test_a_state_the_rebuilt_simulator_does_not_reproduce_is_reported_not_labelled(
    pick_episodes: list[Path], tmp_path: Path
) -> None:
    path = Path(shutil.copytree(pick_episodes[0], tmp_path / "ep"))
    meta = json.loads((path / "meta.json").read_text())
    meta["extra"]["seed"] += 1  # another table than the one the policy saw
    (path / "meta.json").write_text(json.dumps(meta))
    samples, outcome = _label(path)
    assert samples == [] and outcome.labelled == 0
    assert sum(outcome.skipped.values()) == outcome.states + 1  # every state, and the initial one
    assert outcome.skipped["initial state: scene text differs from the recorded observation"] == 1
    assert outcome.skipped["an earlier state did not match the recording"] == outcome.states
    assert outcome.disagreement.episodes == 0  # nothing is counted against the policy from a wrong world


def _cli(*args: str):
    from vlm2vla_edge.train.data.cli import app

    return CliRunner().invoke(app, ["dagger", *args])


def test_appending_keeps_the_dataset_and_adds_the_corrections(pick_episodes: list[Path], tmp_path: Path) -> None:
    record_demonstrations(tmp_path / "demos", [0], ROBOT, languages=("en",), frames=True)
    relabel(tmp_path / "demos", tmp_path / "ds", LocalAnnotator(WAYPOINTS, ROBOT), aux=True)
    before = read_dataset(tmp_path / "ds")
    result = _cli(*map(str, pick_episodes), "--into", str(tmp_path / "ds"), "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "[1/2]" in result.output and "where the policy disagreed with the expert" in result.output
    assert "from the held-out evaluation seeds" in result.output  # eval's default seeds: warned, not refused
    after = read_dataset(tmp_path / "ds")
    assert after.samples[: len(before)] == before.samples  # nothing lost, nothing reordered
    assert after.info.language() == WAYPOINTS and len(after) > len(before)
    assert [s.annotator for s in after.info.sources] == ["local", EXPERT_ANNOTATOR, EXPERT_ANNOTATOR]
    added = after.samples[len(before):]
    assert {s.episode for s in added} == {p.name for p in pick_episodes}
    assert all(s.image is None or (tmp_path / "ds" / s.image).is_file() for s in after.samples)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]  # no staging or backup left behind
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples_before"] == len(before) and report["samples_after"] == len(after)
    # The same episodes again: nothing new, a clean error, the dataset unchanged.
    again = _cli(*map(str, pick_episodes), "--into", str(tmp_path / "ds"))
    assert again.exit_code == 2 and "already in" in again.output and "Traceback" not in again.output
    assert read_dataset(tmp_path / "ds").info.samples_sha256 == after.info.samples_sha256
    # Teleoperated corrections (here: expert demonstrations) are labelled by the local annotator, tagged.
    record_demonstrations(tmp_path / "fixes", [1], ROBOT, languages=("en",), frames=False)
    fixed = _cli("--corrections", str(tmp_path / "fixes"), "--into", str(tmp_path / "ds"))
    assert fixed.exit_code == 0, fixed.output
    grown = read_dataset(tmp_path / "ds")
    assert grown.info.sources[-1].annotator == "correction:local" and grown.samples[: len(after)] == after.samples


def test_the_labelled_samples_render_as_training_prompts(pick_episodes: list[Path], tmp_path: Path) -> None:
    from vlm2vla_edge.train.lora.samples import chat_samples

    info = run_dagger(pick_episodes, tmp_path / "new", DaggerOptions(robot=ROBOT, language=WAYPOINTS))
    dataset = read_dataset(tmp_path / "new")
    assert info.samples_before == 0 and info.samples_after == len(dataset) > 0
    rendered = chat_samples(dataset, vision=False)
    assert len(rendered) == len(dataset) and all("Scene: gripper" in c.prompt for c in rendered)
    for sample in dataset.by_stage("subtasks"):
        assert list(parse_subtasks(sample.target).subtasks) == sample.subtasks


def test_bad_input_ends_with_one_clean_error(pick_episodes: list[Path], tmp_path: Path) -> None:
    record_demonstrations(tmp_path / "demos", [0], ROBOT, languages=("en",), frames=False)
    no_seed = Path(shutil.copytree(pick_episodes[0], tmp_path / "real"))
    meta = json.loads((no_seed / "meta.json").read_text())
    del meta["extra"]["seed"]
    (no_seed / "meta.json").write_text(json.dumps(meta))
    relabel(
        tmp_path / "demos", tmp_path / "steps-ds", LocalAnnotator(load_policy_config("policy").action_language, ROBOT)
    )
    cases = {
        "not a policy episode": [str(tmp_path / "demos" / "sim-0000000"), "--into", str(tmp_path / "a")],
        "no simulator seed": [str(no_seed), "--into", str(tmp_path / "b")],
        "another action language": [
            str(pick_episodes[0]),
            "--into",
            str(tmp_path / "steps-ds"),
            "--policy",
            "policy_waypoints",
        ],
        "nothing to label": ["--into", str(tmp_path / "c")],
        "does not exist": [str(tmp_path / "missing"), "--into", str(tmp_path / "d")],
    }
    steps_hash = read_dataset(tmp_path / "steps-ds").info.samples_sha256
    for expected, args in cases.items():
        result = _cli(*args)
        assert result.exit_code == 2, (expected, result.output)
        assert expected in result.output and "Traceback" not in result.output
    assert read_dataset(tmp_path / "steps-ds").info.samples_sha256 == steps_hash
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_in_a_steps_language_the_label_is_the_experts_next_chunk_toward_its_waypoint(pick_episodes: list[Path]) -> None:
    import numpy as np

    steps = load_policy_config("policy").action_language
    samples, outcome = _label(pick_episodes[0], steps)
    assert outcome.labelled == outcome.states and not outcome.skipped
    reader = EpisodeReader(pick_episodes[0])
    records = {r.index: r for r in reader.steps()}
    limits = ChunkLimits.for_robot(ROBOT, steps)
    for sample in (s for s in samples if s.stage == "action"):
        chunk = parse_action_chunk(sample.target, steps)
        assert 0 < len(chunk) <= limits.max_actions and chunk.path_length() <= limits.max_chunk_path_m + 1e-9
        parse_motion_plan(sample.motion_plan)
        # The waypoint policy's own move (which copied the expert's key point) points the same way.
        theirs = np.sum(np.array(records[sample.step + 1].parsed_actions)[:, :3], axis=0)
        ours = np.array(chunk.total_translation())
        assert float(theirs @ ours) / (np.linalg.norm(theirs) * np.linalg.norm(ours)) > 0.99, sample.id


def test_a_run_that_fails_half_way_leaves_the_dataset_as_it_was(
    pick_episodes: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlm2vla_edge.train.data.dagger as dagger

    run_dagger(pick_episodes[:1], tmp_path / "ds", DaggerOptions(robot=ROBOT, language=WAYPOINTS))
    before = read_dataset(tmp_path / "ds")
    real = dagger.label_policy_episode

    def fail_on_second(episode, *args, **kwargs):
        if episode.path == pick_episodes[1]:
            raise OSError("disk full")
        return real(episode, *args, **kwargs)

    monkeypatch.setattr(dagger, "label_policy_episode", fail_on_second)
    other = Path(shutil.copytree(pick_episodes[0], tmp_path / "copy" / "20990101T000000.000Z-abcdef"))
    with pytest.raises(OSError):
        run_dagger([other, pick_episodes[1]], tmp_path / "ds", DaggerOptions(robot=ROBOT, language=WAYPOINTS))
    after = read_dataset(tmp_path / "ds")
    assert after.info == before.info and after.samples == before.samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "ds"]  # no staging copy left behind
