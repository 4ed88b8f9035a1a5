"""The waypoint action language end to end, with a rule-based policy that copies the scene (no model):
labels agree with the scene text digit for digit, the loop solves the suite, and the per-subtask
evaluation scores each subtask from the expert's states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.evaluation import HELD_OUT_SEED
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig
from vlm2vla_edge.runtime.scene_text import scene_in_units
from vlm2vla_edge.runtime.sim.expert import ScriptedExpert, record_demonstrations
from vlm2vla_edge.runtime.sim.session import make_sim_session
from vlm2vla_edge.runtime.subtask_eval import run_subtask_eval
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier
from vlm2vla_edge.testing.policies import SceneCopyPolicy, ScriptedPolicy
from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples

ROBOT = load_robot_config("widowx250s")
WAYPOINTS = load_policy_config("policy_waypoints").action_language


def test_waypoint_labels_copy_the_scene_offsets_exactly(tmp_path: Path) -> None:
    results = record_demonstrations(tmp_path, range(12), ROBOT, languages=("en", "fr", "de"), frames=False)
    assert all(r.success for r in results)
    annotator = LocalAnnotator(WAYPOINTS, ROBOT)
    checked = 0
    for result in results:
        assert result.path is not None
        labels = annotator.label(EpisodeReader(result.path))
        samples = build_samples(labels, aux=True)
        actions = [s for s in samples if s.stage == "action"]
        assert actions and all(re.fullmatch(r"\[\[[-0-9., ]+\]\]", s.target) for s in actions)  # one action each
        for sample in actions:
            offset = re.search(r"\(([^)]*)\)", sample.motion_plan).group(1)
            assert sample.target.startswith(f"[[{offset}, ")  # the chunk copies the plan
            assert sample.motion_plan.startswith(sample.subtask + ": ")  # the plan names the subtask's object
            key = (
                "above"
                if sample.subtask.startswith("Move to")
                else "grasp"
                if sample.subtask.startswith("Grasp")
                else None
            )
            if key:
                # ... and copies the scene, as the model reads it (in the language's units)
                assert f"{key} ({offset})" in scene_in_units(sample.scene, WAYPOINTS.units)
                checked += 1
        segments = {(w.segment, w.end) for w in labels.windows}
        assert len([s for s in samples if s.stage == "aux"]) <= len(segments)
    assert checked > 30


@pytest.mark.parametrize("seed", range(HELD_OUT_SEED, HELD_OUT_SEED + 6))
def test_copying_the_scene_solves_the_suite(seed: int) -> None:
    session = make_sim_session(ROBOT, seed, language="en")
    try:
        policy = SceneCopyPolicy(ScriptedExpert(ROBOT).subtask_names(session.task))
        result = EpisodeRunner(policy, session.arm, session.camera, HeuristicVerifier(), session.limiter,
                               hooks=session.hooks).run(session.instruction)
        assert result.outcome == "success", result.detail
        assert session.task.success(session.world)
    finally:
        session.close()


def test_runner_works_through_a_given_subtask_list_without_asking_for_one() -> None:
    session = make_sim_session(ROBOT, HELD_OUT_SEED, language="en")
    try:
        names = ScriptedExpert(ROBOT).subtask_names(session.task)
        policy = SceneCopyPolicy(["Never asked"])
        result = EpisodeRunner(policy, session.arm, session.camera, HeuristicVerifier(), session.limiter,
                               hooks=session.hooks).run(session.instruction, subtasks=names[:1])
        assert result.subtasks == tuple(names[:1]) and result.outcome == "success"
    finally:
        session.close()


def _session(robot, seed, language):
    return make_sim_session(robot, seed, language=language)


def test_per_subtask_evaluation_from_expert_states() -> None:
    seeds = [HELD_OUT_SEED + i for i in range(3)]
    names = {}
    for seed in seeds:
        s = _session(ROBOT, seed, "en")
        names[seed] = ScriptedExpert(ROBOT).subtask_names(s.task)
        s.close()
    all_names = sorted({n for v in names.values() for n in v})
    good = run_subtask_eval(SceneCopyPolicy(all_names), ROBOT, seeds, "en", _session, HeuristicVerifier(),
                            RunnerConfig(max_retries_per_subtask=3), echo=lambda _: None)
    assert len(good.runs) == sum(len(v) for v in names.values()) and good.overall == 1.0
    # A policy that always writes the same small move fails the subtasks that need the scene.
    bad = run_subtask_eval(ScriptedPolicy(needs_image=False, actions=("[[0.01, 0, 0, 1]]",)), ROBOT, seeds[:1], "en",
                           _session, HeuristicVerifier(), RunnerConfig(max_retries_per_subtask=1), echo=lambda _: None)
    assert bad.by_kind["move to object"] == 0.0 and bad.overall < 0.5


def test_open_loop_evaluation_tells_a_copying_policy_from_a_constant_one(tmp_path: Path) -> None:
    from vlm2vla_edge.train.data.dataset import read_dataset
    from vlm2vla_edge.train.data.local_annotator import relabel
    from vlm2vla_edge.train.data.open_loop import evaluate_open_loop

    record_demonstrations(
        tmp_path / "eps", range(HELD_OUT_SEED, HELD_OUT_SEED + 4), ROBOT, languages=("en",), frames=False
    )
    relabel(tmp_path / "eps", tmp_path / "ds", LocalAnnotator(WAYPOINTS, ROBOT), aux=False)
    dataset = read_dataset(tmp_path / "ds")
    lists = {s.instruction: s.subtasks for s in dataset.samples if s.stage == "subtasks"}
    good = evaluate_open_loop(SceneCopyPolicy(lists.__getitem__), dataset, max_samples=40, echo=lambda _: None)
    assert good.subtasks_exact == 1.0 and good.subtasks_objects_agree == 1.0
    assert good.overall is not None and good.overall.n == min(40, len(dataset.by_stage("action")))
    assert good.overall.error_cm_mean == pytest.approx(0.0, abs=1e-6) and good.plan_exact == 1.0
    assert good.overall.sign_agreement == 1.0 and good.format_invalid == 0
    assert good.by_kind["move_open"].mean_answer_error_cm > 1.0  # the baseline is not trivially zero
    constant = ScriptedPolicy(needs_image=False, actions=("[[0.01, 0, 0, 1]]",), language=WAYPOINTS)
    bad = evaluate_open_loop(constant, dataset, max_samples=40, echo=lambda _: None)
    assert bad.overall.error_cm_mean > 5.0 and bad.plan_exact == 0.0 and bad.subtasks_exact == 0.0
    assert "move_open" in bad.table() and "mean-ans" in bad.table()
