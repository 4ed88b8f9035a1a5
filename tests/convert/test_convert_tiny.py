"""End to end on the tiny random Gemma-3 vision model: base folder + small adapter -> bundle -> runtime.

A random model's greedy action chunks are chaotic (near-tied logits everywhere), so the quantised-vs-F16
chunk thresholds are relaxed here; the F16-vs-transformers check is held to the real threshold (99%).
Q8_0 is used because k-quants need rows of 256 values and every tensor of a width-64 model falls back
to another type anyway (the progress log lists what each tensor got).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convert_helpers import make_adapter
from vlm2vla_edge.convert.merge import AdapterError
from vlm2vla_edge.convert.merge_quantize import ConvertOptions, ValidationFailed, convert
from vlm2vla_edge.convert.validate import Thresholds
from vlm2vla_edge.runtime.config import PolicyConfig
from vlm2vla_edge.runtime.policy.bundle import load_bundle
from vlm2vla_edge.runtime.policy.engine import LlamaPolicy
from vlm2vla_edge.testing import models

pytestmark = pytest.mark.slow

RELAXED_CHUNKS = Thresholds(min_top1_agreement=0.99, min_chunk_agreement=0.0, max_mean_abs_diff_cm=100.0)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_vision_gguf: models.VisionModelFiles) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config.from_pretrained(str(tiny_vision_gguf.hf_dir))
    return make_adapter(config, Gemma3ForConditionalGeneration, tmp_path_factory.mktemp("adapter") / "tiny", seed=3)


def _options(files: models.VisionModelFiles, adapter: Path, out: Path, **kw: object) -> ConvertOptions:
    fields: dict = dict(
        base=files.hf_dir, adapter=adapter, out=out, quant="Q8_0", vocab_gguf=models.gemma270m_gguf(),
        thresholds=RELAXED_CHUNKS, max_prompts=2, n_threads=2,
    )
    fields.update(kw)
    return ConvertOptions(**fields)


def test_tiny_vision_bundle_runs_in_the_runtime(
    tmp_path: Path, tiny_vision_gguf: models.VisionModelFiles, tiny_adapter: Path
) -> None:
    lines: list[str] = []
    result = convert(_options(tiny_vision_gguf, tiny_adapter, tmp_path / "bundle"), progress=lines.append)

    assert result.report.logits is not None and result.report.logits.top1_agreement >= 0.99
    assert any(line.startswith("[6/6] write: done in") for line in lines)
    assert any("tensor types:" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the work folder is gone

    bundle = load_bundle(tmp_path / "bundle")  # full hash check
    manifest = bundle.manifest
    assert manifest.quant_type == "Q8_0" and bundle.text_model.name == "model-q8_0.gguf"
    assert bundle.mmproj is not None and bundle.mmproj.name == "mmproj-f16.gguf"
    assert manifest.adapter_sha256 is not None and len(manifest.adapter_sha256) == 64
    assert manifest.validation["f16_top1_agreement"] >= 0.99
    assert manifest.validation["f16_max_logit_diff"] < 0.05
    assert "quant_chunk_agreement" in manifest.validation

    image = np.zeros((96, 128, 3), dtype=np.uint8)
    image[20:60, 30:90] = (200, 60, 40)
    config = PolicyConfig(n_threads=2, n_ctx=2048)
    with LlamaPolicy.from_bundle(bundle, config) as policy:
        step = policy.step(image, "put the carrot on the plate", "pick up the carrot")
    assert 1 <= len(step.chunk) <= bundle.action_language.max_steps
    assert all(a.is_finite() for a in step.chunk)


def test_failed_validation_writes_no_bundle(
    tmp_path: Path, tiny_vision_gguf: models.VisionModelFiles, tiny_adapter: Path
) -> None:
    strict = Thresholds(max_logit_diff=1e-6)  # no F16 conversion is that exact
    with pytest.raises(ValidationFailed, match="max \\|logit diff\\|"):
        convert(_options(tiny_vision_gguf, tiny_adapter, tmp_path / "bundle", thresholds=strict, max_prompts=1),
                progress=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base_is_refused(tmp_path: Path, tiny_vision_gguf: models.VisionModelFiles) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # A text-only Gemma-3 of the same width: the vision model's adapter names modules it does not have.
    config = Gemma3TextConfig(**{**models.TINY_TEXT_CONFIG, "vocab_size": 1024})
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(str(tmp_path / "text-base"))
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision_adapter = make_adapter(
        Gemma3Config.from_pretrained(str(tiny_vision_gguf.hf_dir)), Gemma3ForConditionalGeneration, tmp_path / "adapter"
    )
    options = ConvertOptions(base=tmp_path / "text-base", adapter=vision_adapter, out=tmp_path / "bundle")
    with pytest.raises(AdapterError, match="does not fit --base"):
        convert(options, progress=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "text-base"]


def test_adapter_mode_on_a_vision_base_then_a_second_adapter_added(
    tmp_path: Path, tiny_vision_gguf: models.VisionModelFiles, tiny_adapter: Path
) -> None:
    """A Hugging Face base is converted once, without the adapter; `--add` puts a second adapter beside the
    first on the very same base file (hard-linked, not rewritten), and the policy switches between them."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from vlm2vla_edge.runtime.policy.bundle import BundleError

    out = tmp_path / "skills"
    options = _options(tiny_vision_gguf, tiny_adapter, out, quant="F16", mode="adapter", adapter_name="pick")
    lines: list[str] = []
    result = convert(options, progress=lines.append)
    assert any(line.startswith("[4/7] base:") for line in lines) and any(
        line.startswith("[7/7] write: done") for line in lines
    )
    assert result.report.adapter_logits is not None and result.report.adapter_logits.top1_agreement >= 0.99
    first = load_bundle(out)
    assert first.manifest.format_version == 2 and first.mmproj is not None and set(first.adapters) == {"pick"}
    assert first.adapter("pick").info.validation["adapter_top1_agreement"] >= 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skills"]  # the work folder is gone
    base_inode = first.text_model.stat().st_ino

    second = make_adapter(
        Gemma3Config.from_pretrained(str(tiny_vision_gguf.hf_dir)), Gemma3ForConditionalGeneration,
        tmp_path.parent / f"{tmp_path.name}-second", seed=11,
    )
    with pytest.raises(BundleError, match="already has an adapter 'pick'"):
        convert(_options(tiny_vision_gguf, second, out, quant=None, mode="adapter", adapter_name="pick", add=True),
                progress=lambda line: None)
    lines.clear()
    convert(_options(tiny_vision_gguf, second, out, quant=None, mode="adapter", adapter_name="place", add=True,
                     make_default=True),
            progress=lines.append)
    assert not any(" base:" in line for line in lines)  # the bundle's base is reused, not converted again
    both = load_bundle(out)
    assert set(both.adapters) == {"pick", "place"} and both.default_adapter == "place"
    assert both.text_model.stat().st_ino == base_inode
    assert both.adapter("pick").info.validation == first.adapter("pick").info.validation

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[10:40, 20:50] = (200, 60, 40)
    with LlamaPolicy.from_bundle(both, PolicyConfig(n_threads=2, n_ctx=2048)) as policy:
        assert policy.adapter == "place"
        policy.step(image, "put the carrot on the plate", "pick up the carrot")
        policy.use_adapter("pick")
        step = policy.step(image, "put the carrot on the plate", "pick up the carrot")
    assert 1 <= len(step.chunk) <= both.action_language.max_steps
