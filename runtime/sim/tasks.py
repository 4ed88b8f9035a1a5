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

Language = Literal["en", "es", "fr", "de", "hi", "zh", "it", "nl", "sv", "ru", "ja", "id", "vi"]
#: The suite's languages: an episode drawn without a language takes one of these (a fixed list, so that
#: every seed keeps the task it always had).
LANGUAGES: tuple[Language, ...] = ("en", "es", "fr", "de", "hi", "zh")
#: More languages an instruction can be written in (chosen explicitly, never drawn): they widen the
#: demonstrations' languages so that a policy learns to read the instruction's objects in any language.
EXTRA_LANGUAGES: tuple[Language, ...] = ("it", "nl", "sv", "ru", "ja", "id", "vi")
ALL_LANGUAGES: tuple[Language, ...] = LANGUAGES + EXTRA_LANGUAGES

#: How high (metres above the table) an object's bottom must be for "pick up" / "lift" to count.
LIFT_HEIGHT_M = 0.05

# Object names per language, with the article each template needs. German and Russian: accusative (the
# case of every object in these imperatives, destinations included). Hindi is romanised.
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
    "it": {
        "carrot": "la carota", "eggplant": "la melanzana", "fish": "il pesce", "banana": "la banana",
        "spoon": "il cucchiaio", "cup": "la tazza", "corn": "il mais", "mushroom": "il fungo",
        "lemon": "il limone", "strawberry": "la fragola", "pan": "la padella", "pot": "la pentola",
        "bowl": "la ciotola", "plate": "il piatto", "towel": "l'asciugamano",
    },
    "nl": {
        "carrot": "de wortel", "eggplant": "de aubergine", "fish": "de vis", "banana": "de banaan",
        "spoon": "de lepel", "cup": "de beker", "corn": "de maïs", "mushroom": "de paddenstoel",
        "lemon": "de citroen", "strawberry": "de aardbei", "pan": "de koekenpan", "pot": "de kookpan",
        "bowl": "de kom", "plate": "het bord", "towel": "de handdoek",
    },
    "sv": {
        "carrot": "moroten", "eggplant": "auberginen", "fish": "fisken", "banana": "bananen",
        "spoon": "skeden", "cup": "koppen", "corn": "majsen", "mushroom": "svampen",
        "lemon": "citronen", "strawberry": "jordgubben", "pan": "stekpannan", "pot": "kastrullen",
        "bowl": "skålen", "plate": "tallriken", "towel": "handduken",
    },
    "ru": {
        "carrot": "морковку", "eggplant": "баклажан", "fish": "рыбу", "banana": "банан", "spoon": "ложку",
        "cup": "чашку", "corn": "кукурузу", "mushroom": "гриб", "lemon": "лимон", "strawberry": "клубнику",
        "pan": "сковороду", "pot": "кастрюлю", "bowl": "миску", "plate": "тарелку", "towel": "полотенце",
    },
    "ja": {
        "carrot": "にんじん", "eggplant": "なす", "fish": "魚", "banana": "バナナ", "spoon": "スプーン",
        "cup": "カップ", "corn": "とうもろこし", "mushroom": "きのこ", "lemon": "レモン", "strawberry": "いちご",
        "pan": "フライパン", "pot": "鍋", "bowl": "ボウル", "plate": "皿", "towel": "タオル",
    },
    "id": {
        "carrot": "wortel", "eggplant": "terong", "fish": "ikan", "banana": "pisang", "spoon": "sendok",
        "cup": "cangkir", "corn": "jagung", "mushroom": "jamur", "lemon": "jeruk lemon",
        "strawberry": "stroberi", "pan": "wajan", "pot": "panci", "bowl": "mangkuk", "plate": "piring",
        "towel": "handuk",
    },
    "vi": {
        "carrot": "củ cà rốt", "eggplant": "quả cà tím", "fish": "con cá", "banana": "quả chuối",
        "spoon": "cái thìa", "cup": "cái cốc", "corn": "bắp ngô", "mushroom": "cây nấm", "lemon": "quả chanh",
        "strawberry": "quả dâu tây", "pan": "cái chảo", "pot": "cái nồi", "bowl": "cái bát", "plate": "cái đĩa",
        "towel": "cái khăn",
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
    "it": {"pick": "prendi {obj}", "lift": "solleva {obj}", "in": "metti {obj} dentro {target}",
           "on": "metti {obj} sopra {target}", "then": "{first} e poi {second}"},
    "nl": {"pick": "pak {obj} op", "lift": "til {obj} op", "in": "leg {obj} in {target}",
           "on": "leg {obj} op {target}", "then": "{first} en dan {second}"},
    "sv": {"pick": "ta upp {obj}", "lift": "lyft {obj}", "in": "lägg {obj} i {target}",
           "on": "lägg {obj} på {target}", "then": "{first} och sedan {second}"},
    "ru": {"pick": "возьми {obj}", "lift": "подними {obj}", "in": "положи {obj} в {target}",
           "on": "положи {obj} на {target}", "then": "{first}, а потом {second}"},
    "ja": {"pick": "{obj}を取って", "lift": "{obj}を持ち上げて", "in": "{obj}を{target}に入れて",
           "on": "{obj}を{target}の上に置いて", "then": "{first}、それから{second}"},
    "id": {"pick": "ambil {obj}", "lift": "angkat {obj}", "in": "masukkan {obj} ke dalam {target}",
           "on": "letakkan {obj} di atas {target}", "then": "{first} lalu {second}"},
    "vi": {"pick": "nhặt {obj} lên", "lift": "nâng {obj} lên", "in": "đặt {obj} vào {target}",
           "on": "đặt {obj} lên {target}", "then": "{first} rồi {second}"},
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
