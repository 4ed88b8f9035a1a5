"""The simulated robot: a world (scene + arm joints + clock) and the `Arm` / `Camera` drivers over it.

`SimArm` is an ordinary `Arm` driver: it moves only through `Arm.execute(SafeCommand)`, which calls
`_move_to` / `_set_gripper` here. A move is a straight line cut into short segments, each solved by
inverse kinematics; `stop()` (any thread) and the caller's `cancel` event are checked between
segments, so a move halts within one segment (~10 ms in real time) and holds where it is.

Time: with `realtime=True` segments take wall time and the world's clock is `time.monotonic`. With
`realtime=False` (tests, data generation) nothing sleeps and the world keeps a simulated clock that
each segment and gripper settle advances; hand `world.clock` to the `SafetyLimiter` so its rate limit
runs on the same simulated time instead of sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from vlm2vla_edge.runtime.actions import Vec3
from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.robot.base import (
    Arm,
    ArmState,
    Camera,
    DeviceError,
    DeviceNotConnectedError,
    Frame,
    MoveResult,
)
from vlm2vla_edge.runtime.robot.kinematics import WX250sKinematics, fk
from vlm2vla_edge.runtime.sim.render import ArmView, PinholeCamera, Renderer, describe
from vlm2vla_edge.runtime.sim.scene import Scene


@dataclass(frozen=True, slots=True)
class Motion:
    """How fast the simulated arm moves."""

    speed_m_s: float = 0.20  # end-effector speed along a straight move
    joint_speed_rad_s: float = 1.0  # fastest joint during home/sleep moves
    segment_s: float = 0.01  # duration of one interpolation segment (the stop latency in real time)

    def __post_init__(self) -> None:
        if not (self.speed_m_s > 0 and self.joint_speed_rad_s > 0 and self.segment_s > 0):
            raise ValueError("speed_m_s, joint_speed_rad_s and segment_s must be positive")


#: Finger gap of the fully open wx250s gripper (metres): measured openings are fractions of it.
FINGER_SPAN_M = 0.074


class SimWorld:
    """Scene, arm joints, gripper and clock; shared by `SimArm` and `SimCamera` (thread-safe)."""

    def __init__(
        self,
        robot: RobotConfig,
        scene: Scene,
        *,
        realtime: bool = False,
        motion: Motion | None = None,
        camera: PinholeCamera | None = None,
    ) -> None:
        self.robot = robot
        self.scene = scene
        self.realtime = realtime
        self.motion = motion or Motion()
        self.kinematics = WX250sKinematics(robot)
        self.renderer = Renderer(camera)
        self._lock = threading.RLock()
        self._joints: tuple[float, ...] = tuple(robot.home_joints)
        self._ee: Vec3 = self.kinematics.fk_position(self._joints)
        self._gripper_open = True
        self._sim_time = 0.0

    # --- time -------------------------------------------------------------------------------------

    def clock(self) -> float:
        """Seconds: wall monotonic time in real time, the simulated time otherwise."""
        if self.realtime:
            return time.monotonic()
        with self._lock:
            return self._sim_time

    def advance(self, seconds: float) -> None:
        """Let simulated time pass (no effect in real time, where time passes by itself)."""
        if not self.realtime:
            with self._lock:
                self._sim_time += seconds

    # --- arm state --------------------------------------------------------------------------------

    @property
    def joints(self) -> tuple[float, ...]:
        with self._lock:
            return self._joints

    @property
    def ee_position(self) -> Vec3:
        with self._lock:
            return self._ee

    @property
    def gripper_open(self) -> bool:
        with self._lock:
            return self._gripper_open

    def set_joints(self, joints: tuple[float, ...], ee: Vec3 | None = None) -> None:
        """Put the arm at `joints` (`ee` is their FK position when the caller already knows it)."""
        if not self.kinematics.within_limits(joints):
            raise DeviceError(f"joint positions {tuple(round(q, 3) for q in joints)} are outside the joint limits")
        with self._lock:
            self._joints = tuple(float(q) for q in joints)
            self._ee = ee if ee is not None else self.kinematics.fk_position(self._joints)
            self.scene.follow(self._ee)

    def set_gripper(self, open_: bool) -> str | None:
        """Open (release what is held) or close (grasp what is between the fingers); returns the object."""
        with self._lock:
            self._gripper_open = open_
            if open_:
                return self.scene.open_gripper()
            return self.scene.close_gripper(self._ee)

    def arm_state(self) -> ArmState:
        with self._lock:
            joints, ee, open_ = self._joints, self._ee, self._gripper_open
            held = self.scene.held
            gap = 2 * self.scene.objects[held].kind.semi_minor_m if held is not None else None
        if open_:
            opening = 1.0
        elif gap is None:
            opening = 0.0  # closed on nothing
        else:  # the fingers stop on the held object
            opening = min(1.0, gap / FINGER_SPAN_M)
        return ArmState(
            position=ee,
            rpy=self.kinematics.rpy(fk(joints)),
            gripper_open=open_,
            joints=joints,
            timestamp=time.monotonic(),
            gripper_opening=opening,
        )

    def arm_view(self) -> ArmView:
        with self._lock:
            held = self.scene.held
            gap = None
            if held is not None:
                gap = 2 * self.scene.objects[held].kind.semi_minor_m
            return ArmView(joints=self._joints, gripper_open=self._gripper_open, finger_gap_m=gap)

    def reachable(self, position: Vec3) -> bool:
        return self.kinematics.reachable(position)

    # --- observation ------------------------------------------------------------------------------

    def render(self) -> np.ndarray:
        with self._lock:
            view = self.arm_view()
            scene = self.scene.copy()
        return self.renderer.render(scene, view)

    def describe(self) -> str:
        state = self.arm_state()
        with self._lock:
            return describe(self.scene, state)


class SimArm(Arm):
    """The simulated wx250s behind the `Arm` interface."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self._connected = False
        self._stop_lock = threading.Lock()
        self._stop_generation = 0
        self._wake = threading.Event()  # set by stop(): interrupts a real-time segment wait at once

    def connect(self) -> None:
        self._connected = True

    def disconnect(self) -> None:
        if self._connected:
            self.stop()
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    def read_state(self) -> ArmState:
        self._require()
        return self.world.arm_state()

    def stop(self) -> None:
        """Halt the move in progress (if any) at its next segment boundary; the arm holds its pose."""
        with self._stop_lock:
            self._stop_generation += 1
        self._wake.set()

    def go_home(self) -> None:
        self._joint_move(tuple(self.world.robot.home_joints))

    def go_sleep(self) -> None:
        self._joint_move(tuple(self.world.robot.sleep_joints))

    # --- driver hooks -------------------------------------------------------------------------------

    def _move_to(self, target: Vec3, cancel: threading.Event | None) -> MoveResult:
        self._require()
        began = time.monotonic()
        generation = self._generation()
        motion = self.world.motion
        start = np.asarray(self.world.ee_position, dtype=float)
        goal = np.asarray(target, dtype=float)
        distance = float(np.linalg.norm(goal - start))
        step_m = motion.speed_m_s * motion.segment_s
        n = max(1, math.ceil(distance / step_m))
        seg_s = distance / motion.speed_m_s / n
        for i in range(1, n + 1):
            if self._interrupted(generation, cancel):
                return self._result(target, began, completed=False, note="stopped")
            point = start + (goal - start) * (i / n)
            ee: Vec3 = (float(point[0]), float(point[1]), float(point[2]))
            joints = self.world.kinematics.ik_joints(ee)
            if joints is None:
                return self._result(target, began, completed=False, note=f"no IK solution at {_fmt(ee)}; holding")
            self.world.set_joints(joints, ee)
            self._pass_time(seg_s)
        return self._result(target, began, completed=True)

    def _set_gripper(self, open_: bool) -> None:
        self._require()
        self.world.set_gripper(open_)
        self._pass_time(self.world.robot.gripper.settle_s)

    # --- internals ------------------------------------------------------------------------------

    def _require(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError("SimArm is not connected")

    def _generation(self) -> int:
        with self._stop_lock:
            self._wake.clear()
            return self._stop_generation

    def _interrupted(self, generation: int, cancel: threading.Event | None) -> bool:
        with self._stop_lock:
            stopped = self._stop_generation != generation
        return stopped or (cancel is not None and cancel.is_set())

    def _pass_time(self, seconds: float) -> None:
        if self.world.realtime:
            self._wake.wait(seconds)
        else:
            self.world.advance(seconds)

    def _result(self, target: Vec3, began: float, completed: bool, note: str = "") -> MoveResult:
        reached = self.world.ee_position
        return MoveResult(
            completed=completed,
            reached=reached,
            error_m=math.dist(reached, target),
            duration_s=time.monotonic() - began,
            note=note,
        )

    def _joint_move(self, goal: tuple[float, ...]) -> None:
        """Interpolate in joint space to `goal` (home/sleep are fixed joint poses), interruptibly."""
        self._require()
        generation = self._generation()
        motion = self.world.motion
        start = np.asarray(self.world.joints, dtype=float)
        target = np.asarray(goal, dtype=float)
        span = float(np.max(np.abs(target - start))) if len(start) else 0.0
        n = max(1, math.ceil(span / (motion.joint_speed_rad_s * motion.segment_s)))
        seg_s = span / motion.joint_speed_rad_s / n
        for i in range(1, n + 1):
            if self._interrupted(generation, None):
                return
            q = start + (target - start) * (i / n)
            self.world.set_joints(tuple(float(v) for v in q))
            self._pass_time(seg_s)


class SimCamera(Camera):
    """Renders the world from the fixed camera on every `read()`."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self._connected = False
        self._index = 0

    def connect(self) -> None:
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    def read(self, timeout_s: float = 1.0) -> Frame:
        if not self._connected:
            raise DeviceNotConnectedError("SimCamera is not connected")
        image = self.world.render()
        frame = Frame(image=image, timestamp=time.monotonic(), index=self._index)
        self._index += 1
        return frame


def _fmt(p: Vec3) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in p) + ")"
