"""The scene text a text-only policy reads: the object names come back out of the simulator's description."""

from __future__ import annotations

import re

import numpy as np

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates
from vlm2vla_edge.runtime.scene_text import scene_in_units, scene_object_names
from vlm2vla_edge.runtime.sim.tasks import sample_episode
from vlm2vla_edge.runtime.sim.world import SimWorld


def test_every_object_of_a_described_scene_is_read_back() -> None:
    robot = load_robot_config()
    for seed in range(40):
        world = SimWorld(robot, sample_episode(seed).scene)
        if seed % 3 == 0:  # something held, so the text says "<name> in the gripper."
            item = next(n for n in world.scene.objects if world.scene.objects[n].kind.graspable)
            obj = world.scene[item]
            tip = (obj.position[0], obj.position[1], obj.position[2] + obj.kind.height_m / 2)
            world.scene.follow(tip)
            world.scene.close_gripper(tip)
        text = world.describe()
        assert sorted(scene_object_names(text)) == sorted(world.scene.objects), text


def test_other_texts_name_nothing() -> None:
    assert scene_object_names("A carrot lies left of a plate.") == ()
    assert scene_object_names("") == ()
    assert np.array(scene_object_names("gripper open, holding nothing.")).size == 0


def test_scene_in_centimetres_moves_the_point_of_every_coordinate_and_nothing_else() -> None:
    scene = ("gripper closed, holding the lemon. lemon in the gripper. banana on the table: above (-0.09, -0.13, "
             "-0.26), grasp (0.1, 0, -0.34). pot on the table: above (0.125, 0.02, 0).")
    assert scene_in_units(scene, "cm") == (
        "gripper closed, holding the lemon. lemon in the gripper. banana on the table: above (-9, -13, -26), "
        "grasp (10, 0, -34). pot on the table: above (12.5, 2, 0)."
    )
    assert scene_in_units(scene, "m") is scene
    assert scene_in_units("2 cups (red) on 0.5 m", "cm") == "2 cups (red) on 0.5 m"  # only numbers in tuples


def test_prompts_state_the_scene_in_their_units() -> None:
    robot = load_robot_config()
    for seed in range(20):
        text = SimWorld(robot, sample_episode(seed).scene).describe()
        rendered = PromptTemplates(scene_units="cm").render_observation(text)
        assert re.search(r"\(-?[0-9]", rendered) and not re.search(r"[0-9]\.[0-9]", rendered), rendered  # integers
        assert scene_object_names(rendered) == scene_object_names(text)
        assert PromptTemplates().render_observation(text) == f"Scene: {text}\n"
