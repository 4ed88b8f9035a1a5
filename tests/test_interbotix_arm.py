"""InterbotixArm against a fake of Interbotix's ROS 2 API: connection, segmented moves through the real
SafetyLimiter and Arm.execute, stop and cancel between segments, IK refusals, poses, gripper."""

from __future__ import annotations

import importlib.abc
import math
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fakes.fake_interbotix import UPPER, FakeWidowX, forward_kinematics, install
from vlm2vla_edge.runtime.actions import Action
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.errors import ConfigError, UserError
from vlm2vla_edge.runtime.robot.base import CommandRefusedError, DeviceError, DeviceNotConnectedError
from vlm2vla_edge.runtime.robot.devices import InterbotixArmConfig, parse_arm_config
from vlm2vla_edge.runtime.robot.factory import make_arm
from vlm2vla_edge.runtime.robot.interbotix import InterbotixArm, base_to_yaw_frame, rpy_from_rotation
from vlm2vla_edge.runtime.safety import EStopEngaged, SafetyLimiter

ROBOT = load_robot_config()
FAST = dict(segment_moving_time_s=0.05, wp_moving_time_s=0.05, wp_accel_time_s=0.02, wp_period_s=0.05)


def arm_config(**changes: Any) -> InterbotixArmConfig:
    return InterbotixArmConfig(**{"connect_timeout_s": 5.0, **changes})


@pytest.fixture
def hw(monkeypatch: pytest.MonkeyPatch) -> FakeWidowX:
    return install(monkeypatch, FakeWidowX())


@pytest.fixture
def arm(hw: FakeWidowX) -> InterbotixArm:
    driver = InterbotixArm(arm_config(), ROBOT)
    driver.connect()
    yield driver
    driver.disconnect()


def command_for(arm: InterbotixArm, action: Action, limiter: SafetyLimiter | None = None):
    limiter = limiter or SafetyLimiter(ROBOT)
    command, decisions = limiter.check_action(action, arm.read_state().position)
    assert command is not None, decisions
    return command


def cartesian_calls(hw: FakeWidowX) -> list[tuple[Any, ...]]:
    return hw.calls_named("set_ee_cartesian_trajectory")


# --- connection -------------------------------------------------------------------------------------


def test_connect_and_disconnect_are_idempotent(hw: FakeWidowX) -> None:
    arm = InterbotixArm(arm_config(), ROBOT)
    assert not arm.is_connected
    arm.connect()
    arm.connect()
    assert arm.is_connected
    assert len(hw.calls_named("construct")) == 1 and hw.startups == 1
    assert ("set_pressure", ROBOT.gripper.pressure) in hw.calls
    arm.disconnect()
    arm.disconnect()
    assert not arm.is_connected and hw.shutdowns == 1
    with pytest.raises(DeviceNotConnectedError):
        arm.read_state()


def test_context_manager_connects_and_releases(hw: FakeWidowX) -> None:
    with InterbotixArm(arm_config(), ROBOT) as arm:
        assert arm.is_connected
    assert not arm.is_connected and hw.shutdowns == 1


def test_older_humble_api_shuts_down_through_the_bot(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = install(monkeypatch, FakeWidowX(legacy_api=True))
    arm = InterbotixArm(arm_config(), ROBOT)
    arm.connect()
    assert hw.startups == 0  # old releases start spinning on construction
    arm.disconnect()
    assert hw.shutdowns == 1


def test_missing_interbotix_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "interbotix_xs_modules", None)
    arm = InterbotixArm(arm_config(), ROBOT)
    with pytest.raises(DeviceError, match=r"\(interbotix_xs_modules\) is not installed.*Humble.*setup.bash"):
        arm.connect()
    assert not arm.is_connected


class _NoRclpy(importlib.abc.MetaPathFinder):
    """Importing Interbotix's arm module fails on its first ROS import, as without a sourced ROS 2."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "interbotix_xs_modules.xs_robot.arm":
            raise ModuleNotFoundError("No module named 'rclpy'", name="rclpy")
        return None


def test_unsourced_ros_is_reported_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("interbotix_xs_modules", "interbotix_xs_modules.xs_robot"):
        module = type(sys)(name)
        module.__path__ = []  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "interbotix_xs_modules.xs_robot.arm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoRclpy(), *sys.meta_path])
    with pytest.raises(DeviceError, match="ROS 2 is not available.*rclpy.*setup.bash"):
        InterbotixArm(arm_config(), ROBOT).connect()


def test_silent_driver_times_out_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = install(monkeypatch, FakeWidowX(hang_on_connect=True))
    arm = InterbotixArm(arm_config(connect_timeout_s=0.2), ROBOT)
    began = time.monotonic()
    with pytest.raises(DeviceError, match=r"no answer from the xs_sdk driver within 0.2 s.*ros2 launch"):
        arm.connect()
    assert time.monotonic() - began < 2.0
    assert not arm.is_connected
    hw.released.set()  # let the helper thread finish


def test_five_dof_driver_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = install(monkeypatch, FakeWidowX(num_joints=5))
    arm = InterbotixArm(arm_config(), ROBOT)
    with pytest.raises(DeviceError, match="5 joints.*wx250s has 6"):
        arm.connect()
    assert not arm.is_connected and hw.shutdowns == 1  # the API is released again


def test_five_dof_model_in_config_is_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="5-DOF.*sideways"):
        InterbotixArmConfig(robot_model="wx250")
    with pytest.raises(ConfigError, match="5-DOF") as info:
        parse_arm_config({"kind": "interbotix", "robot_model": "wx250"})
    assert isinstance(info.value, UserError)


def test_config_rejects_unknown_fields_and_bad_timing() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        parse_arm_config({"kind": "interbotix", "segment_lenght_m": 0.01})
    with pytest.raises(ValidationError, match="at least wp_period_s"):
        InterbotixArmConfig(segment_moving_time_s=0.05, wp_period_s=0.1)
    with pytest.raises(ValidationError, match="half of wp_moving_time_s"):
        InterbotixArmConfig(wp_moving_time_s=0.1, wp_accel_time_s=0.08)


def test_make_arm_builds_the_driver(hw: FakeWidowX) -> None:
    arm = make_arm(parse_arm_config({"kind": "interbotix"}), ROBOT)
    assert isinstance(arm, InterbotixArm) and not arm.is_connected


# --- state -----------------------------------------------------------------------------------------


def test_read_state_reports_the_measured_pose(arm: InterbotixArm, hw: FakeWidowX) -> None:
    state = arm.read_state()
    expected = forward_kinematics(hw.start_joints)
    np.testing.assert_allclose(state.position, expected[:3, 3], atol=1e-12)
    assert state.rpy[2] == pytest.approx(0.3, abs=1e-9)  # waist 0.3 rad
    assert state.joints == pytest.approx(hw.start_joints)
    assert state.gripper_open is True and state.gripper_opening == pytest.approx(1.0)
    assert state.timestamp > 0


@settings(max_examples=200, deadline=None)
@given(
    st.floats(-3.1, 3.1), st.floats(-1.5, 1.5), st.floats(-3.1, 3.1), st.floats(-0.2, 0.2), st.floats(-0.2, 0.2)
)
def test_rpy_and_yaw_frame_invert_the_vendor_conventions(
    roll: float, pitch: float, yaw: float, dx: float, dy: float
) -> None:
    cr, sr, cp, sp, cy, sy = (
        math.cos(roll),
        math.sin(roll),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(yaw),
        math.sin(yaw),
    )
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    assert rpy_from_rotation(rz @ ry @ rx) == pytest.approx((roll, pitch, yaw), abs=1e-9)
    local = base_to_yaw_frame(np.array([dx, dy, 0.01]), yaw)
    np.testing.assert_allclose(rz @ local, [dx, dy, 0.01], atol=1e-12)


# --- moves -----------------------------------------------------------------------------------------


def test_move_is_executed_as_short_segments_that_reach_the_target(arm: InterbotixArm, hw: FakeWidowX) -> None:
    command = command_for(arm, Action(0.03, -0.025, 0.02, 1.0))
    result = arm.execute(command)
    assert result.completed and result.note == ""
    assert result.error_m < 1e-9
    np.testing.assert_allclose(arm.read_state().position, command.target, atol=1e-9)
    calls = cartesian_calls(hw)
    length = math.dist(command.start, command.target)
    assert len(calls) == math.ceil(length / 0.01)
    for _, x, y, z, moving_time, wp_moving, wp_accel, wp_period in calls:
        assert math.hypot(x, y, z) <= 0.01 + 1e-12
        assert (moving_time, wp_moving, wp_accel, wp_period) == (0.2, 0.1, 0.05, 0.05)
    assert hw.calls_named("grasp") == [] and hw.calls_named("release") == []  # gripper already open


@settings(max_examples=30, deadline=None)
@given(st.floats(-0.05, 0.05), st.floats(-0.05, 0.05), st.floats(-0.05, 0.05))
def test_any_approved_move_ends_on_target_along_the_straight_line(dx: float, dy: float, dz: float) -> None:
    with pytest.MonkeyPatch.context() as patch:
        hw = install(patch, FakeWidowX(time_scale=0.0))
        with InterbotixArm(arm_config(segment_length_m=0.007), ROBOT) as arm:
            command = command_for(arm, Action(dx, dy, dz, 1.0))
            points = []
            original = hw.reachable
            hw.reachable = lambda p: points.append(np.array(p)) or original(p)
            result = arm.execute(command)
    assert result.completed
    np.testing.assert_allclose(result.reached, command.target, atol=1e-6)  # moves under 1 µm are skipped
    start, target = np.array(command.start), np.array(command.target)
    direction = target - start
    for p in points:  # every planned waypoint lies on the segment from start to target
        if np.linalg.norm(direction) < 1e-12:
            break
        t = float(np.dot(p - start, direction) / np.dot(direction, direction))
        assert -1e-9 <= t <= 1 + 1e-9
        assert np.linalg.norm(start + t * direction - p) < 1e-9


def test_ik_failure_surfaces_as_command_refused_and_the_arm_holds(arm: InterbotixArm, hw: FakeWidowX) -> None:
    start = arm.read_state().position
    wall = start[0] + 0.025
    hw.reachable = lambda p: p[0] <= wall  # beyond this x the vendor's IK fails
    command = command_for(arm, Action(0.04, 0.0, 0.0, 1.0))
    with pytest.raises(CommandRefusedError, match="segment 3 of 4.*inverse kinematics failed"):
        arm.execute(command)
    held = arm.read_state().position
    assert held[0] == pytest.approx(start[0] + 0.02, abs=1e-9)  # two segments done, nothing past the wall
    assert held[0] <= wall


def test_unreachable_first_segment_moves_nothing(arm: InterbotixArm, hw: FakeWidowX) -> None:
    start = arm.read_state().position
    hw.reachable = lambda p: False
    with pytest.raises(CommandRefusedError):
        arm.execute(command_for(arm, Action(0.0, 0.0, 0.02, 1.0)))
    assert arm.read_state().position == pytest.approx(start)


def test_stop_from_another_thread_halts_within_one_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = install(monkeypatch, FakeWidowX(time_scale=1.0))  # real durations: 0.1 s per segment
    arm = InterbotixArm(arm_config(**FAST), ROBOT)
    arm.connect()
    command = command_for(arm, Action(0.05, 0.0, 0.0, 1.0))
    outcome: list[Any] = []
    mover = threading.Thread(target=lambda: outcome.append(arm.execute(command)))
    mover.start()
    hw.wait_for_call("set_ee_cartesian_trajectory")  # the first segment is in flight
    started_at_stop = len(cartesian_calls(hw))
    asked = time.monotonic()
    arm.stop()
    returned = time.monotonic() - asked
    assert not hw.in_call  # stop() returns once the arm is still...
    # ...waiting out at most the segment in flight (0.1 s), not its 1.1 s cap (the whole move takes 0.5 s);
    # the margin is for a loaded machine, the call counts below say how far the arm went.
    assert returned < 0.6
    mover.join(10.0)
    result = outcome[0]
    assert not result.completed and "stopped after" in result.note
    assert 1 <= started_at_stop <= len(cartesian_calls(hw)) <= started_at_stop + 1 < 5
    held = arm.read_state().position
    time.sleep(0.1)
    assert arm.read_state().position == held  # holding, not drifting on
    assert hw.overlapping_calls == 0  # stop() never called into the API during a segment
    # The stop does not carry over: the next approved move runs.
    assert arm.execute(command_for(arm, Action(0.0, 0.0, 0.01, 1.0))).completed
    arm.disconnect()


def test_cancel_event_halts_between_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = install(monkeypatch, FakeWidowX())
    arm = InterbotixArm(arm_config(**FAST), ROBOT)
    arm.connect()
    cancel = threading.Event()
    hw.on_enter = lambda call: cancel.set() if call[0] == "set_ee_cartesian_trajectory" else None  # during segment 1
    result = arm.execute(command_for(arm, Action(0.0, 0.05, 0.0, 1.0)), cancel)
    assert not result.completed and "stopped after 1 of 5 segments" in result.note
    assert len(cartesian_calls(hw)) == 1  # the segment in flight finished; no other began
    arm.disconnect()


def test_gripper_commands_follow_the_move(arm: InterbotixArm, hw: FakeWidowX) -> None:
    hw.object_width = 0.025  # the fingers close on something
    result = arm.execute(command_for(arm, Action(0.0, 0.0, -0.01, 0.0)))
    assert result.completed
    assert hw.calls_named("grasp") == [("grasp", ROBOT.gripper.settle_s)]
    state = arm.read_state()
    assert state.gripper_open is False
    assert state.gripper_opening == pytest.approx((0.025 - 0.015) / (0.037 - 0.015))
    arm.execute(command_for(arm, Action(0.0, 0.0, 0.0, 1.0)))
    assert hw.calls_named("release") == [("release", ROBOT.gripper.settle_s)]
    assert arm.read_state().gripper_open is True


def test_estop_latched_in_the_limiter_blocks_the_arm(arm: InterbotixArm, hw: FakeWidowX) -> None:
    limiter = SafetyLimiter(ROBOT)
    command = command_for(arm, Action(0.01, 0.0, 0.0, 1.0), limiter)
    limiter.estop("test")
    with pytest.raises(EStopEngaged):
        arm.execute(command)
    assert cartesian_calls(hw) == []


# --- poses -----------------------------------------------------------------------------------------


def test_home_and_sleep_use_the_robot_config_and_their_own_timing(arm: InterbotixArm, hw: FakeWidowX) -> None:
    arm.execute(command_for(arm, Action(0.01, 0.0, 0.0, 1.0)))  # leaves the vendor's moving_time at 0.2 s
    arm.go_sleep()
    (call,) = hw.calls_named("set_joint_positions")
    assert call == ("set_joint_positions", ROBOT.sleep_joints, 2.0, 0.3, False)
    assert hw.calls[hw.calls.index(call) - 1] == ("set_trajectory_time", 2.0, 0.3)
    assert arm.read_state().joints == pytest.approx(ROBOT.sleep_joints)
    arm.go_home()
    np.testing.assert_allclose(arm.read_state().position, forward_kinematics(ROBOT.home_joints)[:3, 3], atol=1e-9)


def test_stop_cuts_a_pose_move_short_and_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = install(monkeypatch, FakeWidowX(time_scale=1.0))
    arm = InterbotixArm(arm_config(pose_moving_time_s=1.0), ROBOT)
    arm.connect()
    mover = threading.Thread(target=arm.go_sleep)
    mover.start()
    hw.wait_for_call("set_joint_positions")  # the 1 s move has begun
    asked = time.monotonic()
    arm.stop()
    mover.join(10.0)
    assert time.monotonic() - asked < 0.6  # did not wait out the 1 s move (margin for a loaded machine)
    (hold,) = hw.calls_named("robot_write_commands")
    assert hold[1] == "arm"
    joints = arm.read_state().joints
    assert joints != pytest.approx(ROBOT.sleep_joints, abs=1e-3)
    time.sleep(0.1)
    assert arm.read_state().joints == pytest.approx(joints, abs=1e-2)  # held where it stopped
    arm.disconnect()


def test_pose_outside_the_drivers_limits_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    upper = list(UPPER)
    upper[2] = 1.0  # a driver whose elbow limit excludes the configured sleep pose (elbow 1.55)
    hw = install(monkeypatch, FakeWidowX(upper=tuple(upper)))
    with InterbotixArm(arm_config(), ROBOT) as arm:
        before = arm.read_state().joints
        with pytest.raises(CommandRefusedError, match="sleep pose .* outside its joint or velocity limits"):
            arm.go_sleep()
        assert arm.read_state().joints == before
    assert hw.calls_named("robot_write_commands") == []
