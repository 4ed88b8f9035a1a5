"""The objects and destinations of an instruction, in English or any language of the simulator's task suite.

English text goes through verb and preposition patterns; other text is matched against the known
objects' names in every language the task suite uses (the simulator's vocabulary, `sim.tasks.NOUNS`,
and its catalogue says which objects are containers: the simulator ships with the runtime, and the
task suite is what the demonstrations were recorded in); failing both, the parts are generic ("the
object", "the target"). The subtask names (`subtasks`) are built from these parts.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from vlm2vla_edge.runtime.sim.scene import CATALOGUE
from vlm2vla_edge.runtime.sim.tasks import NOUNS


@dataclass(frozen=True)
class TaskPart:
    """One clause of an instruction: the object handled and where it goes (noun phrases with article)."""

    obj: str
    destination: str | None = None


@dataclass(frozen=True)
class ParsedInstruction:
    parts: tuple[TaskPart, ...]
    sentence: str  # the (English, when known) instruction as one clean subtask, for episodes without grasps
    method: str  # "english", "nouns" or "generic": how the objects were found


_ARTICLES = re.compile(r"^(?:the|a|an|some|that|this|these|those|your)\s+")
_PLACE_VERBS = r"(?:put|place|move|set|drop|transfer|stack|lay|bring|push|slide|pour|flip|sweep|turn|throw)"
_TAKE_VERBS = r"(?:pick\s+up|pick|lift\s+up|lift|grab|grasp|take|raise|hold|get|remove)"
_PREPOSITIONS = (
    r"(?:on\s+top\s+of|in\s+front\s+of|next\s+to|to\s+the\s+(?:left|right)\s+of|inside\s+of|inside|into|onto|"
    r"in|on|to|towards|toward|near|over|under|beside|behind|at)"
)
_CLAUSE_SPLIT = re.compile(r"\s*(?:,\s*and\s+then|\band\s+then\b|,\s*then\b|\bthen\b|;|\.\s+)\s*")


def _noun_phrase(text: str) -> str | None:
    words = text.strip(" ,.!?").lower()
    words = re.sub(r"\s+(?:up|please|now|carefully)$", "", words)
    while True:
        stripped = _ARTICLES.sub("", words)
        if stripped == words:
            break
        words = stripped
    words = re.sub(r"[^a-z0-9 '\-]", "", words).strip()
    tokens = words.split()
    if not tokens or len(tokens) > 6:
        return None
    return "the " + " ".join(tokens)


def _parse_english_clause(clause: str, generic: bool) -> TaskPart | None:
    """A clause by the placing and taking verbs; with `generic`, also "<any verb> <object> [<prep> <place>]"."""
    clause = clause.strip(" ,.!?").lower()
    clause = re.sub(r"^(?:please\s+|now\s+|robot,?\s+)+", "", clause)
    m = re.match(rf"^{_PLACE_VERBS}\s+(?P<obj>.+?)\s+{_PREPOSITIONS}\s+(?P<dest>.+)$", clause)
    if m:
        obj, dest = _noun_phrase(m["obj"]), _noun_phrase(m["dest"])
        if obj:
            return TaskPart(obj, dest)
    m = re.match(
        rf"^{_TAKE_VERBS}\s+(?P<obj>.+?)(?:\s+up)?(?:\s+(?:from|off|out\s+of|off\s+of)\s+(?P<src>.+))?$", clause
    )
    if m:
        obj = _noun_phrase(m["obj"])
        if obj:
            return TaskPart(obj, None)
    m = re.match(rf"^[a-z]+\s+(?P<obj>.+?)(?:\s+{_PREPOSITIONS}\s+(?P<dest>.+))?$", clause) if generic else None
    if m:
        obj = _noun_phrase(m["obj"])
        if obj:
            return TaskPart(obj, _noun_phrase(m["dest"]) if m["dest"] else None)
    return None


@functools.lru_cache(maxsize=1)
def _noun_table() -> list[tuple[str, str]]:
    """(surface form, English name) from the simulator's multilingual nouns, longest forms first."""
    forms: dict[str, str] = {}
    for nouns in NOUNS.values():
        for english, phrase in nouns.items():
            forms[phrase.lower()] = english
            bare = re.sub(r"^(?:the|la|el|le|l'|les|die|den|das|der|il|de|het)\s*", "", phrase.lower())
            if len(bare) >= 2:
                forms.setdefault(bare, english)
    return sorted(forms.items(), key=lambda item: -len(item[0]))


def _find_known_nouns(text: str) -> list[str]:
    """English names of the known objects in `text`, in order of appearance (any language of the table)."""
    lowered = unicodedata.normalize("NFC", text.lower())
    hits: list[tuple[int, str]] = []
    taken = [False] * len(lowered)
    for form, english in _noun_table():
        is_word = form.isascii()
        for m in re.finditer(re.escape(form), lowered):
            a, b = m.span()
            if is_word and ((a > 0 and lowered[a - 1].isalpha()) or (b < len(lowered) and lowered[b].isalpha())):
                continue
            if any(taken[a:b]):
                continue
            for i in range(a, b):
                taken[i] = True
            hits.append((a, english))
    return [english for _, english in sorted(hits)]


def _sentence(text: str) -> str:
    clean = " ".join(re.sub(r'["\\\x00-\x1f\x7f]', " ", text).split()).strip(" .")
    clean = clean[:1].upper() + clean[1:]
    return (clean[:93] + "...") if len(clean) > 96 else (clean or "Do the task")


def parse_instruction(instruction: str, instruction_en: str | None = None) -> ParsedInstruction:
    """Objects and destinations of an instruction, clause by clause ("... then ...").

    English text (the canonical `instruction_en` when the episode has one) goes through verb and
    preposition patterns; otherwise the known objects of the simulator's noun table are looked up in
    any of its languages (in order: first the object, then the destination of each placement); else
    the parts are the generic "the object" and "the target".
    """
    english = instruction_en or (instruction if instruction.isascii() else None)

    def english_parts(generic: bool) -> list[TaskPart]:
        clauses = [c for c in _CLAUSE_SPLIT.split(english or "") if c.strip()]
        return [p for p in (_parse_english_clause(c, generic) for c in clauses) if p]

    # The canonical English form is trusted as English; an ASCII instruction may be French or Spanish,
    # so for it the known verbs come first, then the noun table, and only then any verb.
    parts = english_parts(generic=instruction_en is not None) if english else []
    if parts:
        return ParsedInstruction(tuple(parts), _sentence(english or instruction), "english")
    nouns = _find_known_nouns(instruction)
    if nouns:
        parts = []
        i = 0
        while i < len(nouns):
            obj = nouns[i]
            dest = nouns[i + 1] if i + 1 < len(nouns) and CATALOGUE[nouns[i + 1]].container else None
            parts.append(TaskPart(f"the {obj}", f"the {dest}" if dest else None))
            i += 2 if dest else 1
        return ParsedInstruction(tuple(parts), _sentence(english or instruction), "nouns")
    parts = english_parts(generic=True) if english else []
    if parts:
        return ParsedInstruction(tuple(parts), _sentence(english or instruction), "english")
    return ParsedInstruction((TaskPart("the object", "the target"),), _sentence(english or instruction), "generic")
