"""The action language's grammars, read as package resources so they work from an installed wheel.

The GBNF files are the single source the decoder loads (llguidance reads GBNF, and llama.cpp's own
server takes them as they are); `action_language.lark` is the parser's grammar for the same language,
and tests/test_grammars.py checks on generated strings that the two accept exactly the same strings.
llguidance is an optional dependency of the runtime (the `llm` extra), so it is imported only inside
`validate_gbnf`. The package imports nothing of ours (tests/test_layers.py): every part of the
project reads the language from here, so its errors are its own (`GrammarError`, a `ValueError`); the
runtime wraps them in its error hierarchy (`runtime.errors.GrammarError`).
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Literal, get_args

GbnfName = Literal["action_chunk", "subtasks", "motion_plan"]
GBNF_NAMES: tuple[str, ...] = get_args(GbnfName)

# Start rules of action_language.lark, by the GBNF file each one mirrors.
LARK_START_RULES: dict[str, str] = {
    "action_chunk": "action_chunk",
    "subtasks": "subtask_list",
    "motion_plan": "motion_plan",
}

_PACKAGE = "vlm2vla_edge.grammars"

# A motion plan (motion_plan.gbnf): 1-160 characters, an ASCII letter first, then these (a regex class body).
MOTION_PLAN_CHARS = "A-Za-z0-9 ,.;:'()/%+-"
MOTION_PLAN_MAX_CHARS = 160


class GrammarError(ValueError):
    """A grammar is missing, unknown or does not compile; the message names the file or rule."""


def _read(filename: str) -> str:
    try:
        return resources.files(_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise GrammarError(f"grammar file {filename} is missing from the {_PACKAGE} package") from exc


GRAMMAR_VERSION: str = _read("VERSION").strip()
#: The versions this package's grammars parse. Each version is a superset of the one before (v2 adds
#: integer numbers, for actions in centimetres), so a model trained with any of them decodes and parses
#: under the current files; a bundle's `ActionLanguage.grammar_version` says which one it was trained with.
SUPPORTED_GRAMMAR_VERSIONS: tuple[str, ...] = ("1", "2")
#: The first version that writes action values in each unit.
FIRST_VERSION_FOR_UNITS: dict[str, str] = {"m": "1", "cm": "2"}


def load_gbnf(name: GbnfName) -> str:
    """The text of grammars/<name>.gbnf, exactly as the decoder should load it."""
    if name not in GBNF_NAMES:
        raise GrammarError(f"unknown grammar '{name}'; known grammars: {', '.join(GBNF_NAMES)}")
    return _read(f"{name}.gbnf")


def load_lark() -> str:
    """The text of action_language.lark (start rules: action_chunk, subtask_list, motion_plan)."""
    return _read("action_language.lark")


def _gbnf_rule_names(text: str) -> list[str]:
    return re.findall(r"(?m)^\s*([A-Za-z][A-Za-z0-9_-]*)\s*::=", text)


def _lark_name_to_gbnf(lark_name: str, gbnf_text: str) -> str:
    """Map a rule name from llguidance's GBNF-to-Lark conversion back to the GBNF rule name.

    The conversion renames `root` to `start`, turns `fooBar-baz` into `foo_bar_baz`, and upper-cases
    rules that are pure terminals; error messages quote the converted names.
    """
    if lark_name == "start":
        return "root"
    for original in _gbnf_rule_names(gbnf_text):
        converted = re.sub(r"([a-z])([A-Z])", r"\1_\2", original.replace("-", "_")).lower()
        if converted == lark_name.lower():
            return original
    return lark_name


def _rule_in_message(message: str, gbnf_text: str) -> str | None:
    """The rule named on the line an llguidance validation message points at ("at 4(4): ...")."""
    where = re.match(r"at (\d+)\(", message)
    if where is None:
        return None
    line = re.search(rf"(?m)^\s*{where.group(1)} \| \s*([A-Za-z_][A-Za-z0-9_]*)\s*:", message)
    return _lark_name_to_gbnf(line.group(1), gbnf_text) if line else None


def validate_gbnf(text: str, name: str = "grammar") -> None:
    """Compile a GBNF grammar with llguidance, as the decoder will, and raise `GrammarError` if it fails.

    llama.cpp's own grammar sampler silently returns NULL for a grammar it cannot parse, so every grammar
    is validated when it is loaded. Two stages can fail: the GBNF-to-Lark conversion (unknown rule,
    syntax) raises `ValueError`, and semantic problems (an empty repetition range, ...) only show in
    `LLMatcher.validate_grammar`, which returns a message instead of raising.
    """
    try:
        import llguidance
    except ImportError as exc:
        raise GrammarError(
            "llguidance is not installed, so grammars cannot be validated; install vlm2vla-edge[llm]"
        ) from exc
    try:
        compiled = llguidance.grammar_from("gbnf", text)
    except ValueError as exc:
        detail = str(exc).removeprefix("Failed to convert the grammar from GBNF to Lark: ")
        quoted = re.search(r"Rule '([^']+)'", detail)
        rule = f" (rule '{quoted.group(1)}')" if quoted else ""
        raise GrammarError(f"{name} is not a valid GBNF grammar{rule}: {detail.splitlines()[0]}") from exc
    message = llguidance.LLMatcher.validate_grammar(compiled)
    if message:
        rule_name = _rule_in_message(message, text)
        rule = f" in rule '{rule_name}'" if rule_name else ""
        first = message.splitlines()[0]
        raise GrammarError(f"{name} does not compile with llguidance{rule}: {first}")


def _digits_after(prefix: str, max_units: int, width: int) -> str:
    """GBNF for the digits that may follow `prefix` (decimal digits after "0."), keeping the value at
    most `max_units` (in units of 10^-width); digits with the same continuation share one class."""
    groups: dict[str, list[str]] = {}
    if len(prefix) < width:
        for digit in "0123456789":
            candidate = prefix + digit
            if int(candidate.ljust(width, "0")) <= max_units:
                groups.setdefault(_digits_after(candidate, max_units, width), []).append(digit)
    options = []
    for continuation, digits in groups.items():
        options.append(f"{_digit_class(digits)} {continuation}".strip())
    if not options:
        return ""
    body = options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"
    if prefix == "":
        return body
    return f"({body})?" if len(options) == 1 else f"{body}?"


def _integers_upto(max_value: int, step: int) -> str:
    """GBNF for the positive integers 1-99 that are multiples of `step` and at most `max_value`, as a
    digit trie (units digit classes under each tens digit) rather than a list of 99 alternatives."""
    values = [v for v in range(step, min(max_value, 99) + 1, step)]
    options: list[str] = []
    ones = [v for v in values if v < 10]
    if ones:
        options.append(_digit_class([str(v) for v in ones]))
    by_units: dict[str, list[str]] = {}  # tens digits that take the same units digits share one class
    for tens in sorted({v // 10 for v in values if v >= 10}):
        units = _digit_class([str(v % 10) for v in values if v // 10 == tens])
        by_units.setdefault(units, []).append(str(tens))
    options.extend(f"{_digit_class(tens)} {units}" for units, tens in by_units.items())
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _digit_class(digits: list[str]) -> str:
    """One GBNF item for ascending digits: a literal, a range where they are consecutive, else a class."""
    if len(digits) == 1:
        return f'"{digits[0]}"'
    if int(digits[-1]) - int(digits[0]) == len(digits) - 1:
        return f"[{digits[0]}-{digits[-1]}]"
    return "[" + "".join(digits) + "]"


def _number_gbnf(max_abs_value_m: float, decimals: int, units: str) -> tuple[str, str, str]:
    """(GBNF of one action value, the bound in words, the grammar version that writes it); bounds checked by
    the caller."""
    max_units = int(max_abs_value_m * 10**decimals + 1e-9)
    if max_units == 0:
        raise GrammarError(f"max_abs_value_m={max_abs_value_m} is below the smallest step of {decimals} decimals")
    if units == "cm":
        step = 10 ** (2 - decimals)
        number = f'"0" | "-"? {_integers_upto(max_units * step, step)}'
        return number, f"|value| <= {round(max_abs_value_m * 100, 6):g} cm in steps of {step} cm", "2"
    number = f'"0" | "-"? "0." {_digits_after("", max_units, decimals)}'
    return number, f"|value| <= {max_abs_value_m} m with at most {decimals} decimals", "1"


def _check_bounds(max_abs_value_m: float, decimals: int, max_steps: int, units: str) -> None:
    if units not in FIRST_VERSION_FOR_UNITS:
        raise GrammarError(f"unknown action units '{units}'; known: {', '.join(FIRST_VERSION_FOR_UNITS)}")
    max_decimals = 2 if units == "cm" else 3
    if not (0 < max_abs_value_m < 1 and 1 <= decimals <= max_decimals and 1 <= max_steps <= 16):
        raise GrammarError(
            f"cannot narrow the action grammar to max_abs_value_m={max_abs_value_m}, decimals={decimals}, "
            f"max_steps={max_steps}, units={units} (allowed: 0 < max_abs < 1, decimals 1-{max_decimals}, "
            "steps 1-16)"
        )


def action_chunk_gbnf(
    max_abs_value_m: float, decimals: int, max_steps: int, units: str = "m", gripper: str | None = None
) -> str:
    """The action grammar narrowed to one bundle's bounds: |values| <= max_abs_value_m, at most
    `decimals` decimals (of metres) and `max_steps` actions, written in `units`.

    The generic grammars/action_chunk.gbnf admits any magnitude below 1 m and 16 actions; a model
    decoding under it can still write a chunk the parser then refuses (out_of_range), which costs a
    retry. Decoding under this subset cannot: everything it admits parses under the same bounds
    (tests/test_grammars.py checks this), and it is still a sublanguage of the generic grammar.
    In centimetres (v2) the values are integers (`decimals` 1 or 2: multiples of 10 cm or of 1 cm),
    which spell a centimetre-resolution value in 1-3 tokens instead of 3-5 ("-24" against "-0.24").
    `gripper` ("0" or "1") admits only that gripper value in every action (None: both).
    """
    if gripper not in (None, "0", "1"):
        raise GrammarError(f"the gripper value must be '0' or '1', not {gripper!r}")
    _check_bounds(max_abs_value_m, decimals, max_steps, units)
    number, bound, version = _number_gbnf(max_abs_value_m, decimals, units)
    more = f' (", " action){{0,{max_steps - 1}}}' if max_steps > 1 else ""
    return (
        f"# Action chunk, action language version {version}, narrowed to {bound} and\n"
        f"# {max_steps} actions{'' if gripper is None else ', gripper ' + gripper} "
        "(generated by vlm2vla_edge.grammars.action_chunk_gbnf).\n"
        f'root   ::= "[" action{more} "]"\n'
        'action ::= "[" num ", " num ", " num ", " grip "]"\n'
        f"num    ::= {number}\n"
        + ('grip   ::= "0" | "1"\n' if gripper is None else f'grip   ::= "{gripper}"\n')
    )


#: The subtask phrasings the local annotator writes (train/data/subtasks.py), each over one object: a
#: model trained on its labels speaks exactly these (tests/data checks the two stay in step).
SUBTASK_PHRASES: tuple[str, ...] = (
    "Move to the {object}", "Grasp the {object}", "Lift the {object}", "Release the {object}", "Move the {object}",
)
_OBJECT_NAME = re.compile(r"[a-z][a-z0-9 '-]{0,40}")


def scene_subtasks_gbnf(objects: list[str] | tuple[str, ...], max_subtasks: int = 8) -> str:
    """The v1 subtask grammar narrowed to `SUBTASK_PHRASES` over the named objects (a sublanguage of
    grammars/subtasks.gbnf, so the parser is unchanged).

    For a policy that reads the scene as text: its subtasks can then name only objects the observation
    reports, instead of a word of the instruction it could not map (measured on the demo model:
    "the champiñón", "the restroom", "the tomato" for an unseen language's eggplant).
    """
    names = sorted(set(objects))
    if not names:
        raise GrammarError("a scene subtask grammar needs at least one object name")
    bad = [n for n in names if not _OBJECT_NAME.fullmatch(n)]
    if bad:
        raise GrammarError(f"object names must be lower-case words of at most 41 characters, not {bad}")
    if not 1 <= max_subtasks <= 8:
        raise GrammarError(f"max_subtasks must be 1-8 (the v1 subtask grammar's bound), not {max_subtasks}")
    alternatives = []
    for phrase in SUBTASK_PHRASES:
        before, _, after = phrase.partition("{object}")
        alternatives.append(f'"{before}" object' + (f' "{after}"' if after else ""))
    phrases = " | ".join(alternatives)
    more = f' (", " subtask){{0,{max_subtasks - 1}}}' if max_subtasks > 1 else ""
    return (
        "# Subtask list, action language version 1, narrowed to the annotator's phrases over the objects of one\n"
        "# scene (generated by vlm2vla_edge.grammars.scene_subtasks_gbnf).\n"
        f'root    ::= "[" subtask{more} "]"\n'
        f'subtask ::= "\\"" ({phrases}) "\\""\n'
        "object  ::= " + " | ".join(f'"{n}"' for n in names) + "\n"
    )


_PLAN_TEXT = re.compile(f"[A-Za-z][{MOTION_PLAN_CHARS}]*")  # plan text of any length (lengths checked apart)


def waypoint_plan_gbnf(
    lead: str, endings: tuple[str, ...], max_abs_value_m: float, decimals: int, units: str = "m"
) -> str:
    """The motion-plan grammar narrowed to a waypoint plan about one subtask: `lead` (the current subtask, as
    the prompt states it), a colon, the offset its chunk will copy (three action values, bounded and written
    as the chunk writes them), then one of `endings` (each ends with its full stop: "." and the gripper
    endings the runtime reads back): "Move to the lemon: (-18, -16, -6), gripper open.".

    That is the local annotator's waypoint plan (train/data/chunks.waypoint_plan_text); a model trained on its
    labels writes it word for word, so its words are all forced and only the numbers and the ending are
    chosen (a handful of tokens each: the decoder's sparse logits). A sublanguage of motion_plan.gbnf: a lead
    the plan grammar cannot hold, or a plan that could outgrow its 160 characters, is refused here.
    """
    _check_bounds(max_abs_value_m, decimals, 1, units)
    if not _PLAN_TEXT.fullmatch(lead):
        raise GrammarError(f"a plan cannot start with {lead!r}: a letter, then letters, digits, spaces and ,.;:'()/%+-")
    if not endings or any(not e.endswith(".") or not _PLAN_TEXT.fullmatch("A" + e) for e in endings):
        raise GrammarError(f"plan endings must be plan text ending with a full stop, not {endings!r}")
    number, bound, version = _number_gbnf(max_abs_value_m, decimals, units)
    longest_number = 1 + (len(str(int(max_abs_value_m * 100 + 1e-9))) if units == "cm" else 2 + decimals)
    longest = len(lead) + len(": (, , )") + 3 * longest_number + max(len(e) for e in endings)
    if longest > MOTION_PLAN_MAX_CHARS:
        raise GrammarError(
            f"a plan about {lead!r} could take {longest} characters, more than {MOTION_PLAN_MAX_CHARS}"
        )
    return (
        f"# Waypoint motion plan, action language version {version}, about one subtask, numbers {bound}\n"
        "# (generated by vlm2vla_edge.grammars.waypoint_plan_gbnf).\n"
        f'root ::= "{lead}: (" num ", " num ", " num ")" end\n'
        f"num  ::= {number}\n"
        "end  ::= " + " | ".join(f'"{e}"' for e in endings) + "\n"
    )
