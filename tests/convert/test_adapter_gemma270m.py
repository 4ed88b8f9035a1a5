"""Run-time LoRA on the real Gemma-3-270M: the untouched PyPI Q4_K_M base + the demo adapter as a LoRA GGUF.

Slow (a few minutes on 2 cores: the merged F16 reference is built twice, by `--quant F16` merge mode and
inside adapter mode). Checks: `convert --mode adapter` keeps the base byte for byte and records its
validation against merged F16; the policy loads base + adapters, its greedy output follows the merged
F16 model, a switch to another adapter changes the model and a switch back restores it exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm2vla_edge.convert.demo_bundle import demo_adapter_dir, validation_dataset
from vlm2vla_edge.convert.merge_quantize import ConvertOptions, convert
from vlm2vla_edge.convert.validate import compare_chunks, compare_decoders, dataset_cases, greedy_chunks
from vlm2vla_edge.runtime.config import PolicyConfig
from vlm2vla_edge.runtime.files import sha256_file
from vlm2vla_edge.runtime.policy.bundle import AdapterSpec, adapter_specs_of, load_bundle, write_bundle
from vlm2vla_edge.runtime.policy.engine import LlamaPolicy
from vlm2vla_edge.runtime.policy.interface import Observation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, gemma270m_gguf: Path) -> dict[str, Path]:
    """The demo adapter two ways: merged F16 (merge mode, --quant F16) and Q4_K_M base + LoRA (adapter mode)."""
    from vlm2vla_edge.convert.merge import read_adapter
    from vlm2vla_edge.convert.merge_quantize import adapter_fields

    root = tmp_path_factory.mktemp("adapter270m")
    language = adapter_fields(read_adapter(demo_adapter_dir()), gemma270m_gguf)["action_language"]
    dataset = validation_dataset(root / "validation", 2, language)
    common = dict(base=gemma270m_gguf, adapter=demo_adapter_dir(), dataset=dataset, max_prompts=2, n_threads=2,
                  base_model_id="google/gemma-3-270m")
    convert(ConvertOptions(out=root / "merged-f16", quant="F16", **common), progress=print)  # used to crash
    convert(ConvertOptions(out=root / "adapters", mode="adapter", adapter_name="demo", **common), progress=print)
    return {"merged": root / "merged-f16", "adapters": root / "adapters", "dataset": dataset}


def test_adapter_mode_keeps_the_base_and_records_its_validation(bundles: dict[str, Path], gemma270m_gguf: Path) -> None:
    merged = load_bundle(bundles["merged"])
    assert merged.manifest.quant_type == "F16" and merged.text_model.name == "model-f16.gguf"
    assert "quant_chunk_agreement" not in merged.manifest.validation  # nothing was quantised

    bundle = load_bundle(bundles["adapters"])
    assert bundle.manifest.format_version == 2 and bundle.manifest.quant_type == "Q4_K_M"
    assert sha256_file(bundle.text_model) == sha256_file(gemma270m_gguf)  # the base, byte for byte
    demo = bundle.adapter("demo")
    assert bundle.default_adapter == "demo" and (demo.info.rank, demo.info.alpha) == (16, 32.0)
    assert demo.path.stat().st_size < 20 * 2**20  # 7.6 MB in F16, 15 MB in F32
    figures = demo.info.validation
    assert figures["f16_top1_agreement"] >= 0.99  # the merged F16 reference against transformers
    assert figures["adapter_top1_agreement"] >= 0.95  # base + run-time LoRA against merged F16
    assert figures["adapter_positions"] >= 100 and figures["adapter_prompts"] == 2
    assert figures["label_nll"] < 0.6  # the adapter is applied: the bare base scores ~1.5 here
    # the training card's prompts and action language travel with the adapter
    from vlm2vla_edge.convert.merge import read_adapter

    card = read_adapter(demo_adapter_dir()).training_card or {}
    from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

    assert demo.prompts == PromptTemplates.model_validate(card["prompts"]["templates"])


def test_policy_follows_merged_f16_and_switches_adapters_without_reloading(
    bundles: dict[str, Path], tmp_path: Path, gemma270m_gguf: Path
) -> None:
    from transformers import Gemma3ForCausalLM

    from convert_helpers import make_adapter
    from test_convert_gemma270m import _text_config
    from vlm2vla_edge.convert.lora_gguf import write_lora_gguf

    # A second skill beside the demo adapter, on the same base (what `convert --mode adapter --add` writes).
    bundle = load_bundle(bundles["adapters"])
    other_dir = make_adapter(_text_config(gemma270m_gguf), Gemma3ForCausalLM, tmp_path / "other", seed=5, b_std=0.05)
    other = write_lora_gguf(other_dir, bundle.text_model, tmp_path / "other.gguf")
    demo = bundle.adapter("demo")
    specs = [*adapter_specs_of(bundle), AdapterSpec(
        name="other", path=other.path, rank=other.rank, alpha=other.alpha, base_model="google/gemma-3-270m",
        prompts=demo.prompts, action_language=demo.action_language,
    )]
    two = write_bundle(tmp_path / "two", text_model=bundle.text_model, name="two", base_model="google/gemma-3-270m",
                       quant_type="Q4_K_M", adapters=specs, link=True)

    stages = PolicyConfig().sampling
    greedy = stages.model_copy(
        update={
            name: getattr(stages, name).model_copy(update={"temperature": 0.0})
            for name in ("subtasks", "motion", "action", "retry")
        }
    )
    config = PolicyConfig(n_threads=2, n_ctx=2048, sampling=greedy)
    cases = dataset_cases(bundles["dataset"], vision=False, limit=2)
    with LlamaPolicy.from_bundle(load_bundle(bundles["merged"]), config) as merged, \
            LlamaPolicy.from_bundle(load_bundle(two.root), config) as policy:
        assert policy.adapter == "demo" and policy.adapters == ("demo", "other")
        assert policy.bundle_id.endswith(f"+demo@{demo.sha256[:12]}")
        # teacher-forced next-token agreement with the merged F16 model, through the runtime decoders
        agreement = compare_decoders(merged.decoder, policy.decoder, cases, policy.prompts)
        assert agreement.top1_agreement >= 0.95
        # greedy action chunks on the labelled motion plans, as the converter compares them: within 1 cm of
        # merged F16 (the converter measured 12/12 on 12 prompts; 1 of 2 is the floor held here)
        ours = greedy_chunks(policy.decoder, cases, policy.prompts, policy.language, 512)
        theirs = greedy_chunks(merged.decoder, cases, merged.prompts, merged.language, 512)
        chunks = compare_chunks(theirs, ours, 1.0)
        assert chunks.candidate_parsed == len(cases) and chunks.agreement >= 0.5, (ours, theirs)
        # the policy's own step (its motion plan, then its actions) follows the merged model's plan
        case = cases[0]
        observation = Observation(scene=case.scene)
        step = policy.step(observation, case.instruction, case.subtask)
        assert step.motion.text == merged.step(observation, case.instruction, case.subtask).motion.text
        assert 1 <= len(step.chunk) <= policy.language.max_steps

        prefix_text, suffix = case.prompt(policy.prompts)
        def logits() -> np.ndarray:
            policy.decoder.eval_prefix(prefix_text + suffix)
            return policy.decoder.last_logits()

        before = logits()
        model_handle = policy.decoder._model
        assert policy.use_adapter("other") < 0.5  # milliseconds in practice (bench/adapters.py)
        assert policy.adapter == "other" and "+other@" in policy.bundle_id
        assert policy.decoder._model is model_handle  # the base was not reloaded
        assert np.abs(logits() - before).max() > 0.5  # another skill computes something else
        policy.use_adapter("demo")
        np.testing.assert_array_equal(logits(), before)  # and switching back restores it exactly
