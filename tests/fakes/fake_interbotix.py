"""A fake of Interbotix's ROS 2 Python API (humble branch) over a fake WidowX 250 6DOF.

Same names, signatures and failure reports as `interbotix_xs_modules.xs_robot.arm` and
`interbotix_common_modules.common_robot.robot`:
- `set_ee_cartesian_trajectory` moves in the end effector's yaw frame from the last *commanded*
  pose, returns False (and moves nothing) when any waypoint is unreachable or when a 5-DOF arm is
  asked for y, and blocks for `moving_time + wp_moving_time`;
- `set_joint_positions` checks position and velocity limits against the arm's *current*
  `moving_time`; joint goals are reached over time, and a new goal (`core.robot_write_commands`)
  replaces the old one from where the joints are;
- the global ROS node can be created once per process; `robot_startup` twice raises.
Forward kinematics uses the wx250s product-of-exponentials description Interbotix publishes
(`mr_descriptions.wx250s`). Blocking calls sleep `time_scale` times the real duration.
"""

from __future__ import annotations

import math
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

JOINT_NAMES = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
LOWER = (-3.14158, -1.88496, -2.14675, -3.14158, -1.74533, -3.14158)
UPPER = (3.14158, 1.98968, 1.60570, 3.14158, 2.14675, 3.14158)
VELOCITY = (math.pi,) * 6
SLEEP = (0.0, -1.80, 1.55, 0.0, 0.8, 0.0)

# wx250s screw axes in the space frame (columns) and home configuration M (Interbotix mr_descriptions).
SLIST = np.array(
    [
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, -0.11065, 0.0, 0.0],
        [0.0, 1.0, 0.0, -0.36065, 0.0, 0.04975],
        [1.0, 0.0, 0.0, 0.0, 0.36065, 0.0],
        [0.0, 1.0, 0.0, -0.36065, 0.0, 0.29975],
        [1.0, 0.0, 0.0, 0.0, 0.36065, 0.0],
    ]
).T
M_HOME = np.array([[1.0, 0, 0, 0.458325], [0, 1.0, 0, 0], [0, 0, 1.0, 0.36065], [0, 0, 0, 1.0]])


def _skew(w: np.ndarray) -> np.ndarray:
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def _exp_twist(screw: np.ndarray, theta: float) -> np.ndarray:
    """exp([S] theta) for a revolute screw axis (|w| = 1)."""
    w, v = screw[:3], screw[3:]
    wx = _skew(w)
    rot = np.eye(3) + math.sin(theta) * wx + (1 - math.cos(theta)) * wx @ wx
    p = (np.eye(3) * theta + (1 - math.cos(theta)) * wx + (theta - math.sin(theta)) * wx @ wx) @ v
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot, p
    return out


def forward_kinematics(joints: tuple[float, ...] | list[float]) -> np.ndarray:
    pose = np.eye(4)
    for i, theta in enumerate(joints[:6]):
        pose = pose @ _exp_twist(SLIST[:, i], float(theta))
    return pose @ M_HOME


def yaw_of(rotation: np.ndarray) -> float:
    """Yaw of tf's static-xyz Euler decomposition (what Interbotix's cartesian call uses)."""
    if math.hypot(rotation[0, 0], rotation[1, 0]) <= np.finfo(float).eps * 4.0:
        return 0.0
    return math.atan2(rotation[1, 0], rotation[0, 0])


def default_reachable(point: np.ndarray) -> bool:
    """Rough wx250s reach: within 0.60 m of the shoulder and above the table."""
    shoulder = np.array([0.0, 0.0, 0.11065])
    return float(np.linalg.norm(point - shoulder)) <= 0.60 and point[2] >= 0.0


class InterbotixException(Exception):
    """Same name as interbotix_common_modules.common_robot.exceptions.InterbotixException."""


@dataclass
class FakeWidowX:
    """The fake hardware plus xs_sdk driver: joints, end-effector pose, fingers, and a log of calls."""

    num_joints: int = 6
    time_scale: float = 0.02
    reachable: Callable[[np.ndarray], bool] = default_reachable
    hang_on_connect: bool = False
    legacy_api: bool = False  # older humble: bot.shutdown(), no robot_startup()
    start_joints: tuple[float, ...] = (0.3, 0.2, 0.3, 0.0, 0.4, 0.0)
    upper: tuple[float, ...] = UPPER  # joint upper limits the driver reports
    finger_lower: float = 0.015
    finger_upper: float = 0.037
    object_width: float | None = None  # finger position where closing stops on an object
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    overlapping_calls: int = 0  # calls that entered while another API call was running
    startups: int = 0
    shutdowns: int = 0
    global_node_exists: bool = False
    up: bool = False
    released: threading.Event = field(default_factory=threading.Event)
    # Called (on the caller's thread) as each blocking API call begins: lets a test act at an exact point
    # of a move (a cancel during segment 1) instead of guessing it with a sleep.
    on_enter: Callable[[tuple[Any, ...]], None] | None = None

    def __post_init__(self) -> None:
        self._joint_from = tuple(self.start_joints[: self.num_joints])
        self._joint_to = self._joint_from
        self._joint_t0 = 0.0
        self._joint_duration = 0.0
        self._cartesian_pose: np.ndarray | None = None  # set by cartesian moves; None: pose from joints
        self.finger = self.finger_upper
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._entered = threading.Condition(self._busy_lock)  # notified as each blocking call begins

    # time and bookkeeping
    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds) * self.time_scale)

    def enter(self, *call: Any) -> None:
        with self._busy_lock:
            if self._busy:
                self.overlapping_calls += 1
            self._busy += 1
            self.calls.append(call)
            self._entered.notify_all()
        if self.on_enter is not None:
            self.on_enter(call)

    def leave(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def calls_named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]

    @property
    def in_call(self) -> bool:
        """Whether a blocking API call (a move segment, a gripper action) is running now."""
        with self._busy_lock:
            return self._busy > 0

    def wait_for_call(self, name: str, count: int = 1, timeout_s: float = 30.0) -> None:
        """Block until `count` blocking calls named `name` have begun (generous timeout: loaded machines)."""
        with self._entered:
            if not self._entered.wait_for(lambda: len(self.calls_named(name)) >= count, timeout_s):
                raise AssertionError(f"no {count} {name!r} calls within {timeout_s} s; calls: {self.calls}")

    # joints and pose
    def joints_now(self) -> tuple[float, ...]:
        if self._joint_duration <= 0:
            return self._joint_to
        frac = min(1.0, (time.monotonic() - self._joint_t0) / self._joint_duration)
        return tuple(a + (b - a) * frac for a, b in zip(self._joint_from, self._joint_to))

    def joint_goal(self, goal: list[float], duration_s: float) -> None:
        self._joint_from = self.joints_now()
        self._joint_to = tuple(float(q) for q in goal)
        self._joint_t0 = time.monotonic()
        self._joint_duration = duration_s * self.time_scale
        self._cartesian_pose = None

    def joint_motion_done(self) -> bool:
        return self.joints_now() == self._joint_to

    def pose(self) -> np.ndarray:
        if self._cartesian_pose is not None:
            return self._cartesian_pose.copy()
        return forward_kinematics(self.joints_now())

    def position(self) -> np.ndarray:
        return self.pose()[:3, 3]


def _build_modules(hw: FakeWidowX) -> dict[str, types.ModuleType]:
    class GroupInfo:
        def __init__(self) -> None:
            self.num_joints = hw.num_joints
            names = JOINT_NAMES if hw.num_joints == 6 else tuple(n for n in JOINT_NAMES if n != "forearm_roll")
            self.joint_names = list(names)
            self.joint_lower_limits = list(LOWER[: hw.num_joints])
            self.joint_upper_limits = list(hw.upper[: hw.num_joints])
            self.joint_velocity_limits = list(VELOCITY[: hw.num_joints])
            self.joint_sleep_positions = list(SLEEP[: hw.num_joints])
            self.profile_type = "time"
            self.mode = "position"

    class Core:
        def robot_write_commands(self, group_name: str, commands: list[float]) -> None:
            hw.enter("robot_write_commands", group_name, tuple(commands))
            try:
                hw.joint_goal(list(commands), bot_arm_moving_time[0])
            finally:
                hw.leave()

    bot_arm_moving_time = [2.0]  # shared between arm and core, as Profile_Velocity is a motor register

    class ArmInterface:
        def __init__(self, moving_time: float, accel_time: float) -> None:
            self.group_info = GroupInfo()
            self.moving_time = moving_time
            self.accel_time = accel_time
            bot_arm_moving_time[0] = moving_time
            self.joint_commands = list(hw.joints_now())
            self.T_sb = hw.pose()

        def set_trajectory_time(self, moving_time: float | None = None, accel_time: float | None = None) -> None:
            hw.calls.append(("set_trajectory_time", moving_time, accel_time))
            if moving_time is not None:
                self.moving_time = moving_time
                bot_arm_moving_time[0] = moving_time
            if accel_time is not None:
                self.accel_time = accel_time

        def _check_joint_limits(self, positions: list[float]) -> bool:
            theta = [int(q * 1000) / 1000.0 for q in positions]
            for x in range(self.group_info.num_joints):
                if not self.group_info.joint_lower_limits[x] <= theta[x] <= self.group_info.joint_upper_limits[x]:
                    return False
                speed = abs(theta[x] - self.joint_commands[x]) / float(self.moving_time)
                if speed > self.group_info.joint_velocity_limits[x]:
                    return False
            return True

        def _publish_commands(
            self, positions: list[float], moving_time: float | None, accel_time: float | None, blocking: bool
        ) -> None:
            self.set_trajectory_time(moving_time, accel_time)
            self.joint_commands = list(positions)
            hw.joint_goal(list(positions), self.moving_time)
            if blocking:
                hw.sleep(self.moving_time)
            self.T_sb = forward_kinematics(self.joint_commands)

        def set_joint_positions(
            self,
            joint_positions: list[float],
            moving_time: float | None = None,
            accel_time: float | None = None,
            blocking: bool = True,
        ) -> bool:
            hw.enter("set_joint_positions", tuple(joint_positions), moving_time, accel_time, blocking)
            try:
                if self._check_joint_limits(joint_positions):
                    self._publish_commands(joint_positions, moving_time, accel_time, blocking)
                    return True
                return False
            finally:
                hw.leave()

        def go_to_home_pose(
            self, moving_time: float | None = None, accel_time: float | None = None, blocking: bool = True
        ) -> None:
            hw.enter("go_to_home_pose")
            try:
                self._publish_commands([0.0] * self.group_info.num_joints, moving_time, accel_time, blocking)
            finally:
                hw.leave()

        def go_to_sleep_pose(
            self, moving_time: float | None = None, accel_time: float | None = None, blocking: bool = True
        ) -> None:
            hw.enter("go_to_sleep_pose")
            try:
                self._publish_commands(list(self.group_info.joint_sleep_positions), moving_time, accel_time, blocking)
            finally:
                hw.leave()

        def set_ee_cartesian_trajectory(
            self,
            x: float = 0,
            y: float = 0,
            z: float = 0,
            roll: float = 0,
            pitch: float = 0,
            yaw: float = 0,
            moving_time: float | None = None,
            wp_moving_time: float = 0.2,
            wp_accel_time: float = 0.1,
            wp_period: float = 0.05,
        ) -> bool:
            hw.enter("set_ee_cartesian_trajectory", x, y, z, moving_time, wp_moving_time, wp_accel_time, wp_period)
            try:
                if self.group_info.num_joints < 6 and (y != 0 or yaw != 0):
                    return False  # Interbotix logs a warning and refuses
                if moving_time is None:
                    moving_time = self.moving_time
                accel_time = self.accel_time
                n = int(moving_time / wp_period)
                inc = 1.0 / float(n)  # ZeroDivisionError when moving_time < wp_period, as in the real API
                frame_yaw = yaw_of(self.T_sb[:3, :3])
                c, s = math.cos(frame_yaw), math.sin(frame_yaw)
                displacement = np.array([c * x - s * y, s * x + c * y, z])  # yaw frame -> base frame
                start = self.T_sb[:3, 3].copy()
                for i in range(1, n + 1):
                    if not hw.reachable(start + displacement * inc * i):
                        return False  # "Only N% of trajectory successfully planned"
                self.set_trajectory_time(wp_moving_time, wp_accel_time)
                hw.sleep(moving_time + wp_moving_time)
                target = self.T_sb.copy()
                target[:3, 3] = start + displacement
                self.T_sb = target
                hw._cartesian_pose = target.copy()
                hw._joint_duration = 0.0
                self.set_trajectory_time(moving_time, accel_time)
                return True
            finally:
                hw.leave()

        def get_joint_commands(self) -> list[float]:
            return list(self.joint_commands)

        def get_ee_pose_command(self) -> np.ndarray:
            return np.array(self.T_sb)

        def get_ee_pose(self) -> np.ndarray:
            return hw.pose()

        def get_joint_positions(self) -> list[float]:
            return list(hw.joints_now())

        def capture_joint_positions(self) -> None:
            hw.calls.append(("capture_joint_positions",))
            self.joint_commands = list(hw.joints_now())
            self.T_sb = hw.pose()

    class GripperInterface:
        def __init__(self, pressure: float) -> None:
            self.gripper_pressure = pressure
            self.left_finger_lower_limit = hw.finger_lower
            self.left_finger_upper_limit = hw.finger_upper

        def set_pressure(self, pressure: float) -> None:
            hw.calls.append(("set_pressure", pressure))
            self.gripper_pressure = pressure

        def release(self, delay: float = 1.0) -> None:
            hw.enter("release", delay)
            try:
                hw.finger = hw.finger_upper
                hw.sleep(delay)
            finally:
                hw.leave()

        def grasp(self, delay: float = 1.0) -> None:
            hw.enter("grasp", delay)
            try:
                hw.finger = hw.object_width if hw.object_width is not None else hw.finger_lower
                hw.sleep(delay)
            finally:
                hw.leave()

        def get_finger_position(self) -> float:
            return hw.finger

    def _create_global_node() -> None:
        if hw.global_node_exists:
            raise InterbotixException("Tried to create an Interbotix global node but one already exists.")
        hw.global_node_exists = True

    class InterbotixManipulatorXS:
        def __init__(
            self,
            robot_model: str,
            group_name: str = "arm",
            gripper_name: str = "gripper",
            robot_name: str | None = None,
            moving_time: float = 2.0,
            accel_time: float = 0.3,
            gripper_pressure: float = 0.5,
            gripper_pressure_lower_limit: int = 150,
            gripper_pressure_upper_limit: int = 350,
            topic_joint_states: str = "joint_states",
            logging_level: Any = None,
            node_name: str = "robot_manipulation",
            node: Any = None,
            iterative_update_fk: bool = True,
            args: Any = None,
        ) -> None:
            hw.calls.append(
                ("construct", robot_model, group_name, gripper_name, moving_time, accel_time, gripper_pressure)
            )
            if hw.hang_on_connect:  # the real constructor spins until the xs_sdk services answer
                hw.released.wait()
                raise RuntimeError("rclpy shut down while waiting for the xs_sdk services")
            if not hw.legacy_api:
                _create_global_node()
            self.core = Core()
            self.arm = ArmInterface(moving_time, accel_time)
            self.gripper = GripperInterface(gripper_pressure) if gripper_name is not None else None

    if hw.legacy_api:

        def shutdown(self: Any) -> None:
            hw.shutdowns += 1

        InterbotixManipulatorXS.shutdown = shutdown  # type: ignore[attr-defined]

    def robot_startup(
        node: Any = None, node_name: str = "interbotix_robot_manipulation", namespace: Any = None
    ) -> None:
        if hw.up:
            raise InterbotixException("Startup has already been requested")
        if not hw.global_node_exists:
            _create_global_node()
        hw.up = True
        hw.startups += 1

    def robot_shutdown(node: Any = None) -> None:
        hw.up = False
        hw.shutdowns += 1

    modules: dict[str, types.ModuleType] = {}
    for name in (
        "interbotix_xs_modules",
        "interbotix_xs_modules.xs_robot",
        "interbotix_common_modules",
        "interbotix_common_modules.common_robot",
    ):
        package = types.ModuleType(name)
        package.__path__ = []  # type: ignore[attr-defined]
        modules[name] = package
    arm_module = types.ModuleType("interbotix_xs_modules.xs_robot.arm")
    arm_module.InterbotixManipulatorXS = InterbotixManipulatorXS  # type: ignore[attr-defined]
    modules["interbotix_xs_modules.xs_robot.arm"] = arm_module
    if not hw.legacy_api:
        robot_module = types.ModuleType("interbotix_common_modules.common_robot.robot")
        robot_module.robot_startup = robot_startup  # type: ignore[attr-defined]
        robot_module.robot_shutdown = robot_shutdown  # type: ignore[attr-defined]
        modules["interbotix_common_modules.common_robot.robot"] = robot_module
    return modules


def install(monkeypatch: pytest.MonkeyPatch, hw: FakeWidowX) -> FakeWidowX:
    """Put the fake Interbotix packages into sys.modules for the duration of one test."""
    import sys

    for name, module in _build_modules(hw).items():
        monkeypatch.setitem(sys.modules, name, module)
    return hw
