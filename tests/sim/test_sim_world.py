"""SimWorld / SimArm / SimCamera: moves only through Arm.execute, interruptible, grasps through commands."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.robot.base import DeviceNotConnectedError
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.sim.scene import Scene
from vlm2vla_edge.runtime.sim.world import Motion, SimArm, SimCamera, SimWorld

ROBOT = load_robot_config()


def make(realtime: bool = False, motion: Motion | None = None, seed: int = 3) -> tuple[SimWorld, SimArm, SafetyLimiter]:
    world = SimWorld(
        ROBOT, Scene.random(seed, required=["carrot", "plate"], n_distractors=1), realtime=realtime, motion=motion
    )
    arm = SimArm(world)
    arm.connect()
    limiter = SafetyLimiter(ROBOT, reachable=world.reachable, clock=world.clock)
    return world, arm, limiter


def execute(arm: SimArm, limiter: SafetyLimiter, *actions: Action) -> list:
    verdict = limiter.check_chunk(ActionChunk(actions), arm.read_state().position)
    assert not verdict.rejected, verdict.reason
    return [arm.execute(c) for c in verdict.commands]


def test_starts_at_home_and_execute_moves_to_the_checked_target() -> None:
    world, arm, limiter = make()
    state = arm.read_state()
    assert state.position == pytest.approx((0.458325, 0.0, 0.36065))
    assert state.joints == ROBOT.home_joints and state.gripper_open
    results = execute(arm, limiter, Action(-0.03, 0.02, -0.03, 1.0), Action(-0.03, 0.0, -0.04, 1.0))
    assert all(r.completed and r.error_m < 1e-9 for r in results)
    assert arm.read_state().position == pytest.approx((0.458325 - 0.06, 0.02, 0.36065 - 0.07))
    # Simulated time advanced by the path at the configured speed (no sleeping).
    assert world.clock() == pytest.approx((math.dist((0, 0, 0), (0.03, 0.02, 0.03)) + 0.05) / Motion().speed_m_s)


def test_only_safe_commands_move_the_arm() -> None:
    _, arm, _ = make()
    with pytest.raises(TypeError):
        arm.execute((0.3, 0.0, 0.1))  # type: ignore[arg-type]


def test_not_connected_arm_and_camera_refuse() -> None:
    world, arm, limiter = make()
    arm.disconnect()
    with pytest.raises(DeviceNotConnectedError):
        arm.read_state()
    with pytest.raises(DeviceNotConnectedError):
        SimCamera(world).read()


def test_home_and_sleep_poses_come_from_the_robot_config() -> None:
    world, arm, _ = make()
    arm.go_sleep()
    assert world.joints == pytest.approx(ROBOT.sleep_joints)
    arm.go_home()
    assert world.joints == pytest.approx(ROBOT.home_joints)


def run_interrupted(interrupt: str) -> tuple[float, object, SimWorld]:
    # Slow arm (1 cm/s): a 5 cm move takes 5 s unless interrupted.
    world, arm, limiter = make(realtime=True, motion=Motion(speed_m_s=0.01, segment_s=0.01))
    cancel = threading.Event()
    verdict = limiter.check_chunk(ActionChunk((Action(-0.05, 0.0, 0.0, 1.0),)), arm.read_state().position)
    box: dict[str, object] = {}

    def worker() -> None:
        box["result"] = arm.execute(verdict.commands[0], cancel=cancel)
        box["done"] = time.monotonic()

    thread = threading.Thread(target=worker)
    start_x = world.ee_position[0]
    thread.start()
    deadline = time.monotonic() + 30.0  # generous: a loaded machine may start the thread late
    while world.ee_position[0] > start_x - 0.001 and time.monotonic() < deadline:  # until it has moved 1 mm
        time.sleep(0.005)
    asked = time.monotonic()
    if interrupt == "stop":
        arm.stop()
    else:
        cancel.set()
    thread.join(timeout=4.0)  # the whole move would take 5 s
    assert not thread.is_alive()
    return float(box["done"]) - asked, box["result"], world  # type: ignore[arg-type]


@pytest.mark.parametrize("interrupt", ["stop", "cancel"])
def test_stop_and_cancel_halt_a_realtime_move_within_milliseconds(interrupt: str) -> None:
    latency, result, world = run_interrupted(interrupt)
    # 10 ms segments: tens of ms on a quiet machine; the bound leaves room for a loaded one (the move takes 5 s,
    # and bench/estop_latency.py measures the real latency).
    assert latency < 0.5, f"{interrupt} took {latency * 1000:.1f} ms"
    assert not result.completed  # type: ignore[attr-defined]
    x = world.ee_position[0]
    assert 0.458325 - 0.05 < x < 0.458325 - 0.0005  # stopped part-way, holding there


def test_grasp_carry_and_place_through_commands() -> None:
    world, arm, limiter = make()
    carrot, plate = world.scene["carrot"], world.scene["plate"]

    def go(target: tuple[float, float, float], gripper: float) -> None:
        here = np.array(arm.read_state().position)
        delta = np.array(target) - here
        n = max(1, math.ceil(np.linalg.norm(delta) / 0.045))
        keep = 1.0 if arm.read_state().gripper_open else 0.0
        for i in range(n):  # the gripper changes after the last step, as in the expert's demonstrations
            execute(arm, limiter, Action(*(delta / n), gripper if i == n - 1 else keep))

    go((carrot.position[0], carrot.position[1], 0.10), 1.0)
    go((carrot.position[0], carrot.position[1], carrot.kind.height_m / 2), 0.0)
    assert world.scene.held == "carrot" and not arm.read_state().gripper_open
    go((plate.position[0], plate.position[1], 0.12), 0.0)
    assert world.scene["carrot"].position[:2] == pytest.approx(plate.position[:2])
    go((plate.position[0], plate.position[1], 0.06), 1.0)
    assert world.scene.held is None and world.scene.rests_in("carrot", "plate")


def test_camera_frames_count_up_and_show_the_current_state() -> None:
    world, arm, limiter = make()
    camera = SimCamera(world)
    with camera:
        first = camera.read()
        execute(arm, limiter, Action(-0.05, 0.0, -0.05, 0.0))
        second = camera.read()
    assert (first.index, second.index) == (0, 1)
    assert first.image.shape == (256, 256, 3)
    assert not np.array_equal(first.image, second.image)
