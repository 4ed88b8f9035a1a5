"""The evaluation harness: seed selection, ground-truth metrics with scripted and oracle policies, the
results files, Ctrl-C, and the `eval` command's exit codes."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from vlm2vla_edge.runtime.actions import ActionChunk
from vlm2vla_edge.runtime.cli_support import run_typer_app
from vlm2vla_edge.runtime.config import ActionLanguage, PostProcess, RobotConfig, load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.eval_cli import eval_command
from vlm2vla_edge.runtime.evaluation import (
    HELD_OUT_SEED,
    TASK_KINDS,
    EvalConfig,
    EvalReport,
    mentions,
    plan_hits,
    run_eval,
    select_seeds,
    task_kind,
    write_results,
)
from vlm2vla_edge.runtime.parser import parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.interface import PolicyOutputError, StageOutput, StepResult, SubtasksResult
from vlm2vla_edge.runtime.runner import RunnerConfig
from vlm2vla_edge.runtime.sim.expert import ScriptedExpert
from vlm2vla_edge.runtime.sim.session import SimSession, make_sim_session, objects_mentioned
from vlm2vla_edge.runtime.sim.tasks import CompositeTask, PickTask, PlaceTask, sample_episode
from vlm2vla_edge.runtime.verifier.base import Verdict, Verifier
from vlm2vla_edge.testing.policies import ScriptedPolicy

# --- fakes -------------------------------------------------------------------------------------------------


class FixedVerifier(Verifier):
    """Gives the same verdict on every step (True: a verifier fooled by everything)."""

    name = "fixed"

    def __init__(self, answer: bool) -> None:
        self.answer = answer

    def verify(self, request, cancel=None) -> Verdict:
        return Verdict(success=self.answer, reason="scripted", verifier=self.name, latency_s=0.0)


class NamingPolicy(ScriptedPolicy):
    """Plans one subtask per object the instruction names (all of them, or only the first)."""

    def __init__(self, only_first: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.only_first = only_first

    def subtasks(self, observation, instruction, *, cancel=None) -> SubtasksResult:
        names = objects_mentioned(instruction)[: 1 if self.only_first else None]
        text = json.dumps([f"Move to the {name.upper()}" for name in names])
        return SubtasksResult(subtasks=parse_subtasks(text), output=StageOutput("subtasks", instruction, text, {}))


class UnusableStepsPolicy(ScriptedPolicy):
    """A usable subtask list, then action output that never parses."""

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None) -> StepResult:
        self.steps += 1
        raise PolicyOutputError("action", "[[0.1, 0", "cut off by the token budget")


class UnusablePlanPolicy(ScriptedPolicy):
    def subtasks(self, observation, instruction, *, cancel=None) -> SubtasksResult:
        raise PolicyOutputError("subtasks", '["Move to the carr', "cut off by the token budget")


class OraclePolicy(ScriptedPolicy):
    """Plays the scripted expert's chunks for each episode's task (planned from the simulator's ground
    truth, so a test device only); `first_part_only` stops a composite after its first part. Its
    verifier (`done`) says the subtask is done once the expert has nothing left to play."""

    def __init__(self, robot: RobotConfig, first_part_only: bool = False) -> None:
        super().__init__(subtasks=("Do the task",))
        self.expert = ScriptedExpert(robot)
        self.first_part_only = first_part_only
        self._chunks = iter(())
        self._pending: ActionChunk | None = None

    @property
    def action_language(self) -> ActionLanguage:
        return ActionLanguage(postprocess=PostProcess(enabled=False))

    def make_session(self, robot: RobotConfig, seed: int, language) -> SimSession:
        session = make_sim_session(robot, seed, language=language)
        task = session.task
        if self.first_part_only and isinstance(task, CompositeTask):
            task = task.parts[0]
        # lazy: the expert plans each part from the world as it is when the part starts
        self._chunks, self._pending = self.expert.chunks(task, session.world), None
        return session

    def _peek(self) -> ActionChunk | None:
        if self._pending is None:
            self._pending = next(self._chunks, None)
        return self._pending

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None) -> StepResult:
        self.steps += 1
        chunk, self._pending = self._peek() or ActionChunk(()), None
        motion = "Move as the expert does"
        return StepResult(
            motion=parse_motion_plan(motion), chunk=chunk,
            motion_output=StageOutput("motion", subtask, motion, {"total_s": 0.002}),
            action_output=StageOutput("action", subtask, "(expert chunk)", {"total_s": 0.003}),
        )

    @property
    def done(self) -> Verifier:
        oracle = self

        class Done(Verifier):
            name = "oracle"

            def verify(self, request, cancel=None) -> Verdict:
                return Verdict(
                    success=oracle._peek() is None, reason="expert finished", verifier=self.name, latency_s=0.0
                )

        return Done()


def config(**fields) -> EvalConfig:
    fields.setdefault("episodes", 2)
    fields.setdefault("runner", RunnerConfig(max_steps=4, max_retries_per_subtask=1))
    return EvalConfig(**fields)


def quiet(lines: list[str] | None = None):
    return (lines.append if lines is not None else (lambda line: None))


# --- seeds -------------------------------------------------------------------------------------------------


def test_seeds_are_deterministic_held_out_and_of_their_kind() -> None:
    chosen = {kind: select_seeds(kind, 6) for kind in TASK_KINDS}
    assert chosen == {kind: select_seeds(kind, 6) for kind in TASK_KINDS}
    everything = [s for seeds in chosen.values() for s in seeds]
    assert min(everything) >= HELD_OUT_SEED and len(set(everything)) == len(everything)
    for kind, seeds in chosen.items():
        assert all(task_kind(sample_episode(s, language="en").task) == kind for s in seeds)
    # known values pin the scan (a change of the suite's sampler must be noticed: results would not compare)
    assert chosen["pick"][:3] == [1000004, 1000008, 1000009]
    assert chosen["composite"][:2] == [1000000, 1000015]


@given(start=st.integers(HELD_OUT_SEED, HELD_OUT_SEED + 10**6), n=st.integers(1, 4), kind=st.sampled_from(TASK_KINDS))
def test_seeds_are_the_first_of_their_kind_from_the_start(start: int, n: int, kind: str) -> None:
    seeds = select_seeds(kind, n, start)
    assert len(seeds) == n and seeds == sorted(seeds) and seeds[0] >= start
    for seed in range(start, seeds[-1] + 1):
        assert (seed in seeds) == (task_kind(sample_episode(seed, language="en").task) == kind)


def test_the_same_tasks_in_every_language() -> None:
    seeds = select_seeds("place", 3, language="en")
    assert select_seeds("place", 3, language="zh") == seeds
    for seed in seeds:
        en, zh = sample_episode(seed, language="en").task, sample_episode(seed, language="zh").task
        assert (en.item, en.target) == (zh.item, zh.target) and en.instruction() != zh.instruction()


def test_training_seeds_are_refused_unless_asked_for() -> None:
    with pytest.raises(ValueError, match="training range"):
        EvalConfig(seed_start=HELD_OUT_SEED - 1)
    assert EvalConfig(seed_start=0, allow_training_seeds=True).seed_start == 0
    with pytest.raises(ValueError, match="repeat"):
        EvalConfig(tasks=("pick", "pick"))


# --- plan hits ---------------------------------------------------------------------------------------------


def test_plan_hits_match_whole_words_case_insensitively() -> None:
    pick, place = PickTask("carrot"), PlaceTask("carrot", "pan")
    composite = CompositeTask(parts=(PlaceTask("eggplant", "pan"), PickTask("fish", verb="lift")))
    assert plan_hits(pick, ["Move to the CARROT", "Grasp it"]) == (True, None)
    assert plan_hits(place, ["Grasp the carrots", "Lift"]) == (True, False)
    assert plan_hits(place, ["Grasp the carrot", "Move over the pancake"]) == (True, False)
    assert plan_hits(place, ["Grasp the carrot", "Put it in the pan."]) == (True, True)
    assert plan_hits(composite, ["Put the eggplant in the pan", "Lift the mushroom"]) == (False, True)
    assert plan_hits(composite, []) == (False, False)
    assert mentions(["Open the gripper"], "pan") is False


# --- metrics -----------------------------------------------------------------------------------------------


def test_a_policy_that_achieves_nothing_scores_zero_with_valid_format() -> None:
    report = run_eval(ScriptedPolicy(), config(), quiet(), verifier=FixedVerifier(False))
    assert len(report.rows) == 6 and not report.partial
    overall = report.overall
    assert overall.success_rate == 0.0 and overall.mean_partial_credit == 0.0
    assert overall.runner_success_rate == 0.0 and overall.format_validity == 1.0
    # one retry allowed: the first subtask fails twice, then the episode ends
    assert (overall.steps_mean, overall.retries_mean, overall.retries_max) == (2.0, 2.0, 2)
    for row in report.rows:
        assert row.outputs == 1 + row.steps and row.invalid_outputs == 0
        assert set(row.stage_latency_s) == {"subtasks", "motion", "action", "execute", "verify"}
    assert overall.latency_s["motion"].n == sum(r.steps for r in report.rows)
    assert overall.latency_s["motion"].p50 == pytest.approx(0.001)


def test_runner_success_and_ground_truth_are_reported_apart() -> None:
    report = run_eval(ScriptedPolicy(), config(), quiet(), verifier=FixedVerifier(True))
    assert report.overall.runner_success_rate == 1.0
    assert report.overall.success_rate == 0.0


def test_plan_hit_rates_per_task_kind() -> None:
    everything = run_eval(NamingPolicy(), config(), quiet())
    for summary in everything.by_kind.values():
        assert summary.plan_hit_rate == 1.0 and summary.object_hit_rate == 1.0
    assert everything.by_kind["pick"].destination_hit_rate is None
    assert everything.by_kind["place"].destination_hit_rate == 1.0

    first = run_eval(NamingPolicy(only_first=True), config(), quiet()).by_kind
    assert (first["pick"].plan_hit_rate, first["pick"].object_hit_rate) == (1.0, 1.0)
    assert (first["place"].plan_hit_rate, first["place"].object_hit_rate, first["place"].destination_hit_rate) == (
        0.0,
        1.0,
        0.0,
    )
    # a composite moves two items: naming only the first misses the second
    assert (first["composite"].plan_hit_rate, first["composite"].object_hit_rate) == (0.0, 0.0)


def test_unusable_output_lowers_format_validity() -> None:
    steps = run_eval(UnusableStepsPolicy(), config(tasks=("pick",)), quiet())
    for row in steps.rows:  # a subtask list, then two rejected steps (one retry allowed)
        assert (row.outputs, row.invalid_outputs, row.steps) == (3, 2, 2)
    assert steps.overall.format_validity == pytest.approx(1 / 3)
    assert steps.overall.latency_s["motion"] is None

    plan = run_eval(UnusablePlanPolicy(), config(tasks=("place",)), quiet())
    assert plan.overall.format_validity == 0.0 and plan.overall.plan_hit_rate == 0.0
    assert all(r.subtasks == () and r.runner_outcome == "failed" for r in plan.rows)


def test_ground_truth_success_and_partial_credit_with_an_oracle() -> None:
    robot = load_robot_config()
    budget = RunnerConfig(max_steps=60, max_retries_per_subtask=20)
    oracle = OraclePolicy(robot)
    report = run_eval(oracle, config(runner=budget), quiet(), verifier=oracle.done, make_session=oracle.make_session)
    for summary in report.by_kind.values():
        assert (summary.success_rate, summary.runner_success_rate, summary.mean_partial_credit) == (1.0, 1.0, 1.0)

    half = OraclePolicy(robot, first_part_only=True)
    composite = run_eval(half, config(tasks=("composite",), runner=budget), quiet(), verifier=half.done,
                         make_session=half.make_session)
    assert composite.overall.success_rate == 0.0 and composite.overall.mean_partial_credit == 0.5


# --- results files -----------------------------------------------------------------------------------------


def test_results_json_and_csv(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_eval(NamingPolicy(only_first=True), config(tasks=("pick", "place")), quiet(lines))
    assert sum(line.startswith("[") for line in lines) == 4 and "seed 1000004" in lines[1]
    json_path, csv_path = write_results(report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["episodes.csv", "results.json"]
    assert EvalReport.model_validate_json(json_path.read_text()) == report
    data = json.loads(json_path.read_text())
    assert data["config"]["episodes"] == 2 and data["bundle_id"] == "scripted-fake" and data["partial"] is False
    assert data["versions"]["vlm2vla-edge"] and set(data["by_kind"]) == {"pick", "place"}
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["kind"], int(r["seed"])) for r in rows] == [(r.kind, r.seed) for r in report.rows]
    place = [r for r in rows if r["kind"] == "place"]
    assert all(r["plan_hit"] == "0" and r["object_hit"] == "1" and r["destination_hit"] == "0" for r in place)
    assert all(r["destination_hit"] == "" for r in rows if r["kind"] == "pick")
    assert float(rows[0]["motion_s"]) == pytest.approx(sum(report.rows[0].stage_latency_s["motion"]), abs=1e-4)
    table = report.table()
    assert "pick" in table and "place" in table and "p99" in table and "composite" not in table


def test_episodes_can_be_recorded(tmp_path: Path) -> None:
    report = run_eval(ScriptedPolicy(), config(tasks=("pick",), episodes=1, record_dir=tmp_path), quiet())
    (row,) = report.rows
    reader = EpisodeReader(Path(row.episode_dir))
    assert reader.outcome == row.runner_outcome and reader.meta.instruction == row.instruction
    assert reader.meta.extra["seed"] == row.seed and reader.meta.extra["eval_task_kind"] == "pick"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_stops_cleanly_and_keeps_finished_episodes() -> None:
    def interrupt_third(index: int, cancel) -> None:
        if index == 2:  # one step per episode: the third episode
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    policy = ScriptedPolicy(on_step=interrupt_third)
    report = run_eval(policy, config(episodes=3, runner=RunnerConfig(max_steps=1)), quiet())
    assert report.partial and "Ctrl-C" in report.stop_reason
    assert len(report.rows) == 2 and report.planned_episodes == 9 and policy.steps == 3
    assert signal.getsignal(signal.SIGINT) is before


# --- the command -------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Throwaway group, as runtime/cli.py mounts the command."""

    app.command("eval")(eval_command)
    return run_typer_app(app, ["eval", *argv], "vlm2vla-edge")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--tasks", "pick,stack"],
            "error: --tasks takes a comma-separated list of pick, place, composite; 'stack' is not one",
        ),
        (
            ["--language", "pt"],
            "error: --language must be one of en, es, fr, de, hi, zh, it, nl, sv, ru, ja, id, vi, not 'pt'",
        ),
        (["--seed-start", "5"], "error: --seed-start 5 is in the training range"),
        ([], "error: no model bundle"),
        (["--bundle", "/nonexistent/bundle"], "error: the bundle folder /nonexistent/bundle does not exist"),
    ],
)
def test_input_errors_exit_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_policy_settings_are_validated_by_the_policy_config(tmp_path: Path, capsys) -> None:
    assert run_cli(["--bundle", str(tmp_path), "--constraint", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "constraint" in err[0]
    assert run_cli(["--bundle", str(tmp_path), "--policy-set", "n_threads"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_the_command_runs_and_writes_results(tmp_path: Path, monkeypatch, capsys) -> None:
    from vlm2vla_edge.runtime import evaluation, station

    class ClosablePolicy(NamingPolicy):
        closed = False

        def close(self) -> None:
            type(self).closed = True

    loaded = {}

    def fake_load(path, policy_config, echo):
        loaded["config"] = policy_config
        return ClosablePolicy()

    monkeypatch.setattr(station, "load_policy", fake_load)
    monkeypatch.setattr(evaluation, "bundle_info", lambda path: None)
    out = tmp_path / "out"
    code = run_cli(["--bundle", str(tmp_path), "--episodes", "1", "--tasks", "composite", "--max-steps", "2",
                    "--policy-set", "n_threads=2", "--policy-set", "sampling.action.temperature=0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert loaded["config"].n_threads == 2 and loaded["config"].sampling.action.temperature == 0.0
    assert ClosablePolicy.closed
    assert "composite" in printed and "latency (s)" in printed and str(out / "results.json") in printed
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["tasks"] == ["composite"] and len(data["rows"]) == 1
    assert data["rows"][0]["plan_hit"] is True and data["config"]["runner"]["max_steps"] == 2


@pytest.mark.slow
def test_a_real_bundle_through_the_command(gemma270m_bundle, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = run_cli(["--bundle", str(gemma270m_bundle.root), "--episodes", "1", "--tasks", "pick", "--max-steps", "2",
                    "--max-retries", "1", "--policy-set", "n_threads=2", "--policy-set", "n_ctx=2048",
                    "--policy-set", "n_batch=256", "--policy-set", "n_ubatch=256", "--out", str(out), "--record",
                    # short budgets keep it quick on a busy CPU; a cut-off output is a format error, still scored
                    "--policy-set", "sampling.subtasks.max_tokens=48", "--policy-set", "sampling.motion.max_tokens=24",
                    "--policy-set", "sampling.action.max_tokens=48", "--policy-set", "sampling.retry.max_tokens=48"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads((out / "results.json").read_text())
    (row,) = data["rows"]
    manifest = gemma270m_bundle.manifest
    assert data["bundle"]["name"] == manifest.name
    assert data["bundle"]["text_model_sha256"] == manifest.files[manifest.text_model].sha256
    assert row["kind"] == "pick" and row["seed"] == select_seeds("pick", 1)[0]
    assert 1 <= row["outputs"] <= 3 and row["steps"] <= 2
    assert data["overall"]["latency_s"]["subtasks"]["n"] == 1
    assert EpisodeReader(Path(row["episode_dir"])).outcome == row["runner_outcome"]
