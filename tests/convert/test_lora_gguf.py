"""peft LoRA adapter -> LoRA GGUF (convert/lora_gguf.py) on synthetic adapters: names, shapes, alpha, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from test_bundle import make_gguf
from vlm2vla_edge.convert.lora_gguf import LoraConversionError, write_lora_gguf

pytest.importorskip("gguf")
pytest.importorskip("safetensors")

F32 = 0
RANK, IN, OUT = 2, 8, 4


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    """A gemma3 'base' of one layer: attn_q [in=8, out=4] and ffn_down [in=4, out=8] in ggml order."""
    return make_gguf(
        tmp_path / "base.gguf",
        [("blk.0.attn_q.weight", (IN, OUT), F32, 4), ("blk.0.ffn_down.weight", (OUT, IN), F32, 4)],
        {"general.architecture": "gemma3", "gemma3.block_count": 1},
    )


def make_peft(folder: Path, tensors: dict[str, np.ndarray] | None = None, **config) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(size=(RANK, IN)),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.normal(size=(OUT, RANK)),
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": rng.normal(size=(RANK, OUT)),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": rng.normal(size=(IN, RANK)),
        }
    save_file(
        {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    settings = {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "use_dora": False, "use_rslora": False,
                "modules_to_save": None, "alpha_pattern": {}, "rank_pattern": {}}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def test_peft_names_become_the_bases_tensor_names(tmp_path: Path, base: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    adapter = make_peft(tmp_path / "adapter")
    result = write_lora_gguf(adapter, base, tmp_path / "lora.gguf")
    assert (result.rank, result.alpha, result.tensors, result.architecture) == (RANK, 4.0, 4, "gemma3")
    reader = gguf.GGUFReader(str(result.path))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 4.0
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {
        "blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b",
        "blk.0.ffn_down.weight.lora_a", "blk.0.ffn_down.weight.lora_b",
    }
    source = load_file(str(adapter / "adapter_model.safetensors"))
    a = source["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    written = np.asarray(tensors["blk.0.attn_q.weight.lora_a"].data, dtype=np.float32).reshape(a.shape)
    np.testing.assert_allclose(written, a, rtol=1e-3, atol=1e-3)  # PyTorch's [r, in] kept, stored as F16
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [IN, RANK]  # ggml order


def test_a_vision_models_language_layers_map_too(tmp_path: Path, base: Path) -> None:
    rng = np.random.default_rng(1)
    adapter = make_peft(tmp_path / "adapter", {
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(size=(RANK, IN)),
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight": rng.normal(size=(OUT, RANK)),
    })
    assert write_lora_gguf(adapter, base, tmp_path / "lora.gguf").tensors == 2


def test_rslora_alpha_is_rescaled_for_llama_cpp(tmp_path: Path, base: Path) -> None:
    adapter = make_peft(tmp_path / "adapter", use_rslora=True)
    assert write_lora_gguf(adapter, base, tmp_path / "lora.gguf").alpha == pytest.approx(4 * math.sqrt(RANK))


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"use_dora": True}, None, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, None, "trained whole modules"),
        ({"alpha_pattern": {"q_proj": 8}}, None, "per-layer alphas"),
        ({"peft_type": "IA3"}, None, "only LoRA adapters"),
        ({}, {"base_model.model.vision_tower.layers.0.q.lora_A.weight": np.zeros((2, 8))}, "vision tower"),
        ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 8))}, "not a LoRA A/B weight"),
        ({}, {"base_model.model.model.layers.0.self_attn.rot_proj.lora_A.weight": np.zeros((2, 8))}, "has no tensor"),
        ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 16)),
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((4, 2))}, "do not fit"),
    ],
)
def test_what_llama_cpp_cannot_apply_is_refused(tmp_path: Path, base: Path, config, tensors, message: str) -> None:
    adapter = make_peft(tmp_path / "adapter", tensors, **config)
    with pytest.raises(LoraConversionError, match=message):
        write_lora_gguf(adapter, base, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()
