"""The parser: valid texts, every error code with its position, the hostile corpus, and properties."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark import Lark
from lark.exceptions import LarkError

from grammar_tools import MUTATION_CHARS, mutate
from vlm2vla_edge.grammars import LARK_START_RULES, load_lark
from vlm2vla_edge.runtime.action_text import (
    format_action_chunk,
    format_motion_plan,
    format_number,
    format_subtasks,
    gripper_texts,
    metres_text_in_cm,
)
from vlm2vla_edge.runtime.actions import Action, ActionChunk, MotionPlan, SubtaskList
from vlm2vla_edge.runtime.config import ActionLanguage, GripperValues
from vlm2vla_edge.runtime.errors import ConfigError
from vlm2vla_edge.runtime.parser import (
    ERROR_CODES,
    MAX_TEXT_CHARS,
    ParseError,
    parse_action_chunk,
    parse_motion_plan,
    parse_subtasks,
)

CORPUS_PATH = Path(__file__).parent / "data" / "hostile_parser.yaml"
PARSERS = {"action_chunk": parse_action_chunk, "subtasks": parse_subtasks, "motion_plan": parse_motion_plan}
LANG = ActionLanguage()
INVERTED = ActionLanguage(gripper=GripperValues(open=0.0, closed=1.0))


def _corpus() -> list[dict]:
    return yaml.safe_load(CORPUS_PATH.read_text(encoding="utf-8"))


def _text(entry: dict) -> str:
    if "text" in entry:
        return entry["text"]
    recipe = entry["recipe"]
    return recipe.get("prefix", "") + recipe["repeat"] * recipe["times"] + recipe.get("suffix", "")


def _code(parser, text: str, *args) -> ParseError:  # type: ignore[no-untyped-def]
    with pytest.raises(ParseError) as caught:
        parser(text, *args)
    return caught.value


# --- valid texts ------------------------------------------------------------------------------------


def test_example_chunk() -> None:
    chunk = parse_action_chunk("[[0.025, -0.01, 0, 1], [0, 0, 0.05, 0]]")
    assert chunk == ActionChunk((Action(0.025, -0.01, 0.0, 1.0), Action(0.0, 0.0, 0.05, 0.0)))


def test_ascii_whitespace_around_is_stripped_and_positions_count_it() -> None:
    assert parse_action_chunk(" \t\n[[0, 0, 0, 1]]\r\n") == ActionChunk((Action(0.0, 0.0, 0.0, 1.0),))
    error = _code(parse_action_chunk, "\n  [[0.5, 0, 0, 1]]")
    assert (error.code, error.position) == ("out_of_range", 5)


def test_non_ascii_whitespace_is_not_stripped() -> None:
    assert _code(parse_action_chunk, "\u00a0[[0, 0, 0, 1]]").code == "non_ascii"
    assert _code(parse_motion_plan, "\u3000Move down").code == "bad_start"


def test_negative_zero_becomes_zero() -> None:
    action = parse_action_chunk("[[-0.0, -0.000, 0.0, 0]]")[0]
    assert all(math.copysign(1.0, v) == 1.0 for v in action.translation())


def test_gripper_texts_follow_the_language() -> None:
    assert parse_action_chunk("[[0, 0, 0, 0]]", INVERTED)[0].gripper == 1.0
    assert parse_action_chunk("[[0, 0, 0, 1]]", INVERTED)[0].gripper == 0.0
    assert gripper_texts(LANG) == {"1": 1.0, "0": 0.0}


def test_language_v1_cannot_write_other_gripper_values() -> None:
    with pytest.raises(ConfigError, match="0 or 1"):
        parse_action_chunk("[[0, 0, 0, 1]]", ActionLanguage(gripper=GripperValues(open=2.0, closed=0.0)))
    with pytest.raises(ConfigError, match="version 3"):
        parse_action_chunk("[[0, 0, 0, 1]]", ActionLanguage(grammar_version="3"))


def test_limits_of_the_language() -> None:
    assert parse_action_chunk("[[0.2, -0.2, 0, 1]]")[0].dx == 0.2  # max_abs is inclusive
    assert _code(parse_action_chunk, "[[0.201, 0, 0, 1]]").code == "out_of_range"
    sixteen = "[" + ", ".join(["[0.001, 0, 0, 1]"] * 16) + "]"
    assert len(parse_action_chunk(sixteen)) == 16
    short = ActionLanguage(max_steps=3)
    four = "[" + ", ".join(["[0.001, 0, 0, 1]"] * 4) + "]"
    error = _code(parse_action_chunk, four, short)
    assert (error.code, error.position) == ("too_many_steps", 55)
    wide = ActionLanguage(max_abs_value_m=0.999)
    assert parse_action_chunk("[[0.999, -0.999, 0, 1]]", wide)[0].dy == -0.999


def test_subtasks_and_motion_plan() -> None:
    assert parse_subtasks('["Move to the carrot", "Grasp it"]') == SubtaskList(("Move to the carrot", "Grasp it"))
    assert parse_subtasks('["Déplacer la carotte"]\n').subtasks == ("Déplacer la carotte",)
    assert parse_motion_plan(" Move down 2 cm, then left.\n") == MotionPlan("Move down 2 cm, then left.")


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", _corpus(), ids=lambda e: f"{e.get('parser', 'chunk')}:{e['code']}:{e['why'][:30]}")
def test_hostile_corpus(entry: dict) -> None:
    parser = PARSERS[entry.get("parser", "action_chunk")]
    error = _code(parser, _text(entry))
    assert error.code == entry["code"], f"{entry['why']}: {error!r}"
    if "position" in entry:
        assert error.position == entry["position"], f"{entry['why']}: {error!r}"
    message = str(error)
    assert message and "\n" not in message and len(message) < 300


def test_corpus_is_big_and_varied() -> None:
    corpus = _corpus()
    assert len(corpus) >= 45
    assert all(set(e) <= {"text", "recipe", "code", "why", "parser", "position"} for e in corpus)
    assert all(e["code"] in ERROR_CODES for e in corpus)


EXTRA_CASES = [
    (parse_action_chunk, None, "not_text"),
    (parse_subtasks, b'["bytes"]', "not_text"),
    (parse_action_chunk, "[[0\ud800, 0, 0, 1]]", "bad_unicode"),
    (parse_subtasks, '["a\ud800"]', "bad_unicode"),
    (parse_subtasks, "[]", "empty"),
    (parse_subtasks, '[""]', "item_length"),
    (parse_subtasks, '["unclosed]', "bad_quote"),
    (parse_subtasks, '["Move"', "unbalanced_brackets"),
    (parse_subtasks, "Move to the carrot", "not_a_list"),
    (parse_motion_plan, "   ", "empty"),
]


@pytest.mark.parametrize(("parser", "text", "code"), EXTRA_CASES)
def test_extra_codes(parser, text, code: str) -> None:  # type: ignore[no-untyped-def]
    assert _code(parser, text).code == code


def test_every_code_is_exercised() -> None:
    """Each documented code is produced somewhere above, except the grammar's catch-all."""
    seen = {e["code"] for e in _corpus()} | {code for _, _, code in EXTRA_CASES}
    assert ERROR_CODES - seen == {"syntax"}


def test_syntax_fallback_carries_larks_position(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the diagnosis finds no precise reason (none is known to slip through: fuzzing finds no
    such text), the error is `syntax` at the character where Lark stopped, offset by the stripping."""
    from vlm2vla_edge.runtime import parser as parser_module

    monkeypatch.setattr(parser_module._ChunkDiagnosis, "run", lambda self: None)
    monkeypatch.setattr(parser_module, "_diagnose_subtasks", lambda s, offset: None)
    monkeypatch.setattr(parser_module, "_diagnose_motion_plan", lambda s, offset: None)
    error = _code(parse_action_chunk, "  [[0, 0, 0, 2]]")
    assert (error.code, error.position) == ("syntax", 13)
    assert "character 13 ('2')" in str(error)
    error = _code(parse_action_chunk, "[[0, 0, 0, 1]")
    assert (error.code, error.position) == ("syntax", 13)
    assert "end of the text" in str(error)
    assert _code(parse_subtasks, '["a"x]').code == "syntax"
    assert _code(parse_motion_plan, "Move\ndown").position == 4


def test_too_long_is_checked_first_and_cheap() -> None:
    huge = "[" * (10 * 1024 * 1024)
    began = time.perf_counter()
    for _ in range(200):
        error = _code(parse_action_chunk, huge)
    assert error.code == "too_long" and error.position is None
    assert time.perf_counter() - began < 1.0  # would take seconds if anything scanned the text
    assert _code(parse_action_chunk, "[" * MAX_TEXT_CHARS).code == "unbalanced_brackets"


# --- properties -------------------------------------------------------------------------------------

axis = st.floats(min_value=-0.2, max_value=0.2, allow_nan=False)
actions = st.builds(Action, axis, axis, axis, st.sampled_from([0.0, 1.0]))
chunks = st.lists(actions, min_size=1, max_size=16).map(lambda a: ActionChunk(tuple(a)))


@settings(max_examples=300, deadline=None)
@given(chunk=chunks, decimals=st.sampled_from([1, 2, 3]), inverted=st.booleans())
def test_canonical_chunks_round_trip(chunk: ActionChunk, decimals: int, inverted: bool) -> None:
    language = ActionLanguage(decimals=decimals, gripper=INVERTED.gripper if inverted else LANG.gripper)
    text = format_action_chunk(chunk, language)
    rounded = [[round(v, decimals) + 0.0 for v in a.translation()] for a in chunk]  # + 0.0: no -0.0
    expected = ActionChunk(tuple(Action(*xyz, a.gripper) for xyz, a in zip(rounded, chunk)))
    assert parse_action_chunk(text, language) == expected
    assert format_action_chunk(expected, language) == text  # canonical: one spelling per value


@settings(max_examples=200, deadline=None)
@given(
    subtasks=st.lists(
        # Without what v1 excludes (grammars/subtasks.gbnf): quote, backslash, controls, zero-width and
        # bidirectional-override characters, line/paragraph separators, the byte-order mark.
        st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\' + "".join(
            chr(c) for c in [*range(0x200B, 0x2010), *range(0x2028, 0x202F), *range(0x2060, 0x206A), 0xFEFF])),
            min_size=1, max_size=96),
        min_size=1,
        max_size=8,
    )
)
def test_subtasks_round_trip(subtasks: list[str]) -> None:
    assert parse_subtasks(format_subtasks(subtasks)).subtasks == tuple(subtasks)


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u200b", "\u202e", "\u2066", "\ufeff"])
def test_subtasks_with_invisible_or_line_breaking_characters_are_refused(char: str) -> None:
    with pytest.raises(ParseError):
        parse_subtasks(format_subtasks([f"Move to the{char} carrot"]))


@settings(max_examples=200, deadline=None)
@given(text=st.from_regex(r"[A-Za-z][A-Za-z0-9 ,.;:'()/%+-]{0,159}", fullmatch=True))
def test_motion_plans_round_trip(text: str) -> None:
    assert parse_motion_plan(format_motion_plan(text)).text == text.rstrip(" ")


HOSTILE_ALPHABET = st.sampled_from(MUTATION_CHARS + list("1nNaIfEx{}:_*"))
any_text = st.one_of(
    st.text(max_size=80),
    st.text(HOSTILE_ALPHABET, max_size=80),
    st.builds(
        lambda n: mutate(f"[[0.0{n % 10}, -0.1, 0, 1], [0, 0, 0.05, 0]]", random.Random(n)), st.integers(0, 10**6)
    ),
    st.builds(lambda n: mutate('["Move to the carrot", "Grasp it"]', random.Random(n)), st.integers(0, 10**6)),
)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_text)
def test_arbitrary_text_only_raises_parse_error(text: str) -> None:
    for parser in PARSERS.values():
        try:
            parser(text)
        except ParseError as error:
            assert error.code in ERROR_CODES and error.code != "syntax", error  # the diagnosis names a reason
            assert error.position is None or 0 <= error.position <= len(text)


_LARK = Lark(load_lark(), parser="lalr", lexer="contextual", start=list(LARK_START_RULES.values()))
# Centimetres with the widest bound admit every number the grammar writes: decimals (read as fractions of a
# centimetre) and 1-2 digit integers alike.
_WIDE = ActionLanguage(grammar_version="2", units="cm", decimals=2, max_abs_value_m=0.999, max_steps=16)


@settings(max_examples=600, deadline=None)
@given(text=any_text)
def test_parser_accepts_exactly_what_the_grammar_accepts(text: str) -> None:
    """With the widest semantic limits, the parser's verdict on stripped text is the grammar's (lone
    surrogates aside: they are not Unicode text, so the parser refuses them before the grammar)."""
    text = text.strip(" \t\n\r\x0b\x0c")
    has_surrogate = any("\ud800" <= c <= "\udfff" for c in text)
    parsers = {"action_chunk": lambda t: parse_action_chunk(t, _WIDE), "subtasks": parse_subtasks,
               "motion_plan": parse_motion_plan}  # fmt: skip
    for name, parser in parsers.items():
        try:
            _LARK.parse(text, start=LARK_START_RULES[name])
            grammar_ok = not has_surrogate
        except LarkError:
            grammar_ok = False
        try:
            parser(text)
            parser_ok = True
        except ParseError:
            parser_ok = False
        assert parser_ok == grammar_ok, (name, text)


# --- formatter --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [(0.0, 3, "0"), (-0.0, 3, "0"), (0.0004, 3, "0"), (-0.0004, 3, "0"), (0.025, 3, "0.025"), (-0.01, 3, "-0.01"),
     (0.1, 3, "0.1"), (0.05, 1, "0.1"), (0.15, 1, "0.1"), (0.999, 3, "0.999"), (-0.12345, 2, "-0.12")],
)  # fmt: skip
def test_format_number(value: float, decimals: int, text: str) -> None:
    assert format_number(value, decimals) == text


@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [(0.0, 2, "0"), (-0.004, 2, "0"), (-0.24, 2, "-24"), (-0.02, 2, "-2"), (0.1, 2, "10"), (0.994, 2, "99"),
     (0.05, 1, "10"), (-0.16, 1, "-20"), (0.125, 2, "12")],
)  # fmt: skip
def test_format_number_in_centimetres(value: float, decimals: int, text: str) -> None:
    """Centimetres write the rounded metre value with its point moved two places: the same digits."""
    assert format_number(value, decimals, "cm") == text
    assert text == metres_text_in_cm(format_number(value, decimals))


def test_metres_text_in_cm_is_exact() -> None:
    assert [metres_text_in_cm(t) for t in ("0", "-0.24", "0.1", "0.125", "-0.05", "0.0")] == [
        "0", "-24", "10", "12.5", "-5", "0"]
    with pytest.raises(ValueError, match="decimals must be 1 or 2"):
        format_number(0.1, 3, "cm")
    with pytest.raises(ValueError, match="units"):
        format_number(0.1, 2, "mm")
    with pytest.raises(ValueError, match="below 1 in magnitude"):
        format_number(0.999, 2, "cm")  # 100 cm: two digits cannot say it


CM = ActionLanguage(grammar_version="2", units="cm", decimals=2)


@settings(max_examples=300, deadline=None)
@given(chunk=chunks, decimals=st.sampled_from([1, 2]))
def test_centimetre_chunks_round_trip(chunk: ActionChunk, decimals: int) -> None:
    """Written as integer centimetres, a chunk parses back to the same metres as the metre language's text."""
    language = CM.model_copy(update={"decimals": decimals})
    metres = ActionLanguage(decimals=decimals)
    text = format_action_chunk(chunk, language)
    assert "." not in text
    assert parse_action_chunk(text, language) == parse_action_chunk(format_action_chunk(chunk, metres), metres)


def test_centimetre_limits() -> None:
    assert parse_action_chunk("[[-24, 0, 5, 1]]", CM.model_copy(update={"max_abs_value_m": 0.5}))[0].dx == -0.24
    assert parse_action_chunk("[[20, -20, 0, 0]]", CM)[0].dy == -0.2  # max_abs is inclusive in cm too
    error = _code(parse_action_chunk, "[[21, 0, 0, 1]]", CM)
    assert error.code == "out_of_range" and "(cm)" in str(error)
    assert _code(parse_action_chunk, "[[100, 0, 0, 1]]", CM).code == "bad_number"
    assert _code(parse_action_chunk, "[[05, 0, 0, 1]]", CM).code == "bad_number"
    # The same text in a metre language is 24 m: refused by the bound, never read as centimetres.
    assert _code(parse_action_chunk, "[[-24, 0, 5, 1]]").code == "out_of_range"


def test_centimetres_need_grammar_version_2() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="units 'cm' need grammar_version 2"):
        ActionLanguage(units="cm", decimals=2)
    with pytest.raises(ValidationError, match="decimals must be 1 or 2"):
        ActionLanguage(grammar_version="2", units="cm", decimals=3)
    assert ActionLanguage(grammar_version="2").units == "m"  # v2 still writes metres when asked to


def test_subtask_offset_plans_need_waypoint_actions() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs actions 'waypoints'"):
        ActionLanguage(motion_plan="subtask_offset")
    assert ActionLanguage(actions="waypoints", motion_plan="subtask_offset").motion_plan == "subtask_offset"


@pytest.mark.parametrize("value", [1.0, -1.0, 0.9996, 1.5, math.inf, -math.inf, math.nan])
def test_format_number_refuses(value: float) -> None:
    with pytest.raises(ValueError):
        format_number(value, 3)


def test_format_refuses_what_v1_cannot_say() -> None:
    with pytest.raises(ValueError, match="gripper"):
        format_action_chunk(ActionChunk((Action(0, 0, 0, 0.5),)), LANG)
    with pytest.raises(ValueError, match="empty"):
        format_action_chunk(ActionChunk(()), LANG)
    with pytest.raises(ValueError, match="max_steps"):
        format_action_chunk(ActionChunk((Action(0, 0, 0, 1.0),) * 17), LANG)
    with pytest.raises(ValueError, match="cannot hold"):
        format_subtasks(['say "hi"'])
    with pytest.raises(ValueError, match="1 to 8"):
        format_subtasks(["a"] * 9)
    with pytest.raises(ValueError, match="single string"):
        format_subtasks("Move")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one line"):
        format_motion_plan("Move\ndown")


def test_plan_gripper_reads_what_the_annotator_writes() -> None:
    """Every ending `waypoint_plan_text` writes is read back as the gripper the chunk leaves."""
    from vlm2vla_edge.runtime.action_text import plan_gripper
    from vlm2vla_edge.train.data.chunks import waypoint_plan_text

    for event, gripper_open, expected in (("close", None, False), ("open", None, True), (None, True, True),
                                          (None, False, False)):  # fmt: skip
        for units in ("m", "cm"):
            plan = waypoint_plan_text("Move to the lemon", (0.1, -0.02, 0.0), event, 2, gripper_open=gripper_open,
                                      units=units)  # fmt: skip
            assert plan_gripper(plan) is expected, plan
    assert plan_gripper("Move the gripper down.") is None
    assert plan_gripper("Move to the lemon: (1, 2, 3), gripper open") is None  # not the annotator's full ending
