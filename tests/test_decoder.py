"""The llama.cpp decoder: grammar-exact output, stopping, prefix reuse, cancel, and clear load errors.

Real-model tests run Gemma-3-270M (Q4_K_M, text only); they are marked slow and kept short.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vlm2vla_edge.grammars import GrammarError, load_gbnf
from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan
from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
from vlm2vla_edge.runtime.policy.interface import GenerationCancelled
from vlm2vla_edge.runtime.policy.llama_handles import DecoderError, ModelLoadError, SamplerChain
from vlm2vla_edge.testing.cancel import CountdownEvent

# A few-shot prompt so that a base model writes short chunks (keeps the tests fast).
ACTION_PROMPT = (
    "Robot arm actions as [[dx, dy, dz, gripper], ...] in metres.\n"
    "Task: lift the cup. Actions: [[0, 0, 0.05, 1], [0, 0, 0.05, 0]]\n"
    "Task: push the box left. Actions: [[0, 0.02, 0, 1]]\n"
    "Task: put the carrot on the plate. Actions: "
)
# The grammar admits any magnitude below 1; range limits are the parser's semantic check, not syntax.
WIDE = ActionLanguage(max_abs_value_m=0.999)
# The generic grammar admits metre decimals and centimetre integers (v2); read as centimetres with the widest
# bound, every number it admits parses (decimals as fractions of a centimetre).
WIDE_ANY = ActionLanguage(grammar_version="2", units="cm", decimals=2, max_abs_value_m=0.999)


def _config(**overrides) -> PolicyConfig:
    return PolicyConfig(n_threads=2, n_ctx=1024, n_batch=256, n_ubatch=256, **overrides)


# --- load errors (no model needed) ------------------------------------------------------------------


def test_missing_model_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LlamaDecoder(tmp_path / "nope.gguf", _config())
    assert issubclass(ModelLoadError, UserError)


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaDecoder(path, _config())


def test_directory_instead_of_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a file"):
        LlamaDecoder(tmp_path, _config())


def test_truncated_gguf_is_a_clear_error_not_a_crash(tmp_path: Path, gemma270m_gguf: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with gemma270m_gguf.open("rb") as src:
        path.write_bytes(src.read(4 * 1024 * 1024))
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaDecoder(path, _config())


def test_missing_projector_is_refused_before_loading(tmp_path: Path, gemma270m_gguf: Path) -> None:
    with pytest.raises(ModelLoadError, match="vision projector"):
        LlamaDecoder(gemma270m_gguf, _config(), mmproj_path=tmp_path / "mmproj.gguf")


# --- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(gemma270m_gguf: Path):
    with LlamaDecoder(gemma270m_gguf, _config()) as dec:
        yield dec


@pytest.fixture(scope="module")
def action_grammar(decoder: LlamaDecoder):
    return decoder.compile_grammar(load_gbnf("action_chunk"), "action_chunk")


@pytest.mark.slow
def test_broken_grammar_fails_at_load_naming_the_rule(decoder: LlamaDecoder) -> None:
    with pytest.raises(GrammarError, match="digit"):
        decoder.compile_grammar('root ::= "[" digit "]"\n', "broken")
    with pytest.raises(GrammarError):
        decoder.compile_grammar('root ::= "[" [0-9 "]"\n', "unclosed")


@pytest.mark.slow
def test_tokens_forced_before_the_first_choice_go_in_with_the_prompt(decoder: LlamaDecoder) -> None:
    """A grammar that starts with a fixed text (a waypoint plan's subtask) has it evaluated with the prompt, one
    batch fewer, and counted as forced output; a grammar that is one fixed text needs no batch at all."""
    from vlm2vla_edge.grammars import waypoint_plan_gbnf

    plan = decoder.compile_grammar(waypoint_plan_gbnf("Move to the lemon", (".",), 0.5, 2, "cm"), "plan")
    fixed = decoder.compile_grammar('root ::= "Grasp the lemon now."\n', "fixed")
    greedy = Sampling(temperature=0.0, max_tokens=40)
    prefix = decoder.eval_prefix("Scene: lemon at (-18, 16, -6) cm.\n")
    gen = decoder.generate("Plan: ", plan, greedy, prefix=prefix)
    assert gen.text.startswith("Move to the lemon: (") and gen.stop_reason == "grammar_end"
    assert gen.timings.prefill_tokens == len(decoder.tokenize("Plan: "))  # the prompt alone
    assert gen.timings.forced_tokens >= len(decoder.tokenize("Move to the lemon")) - 1
    assert gen.timings.generated_tokens == len(gen.tokens)
    whole = decoder.generate("Plan: ", fixed, greedy, prefix=prefix)
    assert (whole.text, whole.stop_reason, whole.timings.decode_batches) == ("Grasp the lemon now.", "grammar_end", 0)
    assert whole.timings.generated_tokens == len(whole.tokens)


@pytest.mark.slow
def test_sampled_action_chunks_always_parse(decoder: LlamaDecoder, action_grammar) -> None:
    for temperature in (0.5, 1.0, 1.5):
        for seed in range(4):
            sampling = Sampling(temperature=temperature, top_p=0.95, max_tokens=420, seed=seed)
            gen = decoder.generate(ACTION_PROMPT, action_grammar, sampling)
            assert gen.stop_reason == "grammar_end", (temperature, seed, gen.text)
            chunk = parse_action_chunk(gen.text, WIDE_ANY)
            assert 1 <= len(chunk) <= 16
            assert decoder.detokenize(gen.tokens) == gen.text
            assert gen.timings.generated_tokens == len(gen.tokens)


@pytest.mark.slow
def test_same_seed_same_text(decoder: LlamaDecoder, action_grammar) -> None:
    sampling = Sampling(temperature=1.0, max_tokens=420, seed=7)
    first = decoder.generate(ACTION_PROMPT, action_grammar, sampling)
    second = decoder.generate(ACTION_PROMPT, action_grammar, sampling)
    assert first.text == second.text


@pytest.mark.slow
def test_fast_forward_and_check_vs_mask_agree_under_greedy(decoder: LlamaDecoder, action_grammar) -> None:
    greedy = Sampling(temperature=0.0, max_tokens=420)
    texts = {}
    saved = decoder.config
    try:
        for constraint in ("check", "mask"):
            for fast_forward in (True, False):
                for speculative in (False, True):
                    decoder.config = _config(constraint=constraint, fast_forward=fast_forward, speculative=speculative)
                    gen = decoder.generate(ACTION_PROMPT, action_grammar, greedy)
                    texts[(constraint, fast_forward, speculative)] = gen.text
                    assert gen.stop_reason == "grammar_end"
                    if fast_forward:
                        assert gen.timings.forced_tokens > 0
                    else:
                        assert gen.timings.forced_tokens == 0
                    if constraint == "mask":
                        assert gen.timings.masked_resamples == 0
                    if speculative and constraint == "mask":
                        assert gen.timings.accepted_tokens > 0  # the few-shot chunk repeats itself
                    else:
                        assert gen.timings.drafted_tokens == 0  # check mode never speculates
                    assert gen.timings.generated_tokens == len(gen.tokens)
    finally:
        decoder.config = saved
    # Plain decoding agrees with itself in every mode. Speculation is off by default: on this base model's
    # repetitive few-shot chunk it meets a near tie that llama.cpp's batch shape flips (tests/test_speculative.py
    # documents it), so it is held to the grammar checks above, not to identical text here.
    plain = {key: text for key, text in texts.items() if not key[2]}
    assert len(set(plain.values())) == 1, texts
    parse_action_chunk(texts[("check", True, False)], WIDE)


@pytest.mark.slow
def test_max_tokens_bounds_output_including_forced_tokens(decoder: LlamaDecoder, action_grammar) -> None:
    for budget in (1, 5, 12):
        gen = decoder.generate(ACTION_PROMPT, action_grammar, Sampling(temperature=0.0, max_tokens=budget))
        assert gen.stop_reason == "max_tokens"
        assert len(gen.tokens) == budget
        assert gen.text.startswith("[")


@pytest.mark.slow
def test_unconstrained_generation_runs_to_budget_or_eos(decoder: LlamaDecoder) -> None:
    gen = decoder.generate("The robot picked up the", None, Sampling(temperature=0.0, max_tokens=8))
    assert gen.stop_reason in ("max_tokens", "eos")
    assert gen.timings.forced_tokens == 0 and gen.timings.masked_resamples == 0
    assert len(gen.tokens) <= 8


@pytest.mark.slow
def test_motion_plan_grammar_output_parses(decoder: LlamaDecoder) -> None:
    grammar = decoder.compile_grammar(load_gbnf("motion_plan"), "motion_plan")
    prompt = "Next motion of the robot gripper, in one sentence: "
    for seed in range(2):
        gen = decoder.generate(prompt, grammar, Sampling(temperature=1.0, max_tokens=40, seed=seed))
        assert gen.stop_reason in ("grammar_end", "eos", "max_tokens")
        if gen.stop_reason != "max_tokens":
            parse_motion_plan(gen.text)
        assert gen.text[:1].isalpha()


@pytest.mark.slow
@pytest.mark.parametrize("padding", [0, 80], ids=["short", "past-sliding-window"])
def test_prefix_reuse_is_exact_and_prefills_only_the_suffix(decoder, action_grammar, padding: int) -> None:
    """A stage after a reused prefix sees exactly the prefix, not the previous stage's tokens.

    (Comparing with one un-split prompt would test llama.cpp's batch invariance, which it does not
    promise.) With padding, prefix + stage outgrow Gemma 3's 512-token sliding window plus one
    micro-batch: only the full-size SWA cache keeps the prefix intact there (without it the logits
    differ by ~0.7).
    """
    head, tail = ACTION_PROMPT.rsplit("\n", 1)
    head = " ".join(f"item{i} costs {i * 7 % 13} coins;" for i in range(padding)) + head + "\n"
    other = "Wave the arm. Actions: "  # shares no leading token with `tail`
    n_tail = len(decoder.tokenize(tail))
    greedy = Sampling(temperature=0.0, max_tokens=60)
    probe = Sampling(temperature=0.0, max_tokens=1)  # stops before evaluating anything it sampled
    noise = Sampling(temperature=1.0, max_tokens=80, seed=3)
    prefix = decoder.eval_prefix(head)
    assert prefix.text_tokens == len(decoder.tokenize(head, add_bos=True)) == prefix.n_pos
    assert prefix.image_tokens == 0 and prefix.timings.prefill_tokens == prefix.n_pos
    first = decoder.generate(tail, action_grammar, probe, prefix=prefix)
    assert (first.timings.prefill_tokens, first.timings.reused_tokens) == (n_tail, 0)
    logits_first = decoder.last_logits()
    decoder.generate(tail, action_grammar, greedy, prefix=prefix)
    decoder.generate(other, None, noise, prefix=prefix)  # fills the cache past the window
    second = decoder.generate(tail, action_grammar, probe, prefix=prefix)
    assert (second.timings.prefill_tokens, second.timings.reused_tokens) == (n_tail, 0)
    assert (decoder.last_logits() == logits_first).all()
    decoder.generate(other, None, noise, prefix=prefix)
    again = decoder.generate(tail, action_grammar, greedy, prefix=prefix)
    fresh = decoder.eval_prefix(head)
    from_fresh = decoder.generate(tail, action_grammar, greedy, prefix=fresh)
    assert again.tokens == from_fresh.tokens
    parse_action_chunk(again.text, WIDE)


@pytest.mark.slow
def test_a_suffix_that_extends_the_cached_one_is_not_evaluated_again(decoder, action_grammar) -> None:
    head, tail = ACTION_PROMPT.rsplit("\n", 1)
    prefix = decoder.eval_prefix(head + "\n")
    greedy = Sampling(temperature=0.0, max_tokens=60)
    motion = decoder.generate("Motion: move left.\n", None, Sampling(temperature=0.0, max_tokens=3), prefix=prefix)
    extended = "Motion: move left.\n" + tail
    n_first = len(decoder.tokenize("Motion: move left.\n"))
    gen = decoder.generate(extended, action_grammar, greedy, prefix=prefix)
    # at least the motion prompt is reused (the motion answer too, where it matches the new suffix)
    assert gen.timings.reused_tokens >= n_first
    assert gen.timings.prefill_tokens + gen.timings.reused_tokens == len(decoder.tokenize(extended))
    parse_action_chunk(gen.text, WIDE)
    again = decoder.generate(extended, action_grammar, greedy, prefix=prefix)
    assert again.timings.prefill_tokens == 1  # everything cached but the last token, for its logits
    assert motion.tokens  # the motion stage's own output was dropped, its prompt kept


@pytest.mark.slow
def test_stale_prefix_handle_is_refused(decoder: LlamaDecoder, action_grammar) -> None:
    old = decoder.eval_prefix("First observation.\n")
    decoder.eval_prefix("Second observation.\n")
    with pytest.raises(DecoderError, match="stale"):
        decoder.generate("Actions: ", action_grammar, Sampling(temperature=0.0, max_tokens=4), prefix=old)
    decoder.generate("Actions: ", action_grammar, Sampling(temperature=0.0, max_tokens=4))  # clears the cache
    with pytest.raises(DecoderError, match="stale"):
        decoder.generate("Actions: ", action_grammar, Sampling(temperature=0.0, max_tokens=4), prefix=old)


@pytest.mark.slow
def test_cancel_stops_within_one_step(decoder: LlamaDecoder, action_grammar) -> None:
    sampling = Sampling(temperature=0.0, max_tokens=300)
    pre_set = threading.Event()
    pre_set.set()
    gen = decoder.generate(ACTION_PROMPT, action_grammar, sampling, cancel=pre_set)
    assert gen.stop_reason == "cancelled" and gen.tokens == ()
    # The prompt fits in one prefill batch (1 check), then one check per decode step (plain decoding:
    # one sampled token per step; speculative decoding: tests below).
    saved = decoder.config
    decoder.config = _config(speculative=False)
    try:
        event = CountdownEvent(checks_before_set=1 + 5)
        gen = decoder.generate(ACTION_PROMPT, action_grammar, sampling, cancel=event)
    finally:
        decoder.config = saved
    assert gen.stop_reason == "cancelled"
    assert gen.timings.sampled_tokens == 5
    assert gen.timings.decode_batches == 5
    assert event.checks == 1 + 5 + 1


@pytest.mark.slow
def test_cancel_from_another_thread(decoder: LlamaDecoder) -> None:
    event = threading.Event()
    long_free = Sampling(temperature=1.0, max_tokens=4000, seed=1)
    timer = threading.Timer(0.2, event.set)
    timer.start()
    try:
        gen = decoder.generate("Once upon a time", None, long_free, cancel=event)
    finally:
        timer.cancel()
    assert gen.stop_reason in ("cancelled", "eos")
    assert len(gen.tokens) < 200


@pytest.mark.slow
def test_context_overflow_is_an_error_not_a_crash(decoder: LlamaDecoder) -> None:
    tokens = decoder.tokenize("word " * 600, add_bos=True)
    with pytest.raises(DecoderError, match="context full"):
        decoder.generate(tokens * 2, None, Sampling(temperature=0.0, max_tokens=4))
    gen = decoder.generate("Hello", None, Sampling(temperature=0.0, max_tokens=2))  # still usable
    assert len(gen.tokens) <= 2


@pytest.mark.slow
def test_image_on_a_text_only_model_is_a_user_error(decoder: LlamaDecoder) -> None:
    import numpy as np

    with pytest.raises(UserError, match="vision projector"):
        decoder.eval_prefix("Look: <__media__>\n", np.zeros((8, 8, 3), dtype=np.uint8))


@pytest.mark.slow
def test_model_facts(decoder: LlamaDecoder) -> None:
    assert decoder.n_vocab == 262_144
    assert 200e6 < decoder.model_size_bytes < 300e6
    assert 1 in decoder.eog_tokens  # <eos>
    assert decoder.detokenize(decoder.tokenize("[[0.025, -0.01, 0, 1]]")) == "[[0.025, -0.01, 0, 1]]"


@pytest.mark.slow
def test_cancel_interrupts_a_long_prompt_evaluation(gemma270m_gguf: Path) -> None:
    """A prompt evaluated in one big batch is stopped mid-call (llama.cpp's abort callback), not after it:
    an e-stop must not wait for hundreds of ms of prefill."""
    config = PolicyConfig(n_threads=2, n_ctx=4096, n_batch=2048, n_ubatch=512)
    with LlamaDecoder(gemma270m_gguf, config) as long_decoder:
        prompt = "The robot moves the carrot to the plate. " * 180  # ~1,600 tokens in one batch
        t0 = time.perf_counter()
        long_decoder.eval_prefix(prompt)
        full_s = time.perf_counter() - t0
        event = threading.Event()
        timer = threading.Timer(full_s / 4, event.set)
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(GenerationCancelled):
            long_decoder.eval_prefix(prompt, cancel=event)
        stopped_s = time.perf_counter() - t0
        timer.join()
        assert stopped_s < full_s * 0.75, (stopped_s, full_s)
        # the decoder is usable again afterwards
        long_decoder.eval_prefix("Short prompt.")


# --- ownership of the llama.cpp objects -----------------------------------------------------------------

_FREE_CALLS = (
    ("llama_cpp", "llama_model_free"), ("llama_cpp", "llama_free"), ("llama_cpp", "llama_batch_free"),
    ("llama_cpp", "llama_adapter_lora_free"), ("llama_cpp", "llama_sampler_free"), ("llama_cpp.mtmd_cpp", "mtmd_free"),
)


@pytest.fixture
def frees(monkeypatch) -> list[str]:
    """The llama.cpp free calls made during a test, in order (each still frees for real)."""
    import importlib

    calls: list[str] = []
    for module_name, name in _FREE_CALLS:
        module = importlib.import_module(module_name)
        real = getattr(module, name)

        def counting(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(module, name, counting)
    return calls


def test_a_handle_frees_its_c_object_exactly_once(frees: list[str]) -> None:
    import llama_cpp

    with SamplerChain() as chain:
        chain.add(llama_cpp.llama_sampler_init_greedy())
    chain.close()  # a second close frees nothing
    assert frees == ["llama_sampler_free"]
    with pytest.raises(DecoderError, match="freed"):
        _ = chain.ptr
    with pytest.raises(DecoderError, match="could not create a sampler"), SamplerChain() as failing:
        failing.add(None)  # a NULL sampler: the chain is still freed on the way out
    assert frees == ["llama_sampler_free", "llama_sampler_free"]


def test_the_backend_is_initialised_once() -> None:
    from vlm2vla_edge.runtime.policy.llama_handles import ensure_backend

    assert ensure_backend() is ensure_backend()


@pytest.mark.slow
def test_closing_twice_frees_each_handle_once_in_reverse_order(gemma270m_gguf: Path, frees: list[str]) -> None:
    decoder = LlamaDecoder(gemma270m_gguf, _config())
    decoder.close()
    decoder.close()
    with decoder:  # leaving a `with` closes a third time
        pass
    assert frees == ["llama_batch_free", "llama_free", "llama_model_free"]
    with pytest.raises(DecoderError, match="closed"):
        decoder.tokenize("too late")


@pytest.mark.slow
def test_a_load_that_fails_half_way_frees_what_it_had_created(gemma270m_gguf: Path, frees: list[str]) -> None:
    # A text model is no vision projector: llama.cpp refuses it after the model, context and batch exist.
    with pytest.raises(ModelLoadError, match="vision projector"):
        LlamaDecoder(gemma270m_gguf, _config(), mmproj_path=gemma270m_gguf)
    assert frees == ["llama_batch_free", "llama_free", "llama_model_free"]


@pytest.mark.slow
def test_an_interrupted_load_frees_only_what_exists(gemma270m_gguf: Path, frees: list[str], monkeypatch) -> None:
    import llama_cpp

    def no_memory(*args):
        raise MemoryError("no room for the batch")

    monkeypatch.setattr(llama_cpp, "llama_batch_init", no_memory)
    with pytest.raises(MemoryError):
        LlamaDecoder(gemma270m_gguf, _config())
    assert frees == ["llama_free", "llama_model_free"]  # no batch was made, so none is freed


@pytest.mark.slow
def test_a_bad_adapter_is_refused_and_the_decoder_stays_usable(decoder: LlamaDecoder, gemma270m_gguf: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not load the LoRA adapter"):
        decoder.load_adapter("not-an-adapter", gemma270m_gguf)  # a model, not a LoRA GGUF
    assert decoder.adapter_names == ()
    assert decoder.generate("Hello", None, Sampling(temperature=0.0, max_tokens=3)).tokens
