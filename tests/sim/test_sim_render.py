"""Rendering: objects appear where the camera projects them; the arm is drawn; descriptions are stable."""

from __future__ import annotations

import numpy as np
import pytest

from vlm2vla_edge.runtime.action_text import format_number
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.robot.base import ArmState
from vlm2vla_edge.runtime.robot.kinematics import link_points
from vlm2vla_edge.runtime.sim.render import ARM_RGB, ArmView, PinholeCamera, Renderer, describe
from vlm2vla_edge.runtime.sim.scene import CATALOGUE, KeyPoints, Scene

ROBOT = load_robot_config()
RENDERER = Renderer(PinholeCamera(width=256, height=256))


def colour_mask(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> np.ndarray:
    return np.all(np.abs(image.astype(int) - np.array(rgb)) <= tol, axis=2)


def test_image_shape_and_camera_centre() -> None:
    scene = Scene.random(0, required=["carrot"])
    image = RENDERER.render(scene, ArmView(ROBOT.home_joints, True))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    u, v = RENDERER.camera.project_point(RENDERER.camera.target)
    assert (u, v) == pytest.approx((128.0, 128.0))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_each_object_is_drawn_at_its_projected_position(seed: int, name: str) -> None:
    scene = Scene.random(seed, required=[name], n_distractors=0).only(name)
    obj = scene[name]
    image = RENDERER.render(scene)
    mask = colour_mask(image, obj.kind.colour)
    assert mask.sum() >= 6, f"{name}: only {mask.sum()} pixels of its colour"
    vs, us = np.nonzero(mask)
    centroid = (us.mean() + 0.5, vs.mean() + 0.5)
    expected = RENDERER.camera.project_point((obj.position[0], obj.position[1], obj.top_z))
    assert np.hypot(centroid[0] - expected[0], centroid[1] - expected[1]) < 3.0, (name, centroid, expected)


def test_full_scene_shows_every_object() -> None:
    scene = Scene.random(21, required=["eggplant", "pan", "fish"], n_distractors=3)
    image = RENDERER.render(scene, ArmView(ROBOT.sleep_joints, True))
    for obj in scene.objects.values():
        assert colour_mask(image, obj.kind.colour).sum() > 0, obj.name


def test_the_arm_is_drawn_along_its_links() -> None:
    scene = Scene.random(1, required=["carrot"], n_distractors=0)
    joints = (0.3, 0.2, 0.1, 0.0, 0.9, 0.0)
    with_arm = RENDERER.render(scene, ArmView(joints, True))
    without = RENDERER.render(scene)
    pts = link_points(joints)
    for a, b in [(pts[1], pts[2]), (pts[2], pts[3])]:
        u, v = RENDERER.camera.project_point((a + b) / 2)
        pixel = with_arm[int(v), int(u)]
        assert np.all(np.abs(pixel.astype(int) - ARM_RGB) <= 6), pixel
        assert not np.array_equal(pixel, without[int(v), int(u)])


def test_open_and_closed_grippers_look_different() -> None:
    scene = Scene.random(1, required=["carrot"], n_distractors=0)
    joints = (0.0, 0.3, 0.2, 0.0, 1.0, 0.0)
    assert not np.array_equal(
        RENDERER.render(scene, ArmView(joints, True)), RENDERER.render(scene, ArmView(joints, False))
    )


def test_describe_lists_each_objects_key_points_as_offsets_and_what_is_held() -> None:
    scene = Scene.random(2, required=["carrot", "plate"], n_distractors=0)
    carrot, plate = scene["carrot"], scene["plate"]
    state = ArmState(position=(0.30, -0.05, 0.20), rpy=(0, 0, 0), gripper_open=True)
    text = describe(scene, state)
    assert text == describe(scene, state)
    assert text.startswith("gripper open, holding nothing.")

    def offset(point: tuple[float, float, float]) -> str:
        cm = [round(p * 100) - round(g * 100) for p, g in zip(point, state.position)]
        return "(" + ", ".join(format_number(v / 100, 2) for v in cm) + ")"

    points = KeyPoints()
    assert (f"carrot on the table: above {offset(points.above(carrot))}, grasp {offset(points.grasp(carrot))}."
            in text)
    # a container has an approach point but nothing to grasp
    assert f"plate on the table: above {offset(points.above(plate))}." in text
    # the carrot (2.4 cm high) is approached 6 cm over its top but never lower than 10 cm over the table
    assert points.above(carrot)[2] == pytest.approx(0.10) and points.grasp(carrot)[2] == pytest.approx(0.021)
    scene.close_gripper((carrot.position[0], carrot.position[1], 0.01))
    held = describe(scene, ArmState(position=(0.3, 0.0, 0.01), rpy=(0, 0, 0), gripper_open=False))
    assert held.startswith("gripper closed, holding the carrot.") and "carrot in the gripper." in held
    scene.follow((plate.position[0], plate.position[1], 0.1))
    scene.open_gripper()
    assert "carrot on the plate: above" in describe(scene, state)
