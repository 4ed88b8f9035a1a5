"""`Arm.execute` with the limiter: only SafeCommands move the arm, stale or e-stopped ones do not, the
rate limit is waited out, and no chunk of any content ever drives `_move_to` past a limit."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import RobotConfig, load_robot_config
from vlm2vla_edge.runtime.robot.base import (
    Arm,
    ArmState,
    CommandRefusedError,
    DeviceNotConnectedError,
    MoveResult,
)
from vlm2vla_edge.runtime.safety import EStopEngaged, SafeCommand, SafetyLimiter, SafetyViolation

START = (0.3, 0.0, 0.2)
TOL = 1e-9
RULES = ("workspace", "table_floor", "action_translation", "chunk_translation", "chunk_length", "gripper", "rate")


class RecordingArm(Arm):
    """A fake arm that teleports to each target and records every `_move_to` and gripper call."""

    def __init__(self, position: tuple[float, float, float] = START, gripper_open: bool = True) -> None:
        self.position = position
        self.gripper_open = gripper_open
        self.moves: list[tuple[float, float, float]] = []
        self.gripper_calls: list[bool] = []
        self._connected = False

    def connect(self) -> None:
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    def read_state(self) -> ArmState:
        return ArmState(position=self.position, rpy=(0.0, 0.0, 0.0), gripper_open=self.gripper_open)

    def stop(self) -> None:
        pass

    def go_home(self) -> None:
        self.position = START

    def go_sleep(self) -> None:
        self.position = (0.15, 0.0, 0.1)

    def _move_to(self, target: tuple[float, float, float], cancel: threading.Event | None) -> MoveResult:
        self.moves.append(target)
        self.position = target
        return MoveResult(completed=True, reached=target, error_m=0.0, duration_s=0.0)

    def _set_gripper(self, open_: bool) -> None:
        self.gripper_calls.append(open_)
        self.gripper_open = open_


class SteppingClock:
    """A clock that jumps a second per reading, so the rate limit never makes a test sleep."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def one_command(limiter: SafetyLimiter, action: Action, start: tuple[float, float, float] = START) -> SafeCommand:
    command, decisions = limiter.check_action(action, start)
    assert command is not None, decisions
    return command


@pytest.fixture
def arm() -> Iterator[RecordingArm]:
    with RecordingArm() as connected:
        yield connected


def test_executes_a_safe_command_then_sets_the_gripper(arm: RecordingArm) -> None:
    limiter = SafetyLimiter(load_robot_config(), clock=SteppingClock())
    result = arm.execute(one_command(limiter, Action(0.02, 0, 0, 0.0)))
    assert result.completed and arm.moves == [pytest.approx((0.32, 0.0, 0.2))]
    assert arm.gripper_calls == [False]


@pytest.mark.parametrize("fake", [Action(0.02, 0, 0, 1), (0.32, 0.0, 0.2), "move to 0.32 0 0.2", None])
def test_refuses_anything_but_a_safe_command(arm: RecordingArm, fake: Any) -> None:
    with pytest.raises(TypeError, match="only a SafeCommand"):
        arm.execute(fake)
    assert arm.moves == []


def test_refuses_a_duck_typed_command(arm: RecordingArm) -> None:
    class Impostor:
        start, target, gripper_open = START, (0.9, 0.0, -0.5), True

        def authorize(self, now: float | None = None) -> float:
            return 0.0

    with pytest.raises(TypeError):
        arm.execute(Impostor())  # type: ignore[arg-type]
    assert arm.moves == []


def test_refuses_a_stale_command(arm: RecordingArm) -> None:
    limiter = SafetyLimiter(load_robot_config(), clock=SteppingClock())
    command = one_command(limiter, Action(0.02, 0, 0, 1))
    arm.position = (0.3, 0.05, 0.2)  # moved 5 cm since the check
    with pytest.raises(CommandRefusedError, match="re-check it"):
        arm.execute(command)
    assert arm.moves == [] and not command.spent


def test_refuses_when_disconnected() -> None:
    limiter = SafetyLimiter(load_robot_config(), clock=SteppingClock())
    with pytest.raises(DeviceNotConnectedError):
        RecordingArm().execute(one_command(limiter, Action(0, 0, 0, 1)))


def test_refuses_when_the_estop_latched_after_the_check(arm: RecordingArm) -> None:
    limiter = SafetyLimiter(load_robot_config(), clock=SteppingClock())
    command = one_command(limiter, Action(0.02, 0, 0, 1))
    limiter.estop("bumper hit")
    with pytest.raises(EStopEngaged, match="bumper hit"):
        arm.execute(command)
    limiter.reset()
    with pytest.raises(SafetyViolation, match="before an e-stop"):
        arm.execute(command)
    assert arm.moves == []


def test_refuses_a_replayed_command(arm: RecordingArm) -> None:
    limiter = SafetyLimiter(load_robot_config(), clock=SteppingClock())
    command = one_command(limiter, Action(0, 0, 0, 0))
    arm.execute(command)
    with pytest.raises(SafetyViolation, match="already executed"):
        arm.execute(command)
    assert len(arm.moves) == 1


def test_waits_for_the_rate_limit(arm: RecordingArm) -> None:
    limiter = SafetyLimiter(load_robot_config(), clock=time.monotonic)  # 10 commands/s, clamp
    verdict = limiter.check_chunk(ActionChunk([Action(0.01, 0, 0, 1)] * 3), START)
    first, second, third = verdict.commands
    arm.execute(first)
    began = time.monotonic()
    arm.execute(second)
    assert time.monotonic() - began >= 0.09
    cancel = threading.Event()
    cancel.set()
    result = arm.execute(third, cancel)  # a cancel during the wait stops before any motion
    assert not result.completed and result.note == "cancelled"
    assert len(arm.moves) == 2


def test_rate_reject_refuses_a_burst(arm: RecordingArm) -> None:
    data = load_robot_config().model_dump(mode="json")
    data["rules"]["rate"] = "reject"
    limiter = SafetyLimiter(RobotConfig.model_validate(data), clock=time.monotonic)
    first, second = limiter.check_chunk(ActionChunk([Action(0.01, 0, 0, 1)] * 2), START).commands
    arm.execute(first)
    with pytest.raises(SafetyViolation, match="too early"):
        arm.execute(second)
    assert len(arm.moves) == 1


# --- whatever comes in, nothing out of bounds reaches _move_to ------------------------------------

wild = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0, 0.5]),
    st.floats(-0.2, 0.2),
    st.floats(-0.06, 0.06),
)
hostile_actions = st.builds(Action, wild, wild, wild, st.one_of(st.sampled_from([0.0, 1.0]), wild))
hostile_chunks = st.lists(hostile_actions, min_size=0, max_size=20).map(lambda a: ActionChunk(tuple(a)))
positions = st.one_of(
    st.tuples(st.floats(0.1, 0.5), st.floats(-0.3, 0.3), st.floats(0.02, 0.4)),
    st.tuples(st.floats(-0.1, 0.7), st.floats(-0.5, 0.5), st.floats(-0.2, 0.6)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    modes=st.fixed_dictionaries({r: st.sampled_from(["clamp", "reject"]) for r in RULES}),
    start=positions,
    chunks=st.lists(hostile_chunks, min_size=1, max_size=4),
    estop_after=st.one_of(st.none(), st.integers(0, 30)),
)
def test_no_move_target_ever_leaves_the_limits(modes, start, chunks, estop_after) -> None:
    data = load_robot_config().model_dump(mode="json")
    data["rules"] = modes
    robot = RobotConfig.model_validate(data)
    reachable = lambda p: math.dist(p, (0.0, 0.0, 0.11)) <= 0.55  # noqa: E731 - stand-in for IK
    limiter = SafetyLimiter(robot, reachable=reachable, clock=SteppingClock())
    arm = RecordingArm(position=start)
    arm.connect()
    executed = 0
    for chunk in chunks:
        for command in limiter.check_chunk(chunk, arm.read_state().position).commands:
            if estop_after is not None and executed == estop_after:
                limiter.estop("property test")
            if limiter.engaged:  # nothing may move now: the stop, or a stale pose, refuses it
                with pytest.raises((EStopEngaged, CommandRefusedError)):
                    arm.execute(command)
                continue
            arm.execute(command)
            executed += 1

    box, limits = robot.workspace, robot.limits
    previous = start
    for target in arm.moves:
        x, y, z = target
        assert all(math.isfinite(v) for v in target)
        assert box.x.min <= x <= box.x.max and box.y.min <= y <= box.y.max and box.z.min <= z <= box.z.max
        assert z >= robot.z_floor and reachable(target)
        assert math.dist(previous, target) <= limits.max_translation_per_action_m + TOL
        previous = target
    if estop_after is not None:
        assert len(arm.moves) <= estop_after
