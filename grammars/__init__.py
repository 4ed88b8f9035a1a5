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


class GrammarError(ValueError):
    """A grammar is missing, unknown or does not compile; the message names the file or rule."""


def _read(filename: str) -> str:
    try:
        return resources.files(_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise GrammarError(f"grammar file {filename} is missing from the {_PACKAGE} package") from exc


GRAMMAR_VERSION: str = _read("VERSION").strip()


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
        cls = (
            f"[{digits[0]}-{digits[-1]}]"
            if len(digits) > 1 and int(digits[-1]) - int(digits[0]) == len(digits) - 1
            else (f'"{digits[0]}"' if len(digits) == 1 else "[" + "".join(digits) + "]")
        )
        options.append(f"{cls} {continuation}".strip())
    if not options:
        return ""
    body = options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"
    if prefix == "":
        return body
    return f"({body})?" if len(options) == 1 else f"{body}?"


def action_chunk_gbnf(max_abs_value_m: float, decimals: int, max_steps: int) -> str:
    """The v1 action grammar narrowed to one bundle's bounds: |values| <= max_abs_value_m, at most
    `decimals` decimals and `max_steps` actions.

    The generic grammars/action_chunk.gbnf admits any magnitude below 1 m and 16 actions; a model
    decoding under it can still write a chunk the parser then refuses (out_of_range), which costs a
    retry. Decoding under this subset cannot: everything it admits parses under the same bounds
    (tests/test_grammars.py checks this), and it is still a sublanguage of v1.
    """
    if not (0 < max_abs_value_m < 1 and 1 <= decimals <= 3 and 1 <= max_steps <= 16):
        raise GrammarError(
            f"cannot narrow the v1 action grammar to max_abs_value_m={max_abs_value_m}, decimals={decimals}, "
            f"max_steps={max_steps} (allowed: 0 < max_abs < 1, decimals 1-3, steps 1-16)"
        )
    max_units = int(max_abs_value_m * 10**decimals + 1e-9)
    digits = _digits_after("", max_units, decimals)
    if not digits:
        raise GrammarError(f"max_abs_value_m={max_abs_value_m} is below the smallest step of {decimals} decimals")
    more = f' (", " action){{0,{max_steps - 1}}}' if max_steps > 1 else ""
    return (
        f"# Action chunk, action language version 1, narrowed to |value| <= {max_abs_value_m} m with at most\n"
        f"# {decimals} decimals and {max_steps} actions (generated by vlm2vla_edge.grammars.action_chunk_gbnf).\n"
        f'root   ::= "[" action{more} "]"\n'
        'action ::= "[" num ", " num ", " num ", " grip "]"\n'
        f'num    ::= "0" | "-"? "0." {digits}\n'
        'grip   ::= "0" | "1"\n'
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
