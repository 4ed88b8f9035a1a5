"""A peft LoRA adapter -> a LoRA GGUF that llama.cpp applies at run time on an untouched base.

Why: merging an adapter and re-quantising costs a full model per skill and, at 4 bits on small
models, erases what the adapter learned (the demo adapter merged at Q4_K_M wrote `[[0, 0, 0, 0]]`
for every chunk). llama.cpp instead applies a LoRA GGUF on
top of a quantised base: `W x + (alpha / r) B A x`. A and B are written in F32 by default: measured on
the demo adapter (bench/README.md), F16 matrices cost more decode time (llama.cpp converts the
activations for each of them) and agreed less with merged F16 (top-1 0.977 against 0.981), for 7.6 MB
saved.

The file, as llama.cpp reads it (`llama_adapter_lora_init`): `general.architecture` equal to the
base's, `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32; llama.cpp
divides by the rank itself, so the run-time scale stays 1.0), and for every adapted weight of the
base `<base tensor name>.lora_a` / `.lora_b` with PyTorch's shapes ([r, in] and [out, r]). peft's
module names become the base's tensor names through the `gguf` package's own name map for the
architecture, the one the converter uses, so names cannot drift from llama.cpp's.

Only what llama.cpp can apply is accepted: plain LoRA on linear layers of the language model (no
DoRA, no embedding LoRA, no `modules_to_save`, no vision tower, one alpha for every layer);
anything else is refused with the advice to merge instead (`vlm2vla-edge convert --mode merge`).
No torch: safetensors weights are read with numpy, so the demo writes its adapter in a fraction of
a second.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.bundle import GgufHeader, check_adapter_header, read_gguf_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# peft key: <prefix>.<module path>.lora_A.weight (lora_A: [r, in], lora_B: [out, r])
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.default)?\.weight$")
# Where the language model's layers live in the wrappers transformers uses for Gemma-3 (text-only
# model; vision model in transformers 5.x; vision model in 4.x). The name map knows `model.layers.N`.
_LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_VISION_PARTS = ("vision_tower", "multi_modal_projector", "vision_model")
_MERGE_ADVICE = "merge it into the base instead (vlm2vla-edge convert --mode merge)"


class LoraConversionError(UserError):
    """The adapter cannot be applied by llama.cpp at run time; the message says why and what to do."""


@dataclass(frozen=True)
class LoraGgufResult:
    """A written LoRA GGUF and the facts its bundle entry records."""

    path: Path
    rank: int
    alpha: float  # as written: llama.cpp applies alpha / rank
    tensors: int  # lora_a + lora_b tensors
    architecture: str


def _language_model_module(module: str) -> str | None:
    """`model.layers.N.<...>` for a module of the language model; None for anything else."""
    for prefix in _LANGUAGE_MODEL_PREFIXES:
        if module.startswith(prefix):
            rest = module[len(prefix) :]
            if rest.startswith("layers."):
                return "model." + rest
    return None


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays (safetensors without torch where possible)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as handle:
                return {k: handle.get_tensor(k).astype(np.float32) for k in handle.keys()}  # noqa: SIM118 - a safetensors handle is no dict
        except (TypeError, ValueError):  # bfloat16 has no numpy dtype: take the torch path
            pass
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def lora_scaling(config: dict[str, Any]) -> tuple[int, float]:
    """(rank, alpha as llama.cpp must see it) from a peft adapter_config.json, or a clear refusal."""
    if config.get("peft_type") != "LORA":
        raise LoraConversionError(f"only LoRA adapters can be applied at run time, not {config.get('peft_type')}")
    if config.get("use_dora"):
        raise LoraConversionError(f"a DoRA adapter cannot be applied by llama.cpp at run time; {_MERGE_ADVICE}")
    if config.get("modules_to_save"):
        raise LoraConversionError(
            f"the adapter also trained whole modules ({', '.join(config['modules_to_save'])}); {_MERGE_ADVICE}"
        )
    if config.get("alpha_pattern"):
        raise LoraConversionError(f"the adapter has per-layer alphas (alpha_pattern); {_MERGE_ADVICE}")
    rank = int(config.get("r") or 0)
    alpha = float(config.get("lora_alpha") or 0)
    if rank <= 0 or alpha <= 0:
        raise LoraConversionError(f"adapter_config.json has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}")
    if config.get("use_rslora"):  # peft scales by alpha / sqrt(r); llama.cpp by alpha / r
        alpha = alpha * math.sqrt(rank)
    if config.get("rank_pattern") and config.get("use_rslora"):
        raise LoraConversionError(f"rsLoRA with per-layer ranks cannot be expressed as one alpha; {_MERGE_ADVICE}")
    return rank, alpha


def write_lora_gguf(adapter_dir: Path, base: GgufHeader | Path, out: Path, *, dtype: str = "f32") -> LoraGgufResult:
    """Write the LoRA GGUF of the peft adapter in `adapter_dir` for the base GGUF `base` (its header, or
    its path); the result is checked against the base's tensor table before it is returned."""
    import gguf

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    weights = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise LoraConversionError(f"{adapter_dir} is not a peft adapter folder (adapter_config.json + adapter weights)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoraConversionError(f"{config_path} is not valid JSON ({exc.msg})") from exc
    rank, alpha = lora_scaling(config)
    header = base if isinstance(base, GgufHeader) else read_gguf_header(base)
    arch_name = header.metadata.get("general.architecture")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise LoraConversionError(f"the base's architecture {arch_name!r} is unknown to the gguf package")
    n_layers = int(header.metadata.get(f"{arch_name}.block_count", 0))
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    np_dtype = {"f16": np.float16, "f32": np.float32}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"dtype must be f16 or f32, not {dtype!r}")

    tensors: dict[str, np.ndarray] = {}
    for key, value in _read_weights(weights).items():
        if any(part in key for part in _VISION_PARTS):
            raise LoraConversionError(f"the adapter changes the vision tower ({key}); {_MERGE_ADVICE}")
        match = _LORA_KEY.match(key)
        if match is None:
            raise LoraConversionError(f"the adapter holds {key!r}, which is not a LoRA A/B weight; {_MERGE_ADVICE}")
        module = _language_model_module(match["module"])
        target = name_map.get_name(module) if module is not None else None
        if target is None:
            raise LoraConversionError(
                f"the adapter's module {match['module']!r} has no tensor in a {arch_name} GGUF; {_MERGE_ADVICE}"
            )
        if value.ndim != 2:
            raise LoraConversionError(f"{key} has shape {list(value.shape)}; LoRA weights are matrices")
        tensors[f"{target}.weight.lora_{match['kind'].lower()}"] = np.ascontiguousarray(value.astype(np_dtype))
    if not tensors:
        raise LoraConversionError(f"{weights} holds no LoRA weights")

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch_name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.name)
        for name in sorted(tensors):
            writer.add_tensor(name, tensors[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    from vlm2vla_edge.runtime.policy.bundle import BundleError

    try:
        check_adapter_header(read_gguf_header(out), header, f"the LoRA GGUF written from {adapter_dir}")
    except BundleError as exc:
        out.unlink(missing_ok=True)
        raise LoraConversionError(str(exc)) from exc
    return LoraGgufResult(out, rank, alpha, len(tensors), arch_name)
