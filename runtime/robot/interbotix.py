"""`InterbotixArm`: a WidowX 250 6DOF driven through Interbotix's ROS 2 Python API.

Interbotix's cartesian call (`set_ee_cartesian_trajectory`) plans the whole line, refuses all of it
when any waypoint fails inverse kinematics, and then *blocks* until the motion is done: nothing can
interrupt it. So a straight move is executed here as short segments (about 1 cm, a few tenths of a
second each), and the stop flag and the caller's cancel event are checked between segments: a stop
takes effect within one segment. A stop then holds the present position; torque is never switched
off, because an unpowered WidowX drops onto the table.

Facts taken from the `humble` branch of `Interbotix/interbotix_ros_toolboxes`
(`interbotix_xs_modules/xs_robot/{arm,gripper,core}.py`):
- the cartesian displacement is expressed in a frame that has the end effector's *yaw* (`T_sy`) and
  is applied to the last *commanded* pose (`T_sb`), not the measured one;
- the call resets the arm's default `moving_time` to the segment's, so every joint move here passes
  its own timing explicitly;
- `release()` opens the gripper and `grasp()` closes it (effort control); early humble releases had
  the two docstrings swapped, not the behaviour;
- recent humble releases start and stop ROS with `robot_startup()` / `robot_shutdown()` from
  `interbotix_common_modules.common_robot.robot`; older ones start on construction and stop with
  `bot.shutdown()`. Both are supported.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vlm2vla_edge.runtime.actions import Vec3
from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.robot.base import (
    Arm,
    ArmState,
    CommandRefusedError,
    DeviceError,
    DeviceNotConnectedError,
    MoveResult,
)
from vlm2vla_edge.runtime.robot.devices import InterbotixArmConfig

log = logging.getLogger(__name__)


INSTALL_HINT = (
    "install Interbotix's ROS 2 packages (ROS 2 Humble: run Interbotix's xsarm_amd64_install.sh "
    "with -d humble, which builds interbotix_xs_modules into ~/interbotix_ws) and source "
    "/opt/ros/humble/setup.bash and ~/interbotix_ws/install/setup.bash before starting"
)
DRIVER_HINT = (
    "start the arm driver first: ros2 launch interbotix_xsarm_control xsarm_control.launch.py robot_model:=wx250s"
)
_POLL_S = 0.01  # how often a joint-space move checks the stop flag
_ARRIVED_RAD = 1e-3  # a joint-space move is over when every joint is this close to its goal


@dataclass(frozen=True, slots=True)
class _InterbotixApi:
    """The few entry points of the vendor package this driver uses."""

    manipulator: Callable[..., Any]  # InterbotixManipulatorXS
    startup: Callable[[], None] | None  # robot_startup (recent humble) or None (starts on construction)
    shutdown: Callable[[], None] | None  # robot_shutdown (recent humble) or None (use bot.shutdown())


def _import_api() -> _InterbotixApi:
    """Import `interbotix_xs_modules` lazily, and turn a missing install into one clear sentence."""
    try:
        arm_module = importlib.import_module("interbotix_xs_modules.xs_robot.arm")
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing.startswith(("rclpy", "builtin_interfaces", "trajectory_msgs", "sensor_msgs", "interbotix_xs_msgs")):
            raise DeviceError(
                f"ROS 2 is not available to Python (cannot import {missing}): {INSTALL_HINT}"
            ) from exc
        raise DeviceError(
            f"the Interbotix Python API (interbotix_xs_modules) is not installed (cannot import {missing or exc}): "
            f"{INSTALL_HINT}"
        ) from exc
    manipulator = arm_module.InterbotixManipulatorXS
    if hasattr(manipulator, "shutdown"):  # older humble releases: start on construction, bot.shutdown()
        return _InterbotixApi(manipulator=manipulator, startup=None, shutdown=None)
    try:
        robot_module = importlib.import_module("interbotix_common_modules.common_robot.robot")
    except ImportError as exc:
        raise DeviceError(
            f"interbotix_common_modules is missing or too old for this interbotix_xs_modules: {INSTALL_HINT}"
        ) from exc
    return _InterbotixApi(
        manipulator=manipulator, startup=robot_module.robot_startup, shutdown=robot_module.robot_shutdown
    )


def rpy_from_rotation(rotation: np.ndarray) -> Vec3:
    """Roll, pitch, yaw of a rotation matrix in the static-xyz convention Interbotix uses.

    Mirrors `tf_transformations.euler_from_matrix(R, 'sxyz')` (what Interbotix's
    `rotation_matrix_to_euler_angles` calls), including its choice of yaw = 0 at gimbal lock, so that
    the yaw frame computed here is the one the cartesian call moves in.
    """
    r = np.asarray(rotation, dtype=float)
    cy = math.hypot(r[0, 0], r[1, 0])
    if cy > np.finfo(float).eps * 4.0:
        return (math.atan2(r[2, 1], r[2, 2]), math.atan2(-r[2, 0], cy), math.atan2(r[1, 0], r[0, 0]))
    return (math.atan2(-r[1, 2], r[1, 1]), math.atan2(-r[2, 0], cy), 0.0)


def base_to_yaw_frame(delta: np.ndarray, yaw: float) -> np.ndarray:
    """Express a base-frame displacement in the end effector's yaw frame (`T_sy` in Interbotix's code)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([c * delta[0] + s * delta[1], -s * delta[0] + c * delta[1], delta[2]])


class InterbotixArm(Arm):
    """WidowX 250 6DOF on Interbotix's ROS 2 API; moves in short interruptible cartesian segments."""

    def __init__(self, config: InterbotixArmConfig, robot: RobotConfig) -> None:
        if config.robot_model != robot.model:
            raise DeviceError(f"arm config is for a '{config.robot_model}' but the robot config is a '{robot.model}'")
        self._config = config
        self._robot = robot
        self._api: _InterbotixApi | None = None
        self._bot: Any = None
        self._lock = threading.Lock()  # connect / disconnect
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._mover: int | None = None  # thread id of the move in progress
        self._gripper_open = True

    # --- connection -------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._bot is not None

    def connect(self) -> None:
        with self._lock:
            if self._bot is not None:
                return
            api = _import_api()
            bot = self._construct(api)
            try:
                self._check_robot(bot)
                bot.gripper.set_pressure(self._robot.gripper.pressure)
                opening = self._gripper_opening(bot)
            except BaseException:
                self._shutdown(api, bot)
                raise
            self._gripper_open = opening is None or opening > 0.5
            self._api, self._bot = api, bot
            log.info("event=arm_connected driver=interbotix model=%s", self._config.robot_model)

    def _construct(self, api: _InterbotixApi) -> Any:
        """Build the vendor object in a helper thread: its constructor waits forever for the driver."""
        outcome: list[Any] = []
        abandoned = threading.Event()
        config = self._config

        def build() -> None:
            try:
                bot = api.manipulator(
                    robot_model=config.robot_model,
                    robot_name=config.robot_name,
                    group_name=config.group_name,
                    gripper_name=config.gripper_name,
                    moving_time=config.pose_moving_time_s,
                    accel_time=config.pose_accel_time_s,
                    gripper_pressure=self._robot.gripper.pressure,
                )
                if api.startup is not None:
                    api.startup()
                if abandoned.is_set():  # the driver answered after connect() gave up: release it again
                    self._shutdown(api, bot)
                    return
                outcome.append(bot)
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: Interbotix calls sys.exit on a bad motor config
                outcome.append(exc)

        thread = threading.Thread(target=build, name="interbotix-connect", daemon=True)
        thread.start()
        thread.join(config.connect_timeout_s)
        if not outcome:
            abandoned.set()
            raise DeviceError(
                f"the Interbotix API got no answer from the xs_sdk driver within {config.connect_timeout_s:g} s; "
                f"{DRIVER_HINT}"
            )
        if isinstance(outcome[0], BaseException):
            exc = outcome[0]
            raise DeviceError(
                f"could not start the Interbotix API ({type(exc).__name__}: {exc}); {DRIVER_HINT}"
            ) from exc
        return outcome[0]

    def _check_robot(self, bot: Any) -> None:
        joints = int(bot.arm.group_info.num_joints)
        if joints != 6:
            raise DeviceError(
                f"the arm driver reports {joints} joints in group '{self._config.group_name}', but a wx250s has 6 "
                f"(a 5-DOF wx250 cannot make sideways moves); launch the driver with robot_model:=wx250s"
            )
        expected = self._robot.hard_limits.joint_names
        names = tuple(bot.arm.group_info.joint_names)
        if names != expected:
            raise DeviceError(f"the arm driver's joints are {list(names)}, expected {list(expected)}")

    def disconnect(self) -> None:
        with self._lock:
            if self._bot is None:
                return
            self.stop()
            api, bot = self._api, self._bot
            self._api, self._bot = None, None
            self._shutdown(api, bot)
            log.info("event=arm_disconnected driver=interbotix")

    @staticmethod
    def _shutdown(api: _InterbotixApi | None, bot: Any) -> None:
        """Stop ROS for this process (the xs_sdk driver keeps torque on, so the arm holds its pose)."""
        try:
            if api is not None and api.shutdown is not None:
                api.shutdown()
            else:
                bot.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down must not hide the error that led here
            log.warning("event=arm_shutdown_failed error=%r", exc)

    def _require(self) -> Any:
        bot = self._bot
        if bot is None:
            raise DeviceNotConnectedError("InterbotixArm is not connected")
        return bot

    # --- state ------------------------------------------------------------------------------------

    def read_state(self) -> ArmState:
        bot = self._require()
        try:
            pose = np.asarray(bot.arm.get_ee_pose(), dtype=float)
            joints = tuple(float(q) for q in bot.arm.get_joint_positions())
            opening = self._gripper_opening(bot)
        except Exception as exc:
            raise DeviceError(f"could not read the arm's joint states ({type(exc).__name__}: {exc})") from exc
        return ArmState(
            position=(float(pose[0, 3]), float(pose[1, 3]), float(pose[2, 3])),
            rpy=rpy_from_rotation(pose[:3, :3]),
            gripper_open=self._gripper_open,
            joints=joints,
            timestamp=time.monotonic(),
            gripper_opening=opening,
        )

    @staticmethod
    def _gripper_opening(bot: Any) -> float | None:
        """Left finger position scaled to 0 (closed limit) .. 1 (open limit)."""
        gripper = getattr(bot, "gripper", None)
        if gripper is None:
            return None
        low, high = float(gripper.left_finger_lower_limit), float(gripper.left_finger_upper_limit)
        if high <= low:
            return None
        return min(1.0, max(0.0, (float(gripper.get_finger_position()) - low) / (high - low)))

    def _commanded_pose(self, bot: Any) -> np.ndarray:
        return np.asarray(bot.arm.get_ee_pose_command(), dtype=float)

    def _measured_position(self, bot: Any) -> Vec3:
        pose = np.asarray(bot.arm.get_ee_pose(), dtype=float)
        return (float(pose[0, 3]), float(pose[1, 3]), float(pose[2, 3]))

    # --- stopping ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Halt at the end of the segment in flight (at most one segment) and hold there.

        Called from another thread, it returns once the arm is still (bounded wait). A stop requested
        while no move runs does not carry over to the next move: refusing later moves is the safety
        limiter's e-stop latch's job.
        """
        self._stop.set()
        if self._mover is not None and self._mover != threading.get_ident():
            self._idle.wait(self._config.segment_duration_s + 1.0)

    def _begin_motion(self) -> None:
        self._stop.clear()
        self._idle.clear()
        self._mover = threading.get_ident()

    def _end_motion(self) -> None:
        self._mover = None
        self._idle.set()

    def _halted(self, cancel: threading.Event | None) -> bool:
        return self._stop.is_set() or (cancel is not None and cancel.is_set())

    # --- motion -----------------------------------------------------------------------------------

    def _move_to(self, target: Vec3, cancel: threading.Event | None) -> MoveResult:
        bot = self._require()
        config = self._config
        started = time.monotonic()
        self._begin_motion()
        try:
            start = self._commanded_pose(bot)[:3, 3].copy()
            goal = np.asarray(target, dtype=float)
            length = float(np.linalg.norm(goal - start))
            # A move under a micrometre is below the motors' resolution: nothing to send.
            count = max(1, math.ceil(length / config.segment_length_m - 1e-9)) if length > 1e-6 else 0
            done = 0
            for index in range(1, count + 1):
                if self._halted(cancel):
                    break
                waypoint = start + (goal - start) * (index / count)
                self._segment(bot, waypoint, index, count, start, goal)
                done = index
            completed = done == count
            note = "" if completed else f"stopped after {done} of {count} segments"
            return self._result(bot, target, completed, started, note)
        finally:
            self._end_motion()

    def _segment(
        self, bot: Any, waypoint: np.ndarray, index: int, count: int, start: np.ndarray, goal: np.ndarray
    ) -> None:
        """One blocking cartesian call from the commanded pose to `waypoint`, then a check of where it went."""
        config = self._config
        commanded = self._commanded_pose(bot)
        yaw = rpy_from_rotation(commanded[:3, :3])[2]
        step = base_to_yaw_frame(waypoint - commanded[:3, 3], yaw)
        ok = bot.arm.set_ee_cartesian_trajectory(
            x=float(step[0]),
            y=float(step[1]),
            z=float(step[2]),
            moving_time=config.segment_moving_time_s,
            wp_moving_time=config.wp_moving_time_s,
            wp_accel_time=config.wp_accel_time_s,
            wp_period=config.wp_period_s,
        )
        if not ok:
            here = self._measured_position(bot)
            raise CommandRefusedError(
                f"the arm refused segment {index} of {count} toward {_fmt(waypoint)}: inverse kinematics failed "
                f"(or a joint limit) on the way; it holds at {_fmt(here)}"
            )
        reached = self._commanded_pose(bot)[:3, 3]
        off_line = float(np.linalg.norm(reached - waypoint))
        if off_line > config.line_tolerance_m:
            raise DeviceError(
                f"segment {index} of {count} ended {off_line * 100:.1f} cm from its waypoint {_fmt(waypoint)} "
                f"(commanded pose {_fmt(reached)}); stopping the move from {_fmt(start)} to {_fmt(goal)}"
            )

    def _result(self, bot: Any, target: Vec3, completed: bool, started: float, note: str) -> MoveResult:
        reached = self._measured_position(bot)
        error = float(np.linalg.norm(np.subtract(target, reached)))
        return MoveResult(
            completed=completed, reached=reached, error_m=error, duration_s=time.monotonic() - started, note=note
        )

    def _set_gripper(self, open_: bool) -> None:
        bot = self._require()
        delay = self._robot.gripper.settle_s
        if open_:
            bot.gripper.release(delay)
        else:
            bot.gripper.grasp(delay)
        self._gripper_open = open_

    def go_home(self) -> None:
        self._joint_move(self._robot.home_joints, "home")

    def go_sleep(self) -> None:
        self._joint_move(self._robot.sleep_joints, "sleep")

    def _joint_move(self, joints: tuple[float, ...], name: str) -> None:
        """Move to a configured joint pose without blocking inside the API, so a stop can cut it short."""
        bot = self._require()
        config = self._config
        self._begin_motion()
        try:
            # The limit check inside set_joint_positions uses the arm's current moving_time: set it first.
            bot.arm.set_trajectory_time(moving_time=config.pose_moving_time_s, accel_time=config.pose_accel_time_s)
            ok = bot.arm.set_joint_positions(
                list(joints),
                moving_time=config.pose_moving_time_s,
                accel_time=config.pose_accel_time_s,
                blocking=False,
            )
            if not ok:
                raise CommandRefusedError(
                    f"the arm refused the {name} pose {list(joints)}: outside its joint or velocity limits"
                )
            deadline = time.monotonic() + config.pose_moving_time_s
            goal = np.asarray(joints, dtype=float)
            while time.monotonic() < deadline:
                if self._stop.wait(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
                    self._hold(bot)
                    log.info("event=arm_stopped during=%s", name)
                    return
                present = np.asarray(bot.arm.get_joint_positions(), dtype=float)
                if float(np.max(np.abs(present - goal))) < _ARRIVED_RAD:
                    break
        finally:
            self._end_motion()

    def _hold(self, bot: Any) -> None:
        """Command the measured joint positions as the new goal: the motors stop where they are."""
        present = [float(q) for q in bot.arm.get_joint_positions()]
        bot.core.robot_write_commands(self._config.group_name, present)
        bot.arm.capture_joint_positions()


def _fmt(point: Any) -> str:
    return "(" + ", ".join(f"{float(v):.3f}" for v in point) + ")"
