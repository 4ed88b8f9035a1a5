"""wx250s kinematics: PoE forward kinematics, analytic IK round trips, reachability, speed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.robot.kinematics import WX250S_M, WX250sKinematics, fk, link_points

ROBOT = load_robot_config()
KIN = WX250sKinematics(ROBOT)
BOX = ROBOT.workspace


def in_box(p: tuple[float, float, float]) -> bool:
    return BOX.x.contains(p[0]) and BOX.y.contains(p[1]) and BOX.z.contains(p[2])


def test_home_pose_is_the_published_m() -> None:
    np.testing.assert_allclose(fk(ROBOT.home_joints), WX250S_M, atol=1e-12)


def test_single_joints_move_the_tip_as_the_screw_axes_say() -> None:
    # Waist by +90 degrees turns the stretched arm to +y.
    np.testing.assert_allclose(KIN.fk_position([math.pi / 2, 0, 0, 0, 0, 0]), (0.0, 0.458325, 0.36065), atol=1e-9)
    # Shoulder positive tilts the arm forward and down about the shoulder at z = 0.11065.
    x, _, z = KIN.fk_position([0, 0.3, 0, 0, 0, 0])
    assert z < 0.36065 and math.isclose(math.hypot(x, z - 0.11065), math.hypot(0.458325, 0.25), rel_tol=1e-9)
    # Wrist rotate spins about the tool axis: the tip does not move.
    np.testing.assert_allclose(
        KIN.fk_position([0.2, 0.1, 0.3, 0, 0.4, 1.3]), KIN.fk_position([0.2, 0.1, 0.3, 0, 0.4, 0]), atol=1e-12
    )


def test_link_points_end_at_the_end_effector() -> None:
    q = (0.3, -0.4, 0.5, 0.0, 0.7, 0.0)
    pts = link_points(q)
    np.testing.assert_allclose(pts[-1], fk(q)[:3, 3], atol=1e-12)
    np.testing.assert_allclose(pts[1], (0, 0, 0.11065), atol=1e-12)  # the shoulder never moves
    # Link lengths are preserved: shoulder-elbow, elbow-wrist, wrist-tip.
    lengths = np.linalg.norm(np.diff(pts[1:], axis=0), axis=1)
    np.testing.assert_allclose(lengths, [math.hypot(0.04975, 0.25), 0.25, 0.158575], atol=1e-9)


def test_fk_ik_fk_round_trip_at_1000_random_poses() -> None:
    """Joints sampled within the limits (all six), kept when the tip lies in the workspace: IK finds it to 1 mm."""
    rng = np.random.default_rng(2026)
    checked = 0
    worst = 0.0
    while checked < 1000:
        q = rng.uniform(KIN.lower, KIN.upper)
        p = KIN.fk_position(q)
        if not in_box(p):
            continue
        solution = KIN.ik(p)
        assert solution is not None, f"IK failed at {p} reached by joints {q}"
        assert KIN.within_limits(solution.joints)
        worst = max(worst, math.dist(KIN.fk_position(solution.joints), p))
        checked += 1
    assert worst < 1e-3


@settings(max_examples=300, deadline=None)
@given(
    st.floats(BOX.x.min, BOX.x.max), st.floats(BOX.y.min, BOX.y.max), st.floats(ROBOT.z_floor, BOX.z.max)
)
def test_every_workspace_point_is_reached_exactly(x: float, y: float, z: float) -> None:
    solution = KIN.ik((x, y, z))
    assert solution is not None
    assert math.dist(KIN.fk_position(solution.joints), (x, y, z)) < 1e-9
    assert KIN.within_limits(solution.joints)


def test_gripper_points_straight_down_over_the_table_and_faces_away_from_the_base() -> None:
    for p in [(0.30, 0.0, 0.03), (0.25, -0.15, 0.05), (0.35, 0.12, 0.10)]:
        solution = KIN.ik(p)
        assert solution is not None and solution.pitch == pytest.approx(math.pi / 2)
        T = fk(solution.joints)
        np.testing.assert_allclose(T[:3, 0], (0, 0, -1), atol=1e-9)  # tool axis straight down
        yaw = math.atan2(p[1], p[0])  # the fingers open across the line from the base
        np.testing.assert_allclose(T[:3, 1], (-math.sin(yaw), math.cos(yaw), 0), atol=1e-9)
        assert KIN.rpy(T)[1] == pytest.approx(math.pi / 2)


def test_pitch_tilts_up_only_where_down_is_out_of_reach() -> None:
    far_high = KIN.ik((0.48, 0.0, 0.38))
    assert far_high is not None and 0.0 <= far_high.pitch < math.pi / 2
    # A bit closer and lower, the pitch can only be the same or more downward.
    nearer = KIN.ik((0.40, 0.0, 0.30))
    assert nearer is not None and nearer.pitch >= far_high.pitch


@pytest.mark.parametrize(
    "point",
    [(0.9, 0.0, 0.2), (0.0, 0.0, 0.9), (0.3, 0.6, 0.3), (float("nan"), 0.0, 0.1), (0.3, 0.0, float("inf"))],
)
def test_out_of_reach_points_are_refused(point: tuple[float, float, float]) -> None:
    assert KIN.ik(point) is None
    assert not KIN.reachable(point)


def test_tighter_joint_limits_shrink_the_reachable_set() -> None:
    data = ROBOT.model_dump()
    data["joint_limits"]["waist"] = {"min": -0.5, "max": 0.5}
    narrow = WX250sKinematics(type(ROBOT).model_validate(data))
    assert KIN.reachable((0.2, 0.25, 0.1))  # yaw 0.9 rad
    assert not narrow.reachable((0.2, 0.25, 0.1))
    assert narrow.reachable((0.3, 0.1, 0.1))


def test_ik_is_fast_enough_for_the_limiter() -> None:
    rng = np.random.default_rng(1)
    points = [tuple(p) for p in rng.uniform((0.1, -0.3, 0.02), (0.5, 0.3, 0.4), size=(2000, 3))]
    start = time.perf_counter()
    for p in points:
        KIN.reachable(p)
    per_call = (time.perf_counter() - start) / len(points)
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per reachable() call"
