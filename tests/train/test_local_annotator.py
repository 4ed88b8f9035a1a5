"""The local annotator on simulator demonstrations: every label parses, and the chunks replay the path."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grammar_tools import LlgAcceptor
from vlm2vla_edge.runtime.action_text import format_subtasks
from vlm2vla_edge.runtime.config import ActionLanguage, load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeReader, EpisodeWriter, StepRecord
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.sim.expert import run_expert_episode
from vlm2vla_edge.runtime.sim.scene import Scene
from vlm2vla_edge.runtime.sim.tasks import Episode, paper_composite, sample_episode
from vlm2vla_edge.train.data.dataset import read_dataset
from vlm2vla_edge.train.data.instruction import parse_instruction
from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples, relabel
from vlm2vla_edge.train.data.segment import segment
from vlm2vla_edge.train.data.subtasks import name_subtasks
from vlm2vla_edge.train.data.trajectory import Trajectory
from vlm2vla_edge.train.data.wording import direction_phrase, motion_plan_text, plan_contradiction

ROBOT = load_robot_config()
LANGUAGE = ActionLanguage()
PP = LANGUAGE.postprocess
SEEDS = range(12)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Expert demonstrations of the task suite (all six languages occur), two of them with frames."""
    root = tmp_path_factory.mktemp("demos")
    for seed in SEEDS:
        result = run_expert_episode(sample_episode(seed), ROBOT, record_to=root, frames=seed < 2)
        assert result.success
    task = paper_composite("zh")  # the paper's composite task, instructed in Chinese
    scene = Scene.random(100, required=task.objects, n_distractors=1)
    assert run_expert_episode(Episode(100, task, scene), ROBOT, record_to=root, frames=False).success
    return root


def episodes(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


def test_every_label_parses_and_fits_the_robot(demos: Path) -> None:
    annotator = LocalAnnotator(LANGUAGE, ROBOT)
    limits = annotator.limits
    for path in episodes(demos):
        labels = annotator.label(EpisodeReader(path))
        assert list(parse_subtasks(format_subtasks(labels.subtasks))) == labels.subtasks
        assert sorted(set(labels.segment_subtask)) == list(range(len(labels.subtasks)))
        for window, plan in zip(labels.windows, labels.plans):
            assert parse_motion_plan(plan).text == plan
            assert plan_contradiction(plan, window.displacement, window.event) is None
            chunk = parse_action_chunk(window.chunk_text, LANGUAGE)
            assert chunk == window.chunk
            assert 1 <= len(chunk) <= limits.max_actions <= ROBOT.limits.max_chunk_length
            assert all(a.norm() <= limits.max_action_m + 1e-3 for a in chunk)  # rounding to mm
            assert chunk.path_length() <= limits.max_chunk_path_m + 1e-3
        for sample in build_samples(labels):
            if sample.stage == "subtasks":
                assert list(parse_subtasks(sample.target)) == labels.subtasks
            elif sample.stage == "action":
                parse_action_chunk(sample.target, LANGUAGE)
                parse_motion_plan(sample.motion_plan)
            else:
                parse_motion_plan(sample.target)


def test_replaying_the_chunks_reproduces_the_recorded_path(demos: Path) -> None:
    annotator = LocalAnnotator(LANGUAGE, ROBOT)
    unit = 0.5 * 10 ** -LANGUAGE.decimals  # rounding of one written value
    for path in episodes(demos):
        labels = annotator.label(EpisodeReader(path))
        traj = labels.trajectory
        recorded = traj.positions
        position = recorded[0].copy()
        replayed = [position.copy()]
        for window in labels.windows:
            chunk = parse_action_chunk(window.chunk_text, LANGUAGE)
            start = position.copy()
            for action in chunk:
                position = position + np.array(action.translation())
                replayed.append(position.copy())
            # Each chunk covers its window's recorded motion (rounding carried, so half a unit at the end).
            moved = position - start
            expected = recorded[window.end] - recorded[window.start]
            assert np.abs(moved - expected).max() <= unit + 1e-9, (path.name, window)
            # The gripper ends each chunk as the recording commands it.
            assert chunk[-1].gripper == (1.0 if traj.gripper_cmd[window.end - 1] else 0.0)
        replayed_path = np.array(replayed)
        # Chained from the first position, the replay drifts by at most the rounding of each chunk end...
        assert np.abs(replayed_path[-1] - recorded[-1]).max() <= unit * len(labels.windows) + 1e-9
        # ...and passes every recorded position within the re-aggregation threshold on every axis.
        slack = unit * len(labels.windows) + 1e-9
        for point in recorded:
            nearest = np.abs(replayed_path - point).max(axis=1).min()
            assert nearest <= PP.per_direction_threshold_m + slack, (path.name, point)


def test_subtasks_speak_the_scene_grammar_phrases(demos: Path) -> None:
    """A model trained on these labels decodes subtasks under grammars.scene_subtasks_gbnf (action language
    `subtasks: scene_objects`): every subtask the annotator writes must be one of its phrases over an
    object of the episode's scene, else the grammar would forbid what training taught."""
    from vlm2vla_edge.grammars import scene_subtasks_gbnf
    from vlm2vla_edge.runtime.scene_text import scene_object_names

    annotator = LocalAnnotator(LANGUAGE, ROBOT)
    for path in episodes(demos):
        reader = EpisodeReader(path)
        labels = annotator.label(reader)
        names = scene_object_names(reader.steps()[0].extra["scene_description"])
        assert sorted(names) == reader.meta.extra["objects"]
        acceptor = LlgAcceptor(scene_subtasks_gbnf(names))
        assert acceptor.accepts(format_subtasks(labels.subtasks)), (labels.subtasks, names)


def test_subtasks_name_the_objects_of_a_foreign_language_instruction(demos: Path) -> None:
    composite = next(p for p in episodes(demos) if EpisodeReader(p).meta.extra.get("task") == "CompositeTask"
                     and EpisodeReader(p).meta.extra.get("language") == "zh")
    labels = LocalAnnotator(LANGUAGE, ROBOT).label(EpisodeReader(composite))
    assert labels.trajectory.instruction == "把茄子放进平底锅里，然后举起鱼"
    assert labels.subtasks == [
        "Move to the eggplant", "Grasp the eggplant", "Lift the eggplant", "Move to the pan", "Release the eggplant",
        "Move to the fish", "Grasp the fish", "Lift the fish",
    ]


def test_subtasks_of_a_pick_and_place(demos: Path) -> None:
    for path in episodes(demos):
        meta = EpisodeReader(path).meta
        parsed = parse_instruction(meta.extra["instruction_en"])
        labels = LocalAnnotator(LANGUAGE, ROBOT).label(EpisodeReader(path))
        obj = parsed.parts[0].obj
        assert f"Grasp {obj}" in labels.subtasks
        if meta.extra["task"] == "PlaceTask":
            assert labels.subtasks[-1] == f"Release {obj}"
            assert f"Move to {parsed.parts[0].destination}" in labels.subtasks
        elif meta.extra["task"] == "PickTask":
            assert labels.subtasks[-1] == f"Lift {obj}"


@pytest.mark.parametrize(
    ("instruction", "english", "parts"),
    [
        ("put the carrot on the plate", None, [("the carrot", "the plate")]),
        ("Pick up the red block.", None, [("the red block", None)]),
        ("move the pot to the left side of the stove", None, [("the pot", "the left side of the stove")]),
        ("take the spoon out of the bowl", None, [("the spoon", None)]),
        ("put the eggplant in the pan then lift the fish", None, [("the eggplant", "the pan"), ("the fish", None)]),
        ("mets l'aubergine sur la serviette", "put the eggplant on the towel", [("the eggplant", "the towel")]),
        ("pon la cuchara en el cuenco", None, [("the spoon", "the bowl")]),
        ("把茄子放进平底锅里，然后举起鱼", None, [("the eggplant", "the pan"), ("the fish", None)]),
        ("leg den Fisch in den Topf", None, [("the fish", "the pot")]),
        ("结束", None, [("the object", "the target")]),
    ],
)
def test_parse_instruction(instruction: str, english: str | None, parts: list[tuple[str, str | None]]) -> None:
    parsed = parse_instruction(instruction, english)
    assert [(p.obj, p.destination) for p in parsed.parts] == parts
    format_subtasks([parsed.sentence])  # usable as a subtask


@pytest.mark.parametrize(
    ("d", "text"),
    [
        ((0.0, -0.02, -0.08), "Move primarily down and slightly to the right"),
        ((0.1, 0.07, 0.0), "Move primarily forward and to the left"),
        ((-0.05, 0.01, 0.002), "Move primarily backward"),
        ((0.001, 0.0, -0.002), None),
    ],
)
def test_direction_wording(d: tuple[float, float, float], text: str | None) -> None:
    assert direction_phrase(d) == text


def test_plan_wording_with_distance_and_gripper() -> None:
    assert motion_plan_text((0.0, 0.0, -0.08), "close") == "Move primarily down, about 8 cm, then close the gripper"
    assert motion_plan_text((0.0, 0.0, 0.001), "open") == "Stay in place and open the gripper"


def test_contradictions_are_found() -> None:
    assert "says 'up'" in plan_contradiction("Move primarily up", (0, 0, -0.05), None)
    assert "main direction" in plan_contradiction("Move to the left a little", (0.0, 0.003, -0.06), None)
    assert "opens the gripper" in plan_contradiction("Move down, then open the gripper", (0, 0, -0.05), "close")
    assert plan_contradiction("Go down and grasp", (0, 0, -0.05), "close") is None


finite = st.floats(-0.3, 0.3, allow_nan=False)


@given(st.tuples(finite, finite, finite), st.sampled_from([None, "close", "open"]))
def test_every_worded_plan_parses_and_agrees_with_its_motion(d: tuple[float, float, float], event) -> None:
    plan = motion_plan_text(d, event)
    assert parse_motion_plan(plan).text == plan
    assert plan_contradiction(plan, d, event) is None


def make_trajectory(deltas: np.ndarray, grippers: np.ndarray | None = None) -> Trajectory:
    n = len(deltas)
    cmd = np.ones(n, bool) if grippers is None else grippers.astype(bool)
    before = np.concatenate([[cmd[0]], cmd[:-1]])
    positions = np.vstack([np.zeros(3), np.cumsum(deltas, axis=0)]) + np.array([0.3, 0.0, 0.2])
    return Trajectory("t", Path("."), "pick up the carrot", None, list(range(n)), positions, deltas, cmd, before,
                      [None] * n, [None] * n)


def test_jitter_does_not_cut_but_a_turn_does() -> None:
    rng = np.random.default_rng(0)
    straight = np.tile([0.005, 0.0, 0.0], (30, 1)) + rng.normal(0, 0.0015, (30, 3))
    assert len(segment(make_trajectory(straight))) == 1
    corner = np.vstack([np.tile([0.005, 0, 0], (12, 1)), np.tile([0, 0, -0.005], (12, 1))]) + rng.normal(
        0, 0.001, (24, 3)
    )
    cuts = [s.start for s in segment(make_trajectory(corner))]
    assert len(cuts) == 2 and abs(cuts[1] - 12) <= 2


def test_gripper_events_cut_and_name_segments() -> None:
    deltas = np.vstack([np.tile([0, 0, -0.01], (6, 1)), np.tile([0, 0, 0.01], (6, 1))])
    grippers = np.array([1] * 5 + [0] * 7)
    traj = make_trajectory(deltas, grippers)
    segments = segment(traj)
    # Row 5 is the first commanding "closed": the event rides on it and ends its segment.
    assert [(s.start, s.end, s.event) for s in segments] == [(0, 6, "close"), (6, 12, None)]
    subtasks, index = name_subtasks(traj, segments, parse_instruction(traj.instruction))
    assert subtasks == ["Grasp the carrot", "Lift the carrot"] and index == [0, 1]


def test_small_teleop_steps_are_reaggregated(tmp_path: Path) -> None:
    """Millimetre teleop steps become few centimetre actions, within the robot's chunk length."""
    deltas = np.tile([0.0, 0.004, -0.003], (40, 1))
    traj = make_trajectory(deltas)
    labels = LocalAnnotator(LANGUAGE, ROBOT).label_trajectory(traj)
    total = sum(len(w.chunk) for w in labels.windows)
    assert total < 40 / 4
    assert all(
        max(abs(a.dy), abs(a.dz)) >= PP.per_direction_threshold_m - 0.005 for w in labels.windows for a in w.chunk[:-1]
    )


def test_relabel_folder_with_frames_and_a_policy_run(demos: Path, tmp_path: Path) -> None:
    # A policy-run episode (stage records without demonstration steps) is skipped, with the reason recorded.
    source = tmp_path / "episodes"
    source.mkdir()
    for path in episodes(demos)[:3]:
        (source / path.name).symlink_to(path, target_is_directory=True)
    with EpisodeWriter.create(source, EpisodeMeta(instruction="pick up the fish", source="runtime"), "run-1") as writer:
        writer.append_step(
            StepRecord(index=0, t=0.0, wall_time=time.time(), stage="subtasks", subtasks=["Grasp the fish"])
        )
        writer.finish("failed")
    seen: list[str] = []
    info = relabel(
        source, tmp_path / "ds", LocalAnnotator(LANGUAGE, ROBOT), progress=lambda p, r, n: seen.append(p.name)
    )
    assert len(seen) == 4 and len(info.sources) == 3
    assert info.skipped and info.skipped[0].startswith("run-1:")
    dataset = read_dataset(tmp_path / "ds")
    with_frames = [s for s in dataset.samples if s.image]
    assert with_frames and all(dataset.image_path(s).is_file() for s in with_frames)
    assert all(s.image is None for s in dataset.by_stage("aux"))
    assert all(s.scene and s.scene.startswith("gripper ") for s in dataset.by_stage("action"))
    # Deterministic: the same episodes give the same dataset content.
    again = relabel(source, tmp_path / "ds2", LocalAnnotator(LANGUAGE, ROBOT))
    assert again.samples_sha256 == info.samples_sha256
