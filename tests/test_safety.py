"""Safety limiter: every rule in clamp and reject mode, the e-stop latch, the rate limit, the
SafeCommand contract, the hard ceilings of the robot config, and hostile but grammatical chunks."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import RobotConfig, StepLimits, load_robot_config
from vlm2vla_edge.runtime.errors import ConfigError
from vlm2vla_edge.runtime.safety import (
    ChunkVerdict,
    EStopEngaged,
    SafeCommand,
    SafetyDecision,
    SafetyLimiter,
    SafetyViolation,
)

HOSTILE = Path(__file__).parent / "data" / "hostile_limiter.yaml"
START = (0.3, 0.0, 0.2)  # well inside the shipped workspace box
TOL = 1e-9


def robot_with(**changes: Any) -> RobotConfig:
    """The shipped robot config with nested `changes` applied, validated like a YAML file would be."""
    data = load_robot_config().model_dump(mode="json")
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return RobotConfig.model_validate(data)


def limiter(robot: RobotConfig | None = None, **kwargs: Any) -> SafetyLimiter:
    return SafetyLimiter(robot or load_robot_config(), **kwargs)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rules_of(decisions: tuple[SafetyDecision, ...]) -> dict[str, str]:
    return {d.rule: d.verdict for d in decisions}


def assert_within_limits(robot: RobotConfig, verdict: ChunkVerdict, start: tuple[float, float, float]) -> None:
    """The limiter's invariant on every emitted command of a chunk."""
    box, limits = robot.workspace, robot.limits
    position, path = start, 0.0
    assert len(verdict.commands) <= limits.max_chunk_length
    for command in verdict.commands:
        assert command.start == position
        x, y, z = command.target
        assert all(math.isfinite(v) for v in command.target)
        assert box.x.min <= x <= box.x.max and box.y.min <= y <= box.y.max and box.z.min <= z <= box.z.max
        assert z >= robot.z_floor
        length = math.dist(command.start, command.target)
        assert length <= limits.max_translation_per_action_m + TOL
        path += length
        assert isinstance(command.gripper_open, bool)
        position = command.target
    assert path <= limits.max_translation_per_chunk_m + TOL


# --- per-action rules ----------------------------------------------------------------------------


def test_plain_action_passes_unchanged() -> None:
    command, decisions = limiter().check_action(Action(0.01, -0.02, 0.03, 0.0), START)
    assert decisions == ()
    assert command is not None and not command.clamped
    assert command.target == pytest.approx((0.31, -0.02, 0.23))
    assert command.gripper_open is False and command.source == Action(0.01, -0.02, 0.03, 0.0)


@pytest.mark.parametrize(
    "action",
    [Action(math.nan, 0, 0, 1), Action(0, math.inf, 0, 1), Action(0, 0, -math.inf, 0), Action(0, 0, 0, math.nan)],
)
@pytest.mark.parametrize("mode", ["clamp", "reject"])
def test_non_finite_actions_are_always_rejected(action: Action, mode: str) -> None:
    every_rule = {r: mode for r in ("workspace", "table_floor", "action_translation", "chunk_translation", "gripper")}
    command, decisions = limiter(robot_with(rules=every_rule)).check_action(action, START)
    assert command is None
    assert rules_of(decisions) == {"finite": "reject"}


def test_non_finite_start_is_rejected() -> None:
    command, decisions = limiter().check_action(Action(0, 0, 0, 1), (0.3, math.nan, 0.2))
    assert command is None and rules_of(decisions) == {"finite": "reject"}
    assert "start pose" in decisions[0].reason


@pytest.mark.parametrize(("value", "opens"), [(0.7, True), (0.3, False), (0.5, False), (1.8, True), (-3.0, False)])
def test_gripper_clamp_snaps_to_nearest(value: float, opens: bool) -> None:
    command, decisions = limiter(robot_with(rules={"gripper": "clamp"})).check_action(Action(0, 0, 0, value), START)
    assert command is not None and command.gripper_open is opens
    assert rules_of(decisions) == {"gripper": "clamp"}
    assert f"{value:g}" in decisions[0].reason


def test_gripper_reject() -> None:
    command, decisions = limiter(robot_with(rules={"gripper": "reject"})).check_action(Action(0, 0, 0, 0.7), START)
    assert command is None and rules_of(decisions) == {"gripper": "reject"}


def test_action_translation_clamp_keeps_direction() -> None:
    robot = robot_with(rules={"action_translation": "clamp"})
    command, decisions = limiter(robot).check_action(Action(0.1, 0.1, -0.05, 1), START)
    assert command is not None and rules_of(decisions) == {"action_translation": "clamp"}
    delta = command.delta
    assert math.hypot(*delta) == pytest.approx(robot.limits.max_translation_per_action_m)
    norm = math.hypot(0.1, 0.1, -0.05)
    assert [d / 0.05 for d in delta] == pytest.approx([0.1 / norm, 0.1 / norm, -0.05 / norm])
    assert "15 cm" in decisions[0].reason and "5 cm" in decisions[0].reason


def test_action_translation_reject() -> None:
    command, decisions = limiter(robot_with(rules={"action_translation": "reject"})).check_action(
        Action(0.06, 0, 0, 1), START
    )
    assert command is None and rules_of(decisions) == {"action_translation": "reject"}


def test_move_exactly_at_the_limit_passes() -> None:
    command, decisions = limiter(robot_with(rules={"action_translation": "reject"})).check_action(
        Action(0.03, 0.04, 0, 1), START
    )
    assert command is not None and decisions == ()


def test_workspace_clamp_projects_into_box() -> None:
    command, decisions = limiter(robot_with(rules={"workspace": "clamp"})).check_action(
        Action(0.04, -0.03, 0, 1), (0.48, -0.29, 0.2)
    )
    assert command is not None and rules_of(decisions) == {"workspace": "clamp"}
    assert command.target == pytest.approx((0.5, -0.3, 0.2))


def test_workspace_reject() -> None:
    command, decisions = limiter(robot_with(rules={"workspace": "reject"})).check_action(
        Action(0, 0, 0.05, 1), (0.3, 0.0, 0.38)
    )
    assert command is None and rules_of(decisions) == {"workspace": "reject"}
    assert "3 cm outside" in decisions[0].reason


def test_sub_nanometre_overshoot_is_snapped_silently() -> None:
    """0.45 + 0.05 may round past 0.5: that is float arithmetic, not a model decision."""
    robot = robot_with(rules={"workspace": "reject"})
    command, decisions = limiter(robot).check_action(Action(0.05, 0, 0, 1), (0.45000000000000007, 0, 0.2))
    assert command is not None and decisions == ()
    assert command.target[0] <= robot.workspace.x.max


def test_table_floor_clamp_raises_z() -> None:
    robot = robot_with(workspace={"z": {"min": 0.0, "max": 0.4}}, rules={"table_floor": "clamp"})
    command, decisions = limiter(robot).check_action(Action(0, 0, -0.05, 0), (0.3, 0.0, 0.04))
    assert command is not None and rules_of(decisions) == {"table_floor": "clamp"}
    assert command.target[2] == robot.z_floor == pytest.approx(0.015)


def test_table_floor_reject() -> None:
    robot = robot_with(workspace={"z": {"min": 0.0, "max": 0.4}}, rules={"table_floor": "reject", "workspace": "clamp"})
    command, decisions = limiter(robot).check_action(Action(0, 0, -0.05, 0), (0.3, 0.0, 0.04))
    assert command is None and rules_of(decisions) == {"table_floor": "reject"}
    assert "0.015" in decisions[0].reason


def test_reachability_is_always_rejected() -> None:
    reach = lambda p: p[0] < 0.4  # noqa: E731 - a stand-in for inverse kinematics
    every_clamp = {
        r: "clamp" for r in ("workspace", "table_floor", "action_translation", "chunk_translation", "gripper")
    }
    safe = limiter(robot_with(rules=every_clamp), reachable=reach)
    command, decisions = safe.check_action(Action(0.05, 0, 0, 1), (0.38, 0, 0.2))
    assert command is None and rules_of(decisions) == {"reachability": "reject"}
    command, _ = safe.check_action(Action(0.01, 0, 0, 1), (0.38, 0, 0.2))
    assert command is not None


def test_reachability_hook_that_raises_rejects() -> None:
    def broken(_: tuple[float, float, float]) -> bool:
        raise RuntimeError("solver diverged")

    command, decisions = limiter(reachable=broken).check_action(Action(0, 0, 0, 1), START)
    assert command is None and rules_of(decisions) == {"reachability": "reject"}
    assert "solver diverged" in decisions[0].reason


def test_reachability_sees_the_final_clamped_target() -> None:
    seen: list[tuple[float, float, float]] = []
    limiter(reachable=lambda p: seen.append(p) or True).check_action(Action(0.2, 0, 0, 1), (0.48, 0, 0.2))
    assert seen == [pytest.approx((0.5, 0.0, 0.2))]


def test_missing_reachability_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vlm2vla_edge.runtime.safety"):
        safe = limiter()
        safe.check_action(Action(0, 0, 0, 1), START)
        safe.check_action(Action(0, 0, 0, 1), START)
    assert sum("reachability_unchecked" in r.message for r in caplog.records) == 1


def test_far_outside_start_asks_for_homing() -> None:
    command, decisions = limiter().check_action(Action(0, 0, 0, 1), (0.8, 0.0, 0.2))
    assert command is None
    assert decisions[-1].rule == "start_pose" and decisions[-1].verdict == "reject"
    assert re.search(r"arm is 30 cm outside the workspace .*home it first", decisions[-1].reason)


def test_slightly_outside_start_may_move_back_in() -> None:
    command, decisions = limiter().check_action(Action(-0.03, 0, 0, 1), (0.51, 0.0, 0.2))
    assert command is not None and decisions == ()
    assert command.target == pytest.approx((0.48, 0.0, 0.2))


def test_outside_start_clamped_back_within_one_action() -> None:
    """From 2 cm outside, moving further out is projected back: a move of 2 cm into the box."""
    command, decisions = limiter().check_action(Action(0.05, 0, 0, 1), (0.52, 0.0, 0.2))
    assert command is not None and rules_of(decisions) == {"workspace": "clamp"}
    assert command.target == pytest.approx((0.5, 0.0, 0.2))


# --- chunk rules ---------------------------------------------------------------------------------


def test_chunk_length_reject_refuses_everything() -> None:
    verdict = limiter(robot_with(rules={"chunk_length": "reject"})).check_chunk(
        ActionChunk([Action(0.001, 0, 0, 1)] * 11), START
    )
    assert verdict.rejected and verdict.commands == ()
    assert rules_of(verdict.decisions) == {"chunk_length": "reject"} and verdict.decisions[0].index is None
    assert "11 actions" in verdict.reason and "10" in verdict.reason


def test_chunk_length_clamp_truncates() -> None:
    verdict = limiter(robot_with(rules={"chunk_length": "clamp"})).check_chunk(
        ActionChunk([Action(0.001, 0, 0, 1)] * 16), START
    )
    assert not verdict.rejected and len(verdict.commands) == 10
    assert rules_of(verdict.decisions) == {"chunk_length": "clamp"}


def test_empty_chunk_is_rejected() -> None:
    verdict = limiter().check_chunk(ActionChunk(()), START)
    assert verdict.rejected and verdict.commands == ()


def test_chunk_follows_the_predicted_path() -> None:
    verdict = limiter().check_chunk(ActionChunk([Action(0.02, 0, 0, 1), Action(0, 0.03, 0, 0)]), START)
    assert not verdict.rejected and verdict.reason == "" and verdict.decisions == ()
    first, second = verdict.commands
    assert second.start == first.target
    assert second.target == pytest.approx((0.32, 0.03, 0.2))
    assert (first.gripper_open, second.gripper_open) == (True, False)


def test_chunk_translation_clamp_shortens_the_crossing_action_and_drops_the_rest() -> None:
    robot = robot_with(rules={"chunk_translation": "clamp"})
    shuttle = ActionChunk([Action(0.03, 0, 0, 1), Action(-0.03, 0, 0, 1)] * 4)  # 24 cm of path, budget 20
    verdict = limiter(robot).check_chunk(shuttle, START)
    assert not verdict.rejected
    assert len(verdict.commands) == 7  # six full moves (18 cm), the seventh shortened to 2 cm, the eighth dropped
    assert verdict.commands[-1].length == pytest.approx(0.02)
    assert sum(c.length for c in verdict.commands) == pytest.approx(0.2)
    (decision,) = verdict.decisions
    assert (decision.rule, decision.verdict, decision.index) == ("chunk_translation", "clamp", 6)
    assert "1 after it dropped" in decision.reason
    assert verdict.commands[-1].decisions == (decision,)


def test_chunk_translation_reject_keeps_the_prefix() -> None:
    robot = robot_with(rules={"chunk_translation": "reject"})
    shuttle = ActionChunk([Action(0.03, 0, 0, 1), Action(-0.03, 0, 0, 1)] * 4)
    verdict = limiter(robot).check_chunk(shuttle, START)
    assert verdict.rejected and len(verdict.commands) == 6
    assert rules_of(verdict.decisions) == {"chunk_translation": "reject"}
    assert verdict.reason == verdict.decisions[0].reason


def test_budget_exactly_spent_passes() -> None:
    verdict = limiter(robot_with(rules={"chunk_translation": "reject"})).check_chunk(
        ActionChunk([Action(0.05, 0, 0, 1), Action(-0.05, 0, 0, 1)] * 2), START
    )
    assert not verdict.rejected and len(verdict.commands) == 4 and verdict.decisions == ()


def test_action_reject_mid_chunk_keeps_prefix_and_drops_rest() -> None:
    chunk = ActionChunk([Action(0.01, 0, 0, 1), Action(0, 0, 0, 0.5), Action(0.01, 0, 0, 1)])
    verdict = limiter(robot_with(rules={"gripper": "reject"})).check_chunk(chunk, START)
    assert verdict.rejected and len(verdict.commands) == 1
    assert [(d.rule, d.index) for d in verdict.decisions] == [("gripper", 1)]


def test_clamped_chunk_reason_names_the_rules() -> None:
    verdict = limiter().check_chunk(ActionChunk([Action(0.2, 0, 0, 1)]), START)
    assert not verdict.rejected and verdict.clamped
    assert verdict.reason == "clamped by action_translation"
    json.dumps(verdict.to_dict())  # recordable in an episode


def test_every_non_pass_decision_is_logged_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    chunk = ActionChunk([Action(0.2, 0, 0, 1), Action(0, 0, 0, 0.5)])
    with caplog.at_level(logging.INFO, logger="vlm2vla_edge.runtime.safety"):
        verdict = limiter(reachable=lambda p: True).check_chunk(chunk, START)
    lines = [r.getMessage() for r in caplog.records if "rule=" in r.getMessage()]
    assert len(lines) == len(verdict.decisions) == 2
    assert re.fullmatch(r'safety rule=action_translation verdict=clamp index=0 reason=".*"', lines[0])
    assert re.fullmatch(r'safety rule=gripper verdict=reject index=1 reason=".*"', lines[1])


# --- e-stop --------------------------------------------------------------------------------------


def test_estop_latches_until_reset() -> None:
    safe = limiter()
    before, _ = safe.check_action(Action(0.01, 0, 0, 1), START)
    assert before is not None
    safe.estop("operator pressed stop")
    assert safe.engaged and safe.estop_reason == "operator pressed stop"
    command, decisions = safe.check_action(Action(0, 0, 0, 1), START)
    assert command is None and rules_of(decisions) == {"estop": "reject"}
    verdict = safe.check_chunk(ActionChunk([Action(0, 0, 0, 1)]), START)
    assert verdict.rejected and verdict.commands == () and "operator pressed stop" in verdict.reason
    with pytest.raises(EStopEngaged):
        before.authorize()
    safe.estop("second press")
    assert safe.estop_reason == "operator pressed stop"  # the first cause is kept
    safe.reset()
    assert not safe.engaged and safe.estop_reason is None
    with pytest.raises(SafetyViolation, match="before an e-stop"):
        before.authorize()  # checked before the stop: the arm may have been moved since
    after, _ = safe.check_action(Action(0.01, 0, 0, 1), START)
    assert after is not None and after.authorize() == 0.0


def test_estop_from_another_thread() -> None:
    safe = limiter()
    threads = [threading.Thread(target=safe.estop, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert safe.engaged and safe.estop_reason in {f"t{i}" for i in range(8)}


# --- rate limit ----------------------------------------------------------------------------------


def _commands(safe: SafetyLimiter, n: int) -> list[SafeCommand]:
    verdict = safe.check_chunk(ActionChunk([Action(0, 0, 0, 1)] * n), START)
    assert len(verdict.commands) == n
    return list(verdict.commands)


def test_rate_clamp_spaces_commands() -> None:
    clock = FakeClock()
    safe = limiter(robot_with(rules={"rate": "clamp"}, limits={"max_commands_per_s": 10.0}), clock=clock)
    a, b, c, d = _commands(safe, 4)
    assert a.authorize() == 0.0
    assert b.authorize() == pytest.approx(0.1)  # same instant: wait a full interval
    clock.now += 0.05
    assert c.authorize() == pytest.approx(0.15)  # b is scheduled at +0.1, so c goes at +0.2
    clock.now += 5.0
    assert d.authorize() == 0.0


def test_rate_reject_refuses_without_spending() -> None:
    clock = FakeClock()
    safe = limiter(robot_with(rules={"rate": "reject"}, limits={"max_commands_per_s": 4.0}), clock=clock)
    a, b = _commands(safe, 2)
    assert a.authorize() == 0.0
    clock.now += 0.2
    with pytest.raises(SafetyViolation, match="too early"):
        b.authorize()
    assert not b.spent
    clock.now += 0.05
    assert b.authorize() == 0.0


def test_authorize_uses_an_explicit_now() -> None:
    safe = limiter(clock=FakeClock(0.0))
    a, b = _commands(safe, 2)
    assert a.authorize(now=50.0) == 0.0
    assert b.authorize(now=50.02) == pytest.approx(0.08)


# --- SafeCommand contract ------------------------------------------------------------------------


def test_safe_command_cannot_be_made_outside_the_limiter() -> None:
    with pytest.raises(TypeError, match="only be created by the SafetyLimiter"):
        SafeCommand(
            token=object(),
            limiter=limiter(),
            start=START,
            target=START,
            gripper_open=True,
            source=Action(0, 0, 0, 1),
            decisions=(),
        )
    with pytest.raises(TypeError):
        SafeCommand()  # type: ignore[call-arg]


def test_safe_command_cannot_be_executed_twice() -> None:
    (command,) = _commands(limiter(), 1)
    command.authorize()
    with pytest.raises(SafetyViolation, match="already executed"):
        command.authorize()


def test_safe_command_is_sealed() -> None:
    (command,) = _commands(limiter(), 1)
    with pytest.raises(AttributeError):
        command.extra = 1  # type: ignore[attr-defined]


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"limits": {"max_translation_per_action_m": 0.5}},
        {"limits": {"max_translation_per_chunk_m": 2.0}},
        {"limits": {"max_chunk_length": 1000}},
        {"limits": {"max_commands_per_s": 500.0}},
        {"workspace": {"x": {"min": 0.1, "max": 1.5}}},
        {"min_clearance_m": -0.1},
    ],
)
def test_config_cannot_exceed_hard_limits(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        robot_with(**changes)


def test_config_file_beyond_hard_limits_is_a_config_error(tmp_path: Path) -> None:
    data = load_robot_config().model_dump(mode="json")
    data["limits"]["max_translation_per_action_m"] = 0.5
    path = tmp_path / "loose.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="max_translation_per_action_m"):
        load_robot_config(path)


def test_limiter_revalidates_configs_that_skipped_validation() -> None:
    """`model_copy(update=...)` does not validate; the limiter must not trust such a config."""
    loose = load_robot_config().model_copy(
        update={"limits": StepLimits.model_construct(max_translation_per_action_m=3.0)}
    )
    with pytest.raises(ConfigError, match="max_translation_per_action_m"):
        SafetyLimiter(loose)


def test_no_parameter_can_loosen_a_limit() -> None:
    assert list(inspect.signature(SafetyLimiter.__init__).parameters) == [
        "self",
        "robot",
        "reachable",
        "clock",
        "logger",
    ]
    assert list(inspect.signature(SafetyLimiter.check_chunk).parameters) == ["self", "chunk", "start"]


# --- hostile but grammatical chunks --------------------------------------------------------------


def parse_chunk(text: str) -> ActionChunk:
    """The real parser when it is there; otherwise a strict stand-in (v1 grammar regex + json)."""
    try:
        from vlm2vla_edge.runtime.parser import parse_action_chunk
    except ImportError:
        num = r"(?:0|-?0\.[0-9]{1,3})"
        action = rf"\[{num}, {num}, {num}, [01]\]"
        assert re.fullmatch(rf"\[{action}(?:, {action}){{0,15}}\]", text), f"not v1 grammar: {text}"
        rows = json.loads(text)
        assert all(abs(v) <= 0.2 for row in rows for v in row[:3])
        return ActionChunk(tuple(Action(*(float(v) + 0.0 for v in row)) for row in rows))
    return parse_action_chunk(text)


def _hostile_cases() -> list[dict[str, Any]]:
    return yaml.safe_load(HOSTILE.read_text())["cases"]


def test_hostile_file_is_big_enough() -> None:
    cases = _hostile_cases()
    assert len(cases) >= 15
    assert len({c["name"] for c in cases}) == len(cases)


@pytest.mark.parametrize("case", _hostile_cases(), ids=lambda c: c["name"])
def test_hostile_chunk(case: dict[str, Any]) -> None:
    robot = robot_with(rules=case.get("rules", {}))
    start = tuple(float(v) for v in case["start"])
    chunk = parse_chunk(case["text"])
    verdict = limiter(robot).check_chunk(chunk, start)  # type: ignore[arg-type]
    found = rules_of(verdict.decisions)
    for rule, expected in case["expect"].items():
        assert found.get(rule, "pass") == expected, f"{rule}: {verdict.decisions}"
    if "commands" in case:
        assert len(verdict.commands) == case["commands"], verdict.decisions
    if "rejected" in case:
        assert verdict.rejected is case["rejected"]
    assert_within_limits(robot, verdict, start)  # type: ignore[arg-type]
    for decision in verdict.decisions:
        assert decision.reason.endswith(("refused", "first")) or decision.verdict == "clamp"
