"""Forward and inverse kinematics of the WidowX 250 6DOF (wx250s), numpy only.

Forward kinematics is the product of exponentials (space form) with the screw axes and home pose
that Interbotix publishes for the wx250s (`mr_descriptions`): six revolute joints, waist about z,
shoulder/elbow/wrist_angle about y, forearm_roll/wrist_rotate about x, end effector
`ee_gripper_link` at (0.458325, 0, 0.36065) with all joints at zero.

Inverse kinematics is analytic for the orientation BridgeData-style policies keep: forearm_roll and
wrist_rotate at zero, yaw = atan2(y, x) (the gripper looks away from the base), and the pitch as far
down as the joint limits allow (straight down when possible, tilting up towards the horizontal near
the edge of the reach). With both rolls at zero the arm is planar, so shoulder/elbow/wrist reduce to
a two-link arm plus a fixed tool length; that is closed form, a few microseconds a call, which the
safety limiter needs because it asks `reachable` for every action. It is checked against the
independent PoE forward kinematics in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vlm2vla_edge.runtime.actions import Vec3
from vlm2vla_edge.runtime.config import RobotConfig

# Screw axes in the space frame, one row per joint: (wx, wy, wz, vx, vy, vz), v = -w x q.
WX250S_SLIST = np.array(
    [
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # waist, about z through the base
        [0.0, 1.0, 0.0, -0.11065, 0.0, 0.0],  # shoulder, about y at z = 0.11065
        [0.0, 1.0, 0.0, -0.36065, 0.0, 0.04975],  # elbow, about y at x = 0.04975, z = 0.36065
        [1.0, 0.0, 0.0, 0.0, 0.36065, 0.0],  # forearm_roll, about x at z = 0.36065
        [0.0, 1.0, 0.0, -0.36065, 0.0, 0.29975],  # wrist_angle, about y at x = 0.29975, z = 0.36065
        [1.0, 0.0, 0.0, 0.0, 0.36065, 0.0],  # wrist_rotate, about x at z = 0.36065
    ]
)
# ee_gripper_link at the zero configuration.
WX250S_M = np.array(
    [
        [1.0, 0.0, 0.0, 0.458325],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.36065],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# Points on each link at the zero configuration (for drawing the arm): the joint centres.
WX250S_JOINT_POINTS = np.array(
    [
        [0.0, 0.0, 0.0],  # base
        [0.0, 0.0, 0.11065],  # shoulder
        [0.04975, 0.0, 0.36065],  # elbow
        [0.29975, 0.0, 0.36065],  # wrist
        [0.458325, 0.0, 0.36065],  # end effector (between the fingertips)
    ]
)

# Planar geometry derived from the screw axes (metres): shoulder height, upper arm, forearm, tool.
_SHOULDER_Z = 0.11065
_UPPER = (0.04975, 0.25)  # elbow minus shoulder, at zero
_L1 = math.hypot(*_UPPER)
_A1 = math.atan2(_UPPER[1], _UPPER[0])  # elevation of the upper arm at zero
_L2 = 0.29975 - 0.04975
_L3 = 0.458325 - 0.29975

# Pitch candidates for IK, from straight down (pi/2) to straight up, coarse then refined by bisection.
_PITCH_GRID = np.linspace(math.pi / 2, -math.pi / 2, 37)
_BISECT_STEPS = 12


def _exp6(screw: np.ndarray, theta: float) -> np.ndarray:
    """Matrix exponential of a unit-rotation screw times `theta` (Rodrigues), as a 4x4 transform."""
    w = screw[:3]
    v = screw[3:]
    wx, wy, wz = w
    K = np.array([[0.0, -wz, wy], [wz, 0.0, -wx], [-wy, wx, 0.0]])
    s, c = math.sin(theta), math.cos(theta)
    K2 = K @ K
    R = np.eye(3) + s * K + (1.0 - c) * K2
    G = np.eye(3) * theta + (1.0 - c) * K + (theta - s) * K2
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = G @ v
    return T


def fk(joints: Sequence[float]) -> np.ndarray:
    """4x4 pose of ee_gripper_link in the base frame (product of exponentials)."""
    T = np.eye(4)
    for screw, theta in zip(WX250S_SLIST, joints, strict=True):
        T = T @ _exp6(screw, float(theta))
    return T @ WX250S_M


def fk_position(joints: Sequence[float]) -> Vec3:
    p = fk(joints)[:3, 3]
    return (float(p[0]), float(p[1]), float(p[2]))


def link_points(joints: Sequence[float]) -> np.ndarray:
    """5 x 3 positions of base, shoulder, elbow, wrist and end effector (for drawing the arm)."""
    out = np.empty((5, 3))
    out[0] = WX250S_JOINT_POINTS[0]
    T = np.eye(4)
    # Joint point k sits on the axis of its joint, so the exponentials up to and including that
    # joint's own carry it to its place.
    for k, (screw, theta) in enumerate(zip(WX250S_SLIST, joints, strict=True)):
        T = T @ _exp6(screw, float(theta))
        slot = {1: 1, 2: 2, 4: 3}.get(k)
        if slot is not None:
            out[slot] = T[:3, :3] @ WX250S_JOINT_POINTS[slot] + T[:3, 3]
    out[4] = (T @ WX250S_M)[:3, 3]
    return out


@dataclass(frozen=True, slots=True)
class IKSolution:
    """Joints reaching a position with the down-ish orientation, and the pitch that was chosen."""

    joints: tuple[float, float, float, float, float, float]
    pitch: float  # radians; pi/2 = gripper pointing straight down, 0 = horizontal


class WX250sKinematics:
    """FK/IK of one wx250s with the joint limits of its robot config."""

    def __init__(self, robot: RobotConfig) -> None:
        intervals = robot.joint_intervals()
        self.lower = np.array([i.min for i in intervals])
        self.upper = np.array([i.max for i in intervals])
        self._lo = tuple(float(v) for v in self.lower)
        self._hi = tuple(float(v) for v in self.upper)

    # --- forward ------------------------------------------------------------------------------

    @staticmethod
    def fk(joints: Sequence[float]) -> np.ndarray:
        """4x4 pose of ee_gripper_link (see the module-level `fk`)."""
        return fk(joints)

    @staticmethod
    def fk_position(joints: Sequence[float]) -> Vec3:
        return fk_position(joints)

    @staticmethod
    def link_points(joints: Sequence[float]) -> np.ndarray:
        return link_points(joints)

    @staticmethod
    def rpy(T: np.ndarray) -> Vec3:
        """Roll, pitch, yaw (ZYX convention) of a rotation; pitch > 0 points the gripper down."""
        R = T[:3, :3]
        pitch = math.asin(max(-1.0, min(1.0, -float(R[2, 0]))))
        roll = math.atan2(float(R[2, 1]), float(R[2, 2]))
        yaw = math.atan2(float(R[1, 0]), float(R[0, 0]))
        return (roll, pitch, yaw)

    def within_limits(self, joints: Sequence[float]) -> bool:
        return all(lo <= q <= hi for q, lo, hi in zip(joints, self._lo, self._hi, strict=True))

    # --- inverse ------------------------------------------------------------------------------

    def _planar(self, r: float, z: float, pitch: float) -> tuple[float, float, float] | None:
        """Shoulder, elbow, wrist_angle putting the tool tip at (r, z) with `pitch`, elbow up; None if not."""
        cp, sp = math.cos(pitch), math.sin(pitch)
        wr = r - _L3 * cp
        wz = z + _L3 * sp - _SHOULDER_Z
        d2 = wr * wr + wz * wz
        c = (d2 - _L1 * _L1 - _L2 * _L2) / (2.0 * _L1 * _L2)
        if c > 1.0 or c < -1.0:
            return None
        s = math.sqrt(1.0 - c * c)
        beta1 = math.atan2(wz, wr) + math.atan2(_L2 * s, _L1 + _L2 * c)  # upper-arm elevation
        beta2 = beta1 - math.acos(c)  # forearm elevation (elbow above the shoulder-wrist line)
        q2 = _A1 - beta1
        q3 = -beta2 - q2
        q5 = pitch - q2 - q3
        lo, hi = self._lo, self._hi
        if not (lo[1] <= q2 <= hi[1] and lo[2] <= q3 <= hi[2] and lo[4] <= q5 <= hi[4]):
            return None
        return (q2, q3, q5)

    def ik(self, position: Sequence[float]) -> IKSolution | None:
        """Joints placing the end effector at `position` with the gripper as far down as possible.

        Returns None when no pitch in [-pi/2, pi/2] reaches the position within the joint limits.
        """
        x, y, z = (float(v) for v in position)
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            return None
        yaw = math.atan2(y, x)
        if not self._lo[0] <= yaw <= self._hi[0]:
            return None
        r = math.hypot(x, y)
        previous = None
        for pitch in _PITCH_GRID:
            sol = self._planar(r, z, float(pitch))
            if sol is not None:
                break
            previous = float(pitch)
        else:
            return None
        pitch = float(pitch)
        if previous is not None:
            # The largest feasible pitch lies between `previous` (infeasible) and `pitch` (feasible).
            bad, good = previous, pitch
            for _ in range(_BISECT_STEPS):
                mid = 0.5 * (bad + good)
                mid_sol = self._planar(r, z, mid)
                if mid_sol is None:
                    bad = mid
                else:
                    good, sol = mid, mid_sol
            pitch = good
        q2, q3, q5 = sol
        return IKSolution(joints=(yaw, q2, q3, 0.0, q5, 0.0), pitch=pitch)

    def ik_joints(self, position: Sequence[float]) -> tuple[float, ...] | None:
        sol = self.ik(position)
        return None if sol is None else sol.joints

    def reachable(self, position: Vec3) -> bool:
        """True when IK succeeds within the joint limits: the SafetyLimiter's reachability hook."""
        return self.ik(position) is not None
