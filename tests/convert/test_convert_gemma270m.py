"""The demo path on the real Gemma-3-270M: its GGUF (through transformers) + an adapter -> Q4_K_M bundle.

Slow (about two minutes on 2 cores: transformers dequantises the GGUF, the converter writes 540 MB,
and validation decodes with both the F16 and the Q4_K_M model), so it validates on one prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from convert_helpers import make_adapter
from vlm2vla_edge.convert.merge_quantize import ConvertOptions, convert
from vlm2vla_edge.convert.validate import Thresholds
from vlm2vla_edge.runtime.config import PolicyConfig, Sampling, StageSampling
from vlm2vla_edge.runtime.policy.bundle import load_bundle, read_gguf_header
from vlm2vla_edge.runtime.policy.engine import LlamaPolicy
from vlm2vla_edge.runtime.policy.interface import Observation

pytestmark = pytest.mark.slow


def _text_config(gguf: Path):
    """Gemma-3-270M's transformers config from the GGUF header (transformers' own GGUF config reader
    parses the whole file: 14 s)."""
    from transformers import Gemma3TextConfig

    from vlm2vla_edge.convert.hf_folder import llama_cpp_layer_types

    meta = read_gguf_header(gguf).metadata
    layers = meta["gemma3.block_count"]
    return Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=meta["gemma3.embedding_length"],
        intermediate_size=meta["gemma3.feed_forward_length"],
        num_hidden_layers=layers,
        num_attention_heads=meta["gemma3.attention.head_count"],
        num_key_value_heads=meta["gemma3.attention.head_count_kv"],
        head_dim=meta["gemma3.attention.key_length"],
        layer_types=llama_cpp_layer_types(layers),
    )


def test_gemma270m_adapter_to_q4_k_m_bundle(tmp_path: Path, gemma270m_gguf: Path) -> None:
    from transformers import Gemma3ForCausalLM

    adapter = make_adapter(_text_config(gemma270m_gguf), Gemma3ForCausalLM, tmp_path / "adapter", seed=7, b_std=0.005)
    lines: list[str] = []
    options = ConvertOptions(
        base=gemma270m_gguf,
        adapter=adapter,
        out=tmp_path / "bundle",
        quant="Q4_K_M",
        max_prompts=1,
        n_threads=2,
        base_model_id="google/gemma-3-270m",
        # The base was never taught the action language, so whether its greedy chunk stops after one action or
        # goes on is a near-tie that quantisation may flip: the chunk figures are recorded, not held.
        thresholds=Thresholds(min_top1_agreement=0.95, min_chunk_agreement=0.0, max_mean_abs_diff_cm=100.0),
    )
    result = convert(options, progress=lambda line: (lines.append(line), print(line)))

    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.mmproj is None and bundle.text_model.name == "model-q4_k_m.gguf"
    assert bundle.manifest.base_model == "google/gemma-3-270m"
    assert bundle.manifest.validation["f16_top1_agreement"] >= 0.95
    assert bundle.manifest.validation["quant_prompts"] == 1.0
    assert result.tensor_types.get("Q4_K", 0) > 0  # real k-quants at this width (640)
    # the vocabulary survived the round trip through transformers and the converter
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
    ours = read_gguf_header(bundle.text_model, keep_arrays=keys).metadata
    theirs = read_gguf_header(gemma270m_gguf, keep_arrays=keys).metadata
    assert all(ours[k] == theirs[k] for k in keys)

    # Greedy, so the step is the same on every run (the paper's sampled default made this a draw: the base,
    # never taught motion plans, once rambled past the 64-token motion budget).
    def greedy(max_tokens: int) -> Sampling:
        return Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens)

    sampling = StageSampling(subtasks=greedy(256), motion=greedy(96), action=greedy(512), retry=greedy(512))
    with LlamaPolicy.from_bundle(bundle, PolicyConfig(n_threads=2, n_ctx=2048, sampling=sampling)) as policy:
        step = policy.step(
            Observation(scene="a carrot lies left of a white plate"),
            "put the carrot on the plate",
            "pick up the carrot",
        )
    assert 1 <= len(step.chunk) <= bundle.action_language.max_steps
