"""Parse the model's text into typed actions, subtasks and motion plans, trusting nothing in it.

Every text goes through the Lark grammar (grammars/action_language.lark, the same language as the GBNF
files the decoder is constrained with), then through semantic checks of the bundle's action language
(|value| <= max_abs_value_m, at most max_steps actions). Only ASCII whitespace (space, tab, CR, LF, FF,
VT) at the very start and end is stripped before parsing: a model that ends its answer with a newline
is fine, but whitespace inside the text must be exactly what the grammar says.

Every failure is a `ParseError` with a stable `code` and the character `position` (in the text as
given, before stripping) where the problem starts. When the grammar rejects a text, a hand-written
diagnosis walks it again to name the precise reason (a NaN, a unicode minus, a missing space, ...);
only if that finds nothing does the error fall back to code `syntax` with Lark's position. The
diagnosis only explains rejections: acceptance is always the grammar's decision.

Error codes (stable; tests/data/hostile_parser.yaml has an example of most):

=================== ================================================================================
not_text            the input is not a `str`
too_long            longer than `MAX_TEXT_CHARS` (checked first, so a 10 MB string costs nothing), or a
                    motion plan over 160 characters
empty               nothing but whitespace, or an empty list `[]`
bad_unicode         lone surrogate code points (not valid Unicode text)
control_char        an ASCII control character other than whitespace (NUL, ESC, DEL, ...)
unicode_minus       a dash look-alike (U+2212 minus, en/em dash, fullwidth hyphen, ...)
non_ascii_digit     a digit outside 0-9 (fullwidth, Arabic-Indic, ...)
non_ascii           any other non-ASCII character in an action chunk (RTL override, zero-width space)
nan / inf           NaN / infinity written as a value
exponent            a number in exponent notation (1e-2)
unbalanced_brackets brackets that do not pair up (truncated output, a stray ']')
not_a_list          the text does not start with '[' (prose, a mapping '{...}', a quoted JSON string)
leading_text        text before the opening '['
wrong_nesting       a flat list of numbers, or lists nested deeper than [[...], ...]
wrong_arity         an action with other than 4 values
bad_separator       separators other than exactly ", " (missing space, two spaces, tabs, newlines)
bad_number          a value that is not "0", a signed decimal below 1 with 1-3 decimals or a signed
                    integer of 1-2 digits ("1.5", ".5", "00.1", "+0.1", "0.1234", "-0", "100",
                    quoted numbers, expressions)
bad_gripper         a gripper value other than the language's open/closed texts ("2", "0.5")
out_of_range        |value| > max_abs_value_m (values in cm are divided by 100 first)
too_many_steps      more actions than max_steps (or the 16 that v1 allows)
trailing_text       anything after the closing ']'
bad_quote           a subtask that is not a double-quoted string, or a quote that never closes
bad_char            a character the subtask or motion-plan language does not allow
item_length         a subtask of 0 or more than 96 characters
too_many_items      more than 8 subtasks
bad_start           a motion plan that does not start with an ASCII letter
syntax              anything else the grammar rejects
=================== ================================================================================
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Mapping

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedEOF, UnexpectedToken

from vlm2vla_edge.grammars import LARK_START_RULES, MOTION_PLAN_CHARS, SUPPORTED_GRAMMAR_VERSIONS, load_lark
from vlm2vla_edge.runtime.action_text import gripper_texts
from vlm2vla_edge.runtime.actions import Action, ActionChunk, MotionPlan, SubtaskList
from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import ConfigError, Vlm2VlaError

# Far above any valid text (16 actions are under 500 characters) yet cheap to reject; big enough that
# a thousand-step chunk is still diagnosed as too_many_steps rather than too_long.
MAX_TEXT_CHARS = 65_536

# Limits of action language v1 (the GBNF files).
V1_MAX_ACTIONS = 16
V1_MAX_SUBTASKS = 8
V1_MAX_SUBTASK_CHARS = 96
V1_MAX_MOTION_PLAN_CHARS = 160

ERROR_CODES: frozenset[str] = frozenset(
    {
        "not_text", "too_long", "empty", "bad_unicode", "control_char", "unicode_minus",
        "non_ascii_digit", "non_ascii", "nan", "inf", "exponent", "unbalanced_brackets", "not_a_list",
        "leading_text", "wrong_nesting", "wrong_arity", "bad_separator", "bad_number", "bad_gripper",
        "out_of_range", "too_many_steps", "trailing_text", "bad_quote", "bad_char", "item_length",
        "too_many_items", "bad_start", "syntax",
    }
)  # fmt: skip

_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"
# Placeholder for the error position in diagnosis messages; repr() never outputs a raw NUL, so quoted
# model text cannot contain it.
AT = "\x00at\x00"
_DEFAULT_LANGUAGE = ActionLanguage()


class ParseError(Vlm2VlaError):
    """The model's text is not valid action language; `code` says why, `position` where (or None)."""

    def __init__(self, code: str, message: str, position: int | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.position = position

    def __repr__(self) -> str:
        return f"ParseError(code={self.code!r}, position={self.position!r}, message={str(self)!r})"


@lru_cache(maxsize=1)
def _lark() -> Lark:
    """The one Lark parser for all three start rules (LALR, contextual lexer: ~50 µs per chunk)."""
    return Lark(load_lark(), parser="lalr", lexer="contextual", start=list(LARK_START_RULES.values()))


# --- shared steps ----------------------------------------------------------------------------------


def _prepare(text: object, what: str) -> tuple[str, int]:
    """Type and size checks, then strip ASCII whitespace; returns the stripped text and its offset."""
    if not isinstance(text, str):
        raise ParseError("not_text", f"the {what} must be text (str), got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise ParseError(
            "too_long", f"the {what} is {len(text)} characters long, over the {MAX_TEXT_CHARS}-character cap", None
        )
    stripped = text.strip(_ASCII_WHITESPACE)
    if not stripped:
        raise ParseError("empty", f"the {what} is empty", 0 if text else None)
    offset = len(text) - len(text.lstrip(_ASCII_WHITESPACE))
    surrogate = re.search("[\ud800-\udfff]", stripped)
    if surrogate is not None:
        raise ParseError(
            "bad_unicode",
            f"the {what} holds a lone surrogate code point at character {surrogate.start() + offset}",
            surrogate.start() + offset,
        )
    return stripped, offset


def _lark_parse(stripped: str, start: str) -> tuple[Tree | None, LarkError | None]:
    try:
        return _lark().parse(stripped, start=start), None
    except LarkError as exc:
        return None, exc


def _syntax_error(exc: LarkError, stripped: str, offset: int, what: str) -> ParseError:
    pos = getattr(exc, "pos_in_stream", None)
    at_end = isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END")
    if at_end or not isinstance(pos, int) or pos < 0:
        pos = len(stripped)  # Lark's end-of-input token borrows the last real token's position
    where = "at the end of the text" if pos >= len(stripped) else f"at character {pos + offset} ({stripped[pos]!r})"
    return ParseError("syntax", f"the {what} is not valid action language {where}", pos + offset)


def _describe_char(c: str) -> str:
    name = unicodedata.name(c, "")
    return f"{c!r} (U+{ord(c):04X}{' ' + name if name else ''})"


def _check_language(language: ActionLanguage) -> Mapping[str, float]:
    if language.grammar_version not in SUPPORTED_GRAMMAR_VERSIONS:
        raise ConfigError(
            f"the bundle's action language is version {language.grammar_version}, "
            f"but this runtime parses versions {', '.join(SUPPORTED_GRAMMAR_VERSIONS)}"
        )
    return gripper_texts(language)


# --- action chunks ---------------------------------------------------------------------------------


def parse_action_chunk(text: str, language: ActionLanguage | None = None) -> ActionChunk:
    """Parse `[[dx, dy, dz, gripper], ...]` into an `ActionChunk`, or raise `ParseError`.

    Gripper texts are mapped to the canonical `Action.gripper` (1.0 open, 0.0 closed) with
    `language.gripper`; -0.0 becomes 0.0. A `ConfigError` means the language itself is unusable.
    """
    language = _DEFAULT_LANGUAGE if language is None else language
    grippers = _check_language(language)
    stripped, offset = _prepare(text, "action chunk")
    tree, exc = _lark_parse(stripped, LARK_START_RULES["action_chunk"])
    if tree is None:
        assert exc is not None
        raise _ChunkDiagnosis(stripped, offset, grippers, min(V1_MAX_ACTIONS, language.max_steps)).run() or (
            _syntax_error(exc, stripped, offset, "action chunk")
        )
    actions: list[Action] = []
    per_metre = 100.0 if language.units == "cm" else 1.0  # text units per metre; the chunk holds metres
    for action_tree in tree.children:
        if not isinstance(action_tree, Tree):
            continue  # separators
        if len(actions) == language.max_steps:
            raise ParseError(
                "too_many_steps",
                f"the chunk has more than {language.max_steps} actions (the language's max_steps)",
                _tree_start(action_tree) + offset,
            )
        values: list[float] = []
        for item in action_tree.children:
            if not isinstance(item, Tree):
                continue
            token = item.children[0]
            assert isinstance(token, Token)
            if item.data == "gripper":
                values.append(grippers[str(token)])
                continue
            value = float(token) / per_metre + 0.0  # + 0.0 turns -0.0 into 0.0
            if abs(value) > language.max_abs_value_m:
                at = (token.start_pos or 0) + offset  # lark sets start_pos on every token it parsed
                raise ParseError(
                    "out_of_range",
                    f"the value {token} ({language.units}) at character {at} is larger in magnitude than "
                    f"max_abs_value_m = {language.max_abs_value_m}",
                    at,
                )
            values.append(value)
        actions.append(Action(*values))
    return ActionChunk(tuple(actions))


def _tree_start(tree: Tree) -> int:
    for token in tree.scan_values(lambda v: isinstance(v, Token)):
        return token.start_pos - 1  # the action's '[' comes right before its first value
    return 0


_NUMBER = re.compile(r"0|-?0\.[0-9]{1,3}|-?[1-9][0-9]?")  # metres (v1) or centimetre integers (v2)
_VALUE = re.compile(r"[^\s,\[\]]+")
# Characters that must never reach a number: ASCII controls other than whitespace, and all non-ASCII.
_SUSPECT_CHAR = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]|[^\x00-\x7f]")
_DASHES = frozenset("\u2010\u2011\u2012\u2013\u2014\u2015\u2043\u02d7\u2212\u2796\ufe58\ufe63\uff0d")
_NAN = re.compile(r"(?<![A-Za-z_])[+-]?nan(?![A-Za-z_])", re.IGNORECASE)
_INF = re.compile(r"(?<![A-Za-z_])[+-]?inf(?:inity)?(?![A-Za-z_])", re.IGNORECASE)
# A number may start only where no digit or '.' precedes it, and its digits split one way only: the
# search stays linear in the text (the earlier `[0-9]+\.?[0-9]*` took minutes on 4,000 digits).
_EXPONENT = re.compile(r"(?<![A-Za-z_0-9.])[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][+-]?[0-9]")


class _ChunkDiagnosis:
    """Walk a rejected action chunk and return the first precise reason, in the order below, or None."""

    def __init__(self, s: str, offset: int, grippers: Mapping[str, float], max_actions: int) -> None:
        self.s = s
        self.offset = offset
        self.grippers = grippers
        self.max_actions = max_actions

    def error(self, code: str, message: str, pos: int) -> ParseError:
        at = pos + self.offset
        return ParseError(code, message.replace(AT, str(at)), at)

    def run(self) -> ParseError | None:
        try:
            self.characters()
            self.words()
            self.brackets()
            self.structure()
        except ParseError as found:
            return found
        except IndexError:  # pragma: no cover - a walk off the end is a diagnosis bug; never seen in fuzzing
            return None  # still a ParseError: the caller falls back to `syntax` at Lark's position
        return None

    def characters(self) -> None:
        bad = _SUSPECT_CHAR.search(self.s)
        if bad is None:
            return
        c, pos = bad.group(), bad.start()
        if c in _DASHES:
            raise self.error("unicode_minus", f"{_describe_char(c)} at character {AT} is not an ASCII '-' sign", pos)
        if unicodedata.category(c) == "Nd" or c.isdigit():
            raise self.error("non_ascii_digit", f"{_describe_char(c)} at character {AT} is not an ASCII digit", pos)
        if ord(c) < 0x80:
            raise self.error("control_char", f"control character {_describe_char(c)} at character {AT}", pos)
        raise self.error("non_ascii", f"non-ASCII character {_describe_char(c)} at character {AT}", pos)

    def words(self) -> None:
        for code, pattern, what in (
            ("nan", _NAN, "NaN is not a number an action can hold"),
            ("inf", _INF, "infinity is not a number an action can hold"),
            ("exponent", _EXPONENT, "exponent notation is not allowed; write a plain decimal"),
        ):
            found = pattern.search(self.s)
            if found is not None:
                raise self.error(code, f"{found.group()!r} at character {AT}: {what}", found.start())

    def brackets(self) -> None:
        depth = 0
        opened: list[int] = []
        for pos, c in enumerate(self.s):
            if c == "[":
                opened.append(pos)
                depth += 1
            elif c == "]":
                if not opened:
                    raise self.error("unbalanced_brackets", f"the ']' at character {AT} closes nothing", pos)
                opened.pop()
        if opened:
            raise self.error(
                "unbalanced_brackets",
                f"{len(opened)} '[' {'is' if len(opened) == 1 else 'are'} never closed (truncated output?); "
                f"the first opens at character {AT}",
                opened[0],
            )

    def structure(self) -> None:
        s = self.s
        if s[0] != "[":
            if s[0] == "{":
                raise self.error("not_a_list", "the text is a mapping ('{'), not a list of actions", 0)
            if "[" in s:
                raise self.error("leading_text", f"there is text before the chunk's '[' (at character {AT})", 0)
            raise self.error("not_a_list", "the text is not a list of [dx, dy, dz, gripper] actions", 0)
        if s.startswith("[]"):
            raise self.error("empty", "the action chunk '[]' has no actions", 0)
        pos = 1
        count = 0
        while True:
            if count == self.max_actions:
                raise self.error(
                    "too_many_steps", f"the chunk has more than {self.max_actions} actions (at character {AT})", pos
                )
            pos = self.action(pos)
            count += 1
            if s[pos] == "]":
                break
            pos = self.separator(pos, "between actions")
            if s[pos] != "[":
                raise self.error(
                    "wrong_nesting", f"expected the '[' of the next action at character {AT}, found {s[pos]!r}", pos
                )
        if pos + 1 < len(s):
            raise self.error(
                "trailing_text", f"there is text after the chunk's closing ']' (at character {AT})", pos + 1
            )

    def separator(self, pos: int, where: str) -> int:
        """Check the separator at s[pos:] and return the position after it."""
        s = self.s
        if s[pos] == "," and s[pos + 1 : pos + 2] == " " and not s[pos + 2 : pos + 3].isspace():
            return pos + 2
        if s[pos] == ",":
            raise self.error(
                "bad_separator", f"the ',' at character {AT} {where} must be followed by exactly one space", pos
            )
        if s[pos].isspace():
            raise self.error(
                "bad_separator", f"{s[pos]!r} at character {AT} {where}: separators must be exactly ', '", pos
            )
        raise self.error("bad_separator", f"expected ', ' {where} at character {AT}, found {s[pos]!r}", pos)

    def action(self, pos: int) -> int:
        """Check one action starting at s[pos] == '['; return the position of its closing ']' + 1."""
        s = self.s
        if s[pos] != "[":
            raise self.error(
                "wrong_nesting", f"expected '[' to open an action at character {AT}, found {s[pos]!r}", pos
            )
        start = pos
        pos += 1
        values: list[tuple[str, int]] = []
        while True:
            if s[pos] == "[":
                raise self.error("wrong_nesting", f"a list inside an action at character {AT}: nested too deep", pos)
            found = _VALUE.match(s, pos)
            if found is None:
                if s[pos] == "]" and not values:
                    raise self.error("wrong_arity", f"the action at character {AT} is empty; it needs 4 values", start)
                raise self.error("bad_separator", f"expected a value at character {AT}, found {s[pos]!r}", pos)
            values.append((found.group(), pos))
            pos = found.end()
            if s[pos] == "]":
                break
            if s[pos] == "[":
                raise self.error("wrong_nesting", f"a list inside an action at character {AT}: nested too deep", pos)
            pos = self.separator(pos, "between values")
        if len(values) != 4:
            raise self.error(
                "wrong_arity",
                f"the action at character {AT} has {len(values)} values; it needs 4 (dx, dy, dz, gripper)",
                start,
            )
        for index, (raw, at) in enumerate(values):
            if index < 3:
                self.number(raw, at)
            elif raw not in self.grippers:
                allowed = " or ".join(f"'{t}' ({'open' if v else 'closed'})" for t, v in self.grippers.items())
                raise self.error("bad_gripper", f"the gripper value {raw!r} at character {AT} is not {allowed}", at)
        return pos + 1

    def number(self, raw: str, at: int) -> None:
        if _NUMBER.fullmatch(raw):
            return
        if raw[0] in "'\"":
            reason = "a quoted string where a number belongs"
        elif raw.startswith("+"):
            reason = "a '+' sign is not allowed"
        elif raw == "-0":
            reason = "zero is written '0', without a sign"
        elif re.fullmatch(r"-?\.[0-9]+", raw):
            reason = "a decimal needs its leading '0' ('0.5', not '.5')"
        elif re.fullmatch(r"-?00+(\.[0-9]*)?", raw):
            reason = "leading zeros are not allowed"
        elif re.fullmatch(r"-?0\.[0-9]{4,}", raw):
            reason = "at most 3 decimals are allowed"
        elif re.fullmatch(r"-?0\.", raw):
            reason = "a decimal point needs 1-3 digits after it"
        elif re.fullmatch(r"-?[0-9]+(\.[0-9]*)?", raw):
            reason = "a number is '0', a decimal below 1 (metres) or an integer of 1-2 digits (centimetres)"
        else:
            reason = "it is not a number"
        raise self.error(
            "bad_number", f"the value {raw!r} at character {AT} is not an action-language number: {reason}", at
        )


# --- subtasks --------------------------------------------------------------------------------------


def parse_subtasks(text: str) -> SubtaskList:
    """Parse `["Move to the carrot", "Grasp the carrot"]` (1-8 subtasks of 1-96 characters), or raise
    `ParseError`."""
    stripped, offset = _prepare(text, "subtask list")
    tree, exc = _lark_parse(stripped, LARK_START_RULES["subtasks"])
    if tree is None:
        assert exc is not None
        raise _diagnose_subtasks(stripped, offset) or _syntax_error(exc, stripped, offset, "subtask list")
    return SubtaskList(tuple(str(t)[1:-1] for t in tree.children if isinstance(t, Token) and t.type == "SUBTASK"))


# Mirrors the excluded set of grammars/subtasks.gbnf: quote, backslash, C0/DEL/C1 controls, zero-width
# and bidirectional-override characters, line/paragraph separators, byte-order mark.
_SUBTASK_BAD_CHAR = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]')


def _diagnose_subtasks(s: str, offset: int) -> ParseError | None:
    def error(code: str, message: str, pos: int) -> ParseError:
        return ParseError(code, message.replace(AT, str(pos + offset)), pos + offset)

    if s[0] != "[":
        if "[" in s:
            return error("leading_text", f"there is text before the subtask list's '[' (at character {AT})", 0)
        return error("not_a_list", 'the text is not a list of double-quoted subtasks ["...", "..."]', 0)
    if s.startswith("[]"):
        return error("empty", "the subtask list '[]' has no subtasks", 0)
    pos, count = 1, 0
    while True:
        if pos >= len(s):
            return error("unbalanced_brackets", f"the subtask list is never closed with ']' (from character {AT})", 0)
        if count == V1_MAX_SUBTASKS:
            return error("too_many_items", f"more than {V1_MAX_SUBTASKS} subtasks (at character {AT})", pos)
        if s[pos] != '"':
            kind = "single quotes" if s[pos] == "'" else f"{s[pos]!r}"
            return error(
                "bad_quote", f"subtask {count + 1} starts with {kind} at character {AT}; use double quotes", pos
            )
        end = s.find('"', pos + 1)
        body = s[pos + 1 : end] if end >= 0 else s[pos + 1 :]
        bad = _SUBTASK_BAD_CHAR.search(body)
        if bad is not None:
            c, at = bad.group(), pos + 1 + bad.start()
            code = "control_char" if c not in '"\\' else "bad_char"
            return error(code, f"subtask {count + 1} contains {_describe_char(c)} at character {AT}", at)
        if end < 0:
            return error("bad_quote", f"the quote opening subtask {count + 1} at character {AT} never closes", pos)
        if not 1 <= len(body) <= V1_MAX_SUBTASK_CHARS:
            return error(
                "item_length",
                f"subtask {count + 1} at character {AT} has {len(body)} characters; allowed are 1 to "
                f"{V1_MAX_SUBTASK_CHARS}",
                pos,
            )
        count += 1
        pos = end + 1
        if pos >= len(s):
            return error("unbalanced_brackets", f"the subtask list is never closed with ']' (from character {AT})", 0)
        if s[pos] == "]":
            break
        if not s.startswith(", ", pos) or s[pos + 2 : pos + 3] in ("", " ", ",") or s[pos + 2].isspace():
            return error("bad_separator", f"separators between subtasks must be exactly ', ' (at character {AT})", pos)
        pos += 2
    if pos + 1 < len(s):
        return error(
            "trailing_text", f"there is text after the subtask list's closing ']' (at character {AT})", pos + 1
        )
    return None


# --- motion plans ----------------------------------------------------------------------------------


def parse_motion_plan(text: str) -> MotionPlan:
    """Parse one line of 1-160 characters that starts with a letter, or raise `ParseError`."""
    stripped, offset = _prepare(text, "motion plan")
    tree, exc = _lark_parse(stripped, LARK_START_RULES["motion_plan"])
    if tree is None:
        assert exc is not None
        raise _diagnose_motion_plan(stripped, offset) or _syntax_error(exc, stripped, offset, "motion plan")
    return MotionPlan(stripped)


_MOTION_BAD_CHAR = re.compile(f"[^{MOTION_PLAN_CHARS}]")


def _diagnose_motion_plan(s: str, offset: int) -> ParseError | None:
    first = s[0]
    if not (first.isascii() and first.isalpha()):
        return ParseError(
            "bad_start", f"a motion plan must start with an ASCII letter, not {_describe_char(first)}", offset
        )
    bad = _MOTION_BAD_CHAR.search(s)
    if bad is not None and bad.start() < V1_MAX_MOTION_PLAN_CHARS:
        c, at = bad.group(), bad.start() + offset
        what = "a line break: a motion plan is one line" if c in "\r\n" else f"{_describe_char(c)} is not allowed"
        return ParseError("bad_char", f"character {at} of the motion plan is {what}", at)
    if len(s) > V1_MAX_MOTION_PLAN_CHARS:
        return ParseError(
            "too_long",
            f"the motion plan has {len(s)} characters; at most {V1_MAX_MOTION_PLAN_CHARS} are allowed",
            V1_MAX_MOTION_PLAN_CHARS + offset,
        )
    return None
