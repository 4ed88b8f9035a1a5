"""The GBNF files (as llguidance enforces them) and action_language.lark accept the same language.

Both directions are sampled independently: strings derived from the GBNF rules must parse with Lark,
strings derived from the compiled Lark rules must be accepted by llguidance, and thousands of near
misses (one or two characters inserted, deleted or replaced, or a slice duplicated) must get the same
answer from both. Everything is seeded.
"""

from __future__ import annotations

import random
import re

import pytest
from lark import Lark
from lark.exceptions import LarkError

from grammar_tools import GbnfReader, LlgAcceptor, derive_gbnf, derive_lark, mutate
from vlm2vla_edge import grammars
from vlm2vla_edge.grammars import (
    GBNF_NAMES,
    LARK_START_RULES,
    GbnfName,
    GrammarError,
    load_gbnf,
    load_lark,
    validate_gbnf,
)

pytest.importorskip("llguidance")

SAMPLES_PER_SIDE = 1000
MUTANTS_PER_GRAMMAR = 3000


@pytest.fixture(scope="module")
def lark_parser() -> Lark:
    return Lark(load_lark(), parser="lalr", lexer="contextual", start=list(LARK_START_RULES.values()))


@pytest.fixture(scope="module", params=GBNF_NAMES)
def grammar(request: pytest.FixtureRequest, lark_parser: Lark):  # type: ignore[no-untyped-def]
    name = request.param
    text = load_gbnf(name)
    start = LARK_START_RULES[name]

    def lark_accepts(s: str) -> bool:
        try:
            lark_parser.parse(s, start=start)
        except LarkError:
            return False
        return True

    return name, GbnfReader(text).read(), LlgAcceptor(text), start, lark_accepts


def test_resources_load() -> None:
    assert grammars.GRAMMAR_VERSION == "2" and grammars.SUPPORTED_GRAMMAR_VERSIONS == ("1", "2")
    for name in GBNF_NAMES:
        assert "root" in load_gbnf(name)
    assert "action_chunk" in load_lark()
    with pytest.raises(GrammarError, match="unknown grammar"):
        load_gbnf("actions")  # type: ignore[arg-type]


def test_the_plan_text_rule_in_python_is_the_shipped_grammars() -> None:
    """runtime/action_text.py, runtime/parser.py and waypoint_plan_gbnf check plan text with MOTION_PLAN_CHARS and
    MOTION_PLAN_MAX_CHARS: they must say what motion_plan.gbnf says."""
    root = f"root ::= [A-Za-z] [{grammars.MOTION_PLAN_CHARS}]{{0,{grammars.MOTION_PLAN_MAX_CHARS - 1}}}"
    assert root in load_gbnf("motion_plan").splitlines()


def test_shipped_gbnf_compile() -> None:
    for name in GBNF_NAMES:
        validate_gbnf(load_gbnf(name), name)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('root ::= "[" item "]"', r"rule 'item'"),
        ('root ::= "a" (', "not a valid GBNF grammar"),
        ('root ::= "a" rep\nrep ::= "b"{3,1} [x]', r"in rule 'rep'.*range end"),
        ('root ::= "a" myRule\nmyRule ::= [b]{5,2} "c"', r"in rule 'myRule'"),
    ],
)
def test_broken_gbnf_named(text: str, pattern: str) -> None:
    with pytest.raises(GrammarError, match=pattern):
        validate_gbnf(text, "test.gbnf")


def test_examples_agree(grammar) -> None:  # type: ignore[no-untyped-def]
    """Hand-picked boundary cases, so a regression names a readable string."""
    name, _, llg, _, lark_accepts = grammar
    cases = {
        "action_chunk": {
            "[[0.025, -0.01, 0, 1], [0, 0, 0.05, 0]]": True,
            "[[0.0, -0.0, 0.999, 0]]": True,
            "[[-24, -2, 5, 1]]": True,  # v2: integers (centimetres)
            "[[99, -1, 0.5, 0]]": True,
            "[[100, 0, 0, 1]]": False,
            "[[05, 0, 0, 1]]": False,
            "[[-0.24, 1.5, 0, 1]]": False,
            "[[0, 0, 0, 2]]": False,
            "[" + ", ".join(["[0, 0, 0, 1]"] * 16) + "]": True,
            "[" + ", ".join(["[0, 0, 0, 1]"] * 17) + "]": False,
            "[[-0, 0, 0, 1]]": False,
            "[[0.1234, 0, 0, 1]]": False,
            "[[0, 0, 0, 0.5]]": False,
            "[[0,0,0,1]]": False,
            "[[0, 0, 0, 1]] ": False,
            "[]": False,
        },
        "subtasks": {
            '["Move to the carrot", "Grasp it"]': True,
            '["' + "é" * 96 + '"]': True,
            '["' + "a" * 97 + '"]': False,
            '[""]': False,
            '["a\\"b"]': False,
            "['a']": False,
            "[" + ", ".join(['"x"'] * 8) + "]": True,
            "[" + ", ".join(['"x"'] * 9) + "]": False,
        },
        "motion_plan": {
            "Move the gripper primarily down and slightly to the right.": True,
            "a" * 160: True,
            "a" * 161: False,
            "1 down": False,
            "Move down\nthen left": False,
            "Move down 5%, (x/y) +- 'z'; ok: done": True,
        },
    }[name]
    for text, expected in cases.items():
        assert llg.accepts(text) is expected, text
        assert lark_accepts(text) is expected, text


def test_gbnf_samples_parse_with_lark(grammar) -> None:  # type: ignore[no-untyped-def]
    name, rules, llg, _, lark_accepts = grammar
    rng = random.Random(f"gbnf-{name}")
    for _ in range(SAMPLES_PER_SIDE):
        text = derive_gbnf(rules, rng)
        assert llg.accepts(text), f"generator bug: llguidance rejects its own grammar's {text!r}"
        assert lark_accepts(text), f"Lark rejects {text!r}, which {name}.gbnf admits"


def test_lark_samples_accepted_by_llguidance(grammar, lark_parser: Lark) -> None:  # type: ignore[no-untyped-def]
    name, _, llg, start, lark_accepts = grammar
    rng = random.Random(f"lark-{name}")
    for _ in range(SAMPLES_PER_SIDE):
        text = derive_lark(lark_parser, start, rng)
        assert lark_accepts(text), f"generator bug: Lark rejects its own grammar's {text!r}"
        assert llg.accepts(text), f"{name}.gbnf (llguidance) rejects {text!r}, which the Lark grammar admits"


def test_near_misses_get_the_same_answer(grammar, lark_parser: Lark) -> None:  # type: ignore[no-untyped-def]
    name, rules, llg, start, lark_accepts = grammar
    rng = random.Random(f"mutants-{name}")
    accepted = rejected = 0
    for i in range(MUTANTS_PER_GRAMMAR):
        seed = derive_gbnf(rules, rng) if i % 2 else derive_lark(lark_parser, start, rng)
        text = mutate(seed, rng)
        verdict = llg.accepts(text)
        assert lark_accepts(text) is verdict, f"llguidance says {verdict}, Lark says {not verdict}, for {text!r}"
        accepted += verdict
        rejected += not verdict
    # Mutants must exercise both answers, or the comparison proves nothing.
    assert accepted > MUTANTS_PER_GRAMMAR // 20 and rejected > MUTANTS_PER_GRAMMAR // 4, (accepted, rejected)


def test_fast_acceptance_matches_decoder_path(grammar, lark_parser: Lark) -> None:  # type: ignore[no-untyped-def]
    """`validate_tokens` (used above for speed) gives the same verdict as consuming tokens like a decoder."""
    name, rules, llg, start, _ = grammar
    rng = random.Random(f"crosscheck-{name}")
    for _ in range(100):
        text = mutate(derive_gbnf(rules, rng), rng)
        assert llg.accepts(text) is llg.accepts_by_consuming(text), text


# --- the action grammar narrowed to a bundle's bounds ------------------------------------------------

NARROWINGS = [
    (0.2, 3, 16, "m"), (0.05, 2, 4, "m"), (0.123, 3, 10, "m"), (0.2, 1, 1, "m"), (0.999, 3, 16, "m"),
    (0.5, 2, 4, "cm"), (0.2, 2, 16, "cm"), (0.055, 2, 3, "cm"), (0.35, 1, 2, "cm"), (0.999, 2, 16, "cm"),
]  # fmt: skip


def _language(max_abs: float, decimals: int, steps: int, units: str):  # type: ignore[no-untyped-def]
    from vlm2vla_edge.runtime.config import ActionLanguage

    return ActionLanguage(grammar_version="2" if units == "cm" else "1", units=units, max_abs_value_m=max_abs,
                          decimals=decimals, max_steps=steps)  # fmt: skip


@pytest.mark.parametrize(("max_abs", "decimals", "steps", "units"), NARROWINGS)
def test_narrowed_action_grammar_only_admits_what_parses(max_abs: float, decimals: int, steps: int, units: str) -> None:
    """Whatever the decoder can write under the narrowed grammar, the parser accepts with the same
    bounds: no out_of_range or too_many_steps retries are possible."""
    from vlm2vla_edge.grammars import action_chunk_gbnf
    from vlm2vla_edge.runtime.parser import parse_action_chunk

    language = _language(max_abs, decimals, steps, units)
    text = action_chunk_gbnf(max_abs, decimals, steps, units)
    rules = GbnfReader(text).read()
    generic = LlgAcceptor(load_gbnf("action_chunk"))
    rng = random.Random(11)
    for _ in range(400):
        sample = derive_gbnf(rules, rng)
        chunk = parse_action_chunk(sample, language)  # raises on any violation
        assert len(chunk) <= steps
        assert generic.accepts(sample), sample  # still a sentence of the generic grammar
        number = r"0|-?0\.[0-9]{1,3}" if units == "m" else r"0|-?[1-9][0-9]?"  # each unit writes one form only
        for action in re.findall(r"\[([^\[\]]*)\]", sample):
            assert all(re.fullmatch(number, v) for v in action.split(", ")[:3]), sample


@pytest.mark.parametrize(("max_abs", "decimals", "steps", "units"), NARROWINGS)
def test_narrowed_action_grammar_admits_every_in_bounds_chunk(
    max_abs: float, decimals: int, steps: int, units: str
) -> None:
    from vlm2vla_edge.grammars import action_chunk_gbnf
    from vlm2vla_edge.runtime.action_text import format_action_chunk, format_number
    from vlm2vla_edge.runtime.actions import Action, ActionChunk

    language = _language(max_abs, decimals, steps, units)
    acceptor = LlgAcceptor(action_chunk_gbnf(max_abs, decimals, steps, units))
    rng = random.Random(5)
    top = int(max_abs * 10**decimals + 1e-9)  # the largest value, in steps of 10^-decimals m
    for _ in range(300):
        n = rng.randint(1, steps)
        values = [[rng.choice([-1, 1]) * rng.randint(0, top) / 10**decimals for _ in range(3)] for _ in range(n)]
        chunk = ActionChunk(tuple(Action(*v, float(rng.randint(0, 1))) for v in values))
        text = format_action_chunk(chunk, language)
        assert acceptor.accepts(text), text
    # and the bounds themselves are enforced
    over = (top + 1) / 10**decimals
    if over < 1:
        assert not acceptor.accepts(f"[[{format_number(over, decimals, units)}, 0, 0, 1]]")
    assert not acceptor.accepts("[" + ", ".join(["[0, 0, 0, 1]"] * (steps + 1)) + "]")


def test_narrowed_action_grammar_refuses_what_its_units_cannot_write() -> None:
    from vlm2vla_edge.grammars import action_chunk_gbnf

    with pytest.raises(GrammarError, match="decimals 1-2"):
        action_chunk_gbnf(0.2, 3, 4, "cm")  # centimetres are integers: millimetres cannot be written
    with pytest.raises(GrammarError, match="unknown action units 'mm'"):
        action_chunk_gbnf(0.2, 2, 4, "mm")
    assert 'num    ::= "0" | "-"? ([1-9] | "1" [0-9] | "2" "0")' in action_chunk_gbnf(0.2, 2, 4, "cm")


# --- the subtask grammar narrowed to one scene's objects ---------------------------------------------


def _narrowed_samples(text: str, generic: GbnfName, seed: int, n: int = 200) -> list[str]:
    """Strings derived from a narrowed grammar, each checked to be a sentence of the generic grammar it narrows
    (so the parser, written for the generic one, is unchanged)."""
    validate_gbnf(text, f"narrowed {generic}")
    acceptor = LlgAcceptor(load_gbnf(generic))
    rng = random.Random(seed)
    rules = GbnfReader(text).read()
    samples = [derive_gbnf(rules, rng) for _ in range(n)]
    for sample in samples:
        assert acceptor.accepts(sample), sample
    return samples


def test_scene_subtask_grammar_admits_the_phrases_over_the_scene_objects_only() -> None:
    from vlm2vla_edge.grammars import SUBTASK_PHRASES, scene_subtasks_gbnf
    from vlm2vla_edge.runtime.parser import parse_subtasks

    objects = ["carrot", "pot", "lemon", "corn"]
    text = scene_subtasks_gbnf(objects)
    acceptor = LlgAcceptor(text)
    for sample in _narrowed_samples(text, "subtasks", seed=3):
        subtasks = parse_subtasks(sample).subtasks  # raises on any violation
        for subtask in subtasks:
            assert any(subtask == p.format(object=o) for p in SUBTASK_PHRASES for o in objects), subtask
    assert acceptor.accepts('["Move to the carrot", "Grasp the carrot", "Lift the carrot", "Move to the pot", '
                            '"Release the carrot"]')
    for refused in ('["Move to the tomato"]', '["Move to the champiñón"]', '["Pick up the carrot"]',
                    '["Move to the carrot and the pot"]', "[" + ", ".join(['"Lift the corn"'] * 9) + "]", "[]"):
        assert not acceptor.accepts(refused), refused


@pytest.mark.parametrize(
    ("objects", "pattern"),
    [([], "at least one"), (["Carrot"], "lower-case"), (['pot"]'], "lower-case"), (["a" * 50], "lower-case")],
)
def test_scene_subtask_grammar_refuses_bad_names(objects: list[str], pattern: str) -> None:
    from vlm2vla_edge.grammars import scene_subtasks_gbnf

    with pytest.raises(GrammarError, match=pattern):
        scene_subtasks_gbnf(objects)


def test_narrowed_action_grammar_with_one_gripper_value() -> None:
    from vlm2vla_edge.grammars import action_chunk_gbnf

    open_only = LlgAcceptor(action_chunk_gbnf(0.5, 2, 4, "cm", gripper="1"))
    assert open_only.accepts("[[-24, 0, 5, 1], [0, 0, 1, 1]]")
    assert not open_only.accepts("[[-24, 0, 5, 1], [0, 0, 1, 0]]")
    assert LlgAcceptor(action_chunk_gbnf(0.5, 2, 4, "m", gripper="0")).accepts("[[-0.24, 0, 0.05, 0]]")
    with pytest.raises(GrammarError, match="gripper value"):
        action_chunk_gbnf(0.5, 2, 4, "cm", gripper="2")


# --- the motion-plan grammar narrowed to a waypoint plan about one subtask ---------------------------


@pytest.mark.parametrize(("units", "decimals"), [("cm", 2), ("m", 2), ("m", 3)])
def test_waypoint_plan_grammar_admits_the_annotators_plans_about_its_subtask(units: str, decimals: int) -> None:
    from vlm2vla_edge.grammars import waypoint_plan_gbnf
    from vlm2vla_edge.runtime.action_text import WAYPOINT_PLAN_ENDINGS
    from vlm2vla_edge.runtime.parser import parse_motion_plan
    from vlm2vla_edge.train.data.chunks import waypoint_plan_text

    text = waypoint_plan_gbnf("Move to the lemon", WAYPOINT_PLAN_ENDINGS, 0.5, decimals, units)
    acceptor = LlgAcceptor(text)
    rng = random.Random(5)
    for sample in _narrowed_samples(text, "motion_plan", seed=5):
        parse_motion_plan(sample)
        assert sample.startswith("Move to the lemon: (")
    for _ in range(200):  # every plan the annotator writes about this subtask, in this language
        offset = [round(rng.uniform(-0.5, 0.5), decimals) for _ in range(3)]
        event = rng.choice(["close", "open", None])
        plan = waypoint_plan_text("Move to the lemon", offset, event, decimals, units=units,
                                  gripper_open=rng.choice([True, False, None]))  # fmt: skip
        assert acceptor.accepts(plan), plan
    for refused in ("Move to the pot: (1, 2, 3).", "Move to the lemon: (1, 2).", "Move to the lemon: (1, 2, 3)",
                    "Move to the lemon: (1, 2, 3), grasp.", "Move to the lemon: (99, 2, 3)."):  # fmt: skip
        assert not acceptor.accepts(refused), refused


@pytest.mark.parametrize(
    ("lead", "pattern"),
    [("Move to the champiñón", "cannot start"), ("1 step left", "cannot start"), ('Say "hi"', "cannot start"),
     ("Move to the " + "x" * 140, "characters")],
)
def test_waypoint_plan_grammar_refuses_a_lead_no_plan_can_hold(lead: str, pattern: str) -> None:
    from vlm2vla_edge.grammars import waypoint_plan_gbnf

    with pytest.raises(GrammarError, match=pattern):
        waypoint_plan_gbnf(lead, (".",), 0.5, 2, "cm")
    with pytest.raises(GrammarError, match="endings"):
        waypoint_plan_gbnf("Lift the cup", (", gripper open",), 0.5, 2, "cm")  # no full stop
