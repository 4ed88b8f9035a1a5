"""Property tests: whatever numbers come in (NaN, infinities, huge values, poses outside the box) and
whatever the rule modes and limits, no command the limiter emits breaks a limit."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import RobotConfig, load_robot_config
from vlm2vla_edge.runtime.safety import ChunkVerdict, SafeCommand, SafetyLimiter

TOL = 1e-9
RULES = ("workspace", "table_floor", "action_translation", "chunk_translation", "chunk_length", "gripper", "rate")
BASE = load_robot_config().model_dump(mode="json")
PROPERTY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any float at all, with the awkward ones over-represented, plus plausible small moves.
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 0.0]),
    st.floats(-0.3, 0.3),
    st.floats(-0.06, 0.06),
)
delta = st.one_of(st.floats(-0.2, 0.2), st.floats(-0.06, 0.06), any_float)
gripper = st.one_of(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0]), any_float)
actions = st.builds(Action, delta, delta, delta, gripper)
chunks = st.lists(actions, min_size=0, max_size=24).map(lambda a: ActionChunk(tuple(a)))
# Start poses inside the box, just outside it, below the table, and anywhere at all.
inside = st.tuples(st.floats(0.1, 0.5), st.floats(-0.3, 0.3), st.floats(0.02, 0.4))
near = st.tuples(st.floats(0.0, 0.6), st.floats(-0.4, 0.4), st.floats(-0.1, 0.5))
starts = st.one_of(inside, inside, near, st.tuples(any_float, any_float, any_float))


@st.composite
def robots(draw: st.DrawFn) -> RobotConfig:
    """The shipped robot with random rule modes and random (valid) limits."""
    data: dict[str, Any] = {**BASE}
    data["rules"] = {rule: draw(st.sampled_from(["clamp", "reject"])) for rule in RULES}
    per_action = draw(st.floats(0.005, 0.1))
    data["limits"] = {
        "max_translation_per_action_m": per_action,
        "max_translation_per_chunk_m": draw(st.floats(per_action, 0.5)),
        "max_chunk_length": draw(st.integers(1, 16)),
        "max_commands_per_s": 10.0,
    }
    z_min = draw(st.floats(0.0, 0.1))
    data["workspace"] = {**BASE["workspace"], "z": {"min": z_min, "max": 0.4}}
    data["min_clearance_m"] = draw(st.floats(0.0, 0.05))
    return RobotConfig.model_validate(data)


def reach_sphere(radius: float):
    """A stand-in for inverse kinematics: reachable within `radius` of the shoulder (0, 0, 0.11)."""
    return lambda p: math.dist(p, (0.0, 0.0, 0.11)) <= radius


def assert_command_safe(robot: RobotConfig, command: SafeCommand, reachable) -> None:
    box, limits = robot.workspace, robot.limits
    x, y, z = command.target
    assert all(math.isfinite(v) for v in (x, y, z)), command
    assert box.x.min <= x <= box.x.max and box.y.min <= y <= box.y.max and box.z.min <= z <= box.z.max, command
    assert z >= robot.z_floor, command
    assert math.dist(command.start, command.target) <= limits.max_translation_per_action_m + TOL, command
    assert command.gripper_open is True or command.gripper_open is False
    if reachable is not None:
        assert reachable(command.target)


def assert_chunk_safe(robot: RobotConfig, verdict: ChunkVerdict, start, reachable) -> None:
    assert len(verdict.commands) <= robot.limits.max_chunk_length
    position, path = start, 0.0
    for command in verdict.commands:
        assert command.start == position  # along the predicted path
        assert_command_safe(robot, command, reachable)
        path += math.dist(command.start, command.target)
        position = command.target
    assert path <= robot.limits.max_translation_per_chunk_m + TOL
    if verdict.rejected:
        assert any(d.verdict == "reject" for d in verdict.decisions) and verdict.reason


@PROPERTY
@given(robot=robots(), action=actions, start=starts, radius=st.sampled_from([None, 0.45, 0.6, 1.0]))
def test_no_emitted_action_breaks_a_limit(robot: RobotConfig, action: Action, start, radius) -> None:
    reachable = None if radius is None else reach_sphere(radius)
    command, decisions = SafetyLimiter(robot, reachable=reachable).check_action(action, start)
    if command is None:
        assert any(d.verdict == "reject" for d in decisions)
        return
    assert command.start == start
    assert_command_safe(robot, command, reachable)
    assert all(d.verdict != "reject" for d in decisions)
    assert action.is_finite()


@PROPERTY
@given(robot=robots(), chunk=chunks, start=starts, radius=st.sampled_from([None, 0.5, 0.7]))
def test_no_emitted_chunk_breaks_a_limit(robot: RobotConfig, chunk: ActionChunk, start, radius) -> None:
    reachable = None if radius is None else reach_sphere(radius)
    verdict = SafetyLimiter(robot, reachable=reachable).check_chunk(chunk, start)
    assert_chunk_safe(robot, verdict, start, reachable)


clean_actions = st.builds(
    Action, st.floats(-0.02, 0.02), st.floats(-0.02, 0.02), st.floats(-0.02, 0.02), st.sampled_from([0.0, 1.0])
)
clean_chunks = st.lists(clean_actions, min_size=1, max_size=10).map(lambda a: ActionChunk(tuple(a)))


@PROPERTY
@given(chunk=clean_chunks, start=inside)
def test_clean_chunks_pass_unchanged(chunk: ActionChunk, start) -> None:
    """The limiter changes only what breaks a rule: a clean chunk comes out as it went in."""
    robot = load_robot_config()
    verdict = SafetyLimiter(robot, reachable=lambda p: True).check_chunk(chunk, start)
    if verdict.decisions:  # only the workspace (near a face) or the floor can object to these
        assert {d.rule for d in verdict.decisions} <= {"workspace", "table_floor", "chunk_translation"}
        return
    assert not verdict.rejected and len(verdict.commands) == len(chunk)
    for command, action in zip(verdict.commands, chunk):
        # equal up to rounding, or to a silent sub-nanometre snap onto a box face
        assert all(abs(c - a) <= TOL + 1e-12 for c, a in zip(command.delta, action.translation()))
        assert command.gripper_open == (action.gripper == 1.0)
        assert command.decisions == ()
