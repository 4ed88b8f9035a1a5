"""Merge a LoRA adapter into its base model and save a Hugging Face folder the converter accepts.

The base is loaded exactly as training loaded it (train/lora/trainer.py `load_base`): a Gemma-3 vision
folder as `Gemma3ForConditionalGeneration`, a text folder or a GGUF file (dequantised by transformers)
as `AutoModelForCausalLM`, always in float32. The adapter's module names then match, and a mismatch
(an adapter trained on another base) is caught here by comparing the adapter's tensors with the LoRA
slots peft made, not discovered later as a model that quietly ignores part of its adapter.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm2vla_edge.convert.hf_folder import FolderFixes, copy_side_files, make_converter_ready
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.files import sha256_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_CARD = "training_card.json"


class AdapterError(UserError):
    """The adapter folder is missing, incomplete or was trained on another base model."""


@dataclass(frozen=True)
class BaseModelSource:
    """Where the base comes from and how to load it."""

    path: Path
    kind: str  # "hf-vision", "hf-text" or "gguf-text"

    @property
    def vision(self) -> bool:
        return self.kind == "hf-vision"

    @property
    def size_bytes(self) -> int:
        """Bytes of weights on disk (the free-space estimate starts from this)."""
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors")) + sum(
            p.stat().st_size for p in self.path.glob("*.bin")
        )


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    weights: Path
    sha256: str  # over adapter_config.json and the weights: a changed alpha is a different adapter
    config: dict[str, Any]
    training_card: dict[str, Any] | None


def resolve_base(path: Path) -> BaseModelSource:
    """Classify `--base` (a Hugging Face Gemma-3 folder or a text GGUF), or a one-sentence `UserError`."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"--base {path} is a file but not a .gguf; give a GGUF file or a Hugging Face folder")
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise UserError(f"--base {path} is not a GGUF file (wrong magic bytes)")
        return BaseModelSource(path, "gguf-text")
    if not path.is_dir():
        raise UserError(f"--base {path} does not exist; give a Hugging Face model folder or a GGUF file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"--base {path} has no config.json: it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--base {path}: cannot read its config.json ({exc})") from exc
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"--base {path} holds no weight files (*.safetensors or *.bin)")
    if config.get("vision_config") is not None:
        if config.get("model_type") != "gemma3":
            raise UserError(f"--base {path} is a '{config.get('model_type')}' vision model; only Gemma-3 is supported")
        return BaseModelSource(path, "hf-vision")
    if config.get("model_type") not in ("gemma3_text", "gemma3"):
        raise UserError(f"--base {path} is a '{config.get('model_type')}' model; only Gemma-3 is supported")
    return BaseModelSource(path, "hf-text")


def adapter_sha256(config_path: Path, weights: Path) -> str:
    """One digest for the adapter: sha256 of 'adapter_config.json:<sha>\\n<weights name>:<sha>\\n'."""
    text = f"{config_path.name}:{sha256_file(config_path)}\n{weights.name}:{sha256_file(weights)}\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_adapter(path: Path) -> AdapterInfo:
    """Check a peft adapter folder (save_pretrained output) and hash it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"--adapter {path} does not exist; give the folder the training wrote (adapter_config.json)")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"--adapter {path} has no {ADAPTER_CONFIG}: it is not a peft adapter folder")
    weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise AdapterError(f"--adapter {path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path} is not valid JSON ({exc.msg})") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"--adapter {path} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    card = None
    card_path = path / TRAINING_CARD
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            card = None
    return AdapterInfo(path, weights, adapter_sha256(config_path, weights), config, card)


def check_card_base(adapter: AdapterInfo, base: BaseModelSource) -> None:
    """When the training card names the base's weight hashes, the base given here must have them."""
    if not adapter.training_card:
        return
    expected = (adapter.training_card.get("base_model") or {}).get("sha256") or {}
    for name, digest in expected.items():
        candidate = base.path if base.path.is_file() and base.path.name == name else base.path / name
        if base.path.is_file() and base.path.name != name:
            continue
        if candidate.is_file() and sha256_file(candidate) != digest:
            raise AdapterError(
                f"--adapter was trained on a base whose {name} differs from the one in --base {base.path}; "
                "merge it into the very base it was trained on"
            )


def load_base_model(base: BaseModelSource) -> Any:
    """The base model in float32, loaded as training loads it."""
    import torch
    import transformers

    if base.kind == "gguf-text":
        # Dense weights (transformers >= 5.2x would keep them packed): the merge adds the adapter to them.
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32,
            quantization_config=transformers.GgufConfig(dequantize=True),
        ).eval()
    if base.kind == "hf-vision":
        return transformers.Gemma3ForConditionalGeneration.from_pretrained(str(base.path), dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32).eval()


def _adapter_keys(weights: Path) -> set[str]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            return set(handle.keys())
    import torch

    return set(torch.load(str(weights), map_location="cpu", weights_only=True))


def attach_adapter(model: Any, adapter: AdapterInfo, base: BaseModelSource | None = None) -> Any:
    """`model` wrapped with the adapter (peft, not merged); refuses an adapter whose tensors do not fill
    exactly the LoRA slots peft makes on this model (an adapter for another base)."""
    from peft import PeftModel

    where = f" --base {base.path}" if base is not None else " this base model"
    trained_on = adapter.config.get("base_model_name_or_path")
    wrong_base = (
        f"--adapter {adapter.path} does not fit{where} (it was trained on another model"
        f"{': ' + str(trained_on) if trained_on else ''})"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing keys are checked below, with a clear message
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise AdapterError(wrong_base) from exc
    slots = {
        name.replace(".default.", ".") for name, _ in peft_model.named_parameters() if ".lora_" in name
    }
    saved = _adapter_keys(adapter.weights)
    if slots != saved:
        raise AdapterError(wrong_base)
    return peft_model


def merge_adapter(model: Any, adapter: AdapterInfo, base: BaseModelSource) -> Any:
    """`model` with the adapter merged in (peft `merge_and_unload`); refuses an adapter for another base."""
    return attach_adapter(model, adapter, base).merge_and_unload()


def save_merged(
    model: Any, base: BaseModelSource, out: Path, *, vocab_gguf: Path | None = None
) -> FolderFixes:
    """Save the merged model as a converter-ready folder: weights, tokenizer and processor files, quirks."""
    out.mkdir(parents=True, exist_ok=True)
    if base.kind == "gguf-text":
        # transformers marks a model read from a GGUF as "quantized with gguf" and refuses to save it,
        # though the weights are dequantised float32 by now: drop the mark, save plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(str(out))
    if base.kind == "gguf-text":
        vocab_gguf = vocab_gguf or base.path  # the base GGUF holds the very vocabulary training used
    else:
        copy_side_files(base.path, out)
    return make_converter_ready(out, vocab_gguf=vocab_gguf)
