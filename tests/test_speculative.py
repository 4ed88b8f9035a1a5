"""Speculative decoding (issue 19): drafts looked up in the prompt and the output, verified in one batch.

What must hold: greedy output is plain decoding's, token for token (demo prompts of the waypoint
language, the v1 few-shot prompt, an image prefix); under sampling the output distribution is plain
sampling's; a cancel stops within one batch, also when it arrives during a verification; the KV
cache holds exactly the kept tokens afterwards. Real-model tests run Gemma-3-270M (Q4_K_M), slow.
"""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from vlm2vla_edge.grammars import action_chunk_gbnf, load_gbnf
from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, load_policy_config
from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS
from vlm2vla_edge.runtime.policy.speculation import SEP, Draft, Drafter, Speculation, plan_forced
from vlm2vla_edge.testing.cancel import CountdownEvent

V1 = ActionLanguage(max_abs_value_m=0.999)
V1_TASKS = (
    "put the carrot on the plate", "push the box right", "lift the cup", "open the drawer", "wipe the table",
    "move the spoon forward",
)


def _few_shot(task: str) -> str:
    return (
        "Robot arm actions as [[dx, dy, dz, gripper], ...] in metres.\n"
        "Task: lift the cup. Actions: [[0, 0, 0.05, 1], [0, 0, 0.05, 0]]\n"
        "Task: push the box left. Actions: [[0, 0.02, 0, 1], [0, 0.025, 0, 1], [0, 0.01, -0.01, 1]]\n"
        f"Task: {task}. Actions: "
    )


def _config(**overrides) -> PolicyConfig:
    """A small decoder config with speculation on (it is off by default) unless the test says otherwise."""
    overrides.setdefault("speculative", True)
    return PolicyConfig(n_threads=2, n_ctx=1024, n_batch=256, n_ubatch=256, **overrides)


def test_speculation_is_off_by_default_and_bounded() -> None:
    """Off until greedy identity holds on every test prompt (see the xfail below)."""
    config = PolicyConfig()
    assert not config.speculative and 1 <= config.draft_max_tokens <= 64
    with pytest.raises(ValueError):
        PolicyConfig(draft_max_tokens=0)


@pytest.fixture(scope="module")
def decoder(gemma270m_gguf: Path):
    with LlamaDecoder(gemma270m_gguf, _config()) as dec:
        yield dec


def _both(decoder: LlamaDecoder, run):
    """run() with speculation off, then on (same decoder, so the same model and threads)."""
    saved = decoder.config
    try:
        decoder.config = _config(speculative=False)
        plain = run()
        decoder.config = _config(speculative=True)
        spec = run()
    finally:
        decoder.config = saved
    return plain, spec


@pytest.fixture(scope="module")
def demo_grammars(decoder: LlamaDecoder):
    """(motion plan, waypoint action chunk) grammars of the demo's action language, compiled once."""
    language = load_policy_config("policy_waypoints").action_language
    action = decoder.compile_grammar(
        action_chunk_gbnf(language.max_abs_value_m, language.decimals, language.max_steps, language.units),
        "action_chunk",
    )
    return decoder.compile_grammar(load_gbnf("motion_plan"), "motion_plan"), action


@pytest.fixture(scope="module")
def demo_cases() -> list[tuple[str, str, str]]:
    """(step prefix, action suffix, label chunk) of simulator steps labelled as the demo's training data is."""
    import tempfile

    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.episode import EpisodeReader
    from vlm2vla_edge.runtime.sim.expert import record_demonstrations
    from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples

    robot = load_robot_config("widowx250s")
    language = load_policy_config("policy_waypoints").action_language
    prompts = DEFAULT_PROMPTS.model_copy(update={"scene_units": language.units})  # the scene as the demo states it
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        results = record_demonstrations(Path(tmp), range(2_500_000, 2_500_003), robot, languages=("en",), frames=False)
        annotator = LocalAnnotator(language, robot)
        for result in results:
            assert result.path is not None
            for sample in build_samples(annotator.label(EpisodeReader(result.path)), aux=False):
                if sample.stage == "action":
                    cases.append((
                        prompts.render_step_prefix(sample.instruction, sample.subtask, sample.scene),
                        prompts.render_action_suffix(sample.motion_plan),
                        sample.target,
                    ))
    assert len(cases) >= 12
    return cases


@pytest.mark.slow
def test_greedy_output_is_plain_decodings_on_demo_prompts(decoder: LlamaDecoder, demo_cases, demo_grammars) -> None:
    """Both stages of a demo step (motion plan, then the waypoint chunk), every prompt, token for token up to
    near ties (the bare base here; the demo adapter matched 12/12 steps exactly: bench/step_latency.py)."""
    motion, action = demo_grammars
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)
    batches = {False: 0, True: 0}
    accepted = 0
    for prefix_text, action_suffix, _label in demo_cases:
        def step():
            prefix = decoder.eval_prefix(prefix_text)
            m = decoder.generate(DEFAULT_PROMPTS.render_motion_suffix(), motion, greedy, prefix=prefix)
            a = decoder.generate(action_suffix, action, greedy, prefix=prefix)
            return m, a

        plain, spec = _both(decoder, step)
        for suffix, p, s in zip((DEFAULT_PROMPTS.render_motion_suffix(), action_suffix), plain, spec):
            _assert_same_or_near_tie(decoder, prefix_text, suffix, p.tokens, s.tokens)
            if s.tokens == p.tokens:
                assert s.stop_reason == p.stop_reason
            assert s.timings.generated_tokens == len(s.tokens)
            batches[False] += p.timings.decode_batches
            batches[True] += s.timings.decode_batches
            accepted += s.timings.accepted_tokens
    assert accepted > 0
    assert batches[True] < batches[False]  # drafts were kept, so fewer forward passes


# Greedy identity holds up to ties this close: llama.cpp's logits differ in the last bits between batch shapes
# (one token per forward against a verified 9-token batch), and the differences carry through the KV cache.
# That flips ties the bare base meets when it repeats itself: measured one token at a time, ']]' against '],'
# after a fifth v1 action 0.017 and 0.038 logits apart, and '),' against '8' in a copied scene point 0.147
# apart, and (centimetre demo prompts, 2026-12-07) ')' against '.' after 62 tokens of a copied scene 0.264 apart.
# A verification that read a wrong row would part where the logits differ by whole units.
TIE_MARGIN = 0.3


def _assert_same_or_near_tie(
    decoder: LlamaDecoder, prefix_text: str, suffix: str | None, plain: tuple[int, ...], spec: tuple[int, ...]
) -> None:
    """The outputs are equal, or they part where plain decoding's choice and the speculative one are within
    TIE_MARGIN logits of each other, measured as plain decoding computes them: the prompt (`prefix_text`, then
    `suffix` if the stage had one), then the common output one token per forward pass."""
    if spec == plain:
        return
    i = next((j for j, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
    decoder.eval_prefix(prefix_text)
    if suffix:
        decoder._prefill(decoder.tokenize(suffix), None)
    for token in plain[:i]:
        decoder._decode([token])
    row = decoder.last_logits()
    # One output a prefix of the other: the shorter one chose to end there (an end-of-generation token, which
    # the output leaves out) where the longer one chose its next token; that choice must be as close a tie.
    end = max(decoder.eog_tokens, key=lambda t: float(row[t]))
    chosen = [tokens[i] if i < len(tokens) else end for tokens in (plain, spec)]
    margin = abs(float(row[chosen[0]]) - float(row[chosen[1]]))
    assert margin < TIE_MARGIN, (
        f"outputs part at token {i} ({decoder.detokenize(plain[:i + 1])!r} vs {decoder.detokenize(spec[:i + 1])!r},"
        f" an end where one is shorter)"
        f" with a logit margin of {margin:.3f}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("fast_forward", [True, False], ids=["ff", "no-ff"])
def test_greedy_output_is_plain_decodings_on_v1_chunks(decoder: LlamaDecoder, fast_forward: bool) -> None:
    grammar = decoder.compile_grammar(action_chunk_gbnf(V1.max_abs_value_m, V1.decimals, V1.max_steps), "v1")
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=200)
    for task in V1_TASKS:
        plain, spec = [], []
        saved = decoder.config
        try:
            for speculative, into in ((False, plain), (True, spec)):
                decoder.config = _config(speculative=speculative, fast_forward=fast_forward)
                into.append(decoder.generate(_few_shot(task), grammar, greedy))
        finally:
            decoder.config = saved
        _assert_same_or_near_tie(decoder, _few_shot(task), None, plain[0].tokens, spec[0].tokens)
        assert spec[0].timings.accepted_tokens > 0, spec[0].timings  # later actions repeat the first one


@pytest.mark.slow
def test_greedy_free_text_is_plain_decodings(decoder: LlamaDecoder) -> None:
    """No grammar (constraint none): drafts from the prompt only, the same text."""
    prompt = "The robot picks up the red cup. The robot picks up the blue cup. The robot picks up the"
    plain, spec = _both(decoder, lambda: decoder.generate(prompt, None, Sampling(temperature=0.0, max_tokens=40)))
    assert spec.tokens == plain.tokens
    assert spec.timings.drafted_tokens > 0


@pytest.mark.slow
def test_max_tokens_and_kv_cache_are_exact_after_speculation(decoder: LlamaDecoder) -> None:
    """A budget cuts a drafted run exactly; and after a generation with rejected drafts the cache holds
    the kept tokens only: a prefix reused afterwards gives the same text as a fresh one."""
    grammar = decoder.compile_grammar(action_chunk_gbnf(V1.max_abs_value_m, V1.decimals, V1.max_steps), "v1")
    full = decoder.generate(_few_shot("lift the cup"), grammar, Sampling(temperature=0.0, max_tokens=200))
    for budget in (1, 3, 7, 16, 30):
        gen = decoder.generate(_few_shot("lift the cup"), grammar, Sampling(temperature=0.0, max_tokens=budget))
        assert gen.tokens == full.tokens[:budget] and gen.stop_reason == "max_tokens"
    head, tail = _few_shot("push the box right").rsplit("\n", 1)
    prefix = decoder.eval_prefix(head + "\n")
    first = decoder.generate(tail, grammar, Sampling(temperature=1.0, max_tokens=120, seed=5), prefix=prefix)
    assert first.timings.drafted_tokens > first.timings.accepted_tokens  # some drafts were rejected
    reused = decoder.generate(tail, grammar, Sampling(temperature=0.0, max_tokens=120), prefix=prefix)
    fresh_prefix = decoder.eval_prefix(head + "\n")
    fresh = decoder.generate(tail, grammar, Sampling(temperature=0.0, max_tokens=120), prefix=fresh_prefix)
    assert reused.tokens == fresh.tokens


@pytest.mark.slow
def test_cancel_stops_within_one_batch(decoder: LlamaDecoder) -> None:
    grammar = decoder.compile_grammar(action_chunk_gbnf(V1.max_abs_value_m, V1.decimals, V1.max_steps), "v1")
    greedy = Sampling(temperature=0.0, max_tokens=200)
    prompt = _few_shot("lift the cup")
    full = decoder.generate(prompt, grammar, greedy)
    assert full.timings.accepted_tokens > 0 and full.timings.decode_batches >= 3
    for k in range(1, full.timings.decode_batches):
        event = CountdownEvent(1 + k)  # one check for the prompt, then one per batch
        gen = decoder.generate(prompt, grammar, greedy, cancel=event)
        assert gen.stop_reason == "cancelled"
        assert gen.timings.decode_batches == k
        assert event.checks == 1 + k + 1
        assert gen.tokens == full.tokens[: len(gen.tokens)]
    assert decoder.generate(prompt, grammar, greedy).tokens == full.tokens  # the decoder is fine afterwards


@pytest.mark.slow
def test_cancel_during_a_verification_stops_after_that_batch(decoder: LlamaDecoder, monkeypatch) -> None:
    """The stop button pressed while a draft is being verified: that batch's verification finishes (the
    kept tokens stay consistent), and no further batch is evaluated."""
    grammar = decoder.compile_grammar(action_chunk_gbnf(V1.max_abs_value_m, V1.decimals, V1.max_steps), "v1")
    greedy = Sampling(temperature=0.0, max_tokens=200)
    prompt = _few_shot("lift the cup")
    full = decoder.generate(prompt, grammar, greedy)
    verify, decode = decoder._verify, decoder._decode
    pressed = 0
    for press_at in (1, 3, 6):
        event = threading.Event()
        state = {"verifications": 0, "batches": 0, "batches_at_press": None}

        def pressing(*args, **kwargs):
            state["verifications"] += 1
            if state["verifications"] == press_at:
                event.set()
                state["batches_at_press"] = state["batches"]
            return verify(*args, **kwargs)

        def counting(*args, **kwargs):
            state["batches"] += 1
            return decode(*args, **kwargs)

        monkeypatch.setattr(decoder, "_verify", pressing)
        monkeypatch.setattr(decoder, "_decode", counting)
        gen = decoder.generate(prompt, grammar, greedy, cancel=event)
        monkeypatch.undo()
        if state["batches_at_press"] is None:  # the chunk needed fewer verifications than that
            continue
        pressed += 1
        assert gen.stop_reason == "cancelled"
        assert state["batches"] == state["batches_at_press"]  # nothing evaluated after the press
        assert gen.tokens == full.tokens[: len(gen.tokens)]
    assert pressed >= 2
    assert decoder.generate(prompt, grammar, greedy).tokens == full.tokens


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square at p = 0.001 (z = 3.09), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.slow
def test_sampled_distribution_is_plain_samplings(decoder: LlamaDecoder) -> None:
    """Three digits 1-3 under a small grammar, temperature 1.5: the exact distribution of plain sampling
    is computed from the model's logits; 400 seeded speculative samples (and, as a control, 400 plain
    ones) must fit it: chi-square goodness of fit at p = 0.001 (outcomes with < 5 expected pooled),
    and total variation distance < 0.1. Drafts are proposed and sometimes rejected, so the
    accept/reject rule itself is what is tested."""
    grammar = decoder.compile_grammar('root ::= [1-3] " " [1-3] " " [1-3]\n', "digits")
    head = "Three digits from 1 to 3: 1 2 3, 2 3 1, 3 1 2, 1 3 2, 2 1 3, 3 2 1, 1 1 2, 2 2 3"
    tail = ", "
    temperature = 1.5
    digits = [decoder.tokenize(str(d)) for d in (1, 2, 3)]
    assert all(len(t) == 1 for t in digits)
    digit_ids = [t[0] for t in digits]
    space = decoder.tokenize(" ")
    assert len(space) == 1

    def probs(logits: np.ndarray) -> np.ndarray:
        x = logits[digit_ids].astype(np.float64) / temperature
        p = np.exp(x - x.max())
        return p / p.sum()

    prefix = decoder.eval_prefix(head)
    probe = decoder.generate(tail, grammar, Sampling(temperature=0.0, max_tokens=1), prefix=prefix)
    assert probe.tokens[0] in digit_ids
    # the logits after the whole prompt: teacher forcing from the prefix (tail + continuation)
    tail_ids = decoder.tokenize(tail)
    exact: dict[str, float] = {}
    rows0 = decoder.teacher_forced_logits(tail_ids, prefix)
    p1 = probs(rows0[-1])
    for i, j in itertools.product(range(3), range(3)):
        rows = decoder.teacher_forced_logits(tail_ids + [digit_ids[i], space[0], digit_ids[j], space[0]], prefix)
        p2 = probs(rows[len(tail_ids) + 1])
        p3 = probs(rows[len(tail_ids) + 3])
        for k in range(3):
            exact[f"{i + 1} {j + 1} {k + 1}"] = p1[i] * p2[j] * p3[k]
    assert abs(sum(exact.values()) - 1) < 1e-9

    n = 400
    counts: dict[bool, dict[str, int]] = {}
    drafted = accepted = 0
    saved = decoder.config
    try:
        for speculative in (False, True):
            decoder.config = _config(speculative=speculative)
            counts[speculative] = {key: 0 for key in exact}
            for seed in range(n):
                prefix = decoder.eval_prefix(head) if seed == 0 else prefix
                sampling = Sampling(temperature=temperature, top_p=1.0, max_tokens=8, seed=seed)
                gen = decoder.generate(tail, grammar, sampling, prefix=prefix)
                counts[speculative][gen.text] += 1
                if speculative:
                    drafted += gen.timings.drafted_tokens
                    accepted += gen.timings.accepted_tokens
    finally:
        decoder.config = saved
    assert 0 < accepted < drafted, (accepted, drafted)  # verification accepted some drafts and rejected others
    for speculative, seen in counts.items():
        expected = {key: n * p for key, p in exact.items()}
        big = [key for key in exact if expected[key] >= 5]
        small = [key for key in exact if expected[key] < 5]
        bins = [(seen[key], expected[key]) for key in big]
        if small:
            bins.append((sum(seen[key] for key in small), sum(expected[key] for key in small)))
        chi2 = sum((o - e) ** 2 / e for o, e in bins if e > 0)
        assert chi2 < _chi2_critical(len(bins) - 1), (speculative, chi2, seen, expected)
        tv = 0.5 * sum(abs(seen[key] / n - exact[key]) for key in exact)
        assert tv < 0.1, (speculative, tv)


@pytest.mark.slow
def test_image_prefix_greedy_is_plain_decodings(tiny_vision_gguf) -> None:
    """A vision bundle: the prefix holds an image (no tokens to copy there); drafts come from the text."""
    config = PolicyConfig(n_threads=2, n_ctx=1024, n_batch=256, n_ubatch=256)
    with LlamaDecoder(tiny_vision_gguf.text_model, config, mmproj_path=tiny_vision_gguf.mmproj) as dec:
        grammar = dec.compile_grammar(action_chunk_gbnf(V1.max_abs_value_m, V1.decimals, V1.max_steps), "v1")
        prefix_text = DEFAULT_PROMPTS.render_step_prefix("put the carrot on the plate", "move to the carrot")
        suffix = DEFAULT_PROMPTS.render_action_suffix("Move to the carrot: (-0.12, 0.05, -0.2).")
        for seed in range(3):
            image = (np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8)

            def run():
                prefix = dec.eval_prefix(prefix_text, image)
                return dec.generate(suffix, grammar, Sampling(temperature=0.0, max_tokens=80), prefix=prefix)

            plain, spec = _both_on(dec, config, run)
            assert spec.tokens == plain.tokens


def _both_on(dec: LlamaDecoder, config: PolicyConfig, run):
    dec.config = config.model_copy(update={"speculative": False})
    plain = run()
    dec.config = config.model_copy(update={"speculative": True})
    return plain, run()


# --- the lookup and the forced-run plan, without a model -------------------------------------------------


def _spec(context, memory=(), key_of=None):
    return Speculation(key_of or (lambda t: t), context, memory)


def test_lookup_prefers_the_longest_match_then_the_most_recent() -> None:
    #            0  1  2  3  4  5  6  7  8  9 10 11
    spec = _spec([5, 1, 2, 9, 7, 1, 2, 8, 3, 4, 1, 2])
    # the end "1 2" occurs at 1-2 (then 9) and 5-6 (then 8): equal matches, the most recent first
    assert spec.context_starts(limit=4)[:2] == [7, 3]
    spec = _spec([4, 1, 2, 9, 7, 1, 2, 8, 3, 4, 1, 2])
    # now "4 1 2" also matches at 0-2: the longer match wins over the more recent one
    assert spec.context_starts(limit=4)[0] == 3
    spec.extend([6])  # 6 never occurred before: nothing to copy
    assert spec.context_starts(limit=4) == []


def test_lookup_stops_at_a_seam_and_reads_loose_keys() -> None:
    spec = _spec([1, 2, SEP, 2, 3, 2])
    # the end "2" occurs at 1 (then the seam) and at 3 (then 3); a match never extends across the seam
    assert spec.context_starts(limit=4) == [4, 2]
    assert spec._match(spec.keys, 3) == 1
    loose = {10: 1, 11: 1}  # two spellings of one opener, as ` [-` and `[-`
    spec = _spec([10, 5, 6, 7, 11], key_of=lambda t: loose.get(t, t))
    assert spec.context_starts(limit=1) == [1]  # the second opener finds the first action
    assert spec.raw[1:4] == [5, 6, 7]


def test_memory_is_searched_with_the_history_end() -> None:
    spec = _spec([0, 3], memory=[3, 4, 5, 3, 6])
    assert spec.memory_starts(limit=4) == [4, 1]  # both 3s; equal match length, most recent first
    assert _spec([0, 3], memory=[]).memory_starts(limit=4) == []


class _FakeMatcher:
    """A grammar over token ids: after token 1 the grammar forces 2, 3; everything else is free."""

    def __init__(self) -> None:
        self.consumed: list[int] = []

    def consume_token(self, token: int) -> bool:
        self.consumed.append(token)
        return True

    def compute_ff_tokens(self) -> list[int]:
        return [2, 3] if self.consumed and self.consumed[-1] == 1 else []

    def is_stopped(self) -> bool:
        return False

    def rollback(self, n: int) -> bool:
        del self.consumed[len(self.consumed) - n :]
        return True


def test_forced_runs_in_a_draft_are_marked_and_a_different_spelling_is_cut() -> None:
    matcher = _FakeMatcher()
    expected = Draft([1, 2, 3, 7, 1, 2], [False, True, True, False, False, True])
    assert plan_forced(matcher, [1, 2, 3, 7, 1, 2]) == expected
    assert matcher.consumed == []  # rolled back
    assert plan_forced(matcher, [1, 2, 9, 7]) == Draft([1, 2], [False, True])  # plain decoding would force 3, not 9
    assert plan_forced(matcher, [5, 6]) == Draft([5, 6], [False, False])


def test_among_equal_matches_the_same_neighbourhood_wins() -> None:
    # two objects' lines "name, opener 9, point" apart from each other; the output named object 30, then 9
    line_30 = [30, 31, 9, 50]
    line_40 = [40, 41, 9, 51]
    filler, other = list(range(100, 112)), list(range(200, 212))
    spec = _spec(line_30 + filler + line_40 + other + [30, 2, 9])
    assert spec.context_starts(limit=2) == [3, 3 + len(filler) + 4]  # object 30's point, though 51 is more recent


class _Vocabulary:
    """Text tokens for the drafter's unit tests: '|' separates the tokens of a string."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self.ids.setdefault(piece, len(self.ids)) for piece in text.split("|")]

    def text(self, tokens) -> str:
        names = {i: t for t, i in self.ids.items()}
        return "|".join(names[t] for t in tokens)

    def drafter(self) -> Drafter:
        def token_bytes(token: int) -> bytes:
            return next(t for t, i in self.ids.items() if i == token).encode()

        return Drafter(token_bytes, eog_tokens=(), fill_bitmask=lambda *_: None, bitmask=np.zeros((1, 1), np.int32))


def test_wording_comes_from_earlier_outputs_and_numbers_from_the_prompt() -> None:
    v = _Vocabulary()
    scene = v("Scene|:| mushroom| on| the| table|:| above| (-|0|.|2|4|,| -|0|.|1|3|),| grasp| (-|0|.|2|4|,| -|0|.|2|1|")
    scene += v(").|\n")
    prompt = scene + v("Current| subtask|:| Move| to| the| mushroom|\n")
    drafter = v.drafter()
    stage = ("motion", None)
    drafter.remember(stage, v("Move| to| the| carrot|:| (-|0|.|1|1|,| -|0|.|3|2|),| gripper| open|."))
    spec = drafter.start(stage, prompt)
    spec.extend(v("Move| to| the| mushroom|:"))
    draft = drafter.draft(spec, None, room=32, fast_forward=False)
    # " (-" and "), gripper open." as the plans before; the digits of this scene, not the carrot's; the scene
    # line's own wording after its numbers ("), grasp (-") is not copied
    assert v.text(draft.tokens) == " (-|0|.|2|4|,| -|0|.|1|3|),| gripper| open|."
    assert len(spec.raw) == len(prompt) + 5  # the supposed history is taken back


def test_a_remembered_output_matches_from_the_start_of_this_one() -> None:
    v = _Vocabulary()
    prompt = v("Give| the| actions| as| [|[|dx|,| dy|]|.|\n| Motion| plan|:| (-|0|.|2|,| 0|.|1|)|\n")
    drafter = v.drafter()
    stage = ("action", None)
    drafter.remember(stage, v("[|[-|0|.|5|,| 0|.|7|]]"))
    spec = drafter.start(stage, prompt)
    spec.extend(v("["))
    # the prompt's "[" goes on with "[" then "dx"; a chunk of this stage began "[", "[-": that wins, then
    # the plan's digits follow
    assert v.text(drafter.draft(spec, None, room=4, fast_forward=False).tokens) == "[-|0|.|2"


def test_without_a_memory_the_prompt_is_copied_as_it_goes_on() -> None:
    v = _Vocabulary()
    prompt = v("Scene|:| above| (-|0|.|2|4|),| grasp|\n")
    drafter = v.drafter()
    spec = drafter.start(("motion", None), prompt)
    spec.extend(v("Go| (-"))
    # one copy, 4 tokens per matched token, as when nothing was remembered
    assert v.text(drafter.draft(spec, None, room=8, fast_forward=False).tokens) == "0|.|2|4"


@pytest.mark.slow
def test_greedy_argmax_check_is_masked_greedy(
    decoder: LlamaDecoder, demo_cases, demo_grammars, monkeypatch
) -> None:
    """Greedy asks the grammar about the unmasked argmax before computing a mask: the same tokens as always
    masking, with fewer masks computed. Plain decoding: with speculation the drafts (hence the batch shapes,
    which can flip the bare base's near ties) depend on what the drafter remembers from the run before;
    verification picks its tokens through the same `_sample_allowed`."""
    motion, action = demo_grammars
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=48)
    masks = {True: 0, False: 0}
    fill = decoder._fill_bitmask
    saved = decoder.config
    try:
        # llama.cpp's logits everywhere: with sparse logits the action grammar's few allowed tokens are masked
        # before the batch (to skip the output layer), and the argmax check applies to free text only
        decoder.config = _config(speculative=False, sparse_logits=False)
        for prefix_text, action_suffix, _label in demo_cases[:6]:
            outputs = {}
            for fast in (True, False):
                monkeypatch.setattr(LlamaDecoder, "_greedy_fast_path", fast)

                def counted(matcher, bitmask, fast=fast):
                    masks[fast] += 1
                    return fill(matcher, bitmask)

                monkeypatch.setattr(decoder, "_fill_bitmask", counted)
                prefix = decoder.eval_prefix(prefix_text)
                m = decoder.generate(DEFAULT_PROMPTS.render_motion_suffix(), motion, greedy, prefix=prefix)
                a = decoder.generate(action_suffix, action, greedy, prefix=prefix)
                outputs[fast] = (m.tokens, a.tokens)
            assert outputs[True] == outputs[False], prefix_text
    finally:
        decoder.config = saved
    assert masks[True] < masks[False] / 2, masks


def test_numbers_every_remembered_output_agrees_on_beat_a_weak_prompt_copy() -> None:
    v = _Vocabulary()
    prompt = v("Scene|:| above| (|0|.|1|5|,| 0|),| grasp|\n| Current| subtask|:| Lift| the| lemon|\n")
    drafter = v.drafter()
    stage = ("motion", None)
    spec = drafter.start(stage, prompt)
    spec.extend(v("Lift| the| lemon|:| ("))
    once = v.text(drafter.draft(spec, None, room=16, fast_forward=False).tokens)
    assert once.startswith("0|.|1|5")  # nothing remembered: the scene's point
    drafter.remember(stage, v("Lift| the| carrot|:| (|0|,| 0|,| 0|.|1|),| gripper| closed|."))
    spec = drafter.start(stage, prompt)
    spec.extend(v("Lift| the| lemon|:| ("))
    assert v.text(drafter.draft(spec, None, room=16, fast_forward=False).tokens).startswith("0|.|1|5")  # one: stale
    drafter.remember(stage, v("Lift| the| pot|:| (|0|,| 0|,| 0|.|1|),| gripper| closed|."))
    spec = drafter.start(stage, prompt)
    spec.extend(v("Lift| the| lemon|:| ("))
    # two remembered lifts agree on "0, 0, 0.1" and the scene's " (" matches one token: the lifts win
    lifted = v.text(drafter.draft(spec, None, room=16, fast_forward=False).tokens)
    assert lifted == "0|,| 0|,| 0|.|1|),| gripper| closed|."


def test_the_drafter_never_asks_the_vocabulary_about_a_seam() -> None:
    v = _Vocabulary()
    drafter = v.drafter()
    asked: list[int] = []
    token_bytes = drafter._token_bytes
    drafter._token_bytes = lambda t: (asked.append(t), token_bytes(t))[1]  # the real one aborts on -1
    stage = ("action", None)
    for chunk in ("[[|0|,| 0|,| 0|.|1", "[[|0|,| 0|,| 0|.|1"):  # outputs that end in a number, then a seam
        drafter.remember(stage, v(chunk))
    spec = drafter.start(stage, v("Plan|:| (|9|.|5|)|\n"))  # the prompt's "." matches one token only
    spec.extend(v("[[|0|,| 0|,| 0|."))
    # the two remembered chunks agree on the "1" that ends them (just before their seams): it is drafted first
    assert v.text(drafter.draft(spec, None, room=8, fast_forward=False).tokens).startswith("1|")
    assert asked and min(asked) >= 0
