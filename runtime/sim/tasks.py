"""The simulated task suite, after the paper: pick up X, put X in/on Y, and composites ("... then ...").

A `Task` carries its instruction (in one of several languages, from per-language templates) and the
ground-truth checks `success(world)` and `partial_credit(world)`. The checks read the simulator's
state directly; they are for evaluation only and must never reach a policy or a verifier (the
runner sees the instruction, the camera and the arm state, nothing from this module's checks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from vlm2vla_edge.runtime.sim.scene import CATALOGUE, CONTAINERS, ITEMS, Scene

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.sim.world import SimWorld

Language = Literal["en", "es", "fr", "de", "hi", "zh"]
LANGUAGES: tuple[Language, ...] = ("en", "es", "fr", "de", "hi", "zh")

#: How high (metres above the table) an object's bottom must be for "pick up" / "lift" to count.
LIFT_HEIGHT_M = 0.05

# Object names per language, with the article each template needs. German: accusative (the case of
# every object in these imperatives). Hindi is romanised.
NOUNS: dict[Language, dict[str, str]] = {
    "en": {n: f"the {n}" for n in CATALOGUE},
    "es": {
        "carrot": "la zanahoria", "eggplant": "la berenjena", "fish": "el pez", "banana": "el plátano",
        "spoon": "la cuchara", "cup": "la taza", "corn": "el maíz", "mushroom": "el champiñón",
        "lemon": "el limón", "strawberry": "la fresa", "pan": "la sartén", "pot": "la olla",
        "bowl": "el cuenco", "plate": "el plato", "towel": "la toalla",
    },
    "fr": {
        "carrot": "la carotte", "eggplant": "l'aubergine", "fish": "le poisson", "banana": "la banane",
        "spoon": "la cuillère", "cup": "la tasse", "corn": "le maïs", "mushroom": "le champignon",
        "lemon": "le citron", "strawberry": "la fraise", "pan": "la poêle", "pot": "la casserole",
        "bowl": "le bol", "plate": "l'assiette", "towel": "la serviette",
    },
    "de": {
        "carrot": "die Karotte", "eggplant": "die Aubergine", "fish": "den Fisch", "banana": "die Banane",
        "spoon": "den Löffel", "cup": "die Tasse", "corn": "den Mais", "mushroom": "den Pilz",
        "lemon": "die Zitrone", "strawberry": "die Erdbeere", "pan": "die Pfanne", "pot": "den Topf",
        "bowl": "die Schüssel", "plate": "den Teller", "towel": "das Handtuch",
    },
    "hi": {
        "carrot": "gaajar", "eggplant": "baingan", "fish": "machhli", "banana": "kela", "spoon": "chammach",
        "cup": "cup", "corn": "bhutta", "mushroom": "khumbi", "lemon": "nimbu", "strawberry": "strawberry",
        "pan": "kadhai", "pot": "bartan", "bowl": "katori", "plate": "thali", "towel": "tauliya",
    },
    "zh": {
        "carrot": "胡萝卜", "eggplant": "茄子", "fish": "鱼", "banana": "香蕉", "spoon": "勺子", "cup": "杯子",
        "corn": "玉米", "mushroom": "蘑菇", "lemon": "柠檬", "strawberry": "草莓", "pan": "平底锅",
        "pot": "锅", "bowl": "碗", "plate": "盘子", "towel": "毛巾",
    },
}

# Templates: {obj} the thing moved, {target} the container; "then" joins the parts of a composite.
TEMPLATES: dict[Language, dict[str, str]] = {
    "en": {"pick": "pick up {obj}", "lift": "lift {obj}", "in": "put {obj} in {target}",
           "on": "put {obj} on {target}", "then": "{first} then {second}"},
    "es": {"pick": "levanta {obj}", "lift": "levanta {obj}", "in": "pon {obj} en {target}",
           "on": "pon {obj} sobre {target}", "then": "{first} y luego {second}"},
    "fr": {"pick": "ramasse {obj}", "lift": "soulève {obj}", "in": "mets {obj} dans {target}",
           "on": "mets {obj} sur {target}", "then": "{first} puis {second}"},
    "de": {"pick": "heb {obj} auf", "lift": "heb {obj} hoch", "in": "leg {obj} in {target}",
           "on": "leg {obj} auf {target}", "then": "{first} und dann {second}"},
    "hi": {"pick": "{obj} uthao", "lift": "{obj} upar uthao", "in": "{obj} ko {target} mein rakho",
           "on": "{obj} ko {target} par rakho", "then": "{first} phir {second}"},
    "zh": {"pick": "拿起{obj}", "lift": "举起{obj}", "in": "把{obj}放进{target}里",
           "on": "把{obj}放在{target}上", "then": "{first}，然后{second}"},
}


def _phrase(language: Language, template: str, **names: str) -> str:
    nouns = NOUNS[language]
    return TEMPLATES[language][template].format(**{k: nouns[v] for k, v in names.items()})


class Task(ABC):
    """One task: what to say to the robot, which objects the scene needs, and the ground truth."""

    language: Language

    @property
    @abstractmethod
    def objects(self) -> tuple[str, ...]:
        """Objects the scene must contain."""

    @abstractmethod
    def instruction(self, language: Language | None = None) -> str:
        """The instruction text (in this task's language unless another is given)."""

    @abstractmethod
    def success(self, world: "SimWorld") -> bool:
        """Ground truth: is the task done in this world state?"""

    @abstractmethod
    def partial_credit(self, world: "SimWorld") -> float:
        """Ground-truth progress in [0, 1]; 1.0 exactly when `success`."""


@dataclass(frozen=True)
class PickTask(Task):
    """Pick up (lift) an object: held, its bottom at least LIFT_HEIGHT_M above the table."""

    item: str
    language: Language = "en"
    verb: Literal["pick", "lift"] = "pick"

    @property
    def objects(self) -> tuple[str, ...]:
        return (self.item,)

    def instruction(self, language: Language | None = None) -> str:
        return _phrase(language or self.language, self.verb, obj=self.item)

    def success(self, world: "SimWorld") -> bool:
        return world.scene.lifted(self.item, LIFT_HEIGHT_M)

    def partial_credit(self, world: "SimWorld") -> float:
        """1.0 lifted; 0.5 held but not yet high enough; 0 otherwise."""
        if self.success(world):
            return 1.0
        return 0.5 if world.scene.held == self.item else 0.0


@dataclass(frozen=True)
class PlaceTask(Task):
    """Put an object in or on a container: released, resting on the container's surface."""

    item: str
    target: str
    language: Language = "en"

    @property
    def relation(self) -> str:
        relation = CATALOGUE[self.target].container
        assert relation is not None, f"{self.target} is not a container"
        return relation

    @property
    def objects(self) -> tuple[str, ...]:
        return (self.item, self.target)

    def instruction(self, language: Language | None = None) -> str:
        return _phrase(language or self.language, self.relation, obj=self.item, target=self.target)

    def success(self, world: "SimWorld") -> bool:
        return world.scene.rests_in(self.item, self.target)

    def partial_credit(self, world: "SimWorld") -> float:
        """1.0 placed; 0.5 while held (picked, not yet placed); 0 otherwise."""
        if self.success(world):
            return 1.0
        return 0.5 if world.scene.held == self.item else 0.0


@dataclass(frozen=True)
class CompositeTask(Task):
    """Parts done one after the other ("put the eggplant in the pan then lift the fish").

    Success: every part holds at the end. Partial credit: the fraction of parts that hold now.
    """

    parts: tuple[Task, ...]
    language: Language = "en"

    @property
    def objects(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for part in self.parts for name in part.objects))

    def instruction(self, language: Language | None = None) -> str:
        lang = language or self.language
        text = self.parts[0].instruction(lang)
        for part in self.parts[1:]:
            text = TEMPLATES[lang]["then"].format(first=text, second=part.instruction(lang))
        return text

    def success(self, world: "SimWorld") -> bool:
        return all(part.success(world) for part in self.parts)

    def partial_credit(self, world: "SimWorld") -> float:
        return sum(part.success(world) for part in self.parts) / len(self.parts)


def paper_composite(language: Language = "en") -> CompositeTask:
    """The paper's composite task: put the eggplant in the pan, then lift the fish."""
    return CompositeTask(
        parts=(PlaceTask("eggplant", "pan", language), PickTask("fish", language, verb="lift")),
        language=language,
    )


@dataclass(frozen=True, slots=True)
class Episode:
    """A sampled episode: the task and its initial scene (the scene is copied per run)."""

    seed: int
    task: Task
    scene: Scene


def sample_task(rng: np.random.Generator, language: Language | None = None) -> Task:
    """One task of the suite: 40% pick, 45% place, 15% composite (of which a third the paper's own)."""
    lang: Language = language or LANGUAGES[int(rng.integers(len(LANGUAGES)))]
    kind = float(rng.random())
    if kind < 0.40:
        item = str(rng.choice(ITEMS))
        verb: Literal["pick", "lift"] = "pick" if rng.random() < 0.7 else "lift"
        return PickTask(item, lang, verb)
    if kind < 0.85:
        return PlaceTask(str(rng.choice(ITEMS)), str(rng.choice(CONTAINERS)), lang)
    if rng.random() < 1 / 3:
        return paper_composite(lang)
    first_item, second_item = (str(n) for n in rng.choice(ITEMS, size=2, replace=False))
    return CompositeTask(
        parts=(PlaceTask(first_item, str(rng.choice(CONTAINERS)), lang), PickTask(second_item, lang, verb="lift")),
        language=lang,
    )


def sample_episode(seed: int, language: Language | None = None, n_distractors: int | None = None) -> Episode:
    """A task and a scene holding its objects plus distractors, both from `seed`."""
    rng = np.random.default_rng([seed, 0x5EED])
    task = sample_task(rng, language)
    distractors = int(rng.integers(1, 4)) if n_distractors is None else n_distractors
    scene = Scene.random(seed, required=task.objects, n_distractors=distractors)
    return Episode(seed=seed, task=task, scene=scene)
