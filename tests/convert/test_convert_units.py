"""Fast tests of the conversion pieces: converter quirks, the gguf-module check, quant names, chunk
agreement, and the CLI's refusals (each a one-sentence message and exit 2, before anything heavy runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from vlm2vla_edge.convert import converter, hf_folder
from vlm2vla_edge.convert.cli import run_app
from vlm2vla_edge.convert.merge import AdapterError, read_adapter, resolve_base
from vlm2vla_edge.convert.merge_quantize import estimate_disk_bytes
from vlm2vla_edge.convert.quantize import normalize_quant
from vlm2vla_edge.convert.validate import ChunkOutcome, Thresholds, ValidationReport, compare_chunks
from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.errors import UserError

REPO = Path(__file__).resolve().parents[2]


# --- converter quirks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        (
            "model.vision_tower.embeddings.patch_embedding.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
        ),
        ("vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
        ("model.multi_modal_projector.mm_input_projection_weight", "multi_modal_projector.mm_input_projection_weight"),
        (
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.0.self_attn.q_proj.weight",
        ),
    ],
)
def test_converter_tensor_names(name: str, expected: str) -> None:
    assert hf_folder.converter_tensor_name(name) == expected
    assert hf_folder.converter_tensor_name(expected) == expected  # idempotent


def test_rename_vision_tensors_rewrites_file_and_index(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file(
        {"vision_tower.a.weight": torch.ones(2), "language_model.model.b": torch.zeros(2)},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"vision_tower.a.weight": "model.safetensors"}})
    )
    assert hf_folder.rename_vision_tensors(tmp_path) == 1
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["language_model.model.b", "vision_tower.vision_model.a.weight"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == ["vision_tower.vision_model.a.weight"]
    assert hf_folder.rename_vision_tensors(tmp_path) == 0  # nothing left to do


def test_layer_pattern_matches_llama_cpp() -> None:
    assert hf_folder.llama_cpp_layer_types(7) == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    hf_folder.check_layer_pattern({"model_type": "gemma3_text", "layer_types": hf_folder.llama_cpp_layer_types(18)})
    with pytest.raises(hf_folder.HfFolderError, match="layout llama.cpp assumes"):
        hf_folder.check_layer_pattern(
            {
                "model_type": "gemma3",
                "text_config": {"model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention"]},
            }
        )


def test_make_converter_ready_needs_a_vocabulary(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gemma3_text", "layer_types": ["sliding_attention"]})
    )
    with pytest.raises(hf_folder.HfFolderError, match="tokenizer.model"):
        hf_folder.make_converter_ready(tmp_path)
    # everything else it could fix without a vocabulary was written, with the Gemma-3 chat template
    assert (tmp_path / "chat_template.jinja").read_text() == hf_folder.GEMMA3_CHAT_TEMPLATE


# --- the gguf module ---------------------------------------------------------------------------------


def test_gguf_module_is_the_converters_copy() -> None:
    assert (converter.check_gguf_module() / "gguf_writer.py").is_file()


def test_wrong_gguf_module_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = metadata.distribution(converter.CONVERTER_DIST)

    class Tampered:
        """The converter's record, but its gguf files point at a copy that differs (the release's)."""

        files = [f for f in real.files if str(f).startswith("gguf/")]

        def locate_file(self, entry: object) -> Path:
            fake = tmp_path / str(entry)
            fake.parent.mkdir(parents=True, exist_ok=True)
            fake.write_text("# the gguf release's copy\n")
            return fake

    monkeypatch.setattr(converter.metadata, "distribution", lambda name: Tampered())
    with pytest.raises(converter.ConverterSetupError) as info:
        converter.check_gguf_module()
    assert converter.FIX_COMMAND in str(info.value)
    assert "\n" not in str(info.value)


# --- quant names, disk estimate ----------------------------------------------------------------------


def test_quant_names() -> None:
    assert normalize_quant("q4_k_m") == "Q4_K_M"
    assert normalize_quant("Q8-0") == "Q8_0"
    with pytest.raises(UserError, match="unknown quant type 'Q3_XL'; choose one of Q4_K_M"):
        normalize_quant("Q3_XL")


def test_disk_estimate_grows_with_reference_type() -> None:
    assert estimate_disk_bytes(1_000_000, "f32") > estimate_disk_bytes(1_000_000, "f16") > 8_000_000


# --- chunk agreement ---------------------------------------------------------------------------------


def _outcome(text: str, actions: list[tuple[float, float, float, float]] | None) -> ChunkOutcome:
    chunk = ActionChunk(tuple(Action(*a) for a in actions)) if actions is not None else None
    return ChunkOutcome("x", text, chunk, None if chunk else "did not parse")


def test_compare_chunks() -> None:
    ref = [
        _outcome("a", [(0.01, 0.0, 0.0, 1.0)]),
        _outcome("b", [(0.01, 0.0, 0.0, 1.0)]),
        _outcome("c", [(0.01, 0.0, 0.0, 1.0)]),
        _outcome("d", [(0.01, 0.0, 0.0, 1.0)]),
        _outcome("bad", None),
    ]
    cand = [
        _outcome("a", [(0.01, 0.0, 0.0, 1.0)]),  # identical
        _outcome("b2", [(0.015, 0.0, 0.0, 1.0)]),  # 0.5 cm off: within 1 cm
        _outcome("c2", [(0.01, 0.0, 0.0, 0.0)]),  # gripper differs
        _outcome("d2", [(0.01, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 1.0)]),  # longer
        _outcome("bad", None),  # the same failure
    ]
    result = compare_chunks(ref, cand, tolerance_cm=1.0)
    assert result.prompts == 5
    assert result.agree == 3
    assert result.compared_values == 9
    assert result.mean_abs_diff_cm == pytest.approx(0.5 / 9)
    assert result.max_abs_diff_cm == pytest.approx(0.5)
    report = ValidationReport(chunks=result, thresholds=Thresholds(min_chunk_agreement=0.75))
    assert report.failures == ["quantised chunk agreement 60.00% < 75.00%"]
    assert report.figures["quant_chunk_agreement"] == pytest.approx(0.6)


# --- adapters and bases --------------------------------------------------------------------------------


def _fake_adapter(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (path / "adapter_model.safetensors").write_bytes(b"not read before the checks")
    return path


def test_adapter_checks(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_adapter(tmp_path / "empty")
    info = read_adapter(_fake_adapter(tmp_path / "ok"))
    assert len(info.sha256) == 64
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert read_adapter(tmp_path / "ok").sha256 != info.sha256  # the config is part of the adapter


def test_base_checks(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        resolve_base(tmp_path / "nope")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf"):
        resolve_base(tmp_path / "w.bin")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="only Gemma-3"):
        resolve_base(tmp_path / "m")


# --- the command line ----------------------------------------------------------------------------------


def _gemma_text_base(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (path / "model.safetensors").write_bytes(b"x")
    return path


def test_cli_missing_adapter_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _gemma_text_base(tmp_path / "base")
    code = run_app(["--base", str(base), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --adapter") and err.count("\n") == 1


def test_cli_bad_quant_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_app(["--base", "b", "--adapter", "a", "--out", str(tmp_path / "b"), "--quant", "Q9_9"])
    assert code == 2
    assert "unknown quant type 'Q9_9'" in capsys.readouterr().err


def test_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _gemma_text_base(tmp_path / "base")
    adapter = _fake_adapter(tmp_path / "adapter")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("mine")
    code = run_app(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "bundle")])
    assert code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "bundle" / "keep.txt").read_text() == "mine"


def test_cli_wrong_gguf_module_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def wrong() -> Path:
        raise converter.ConverterSetupError(
            f"the importable 'gguf' module is not the copy ...; run: {converter.FIX_COMMAND}"
        )

    monkeypatch.setattr(converter, "check_gguf_module", wrong)
    code = run_app(["--base", "b", "--adapter", "a", "--out", "o"])
    assert code == 2
    assert converter.FIX_COMMAND in capsys.readouterr().err


def test_cli_refuses_when_the_disk_is_too_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from vlm2vla_edge.convert import merge_quantize

    base = _gemma_text_base(tmp_path / "base")
    adapter = _fake_adapter(tmp_path / "adapter")
    monkeypatch.setattr(merge_quantize, "count_parameters", lambda base: 10**9)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(merge_quantize.shutil, "disk_usage", lambda path: usage._replace(free=10**9))
    code = run_app(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "bundle")])
    assert code == 2
    assert "GB free but the conversion needs about" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no work folder left


CONVERT_OPTIONS = ("--base", "--adapter", "--out", "--quant", "--dataset", "--overwrite", "--min-top1")


@pytest.mark.slow  # a process that imports the converter (torch); the in-process twin below is quick
def test_script_help_from_the_repo_root() -> None:
    result = subprocess.run(
        [sys.executable, "convert/merge_quantize.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in CONVERT_OPTIONS:
        assert option in result.stdout


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert run_app(["--help"]) == 0
    out = capsys.readouterr().out
    for option in CONVERT_OPTIONS:
        assert option in out
