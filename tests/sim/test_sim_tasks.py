"""Task suite: multilingual instructions, ground-truth success and partial credit, seeded sampling."""

from __future__ import annotations

from collections import Counter

import pytest

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.sim.scene import CATALOGUE, Scene
from vlm2vla_edge.runtime.sim.tasks import (
    ALL_LANGUAGES,
    EXTRA_LANGUAGES,
    LANGUAGES,
    NOUNS,
    TEMPLATES,
    CompositeTask,
    PickTask,
    PlaceTask,
    paper_composite,
    sample_episode,
)
from vlm2vla_edge.runtime.sim.world import SimWorld

ROBOT = load_robot_config()


def test_instructions_in_every_language() -> None:
    assert PickTask("carrot", "es").instruction() == "levanta la zanahoria"
    assert PickTask("carrot").instruction() == "pick up the carrot"
    assert paper_composite().instruction() == "put the eggplant in the pan then lift the fish"
    assert paper_composite("es").instruction() == "pon la berenjena en la sartén y luego levanta el pez"
    assert paper_composite("fr").instruction() == "mets l'aubergine dans la poêle puis soulève le poisson"
    assert paper_composite("de").instruction() == "leg die Aubergine in die Pfanne und dann heb den Fisch hoch"
    assert paper_composite("hi").instruction() == "baingan ko kadhai mein rakho phir machhli upar uthao"
    assert paper_composite("zh").instruction() == "把茄子放进平底锅里，然后举起鱼"
    assert PlaceTask("spoon", "plate", "en").instruction() == "put the spoon on the plate"
    assert PlaceTask("spoon", "plate", "es").instruction("en") == "put the spoon on the plate"


def test_every_language_names_every_object_and_has_every_template() -> None:
    for language in ALL_LANGUAGES:
        assert set(NOUNS[language]) == set(CATALOGUE), language
        assert set(TEMPLATES[language]) == {"pick", "lift", "in", "on", "then"}, language


def world_for(*names: str) -> SimWorld:
    return SimWorld(ROBOT, Scene.random(9, required=names, n_distractors=0))


def grab(world: SimWorld, name: str) -> None:
    obj = world.scene[name]
    tip = (obj.position[0], obj.position[1], obj.position[2] + obj.kind.height_m / 2)
    world.scene.follow(tip)
    assert world.scene.close_gripper(tip) == name


def test_pick_success_needs_the_object_held_and_lifted() -> None:
    world = world_for("carrot")
    task = PickTask("carrot")
    assert not task.success(world) and task.partial_credit(world) == 0.0
    grab(world, "carrot")
    assert not task.success(world) and task.partial_credit(world) == 0.5
    world.scene.follow((0.3, 0.0, 0.1))
    assert task.success(world) and task.partial_credit(world) == 1.0
    world.scene.open_gripper()  # dropped: no longer picked up
    assert not task.success(world)


def test_composite_partial_credit_counts_parts_done() -> None:
    world = world_for("eggplant", "pan", "fish")
    task = paper_composite()
    assert task.objects == ("eggplant", "pan", "fish")
    assert task.partial_credit(world) == 0.0
    grab(world, "eggplant")
    pan = world.scene["pan"]
    world.scene.follow((pan.position[0], pan.position[1], 0.1))
    world.scene.open_gripper()
    assert task.partial_credit(world) == 0.5 and not task.success(world)
    grab(world, "fish")
    world.scene.follow((0.3, 0.0, 0.12))
    assert task.success(world) and task.partial_credit(world) == 1.0


def test_placing_in_the_wrong_container_is_not_success() -> None:
    world = world_for("carrot", "plate", "bowl")
    grab(world, "carrot")
    bowl = world.scene["bowl"]
    world.scene.follow((bowl.position[0], bowl.position[1], 0.1))
    world.scene.open_gripper()
    assert PlaceTask("carrot", "bowl").success(world)
    assert not PlaceTask("carrot", "plate").success(world)


def test_sampling_is_seeded_and_covers_the_suite() -> None:
    a, b = sample_episode(42), sample_episode(42)
    assert a.task == b.task and a.task.instruction() == b.task.instruction()
    assert [(o.name, o.position) for o in a.scene.objects.values()] == [
        (o.name, o.position) for o in b.scene.objects.values()
    ]
    episodes = [sample_episode(s) for s in range(300)]
    kinds = Counter(type(e.task).__name__ for e in episodes)
    assert set(kinds) == {"PickTask", "PlaceTask", "CompositeTask"}
    assert set(e.task.language for e in episodes) == set(LANGUAGES)
    assert any(e.task == paper_composite(e.task.language) for e in episodes)
    for e in episodes:
        assert set(e.task.objects) <= set(e.scene.objects)
        assert len(e.scene.objects) > len(e.task.objects)  # at least one distractor


@pytest.mark.parametrize("language", ALL_LANGUAGES)
def test_language_can_be_fixed(language: str) -> None:
    episode = sample_episode(5, language=language)  # type: ignore[arg-type]
    assert episode.task.language == language
    # Only the instruction's wording depends on the language: the task and the scene are the seed's.
    english = sample_episode(5, language="en")
    assert episode.task.instruction("en") == english.task.instruction()
    assert [(o.name, o.position) for o in episode.scene.objects.values()] == [
        (o.name, o.position) for o in english.scene.objects.values()
    ]


def test_extra_languages_are_never_drawn_so_seeds_keep_their_tasks() -> None:
    # Pinned before the extra languages existed: a seed drawn without a language keeps its task and language.
    assert sample_episode(3).task.instruction() == "levanta la cuchara"
    assert sample_episode(1_000_000, language="es").task.instruction() == (
        "pon el pez sobre el plato y luego levanta el champiñón"
    )
    drawn = {sample_episode(s).task.language for s in range(300)}
    assert drawn == set(LANGUAGES) and not drawn & set(EXTRA_LANGUAGES)


def test_the_instruction_parser_reads_every_language() -> None:
    from vlm2vla_edge.train.data.instruction import parse_instruction

    for language in ALL_LANGUAGES:
        parsed = parse_instruction(paper_composite(language).instruction())
        assert [(p.obj, p.destination) for p in parsed.parts] == [("the eggplant", "the pan"), ("the fish", None)], (
            language
        )
        for english, phrase in NOUNS[language].items():
            one = parse_instruction(PickTask(english, language).instruction())
            assert [p.obj for p in one.parts] == [f"the {english}"], (language, phrase)


def test_composite_of_two_parts_joins_with_then() -> None:
    task = CompositeTask((PickTask("corn"), PickTask("lemon", verb="lift")))
    assert task.instruction() == "pick up the corn then lift the lemon"
