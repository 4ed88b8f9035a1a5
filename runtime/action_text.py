"""Writing actions, subtasks and motion plans as action-language text (versions 1 and 2).

The training annotator writes its targets with these functions and the runtime parses the model's
text with `vlm2vla_edge.runtime.parser`, so the two must agree exactly: for every chunk whose values
fit the language, `parse_action_chunk(format_action_chunk(chunk, lang), lang)` equals the chunk with
its translations rounded to `lang.decimals` (tests/test_parser.py checks this property).

Numbers are canonical: "0" for zero, otherwise a signed decimal below 1 with trailing zeros stripped
("0.05", "-0.125") in metres, or a signed integer ("5", "-24") in centimetres (v2), so one value has one
spelling and costs the fewest tokens.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Sequence

from vlm2vla_edge.grammars import MOTION_PLAN_CHARS, MOTION_PLAN_MAX_CHARS
from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import ConfigError

SEPARATOR = ", "
# Version 1 writes the gripper as one digit: these are the only texts the grammar admits.
_GRIPPER_TEXTS: dict[float, str] = {0.0: "0", 1.0: "1"}
_MAX_DECIMALS = 3  # the v1 grammar admits 1-3 decimals

# Subtask and motion-plan character rules of v1 (grammars/subtasks.gbnf, grammars/motion_plan.gbnf).
_SUBTASK_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')
_MAX_SUBTASKS = 8
_MAX_SUBTASK_CHARS = 96
_MOTION_PLAN = re.compile(f"[A-Za-z][{MOTION_PLAN_CHARS}]{{0,{MOTION_PLAN_MAX_CHARS - 1}}}")


def gripper_texts(language: ActionLanguage) -> dict[str, float]:
    """Map each gripper text of the language to the canonical `Action.gripper` (1.0 open, 0.0 closed).

    A bundle may swap the meanings (open written as "0"), but v1 can only write 0 and 1, so any other
    configured value is a configuration error rather than something the parser could ever see.
    """
    values = language.gripper
    texts: dict[str, float] = {}
    for canonical, written in ((1.0, values.open), (0.0, values.closed)):
        text = _GRIPPER_TEXTS.get(float(written))
        if text is None:
            raise ConfigError(
                f"action language v1 writes gripper values as 0 or 1, but the bundle's gripper "
                f"{'open' if canonical else 'closed'} value is {written!r}"
            )
        texts[text] = canonical
    return texts


def format_number(value: float, decimals: int, units: str = "m") -> str:
    """Canonical text of one translation value (metres): rounded to `decimals` of a metre, trailing zeros
    stripped, then written in `units` ("-0.24" in m, "-24" in cm).

    Rounding is Python's correctly rounded decimal formatting (half-even on the exact binary value), the
    same as `round(value, decimals)`; centimetres shift the rounded metre text's decimal point, so the two
    units state the same value digit for digit. Raises `ValueError` for non-finite values and for values
    whose rounded magnitude is 1 m or more, which the language cannot write.
    """
    if units not in ("m", "cm"):
        raise ValueError(f"units must be m or cm, got {units!r}")
    if units == "cm":
        if not 1 <= decimals <= 2:
            raise ValueError(f"decimals must be 1 or 2 for centimetres (integers), got {decimals}")
        return metres_text_in_cm(format_number(value, decimals))
    if not 1 <= decimals <= _MAX_DECIMALS:
        raise ValueError(f"decimals must be 1 to {_MAX_DECIMALS} in metres, got {decimals}")
    if not math.isfinite(value):
        raise ValueError(f"cannot write the non-finite value {value!r} as an action-language number")
    text = f"{value:.{decimals}f}"
    negative = text.startswith("-")
    digits = text.lstrip("-")
    if not digits.startswith("0."):
        raise ValueError(f"{value!r} rounds to {text}, but action-language numbers must be below 1 in magnitude")
    digits = digits.rstrip("0").rstrip(".")
    if digits == "0":
        return "0"  # also turns a rounded -0.000 into "0"
    return f"-{digits}" if negative else digits


def metres_text_in_cm(text: str) -> str:
    """A decimal number of metres ("-0.24", "0.125", "0") as the same number of centimetres ("-24", "12.5",
    "0"): the decimal point moves two places, exactly, so no value changes by a rounding."""
    value = Decimal(text) * 100
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def rounded_offset(start: Sequence[float], end: Sequence[float], decimals: int) -> tuple[float, float, float]:
    """end - start with both rounded to `decimals` first. The simulator's scene text and the labeller's
    waypoint targets both state offsets this way, so they agree digit for digit instead of disagreeing at
    rounding ties."""
    scale = 10**decimals
    d = [(round(float(e) * scale) - round(float(s) * scale)) / scale + 0.0 for s, e in zip(start, end)]
    return (d[0], d[1], d[2])


def _format_action(action: Action, language: ActionLanguage, gripper_by_value: dict[float, str]) -> str:
    gripper = gripper_by_value.get(action.gripper)
    if gripper is None:
        raise ValueError(f"gripper value {action.gripper!r} is neither open (1.0) nor closed (0.0)")
    numbers = [format_number(v, language.decimals, language.units) for v in action.translation()]
    return "[" + SEPARATOR.join([*numbers, gripper]) + "]"


def format_action_chunk(chunk: ActionChunk, language: ActionLanguage) -> str:
    """The canonical text of a chunk, e.g. `[[0.025, -0.01, 0, 1], [0, 0, 0.05, 0]]`.

    Raises `ValueError` for an empty chunk, a chunk longer than `language.max_steps`, a non-canonical
    gripper value or a translation v1 cannot write (see `format_number`). Translations above
    `language.max_abs_value_m` are written (the grammar admits them) but the parser will reject them.
    """
    if len(chunk) == 0:
        raise ValueError("cannot write an empty action chunk: the language needs at least one action")
    if len(chunk) > language.max_steps:
        raise ValueError(f"the chunk has {len(chunk)} actions, more than max_steps = {language.max_steps}")
    by_value = {canonical: text for text, canonical in gripper_texts(language).items()}
    return "[" + SEPARATOR.join(_format_action(a, language, by_value) for a in chunk) + "]"


#: How a waypoint plan ends, stating the gripper its chunk leaves (train/data/chunks.waypoint_plan_text
#: writes them): True open, False closed.
PLAN_GRIPPER_ENDINGS: dict[str, bool] = {
    ", then close the gripper.": False,
    ", then open the gripper.": True,
    ", gripper open.": True,
    ", gripper closed.": False,
}


#: Every way a waypoint plan ends: a full stop alone (no gripper stated), or a gripper ending.
WAYPOINT_PLAN_ENDINGS: tuple[str, ...] = (".", *PLAN_GRIPPER_ENDINGS)


def plan_gripper(plan: str) -> bool | None:
    """The gripper a waypoint plan says its chunk leaves (True open, False closed), or None if it does not
    end with one of `PLAN_GRIPPER_ENDINGS`."""
    for ending, is_open in PLAN_GRIPPER_ENDINGS.items():
        if plan.endswith(ending):
            return is_open
    return None


def plan_gripper_text(plan: str, language: ActionLanguage) -> str | None:
    """The gripper text ("0", "1") the language writes for the gripper the plan states, or None."""
    is_open = plan_gripper(plan)
    if is_open is None:
        return None
    return next(text for text, canonical in gripper_texts(language).items() if canonical == float(is_open))


def format_subtasks(subtasks: Sequence[str]) -> str:
    """A subtask list as `["Move to the carrot", "Grasp the carrot"]` (v1: 1-8 items of 1-96 characters,
    no double quote, backslash or control character; no escaping exists, so such text is refused)."""
    if isinstance(subtasks, str):
        raise ValueError("format_subtasks takes a list of subtasks, not a single string")
    if not 1 <= len(subtasks) <= _MAX_SUBTASKS:
        raise ValueError(f"a subtask list has 1 to {_MAX_SUBTASKS} subtasks, got {len(subtasks)}")
    for index, subtask in enumerate(subtasks):
        if not 1 <= len(subtask) <= _MAX_SUBTASK_CHARS:
            raise ValueError(f"subtask {index} has {len(subtask)} characters; allowed are 1 to {_MAX_SUBTASK_CHARS}")
        bad = _SUBTASK_FORBIDDEN.search(subtask)
        if bad is not None:
            raise ValueError(f"subtask {index} contains {bad.group()!r}, which v1 subtasks cannot hold")
        if any("\ud800" <= c <= "\udfff" for c in subtask):
            raise ValueError(f"subtask {index} contains a lone surrogate, which is not valid Unicode text")
    return "[" + SEPARATOR.join(f'"{s}"' for s in subtasks) + "]"


def format_motion_plan(text: str) -> str:
    """A motion plan as its one line of text, checked against v1 (1-160 characters, starting with a
    letter; letters, digits, spaces and `,.;:'()/%+-`)."""
    if _MOTION_PLAN.fullmatch(text) is None:
        raise ValueError(
            "a v1 motion plan is one line of 1-160 characters that starts with a letter and holds only "
            "letters, digits, spaces and ,.;:'()/%+-"
        )
    return text
