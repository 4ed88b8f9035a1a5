"""Helpers for the conversion tests: small LoRA adapters made with peft, without training.

An adapter is made on a model instantiated on the meta device (no weights are loaded, so making one for
the real 270M model costs a second, not the 30 s a transformers load of its GGUF takes): peft names
the LoRA slots, and each gets random values, so the merged model differs from its base (not a no-op).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LORA_TARGETS = r".*(?:language_model\.|model\.)layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"


def make_adapter(
    config: Any, model_class: Any, out: Path, *, seed: int = 0, b_std: float = 0.02, rank: int = 4
) -> Path:
    """Save a peft LoRA adapter (r=`rank`) for `model_class(config)` with random A and B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = model_class(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in get_peft_model_state_dict(peft_model).items():
        std = 0.1 if "lora_A" in key else b_std
        tensors[key] = torch.randn(tuple(value.shape), generator=generator) * std
    out.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
