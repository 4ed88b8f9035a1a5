"""The scene text a text-only policy reads: the object names come back out of the simulator's description."""

from __future__ import annotations

import numpy as np

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.scene_text import scene_object_names
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
