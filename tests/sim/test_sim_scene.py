"""Scene: seeded placement without overlaps, grasping, carrying, dropping into containers."""

from __future__ import annotations

import math

import pytest

from vlm2vla_edge.runtime.sim.render import ARM_RGB, FINGER_RGB, SHADOW_RGB, TABLE_RGB, WALL_RGB
from vlm2vla_edge.runtime.sim.scene import CATALOGUE, CONTAINERS, ITEMS, Scene, TableRegion


def footprints_apart(scene: Scene) -> bool:
    objs = list(scene.objects.values())
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            d = math.dist(a.position[:2], b.position[:2])
            if d < a.kind.radius_m + b.kind.radius_m:
                return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_random_scenes_hold_required_objects_inside_the_region_without_overlap(seed: int) -> None:
    scene = Scene.random(seed, required=["eggplant", "pan", "fish"], n_distractors=3)
    assert {"eggplant", "pan", "fish"} <= set(scene.objects)
    assert footprints_apart(scene)
    region = scene.region
    for obj in scene.objects.values():
        r = obj.kind.radius_m
        assert region.x[0] + r <= obj.position[0] <= region.x[1] - r
        assert region.y[0] + r <= obj.position[1] <= region.y[1] - r
        assert obj.position[2] == region.table_z and obj.support is None
    assert sum(1 for n in scene.objects if n in CONTAINERS) <= 2


def test_same_seed_same_scene_other_seed_other_scene() -> None:
    a = Scene.random(11, required=["carrot"], n_distractors=3)
    b = Scene.random(11, required=["carrot"], n_distractors=3)
    c = Scene.random(12, required=["carrot"], n_distractors=3)
    assert [(o.name, o.position, o.yaw) for o in a.objects.values()] == [
        (o.name, o.position, o.yaw) for o in b.objects.values()
    ]
    assert [(o.name, o.position) for o in a.objects.values()] != [(o.name, o.position) for o in c.objects.values()]


def test_unknown_object_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown object 'unicorn'"):
        Scene.random(0, required=["unicorn"])


def test_crowded_table_gives_up_distractors_not_required_objects() -> None:
    small = TableRegion(x=(0.2, 0.42), y=(-0.12, 0.12))
    scene = Scene.random(3, required=["pan", "carrot"], n_distractors=10, region=small)
    assert {"pan", "carrot"} <= set(scene.objects) and footprints_apart(scene)
    with pytest.raises(ValueError, match="cannot place"):
        Scene.random(3, required=list(CONTAINERS), n_distractors=0, region=small)


def test_catalogue_has_the_papers_objects_and_distinct_colours() -> None:
    for name in ("carrot", "eggplant", "pan", "plate", "fish", "banana", "spoon", "cup", "bowl"):
        assert name in CATALOGUE
    colours = [k.colour for k in CATALOGUE.values()] + [TABLE_RGB, WALL_RGB, ARM_RGB, FINGER_RGB, SHADOW_RGB]
    for i, a in enumerate(colours):
        for b in colours[i + 1 :]:
            assert max(abs(x - y) for x, y in zip(a, b)) >= 30, (a, b)
    assert set(ITEMS).isdisjoint(CONTAINERS)


def scene_with(*names: str, seed: int = 5) -> Scene:
    return Scene.random(seed, required=names, n_distractors=0)


def test_closing_at_the_object_grasps_it_and_it_follows_the_gripper() -> None:
    scene = scene_with("carrot", "plate")
    carrot = scene["carrot"]
    tip = (carrot.position[0], carrot.position[1], carrot.kind.height_m / 2)
    assert scene.close_gripper(tip) == "carrot" and scene.held == "carrot"
    lifted_tip = (tip[0] + 0.05, tip[1], 0.2)
    scene.follow(lifted_tip)
    assert scene["carrot"].position == pytest.approx((lifted_tip[0], lifted_tip[1], 0.2 - carrot.kind.height_m / 2))
    assert scene.lifted("carrot")
    # Released over open table: falls onto the table.
    assert scene.open_gripper() == "carrot"
    assert scene.held is None and scene["carrot"].position[2] == 0.0 and scene["carrot"].support is None
    assert not scene.lifted("carrot")


def test_closing_beside_or_above_the_object_grasps_nothing() -> None:
    scene = scene_with("fish")
    fish = scene["fish"]
    x, y, _ = fish.position
    assert scene.close_gripper((x, y + 0.06, 0.01)) is None  # beside it
    assert scene.close_gripper((x, y, fish.top_z + 0.05)) is None  # too high above it
    assert scene.held is None


def test_containers_cannot_be_grasped() -> None:
    scene = scene_with("pan")
    pan = scene["pan"]
    assert scene.close_gripper((pan.position[0], pan.position[1], 0.02)) is None


def test_release_over_a_container_lands_on_its_surface() -> None:
    for container in ("pan", "plate", "bowl"):
        scene = scene_with("eggplant", container)
        egg, base = scene["eggplant"], scene[container]
        scene.close_gripper((egg.position[0], egg.position[1], 0.015))
        scene.follow((base.position[0] + 0.01, base.position[1], 0.15))
        assert not scene.rests_in("eggplant", container)  # still held
        scene.open_gripper()
        assert scene["eggplant"].support == container
        assert scene["eggplant"].position[2] == pytest.approx(base.position[2] + base.kind.surface_m)
        assert scene.rests_in("eggplant", container)


def test_copy_is_independent() -> None:
    scene = scene_with("carrot")
    copy = scene.copy()
    carrot = scene["carrot"]
    copy.close_gripper((carrot.position[0], carrot.position[1], 0.01))
    copy.follow((0.3, 0.0, 0.2))
    assert scene.held is None and scene["carrot"].position == carrot.position
