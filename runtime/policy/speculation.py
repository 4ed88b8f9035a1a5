"""Where speculative drafts come from: prompt-lookup in the text itself, cut to what the grammar admits.

Why: on a CPU every llama_decode call reads the whole model, so a batch of 8 tokens costs about twice
one token (Gemma-3-270M Q4_K_M, 2 threads: 1 token 10.3 ms, 8 tokens 18.4 ms), and the text a policy
writes copies its prompt: a waypoint plan copies the scene's numbers, the action chunk copies the
plan's, and a v1 chunk repeats its first action. So after each chosen token the decoder asks a
`Drafter` for a continuation looked up in the prompt and the output so far (prompt-lookup decoding,
as llama.cpp's lookup examples), cut where the grammar would refuse it (llguidance `validate_tokens`),
and verifies it in one batch (`LlamaDecoder._speculative_loop`). This module never sees the model:
lookup only decides what is *proposed*; the grammar and the model's own choices decide what is kept,
so a bad draft costs time, never a different output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from vlm2vla_edge.runtime.policy.llama_handles import DecoderError

__all__ = ["SEP", "SPARSE_MAX_WORDS", "Draft", "Drafter", "Speculation", "StageKey", "plan_forced"]

SEP = -1  # in a draft lookup history: "no token here" (an image, the seam between two histories)

# Up to this many 32-token bitmask words with an allowed token, the grammar admits "few" tokens: the
# decoder samples from a candidate array of the allowed tokens only (at most 32 x 256 = 8192 candidates),
# and a draft may be anchored on them; above it the grammar is as good as free text.
SPARSE_MAX_WORDS = 256

# Tuning of the lookup (speed only: what is kept is decided by the grammar and the model).
_LOOSE_BRACKETS = bytes.maketrans(b"()", b"[]")
_MAX_MATCH = 12  # a match of the history's end is measured up to this many tokens back
_SCAN = 64  # most recent earlier occurrences of the last token ranked by match length
_ANCHOR_WINDOW = 1024  # history tokens searched by the grammar-anchored source
_ANCHOR_CANDIDATES = 48  # most recent admitted positions tried there
_MEMORY_OUTPUTS = 8  # outputs kept per stage for source (3)
_TOPIC_WINDOW = 10  # tokens compared before a match and before the history's end (ties of equal matches)

#: The stage whose outputs a draft may copy: (compiled grammar or None, active adapter or None).
StageKey = tuple[str | None, str | None]


@dataclass(frozen=True, slots=True)
class Draft:
    """Tokens to verify after the ones just chosen, all admitted by the grammar, and for each whether
    plain decoding would force it (it then needs no logits: the grammar decides it)."""

    tokens: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)


def _match_cap(match: int) -> int:
    """Longest draft copied after a lookup match of this many tokens: a one-token match is weak evidence
    (every verified row costs ~30% of a forward pass, mostly the 262k-row output layer), a long one strong."""
    return 4 * match


class Speculation:
    """One generation's draft state: the token history drafts are copied from, and the counts.

    `raw` is the history (prompt tokens, `SEP` where an image was, then the output as it grows);
    `keys` the loose class of each token, `where` the positions of each class. `memory` holds the
    last outputs of the same stage (same grammar, same adapter), `SEP` after each: the episode's
    previous chunk, and phrases that recur from step to step.
    """

    def __init__(
        self,
        key_of: Callable[[int], int],
        context: Sequence[int],
        memory: Sequence[int],
        digit_keys: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self._key_of = key_of
        self._digit_keys = digit_keys  # classes of digit tokens: one shape when matching the memory
        self.raw: list[int] = []
        self.keys: list[int] = []
        self.where: dict[int, list[int]] = {}
        self.extend(context)
        self.output_start = len(self.raw)  # where this generation's own output begins in `raw`
        self.memory = tuple(memory)
        self.memory_keys = [key_of(t) for t in self.memory]
        self.drafted = 0
        self.accepted = 0

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            key = self._key_of(token)
            self.where.setdefault(key, []).append(len(self.raw))
            self.raw.append(token)
            self.keys.append(key)

    def retract(self, count: int) -> None:
        """Undo the last `count` tokens of `extend` (a draft looked up on a history it only supposed)."""
        for _ in range(count):
            self.raw.pop()
            self.where[self.keys.pop()].pop()

    def _match(self, keys: Sequence[int], i: int) -> int:
        """How many tokens up to keys[i] equal the history's last ones (at most _MAX_MATCH)."""
        own, n = self.keys, len(self.keys)
        m = 1
        while m < _MAX_MATCH and i - m >= 0 and n - 1 - m >= 0 and keys[i - m] == own[n - 1 - m] != SEP:
            m += 1
        return m

    def _overlap(self, i: int, m: int) -> int:
        """How many distinct tokens the _TOPIC_WINDOW tokens before a match at i share with those before the
        history's own matched end: among equal matches, the one in the same neighbourhood (the scene line
        of the object the output just named) beats a merely more recent one."""
        n = len(self.keys)
        before = set(self.keys[max(0, i - m - _TOPIC_WINDOW + 1) : max(0, i - m + 1)])
        recent = set(self.keys[max(0, n - m - _TOPIC_WINDOW) : n - m])
        before.discard(SEP)
        return len(before & recent)

    def context_starts(self, limit: int) -> list[int]:
        return [start for start, _ in self.context_matches(limit)]

    def memory_starts(self, limit: int) -> list[int]:
        return [start for start, _ in self.memory_matches(limit)]

    def context_matches(self, limit: int) -> list[tuple[int, int]]:
        """(start, match length) where drafts may start in the history: after earlier occurrences of its
        last token, the longest match of its end first; among equals the one sharing most of its
        neighbourhood with the history's end, then the most recent."""
        n = len(self.keys)
        last = self.keys[-1] if n else SEP
        if last == SEP:
            return []
        scored: list[tuple[int, int]] = []
        positions = self.where.get(last, ())
        for idx in range(len(positions) - 1, -1, -1):
            i = positions[idx]
            if i >= n - 1:
                continue
            scored.append((self._match(self.keys, i), i))
            if len(scored) >= _SCAN:
                break
        if not scored:
            return []
        best = max(m for m, _ in scored)
        ranked = sorted(
            ((m, self._overlap(i, m) if m == best else 0, i) for m, i in scored),
            key=lambda item: (-item[0], -item[1], -item[2]),
        )
        return [(i + 1, m) for m, _, i in ranked[:limit]]

    def _memory_match(self, i: int) -> int:
        """`_match` in the memory, where the start of a remembered output also matches the start of this
        output: a remembered chunk that began like this one ("[[" then "[-") is the better model of how
        it goes on than a prompt line that merely ends in the same token."""
        own, n, mem = self.keys, len(self.keys), self.memory_keys
        m = 1
        while m < _MAX_MATCH and n - 1 - m >= 0:
            if n - 1 - m == self.output_start - 1:  # matched back to the start of this output
                if i - m < 0 or mem[i - m] == SEP:
                    m += 1
                break
            if i - m < 0 or mem[i - m] == SEP or not self._same_shape(mem[i - m], own[n - 1 - m]):
                break
            m += 1
        return m

    def _same_shape(self, a: int, b: int) -> bool:
        """Equal classes, or two digits: an earlier output of the stage matches this one through its numbers
        ("(-0.23, -0.13, -0.26), gripper" is how "(-0.24, -0.02, -0.26)," goes on, whatever the digits)."""
        return a == b or (a in self._digit_keys and b in self._digit_keys)

    def memory_matches(self, limit: int) -> list[tuple[int, int]]:
        """The same in the last outputs of this stage (a few hundred tokens: scanned whole)."""
        if not self.keys or not self.memory_keys:
            return []
        last = self.keys[-1]
        scored = [
            (self._memory_match(i), i)
            for i in range(len(self.memory_keys) - 2, -1, -1)
            if self._same_shape(self.memory_keys[i], last)
        ]
        scored.sort(key=lambda item: (-item[0], -item[1]))
        return [(i + 1, m) for m, i in scored[:limit]]


def plan_forced(matcher: Any, draft: list[int]) -> Draft:
    """Walk the draft through the grammar as plain decoding would: after each chosen token the
    grammar's forced tokens (`compute_ff_tokens`) follow unseen. Drafted tokens inside such a run
    are marked forced; a draft that spells a forced run differently is cut there (plain decoding
    would write the forced spelling). The matcher is rolled back to where it was."""
    flags: list[bool] = []
    queue: list[int] = []
    for token in draft:
        if queue:
            if token != queue[0]:
                break
            queue.pop(0)
            flags.append(True)
        else:
            flags.append(False)
        if not matcher.consume_token(token):
            flags.pop()
            break
        if not flags[-1]:
            queue = matcher.compute_ff_tokens()
        if matcher.is_stopped():
            break
    if flags and not matcher.rollback(len(flags)):
        raise DecoderError(f"grammar matcher could not roll back a draft: {matcher.get_error()}")
    return Draft(draft[: len(flags)], flags)


class Drafter:
    """One decoder's draft source: the loose token classes and the last outputs of each stage.

    `token_bytes` renders a token (the decoder's vocabulary); `fill_bitmask` and `bitmask` are
    llguidance's mask of the tokens the grammar admits next, written into the decoder's buffer.
    """

    def __init__(
        self,
        token_bytes: Callable[[int], bytes],
        eog_tokens: Sequence[int],
        fill_bitmask: Callable[[Any, np.ndarray], None],
        bitmask: np.ndarray,
    ) -> None:
        self._token_bytes = token_bytes
        self._eog = tuple(eog_tokens)
        self._fill_bitmask = fill_bitmask
        self._bitmask = bitmask
        # the last outputs of each stage (grammar, adapter), most recent last: drafts copy phrases that recur
        # across steps and episodes ("..., then close the gripper.")
        self._memory: dict[StageKey, list[tuple[int, ...]]] = {}
        self._keys: dict[int, int] = {SEP: SEP}  # token -> its loose class for draft lookup
        self._classes: dict[bytes, int] = {}
        self._digit_keys: set[int] = set()  # the classes of digit tokens (shared with each Speculation)

    def key(self, token: int) -> int:
        """The token's loose class for lookup: its text without leading spaces, with ( ) read as [ ].

        Lookup only decides where a draft is copied from; the grammar and the model decide what is kept.
        Loose classes let the opener of a chunk's next action (` [-`) find the first action (`[-`), and
        an action (`[-0.24, ...`) find the plan or scene point it copies (` (-0.24, ...`).
        """
        key = self._keys.get(token)
        if key is None:
            text = self._token_bytes(token)
            loose = (text.lstrip() or text).translate(_LOOSE_BRACKETS)
            key = self._classes.setdefault(loose, len(self._classes))
            self._keys[token] = key
            if loose.isdigit():
                self._digit_keys.add(key)
        return key

    def _unanimous(self, spec: Speculation, best: int) -> bool:
        """Whether at least two remembered places match `best` long, and all go on with the same numbers."""
        runs = [
            tuple(self._numbers_only(list(spec.memory[start : start + _MAX_MATCH])))
            for start, match in spec.memory_matches(limit=_MEMORY_OUTPUTS * 4)
            if match == best
        ]
        return len(runs) >= 2 and len(set(runs)) == 1

    def _numbers_only(self, copied: list[int]) -> list[int]:
        """`copied` up to the first token after a digit that is not part of a number list (or a seam)."""
        seen_digit = False
        for j, token in enumerate(copied):
            if token < 0:
                return copied[:j]
            if self._is_digit(token):
                seen_digit = True
            elif seen_digit and self._token_bytes(token).strip(b" ,.-"):
                return copied[:j]
        return copied

    def _is_digit(self, token: int) -> bool:
        """Whether the token is digits only (Gemma writes one digit per token): content, not wording. Its
        loose class says so (`key`; SEP is its own class and never reaches the vocabulary)."""
        return self.key(token) in self._digit_keys

    def start(self, stage: StageKey, context: list[int]) -> Speculation:
        """The draft state of one generation of `stage` after the prompt tokens `context`."""
        memory: list[int] = []
        for output in self._memory.get(stage, ()):
            memory.extend(output)
            memory.append(SEP)
        return Speculation(self.key, context, memory, self._digit_keys)

    def remember(self, stage: StageKey, output: Sequence[int]) -> None:
        """Keep a finished output of `stage` for source (3) of later drafts (the last few per stage)."""
        outputs = self._memory.setdefault(stage, [])
        outputs.append(tuple(output))
        del outputs[:-_MEMORY_OUTPUTS]

    def draft(self, spec: Speculation, matcher: Any, room: int, fast_forward: bool) -> Draft:
        """The draft to verify after the tokens just chosen (at most `room` tokens, all admitted by the
        grammar), and for each of its tokens whether plain decoding would force it (no logits needed).

        Sources: (1) the history (prompt + output) after the longest earlier match of its own end; (3) the
        last outputs of the same stage (the episode's previous chunk, recurring phrases), matched with every
        digit alike and from the start of this output. When (3) matches at least as long as (1), the draft is
        built in pieces: the remembered wording up to its next number, then that number copied from the
        prompt by (1) (a plan copies the scene's point, a chunk the plan's), cut where the number list ends,
        then the wording again, and so on; without a memory (1) alone, as one copy. If neither gives
        anything: (2) with a grammar that admits few tokens here, the most recent place in the history that
        starts the longest continuation the grammar admits, when it is at least 3 tokens, else what (3) had.
        Measured on the demo (bench/step_latency.py): the motion plan took 7 forward passes with (1) first,
        2-3 with the pieces.
        """
        eog = self._eog

        def admitted(tokens: list[int]) -> int:
            for j, t in enumerate(tokens):
                if t < 0 or t in eog:
                    tokens = tokens[:j]
                    break
            if not tokens:
                return 0
            return int(matcher.validate_tokens(tokens)) if matcher is not None else len(tokens)

        def first_admitted(
            source: Sequence[int], matches: list[tuple[int, int]], before: list[int]
        ) -> tuple[list[int], int, bool]:
            """The first continuation the grammar admits after `before` (the draft so far), cut to what it
            admits, its match length, and whether the source ends right after it (a remembered output's end)."""
            for start, match in matches:
                cont = list(source[start : start + min(room - len(before), _match_cap(match))])
                n = admitted(before + cont) - len(before)
                if n > 0:
                    end = start + n
                    return cont[:n], match, end >= len(source) or source[end] == SEP
            return [], 0, False

        draft: list[int] = []
        remembered: list[int] = []
        supposed = 0  # tokens added to the history while the draft is built (taken back at the end)
        try:
            while len(draft) < room:
                copied, context_match, _ = first_admitted(spec.raw, spec.context_matches(limit=4), draft)
                remembered, memory_match, ends = first_admitted(spec.memory, spec.memory_matches(limit=4), draft)
                piece, more = copied, bool(remembered)  # without a memory, one copy as before
                if remembered:
                    # a number list copied from the prompt ends where its numbers end: the output's own
                    # wording follows ("..., -0.26), gripper open.", not the scene's "..., -0.26), grasp (")
                    piece = self._numbers_only(copied)
                if remembered and memory_match >= context_match:
                    # The stage's earlier outputs say how this one goes on (its wording, its brackets), but
                    # their numbers belong to other scenes: a digit is copied from the prompt if it can be.
                    digit = next((j for j, t in enumerate(remembered) if self._is_digit(t)), len(remembered))
                    if digit > 0:
                        piece = remembered[:digit]
                        more = digit < len(remembered) or not ends  # a remembered output's end ends the draft
                    elif not copied:
                        piece, more = remembered, False
                    elif context_match <= 1 and self._unanimous(spec, memory_match):
                        # ...unless the remembered outputs that match this far (two or more) all wrote the same
                        # numbers here and the prompt offers only a one-token match ("Lift the X: (0, 0, 0.1)")
                        piece = self._numbers_only(remembered)
                if not piece:
                    break
                draft += piece
                # a copy runs on until the grammar or its length cap cuts it, wording from the memory up to a
                # number: then look again from the end of the draft
                if not more or len(draft) >= room:
                    break
                spec.extend(piece)
                supposed += len(piece)
        finally:
            spec.retract(supposed)
        if not draft:
            anchor = self._anchor_draft(spec, matcher, room, admitted) if matcher is not None else []
            draft = anchor if len(anchor) >= 3 or not remembered else remembered
        if matcher is None or not fast_forward or not draft:
            return Draft(draft, [False] * len(draft))
        return plan_forced(matcher, draft)

    def _anchor_draft(
        self, spec: Speculation, matcher: Any, room: int, admitted: Callable[[list[int]], int]
    ) -> list[int]:
        """Source (2) of `draft`: among the most recent history positions holding a token the grammar
        admits next, the one whose continuation the grammar admits longest (the most recent on ties)."""
        self._fill_bitmask(matcher, self._bitmask)
        words = self._bitmask[0]
        if np.count_nonzero(words) > SPARSE_MAX_WORDS:  # free text: a copy from anywhere is a blind guess
            return []
        window = np.asarray(spec.raw[-_ANCHOR_WINDOW:], dtype=np.int64)
        offset = len(spec.raw) - len(window)
        valid = window >= 0
        safe = np.where(valid, window, 0)
        allowed = valid & (((words[safe >> 5] >> (safe & 31)) & 1) != 0)
        best: list[int] = []
        for pos in np.flatnonzero(allowed)[::-1][:_ANCHOR_CANDIDATES]:
            start = offset + int(pos)
            cont = spec.raw[start : start + room]
            n = admitted(cont)
            if n > len(best):
                best = cont[:n]
                if n == room:
                    break
        return best
