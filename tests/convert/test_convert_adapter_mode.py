"""`convert --mode adapter`: the user mistakes it refuses in one line (exit 2) before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_bundle import make_gguf
from vlm2vla_edge.convert.cli import run_app
from vlm2vla_edge.convert.merge_quantize import default_adapter_name
from vlm2vla_edge.runtime.policy.bundle import write_bundle


@pytest.fixture()
def base_q4(tmp_path: Path) -> Path:
    """A 'GGUF base' that says it is Q4_K_M (general.file_type 15)."""
    return make_gguf(tmp_path / "base.gguf", metadata={"general.architecture": "gemma3", "general.file_type": 15})


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "My Adapter!"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    return folder


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_app(args)
    return code, capsys.readouterr().err


def test_a_quantised_base_is_kept_as_it_is(tmp_path: Path, base_q4: Path, adapter: Path, capsys) -> None:
    code, err = run(["--base", str(base_q4), "--adapter", str(adapter), "--out", str(tmp_path / "b"),
                     "--mode", "adapter", "--quant", "Q8_0"], capsys)
    assert (
        code == 2 and "already Q4_K_M; --mode adapter keeps a quantised base as it is" in err and err.count("\n") == 1
    )


def test_add_needs_an_adapter_bundle_at_out(tmp_path: Path, base_q4: Path, adapter: Path, capsys) -> None:
    args = ["--base", str(base_q4), "--adapter", str(adapter), "--mode", "adapter", "--add"]
    code, err = run([*args, "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "there is no bundle at" in err
    merged = write_bundle(tmp_path / "merged", text_model=base_q4, name="m", base_model="x", quant_type="Q4_K_M")
    code, err = run([*args, "--out", str(merged.root)], capsys)
    assert code == 2 and "is a merged bundle" in err


def test_mode_options_are_checked(tmp_path: Path, base_q4: Path, adapter: Path, capsys) -> None:
    common = ["--base", str(base_q4), "--adapter", str(adapter), "--out", str(tmp_path / "b")]
    code, err = run([*common, "--mode", "lora"], capsys)
    assert code == 2 and "--mode must be merge or adapter" in err
    code, err = run([*common, "--add"], capsys)
    assert code == 2 and "are for --mode adapter" in err
    code, err = run([*common, "--mode", "adapter", "--adapter-name", "pick up"], capsys)
    assert code == 2 and "--adapter-name 'pick up' is not" in err


def test_default_adapter_name_comes_from_the_folder(adapter: Path) -> None:
    assert default_adapter_name(adapter) == "My-Adapter"
