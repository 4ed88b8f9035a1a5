"""Sparse logits (runtime/policy/output_head.py): where the grammar allows few tokens, a batch ends at the
final hidden state and only those tokens' logits are computed, from the output matrix read out of the GGUF.

What must hold: those logits are llama.cpp's (within the rounding of its 8-bit activations); a batch that
skipped the output layer leaves the KV cache exactly as a full batch does; greedy output (plain and
speculative) equals the output from llama.cpp's own logits on demo prompts; the decoder keeps llama.cpp's
output layer where the load-time check fails, for an adapter that changes the output layer, and when the
config turns it off. Real-model tests run Gemma-3-270M (Q4_K_M), slow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from vlm2vla_edge.grammars import action_chunk_gbnf
from vlm2vla_edge.runtime.config import PolicyConfig, Sampling, load_policy_config
from vlm2vla_edge.runtime.policy import output_head
from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
from vlm2vla_edge.runtime.policy.llama_handles import DecoderError
from vlm2vla_edge.runtime.policy.output_head import OutputMatrix, adapter_changes_output

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=40)
PROMPT = "Scene: carrot at (-24, -2, -26) cm, plate at (10, 5, -26) cm.\nMove to the carrot: ("


def _config(**overrides) -> PolicyConfig:
    return PolicyConfig(n_threads=2, n_ctx=1024, n_batch=256, n_ubatch=256, **overrides)


@pytest.fixture(scope="module")
def decoder(gemma270m_gguf: Path):
    with LlamaDecoder(gemma270m_gguf, _config()) as dec:
        yield dec


@pytest.fixture(scope="module")
def chunk_grammar(decoder: LlamaDecoder):
    language = load_policy_config("policy_waypoints").action_language
    return decoder.compile_grammar(
        action_chunk_gbnf(language.max_abs_value_m, language.decimals, language.max_steps, language.units), "chunk"
    )


@pytest.mark.slow
def test_the_model_passes_the_load_check_and_its_rows_give_llama_cpp_logits(decoder: LlamaDecoder) -> None:
    assert decoder.sparse_logits  # Gemma-3's tied Q8_0 output matrix passed the check at load
    head = decoder._head
    assert head is not None and head.tensor_name == "token_embd.weight"
    tap = decoder._tap
    assert tap is not None
    tokens = decoder.tokenize(PROMPT, add_bos=True)
    tap.capture = True
    try:
        decoder._clear()
        decoder._decode(tokens, logits_all=True)
    finally:
        tap.capture = False
    assert tap.hidden is not None and tap.hidden.shape == (len(tokens), head.n_embd)
    worst = 0.0
    for row in range(len(tokens)):
        llama = decoder._logits(row)
        top = np.argsort(llama)[-32:]
        ours = head.logits(tap.hidden[row], np.sort(top))
        worst = max(worst, float(np.max(np.abs(ours - llama[np.sort(top)]))))
        margin = float(np.diff(np.sort(llama[top]))[-1])
        assert int(np.sort(top)[np.argmax(ours)]) == int(top[-1]) or margin < 0.3  # the same top token, or a near tie
    assert worst < 0.5, worst  # llama.cpp rounds the hidden state to 8 bits; measured ~0.1-0.2


@pytest.mark.slow
def test_a_batch_that_skips_the_output_layer_leaves_the_cache_exact(decoder: LlamaDecoder) -> None:
    tokens = decoder.tokenize(PROMPT, add_bos=True)
    first, second = tokens[:-3], tokens[-3:]
    results = []
    for head in (True, False):
        decoder._clear()
        decoder._decode(first, head=head)
        if not head:
            with pytest.raises(DecoderError, match="skipped the output layer"):
                decoder._logits()  # llama.cpp's buffer is stale after such a batch: reading it is refused
        decoder._decode(second, logits_all=True)
        results.append(np.stack([decoder._logits(i).copy() for i in range(len(second))]))
    assert np.array_equal(results[0], results[1])


@pytest.mark.slow
def test_last_logits_after_a_sparse_batch_evaluates_the_last_token_again(decoder: LlamaDecoder, chunk_grammar) -> None:
    prefix = decoder.eval_prefix(PROMPT.rsplit("\n", 1)[0] + "\n")
    decoder.generate("Chunk: ", chunk_grammar, GREEDY, prefix=prefix)
    assert not decoder._logits_ok  # the chunk grammar's last batch skipped the output layer
    again = decoder.last_logits()
    assert decoder._logits_ok and again.shape == (decoder.n_vocab,)
    assert np.array_equal(again, decoder.last_logits())


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_output_equals_llama_cpp_logits(decoder: LlamaDecoder, chunk_grammar, speculative: bool) -> None:
    scenes = [
        f"Scene: carrot at ({x}, {y}, -26) cm, plate at ({y}, {x}, -26) cm.\nMove to the carrot: ({x}, {y}, -26), "
        "gripper open.\n"
        for x, y in ((-24, -2), (13, 7), (0, -31), (5, 5), (-9, 18), (30, -12))
    ]
    saved = decoder.config
    outputs: dict[bool, list[tuple[int, ...]]] = {}
    batches: dict[bool, int] = {}
    try:
        for sparse in (False, True):
            decoder.config = _config(sparse_logits=sparse, speculative=speculative)
            outputs[sparse], batches[sparse] = [], 0
            for scene in scenes:
                prefix = decoder.eval_prefix(scene)
                gen = decoder.generate("Action: ", chunk_grammar, GREEDY, prefix=prefix)
                outputs[sparse].append(gen.tokens)
                batches[sparse] += gen.timings.decode_batches
    finally:
        decoder.config = saved
    assert outputs[True] == outputs[False]
    if not speculative:  # (drafts depend on what the drafter remembers from the runs before)
        assert batches[True] == batches[False]  # the same batches, only their output layer left out


@pytest.mark.slow
def test_sparse_logits_off_in_config_keeps_llama_cpp_logits(decoder: LlamaDecoder, chunk_grammar) -> None:
    saved = decoder.config
    try:
        decoder.config = _config(sparse_logits=False)
        assert not decoder.sparse_logits
        prefix = decoder.eval_prefix(PROMPT.rsplit("\n", 1)[0] + "\n")
        decoder.generate("Chunk: ", chunk_grammar, GREEDY, prefix=prefix)
        assert decoder._logits_ok
    finally:
        decoder.config = saved


@pytest.mark.slow
def test_a_model_whose_logits_do_not_match_keeps_llama_cpp_logits(
    gemma270m_gguf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An architecture that scales or soft-caps its logits after the output matrix fails the load check."""
    monkeypatch.setattr(OutputMatrix, "logits", lambda self, hidden, ids: self.rows(ids) @ hidden * 0.5)
    with caplog.at_level(logging.INFO, logger="vlm2vla_edge.runtime.policy.decoder"):
        with LlamaDecoder(gemma270m_gguf, _config()) as dec:
            assert not dec.sparse_logits
            grammar = dec.compile_grammar(action_chunk_gbnf(0.5, 2, 1, "cm"), "chunk")
            gen = dec.generate(PROMPT + "Action: ", grammar, GREEDY)
            assert gen.stop_reason == "grammar_end" and dec._logits_ok
    assert any("sparse_logits_off" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)


def _write_adapter(path: Path, names: list[str]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_type("adapter")
    for name in names:
        writer.add_tensor(name, np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_adapter_that_adapts_the_output_layer_is_recognised(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    body = _write_adapter(
        tmp_path / "body.gguf", ["blk.0.attn_output.weight.lora_a", "blk.0.attn_output.weight.lora_b"]
    )
    head = _write_adapter(tmp_path / "head.gguf", ["blk.0.attn_q.weight.lora_a", "output.weight.lora_a"])
    tied = _write_adapter(tmp_path / "tied.gguf", ["token_embd.weight.lora_a", "token_embd.weight.lora_b"])
    assert not adapter_changes_output(body)
    assert adapter_changes_output(head) and adapter_changes_output(tied)


def test_an_unreadable_gguf_is_a_decoder_error(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(DecoderError, match="GGUF header"):
        output_head.OutputMatrix(bad, 640, 262144)


@pytest.mark.slow
def test_the_tap_reports_a_failure_instead_of_raising_into_c(decoder: LlamaDecoder, monkeypatch) -> None:
    tap = decoder._tap
    assert tap is not None
    monkeypatch.setattr(tap, "_nbytes", lambda tensor: 7)  # not rows of n_embd floats
    decoder._clear()
    with pytest.raises(DecoderError, match="hidden state was not captured"):
        decoder._decode(decoder.tokenize("Move left.", add_bos=True), head=False)
    monkeypatch.undo()
    decoder._clear()
    decoder._decode(decoder.tokenize("Move left.", add_bos=True), head=False)  # the decoder recovered
    assert decoder._tap is not None and decoder._tap.hidden is not None


@pytest.mark.slow
def test_a_vision_model_after_an_image_prefix(tiny_vision_gguf) -> None:
    """The tests' tiny vision model passes the load check (its output matrix is not quantized: within 1e-3) and
    decodes the same chunk after an image prefix with sparse logits as with llama.cpp's."""
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    outputs = {}
    for sparse in (False, True):
        config = _config(sparse_logits=sparse)
        with LlamaDecoder(tiny_vision_gguf.text_model, config, mmproj_path=tiny_vision_gguf.mmproj) as dec:
            assert dec.sparse_logits is sparse
            grammar = dec.compile_grammar(action_chunk_gbnf(0.5, 2, 2, "cm"), "chunk")
            prefix = dec.eval_prefix(f"Look: {dec.media_marker} Act:", image)
            outputs[sparse] = dec.generate(" ", grammar, GREEDY, prefix=prefix).tokens
    assert outputs[True] == outputs[False]
