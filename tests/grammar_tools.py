"""Test helpers: random strings from the GBNF and the Lark grammars, and llguidance acceptance.

The two grammars of the action language must accept the same strings. These helpers generate strings
from each side independently (a small GBNF reader and deriver for the subset our files use; a deriver
over the compiled Lark rules with a regex sampler for its terminals), mutate them into near misses,
and ask llguidance, with a byte-level tokenizer, whether the GBNF accepts a string.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Union

try:  # Python 3.11+
    import re._parser as sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]

# Characters to draw from for negated classes and mutations: the ASCII that matters to the grammars,
# plus non-ASCII look-alikes and multi-byte characters (UTF-8 of 2, 3 and 4 bytes).
ASCII_POOL = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r", "\x00", "\x1b", "\x7f"]
UNICODE_POOL = ["é", "ß", "中", "\u2212", "\u2013", "\uff10", "\uff11", "\u0660", "\u202e", "\u200b", "\u00a0", "🤖"]
UNICODE_POOL += ["\x80", "\x9f", "\u200f", "\u2028", "\u2066", "\ufeff", "\u2070"]  # excluded (and one just past)
CHAR_POOL = ASCII_POOL * 3 + UNICODE_POOL
MUTATION_CHARS = list('0123456789-.,[] "\'\\aZe+/%()#:;\n\t\x00') + ["é", "\u2212", "\uff10", "\u202e"]


# --- GBNF (the subset our grammar files use) -------------------------------------------------------


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class CharClass:
    negated: bool
    ranges: tuple[tuple[str, str], ...]

    def matches(self, c: str) -> bool:
        inside = any(lo <= c <= hi for lo, hi in self.ranges)
        return inside != self.negated


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Alt:
    options: tuple["Node", ...]


@dataclass(frozen=True)
class Repeat:
    node: "Node"
    min: int
    max: int | None


Node = Union[Lit, CharClass, Ref, Seq, Alt, Repeat]

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}


class GbnfReader:
    """Reads GBNF rules: literals, char classes, references, groups, |, ?, *, +, {m}, {m,}, {m,n}."""

    def __init__(self, text: str) -> None:
        self.text = re.sub(r"(?m)#.*$", "", text)
        self.pos = 0

    def read(self) -> dict[str, Node]:
        rules: dict[str, Node] = {}
        while True:
            self._space(newlines=True)
            if self.pos >= len(self.text):
                return rules
            name = self._name()
            self._space(newlines=False)
            self._expect("::=")
            rules[name] = self._alternatives(nested=False)

    def _space(self, newlines: bool) -> None:
        skipped = " \t\r\n" if newlines else " \t"
        while self.pos < len(self.text) and self.text[self.pos] in skipped:
            self.pos += 1

    def _expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise ValueError(f"expected {token!r} at {self.pos}: {self.text[self.pos:self.pos + 20]!r}")
        self.pos += len(token)

    def _name(self) -> str:
        found = re.compile(r"[A-Za-z][A-Za-z0-9_-]*").match(self.text, self.pos)
        if found is None:
            raise ValueError(f"expected a rule name at {self.pos}")
        self.pos = found.end()
        return found.group()

    def _alternatives(self, nested: bool) -> Node:
        options = [self._sequence(nested)]
        while self.pos < len(self.text) and self.text[self.pos] == "|":
            self.pos += 1
            options.append(self._sequence(nested))
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def _sequence(self, nested: bool) -> Node:
        items: list[Node] = []
        while True:
            self._space(newlines=nested)
            if self.pos >= len(self.text) or self.text[self.pos] in "|)\n\r":
                break
            c = self.text[self.pos]
            if c == '"':
                item: Node = self._literal()
            elif c == "[":
                item = self._char_class()
            elif c == "(":
                self.pos += 1
                item = self._alternatives(nested=True)
                self._space(newlines=True)
                self._expect(")")
            else:
                item = Ref(self._name())
            items.append(self._quantifier(item))
        return items[0] if len(items) == 1 else Seq(tuple(items))

    def _quantifier(self, item: Node) -> Node:
        if self.pos >= len(self.text):
            return item
        c = self.text[self.pos]
        if c in "?*+":
            self.pos += 1
            return Repeat(item, 1 if c == "+" else 0, 1 if c == "?" else None)
        found = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.text, self.pos)
        if found is None:
            return item
        self.pos = found.end()
        low = int(found.group(1))
        high = low if found.group(2) is None else (int(found.group(3)) if found.group(3) else None)
        return Repeat(item, low, high)

    def _char(self) -> str:
        c = self.text[self.pos]
        if c != "\\":
            self.pos += 1
            return c
        kind = self.text[self.pos + 1]
        if kind in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[kind]
            value = self.text[self.pos + 2 : self.pos + 2 + width]
            self.pos += 2 + width
            return chr(int(value, 16))
        self.pos += 2
        return _ESCAPES[kind]

    def _literal(self) -> Lit:
        self._expect('"')
        chars = []
        while self.text[self.pos] != '"':
            chars.append(self._char())
        self.pos += 1
        return Lit("".join(chars))

    def _char_class(self) -> CharClass:
        self._expect("[")
        negated = self.text[self.pos] == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.text[self.pos] != "]":
            low = self._char()
            high = low
            if self.text[self.pos] == "-" and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self._char()
            ranges.append((low, high))
        self.pos += 1
        return CharClass(negated, tuple(ranges))


def _count(rng: random.Random, low: int, high: int | None) -> int:
    """Repetition counts biased to the bounds, where the two grammars are most likely to differ."""
    high = low + 4 if high is None else high
    pick = rng.random()
    if pick < 0.2:
        return low
    if pick < 0.4:
        return high
    return rng.randint(low, high)


def _class_char(rng: random.Random, cls: CharClass) -> str:
    if not cls.negated:
        low, high = rng.choice(cls.ranges)
        return chr(rng.randint(ord(low), ord(high)))
    while True:
        c = rng.choice(CHAR_POOL)
        if cls.matches(c):
            return c


def derive_gbnf(rules: dict[str, Node], rng: random.Random, start: str = "root") -> str:
    """One random string of the GBNF grammar (our grammars are not recursive, so no depth limit)."""
    out: list[str] = []

    def walk(node: Node) -> None:
        if isinstance(node, Lit):
            out.append(node.text)
        elif isinstance(node, CharClass):
            out.append(_class_char(rng, node))
        elif isinstance(node, Ref):
            walk(rules[node.name])
        elif isinstance(node, Seq):
            for item in node.items:
                walk(item)
        elif isinstance(node, Alt):
            walk(rng.choice(node.options))
        else:
            for _ in range(_count(rng, node.min, node.max)):
                walk(node.node)

    walk(rules[start])
    return "".join(out)


# --- Lark ------------------------------------------------------------------------------------------


def _sample_regex_items(items, rng: random.Random, out: list[str]) -> None:  # type: ignore[no-untyped-def]
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append(next(c for c in iter(lambda: rng.choice(CHAR_POOL), None) if ord(c) != arg))
        elif name == "ANY":
            out.append(next(c for c in iter(lambda: rng.choice(CHAR_POOL), None) if c != "\n"))
        elif name == "IN":
            out.append(_sample_in(arg, rng))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = arg
            for _ in range(_count(rng, low, None if high == sre_parse.MAXREPEAT else high)):
                _sample_regex_items(sub, rng, out)
        elif name == "SUBPATTERN":
            _sample_regex_items(arg[-1], rng, out)
        elif name == "BRANCH":
            _sample_regex_items(rng.choice(arg[1]), rng, out)
        elif name == "AT":
            continue
        else:
            raise NotImplementedError(f"regex op {name} is not supported by the sampler")


def _sample_in(items, rng: random.Random) -> str:  # type: ignore[no-untyped-def]
    negated = bool(items) and str(items[0][0]) == "NEGATE"
    ranges: list[tuple[int, int]] = []
    for op, arg in items[1:] if negated else items:
        name = str(op)
        if name == "LITERAL":
            ranges.append((arg, arg))
        elif name == "RANGE":
            ranges.append(arg)
        else:
            raise NotImplementedError(f"character-set item {name} is not supported by the sampler")
    if not negated:
        low, high = rng.choice(ranges)
        return chr(rng.randint(low, high))
    while True:
        c = rng.choice(CHAR_POOL)
        if not any(low <= ord(c) <= high for low, high in ranges):
            return c


def sample_regex(pattern: str, rng: random.Random) -> str:
    """One random string matching `pattern` (literals, classes, groups, alternation, repetition)."""
    out: list[str] = []
    _sample_regex_items(sre_parse.parse(pattern), rng, out)
    return "".join(out)


def derive_lark(parser, start: str, rng: random.Random) -> str:  # type: ignore[no-untyped-def]
    """One random string from the compiled rules and terminals of a Lark parser (non-recursive grammars)."""
    expansions: dict[str, list] = {}
    for rule in parser.rules:
        expansions.setdefault(rule.origin.name, []).append(rule.expansion)
    terminals = {t.name: t.pattern for t in parser.terminals}
    out: list[str] = []

    def walk(symbol_name: str, is_terminal: bool) -> None:
        if is_terminal:
            pattern = terminals[symbol_name]
            if pattern.type == "str":
                out.append(pattern.value)
            else:
                out.append(sample_regex(pattern.value, rng))
            return
        for symbol in rng.choice(expansions[symbol_name]):
            walk(symbol.name, symbol.is_term)

    walk(start, False)
    return "".join(out)


# --- mutations -------------------------------------------------------------------------------------


def mutate(text: str, rng: random.Random) -> str:
    """A near miss: one or two single-character inserts, deletes or replacements, or a duplicated slice."""
    for _ in range(rng.choice((1, 1, 1, 2))):
        kind = rng.random()
        pos = rng.randint(0, len(text))
        if kind < 0.3:
            text = text[:pos] + rng.choice(MUTATION_CHARS) + text[pos:]
        elif kind < 0.6 and text:
            pos = min(pos, len(text) - 1)
            text = text[:pos] + text[pos + 1 :]
        elif kind < 0.9 and text:
            pos = min(pos, len(text) - 1)
            text = text[:pos] + rng.choice(MUTATION_CHARS) + text[pos + 1 :]
        else:
            end = rng.randint(pos, min(len(text), pos + 30))
            text = text[:end] + text[pos:end] + text[end:]
    return text


# --- llguidance ------------------------------------------------------------------------------------

EOS = 256


class _ByteTokenizer:
    """256 byte tokens plus EOS: lets llguidance judge raw strings without a model's vocabulary."""

    eos_token_id = EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [EOS]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


def byte_tokenizer():  # type: ignore[no-untyped-def]
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))


class LlgAcceptor:
    """Whether a GBNF grammar, as llguidance enforces it, accepts a whole string (then EOS)."""

    def __init__(self, gbnf_text: str) -> None:
        import llguidance

        self._llg = llguidance
        self.tokenizer = byte_tokenizer()
        self.grammar = llguidance.grammar_from("gbnf", gbnf_text)
        self.matcher = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        assert not self.matcher.is_error(), self.matcher.get_error()

    def accepts(self, text: str) -> bool:
        """`validate_tokens` checks the bytes and EOS without changing the matcher's state."""
        tokens = list(text.encode("utf-8")) + [EOS]
        return self.matcher.validate_tokens(tokens) == len(tokens)

    def accepts_by_consuming(self, text: str) -> bool:
        """The slow path a decoder takes (fresh matcher, consume, EOS): cross-checks `accepts`."""
        matcher = self._llg.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if not matcher.consume_tokens(list(text.encode("utf-8"))):
            return False
        return matcher.is_accepting() and matcher.consume_token(EOS)
