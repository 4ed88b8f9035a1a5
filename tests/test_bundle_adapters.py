"""Base + adapters bundles (format 2): named LoRA adapters pinned to their base, each with its own
prompts and action language; refusals of a mismatched base, of adapters that do not fit, of bad manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_bundle import make_gguf
from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.files import sha256_file
from vlm2vla_edge.runtime.policy.bundle import (
    MANIFEST_NAME,
    AdapterSpec,
    BundleError,
    adapter_specs_of,
    load_bundle,
    write_bundle,
)
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

F32 = 0
# A "base" with two adaptable weights, in ggml order [in, out]: q [8, 4], down [4, 8].
BASE_TENSORS = [
    ("blk.0.attn_q.weight", (8, 4), F32, 4),
    ("blk.0.ffn_down.weight", (4, 8), F32, 4),
    ("token_embd.weight", (8, 16), F32, 4),
]
LORA_META = {"general.architecture": "gemma3", "general.type": "adapter", "adapter.type": "lora"}


def lora_tensors(rank: int = 2, q_in: int = 8, q_out: int = 4) -> list[tuple[str, tuple[int, ...], int, int]]:
    """lora_a is [in, r] and lora_b [r, out] in ggml order (PyTorch's [r, in] and [out, r])."""
    return [
        ("blk.0.attn_q.weight.lora_a", (q_in, rank), F32, 4),
        ("blk.0.attn_q.weight.lora_b", (rank, q_out), F32, 4),
        ("blk.0.ffn_down.weight.lora_a", (4, rank), F32, 4),
        ("blk.0.ffn_down.weight.lora_b", (rank, 8), F32, 4),
    ]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    return {
        "base": make_gguf(src / "base.gguf", BASE_TENSORS, {"general.architecture": "gemma3"}),
        "other_base": make_gguf(src / "other.gguf", BASE_TENSORS, {"general.architecture": "gemma3", "x.y": 1}),
        "pick": make_gguf(src / "pick.gguf", lora_tensors(), LORA_META),
        "wipe": make_gguf(src / "wipe.gguf", lora_tensors(rank=4), LORA_META),
    }


def spec(name: str, path: Path, **changes) -> AdapterSpec:
    fields = dict(
        name=name, path=path, rank=2, alpha=4.0, base_model="google/gemma-3-270m", prompts=PromptTemplates(),
        action_language=ActionLanguage(), validation={"adapter_top1_agreement": 0.98},
    )
    fields.update(changes)
    return AdapterSpec(**fields)


def write(dest: Path, files: dict[str, Path], *specs: AdapterSpec, **kwargs):
    return write_bundle(dest, text_model=files["base"], name="skills", base_model="google/gemma-3-270m",
                        quant_type="Q4_K_M", adapters=list(specs), **kwargs)


def test_a_base_with_two_adapters_round_trips(tmp_path: Path, files: dict[str, Path]) -> None:
    wipe_prompts = PromptTemplates(action_question="Wipe: give the next actions as [[dx, dy, dz, gripper], ...].")
    wipe_language = ActionLanguage(decimals=2, max_steps=4)
    bundle = write(
        tmp_path / "b", files, spec("pick", files["pick"]),
        spec("wipe", files["wipe"], rank=4, prompts=wipe_prompts, action_language=wipe_language),
        default_adapter="wipe",
    )
    again = load_bundle(bundle.root)  # full verification: every hash
    manifest = again.manifest
    assert manifest.format_version == 2 and manifest.adapter_sha256 is None
    assert set(again.adapters) == {"pick", "wipe"} and again.default_adapter == "wipe"
    base_sha = sha256_file(again.text_model)
    for name, adapter in again.adapters.items():
        assert adapter.path.name == f"lora-{name}.gguf" and adapter.path.is_file()
        assert adapter.sha256 == sha256_file(adapter.path) and adapter.info.base_sha256 == base_sha
    # each adapter keeps its own prompts and action language; the top level is the default adapter's
    assert again.adapter("wipe").prompts == wipe_prompts and again.adapter().action_language == wipe_language
    assert again.adapter("pick").action_language == ActionLanguage() and again.adapter("pick").info.rank == 2
    assert again.prompts == wipe_prompts and again.action_language == wipe_language
    assert again.adapter("pick").info.validation == {"adapter_top1_agreement": 0.98}
    with pytest.raises(BundleError, match="no adapter 'mop'; its adapters: pick, wipe"):
        again.adapter("mop")


def test_a_merged_bundle_stays_format_1_and_has_no_adapters(tmp_path: Path, files: dict[str, Path]) -> None:
    bundle = write_bundle(tmp_path / "m", text_model=files["base"], name="m", base_model="x", quant_type="Q8_0")
    data = json.loads((bundle.root / MANIFEST_NAME).read_text())
    assert data["format_version"] == 1 and "adapters" not in data and "default_adapter" not in data
    assert bundle.adapters == {} and bundle.default_adapter is None
    with pytest.raises(BundleError, match="has no adapters"):
        bundle.adapter("pick")


def test_an_adapter_made_for_another_base_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    other = sha256_file(files["other_base"])
    with pytest.raises(BundleError, match="adapter 'pick' was made for a base with sha256"):
        write(tmp_path / "b", files, spec("pick", files["pick"], base_sha256=other))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))

    bundle = write(tmp_path / "b", files, spec("pick", files["pick"], base_sha256=sha256_file(files["base"])))
    manifest_path = bundle.root / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["adapters"]["pick"]["base_sha256"] = other
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"adapter 'pick' of bundle b was made for a base .* convert --mode adapter"):
        load_bundle(bundle.root)


def test_a_swapped_base_file_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    """Replacing the base under the adapters (same size, other weights) fails the hash check."""
    bundle = write(tmp_path / "b", files, spec("pick", files["pick"]))
    data = bytearray(bundle.text_model.read_bytes())
    data[-1] ^= 0xFF
    bundle.text_model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model-q4_k_m.gguf does not match the manifest"):
        load_bundle(bundle.root)


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        (lora_tensors(), {**LORA_META, "general.architecture": "llama"}, "is for architecture 'llama'"),
        (lora_tensors(), {"general.architecture": "gemma3"}, "is not a LoRA adapter GGUF"),
        (lora_tensors(q_in=16), LORA_META, r"shapes of 'blk.0.attn_q.weight'.*do not fit"),
        (lora_tensors()[:3], LORA_META, "has only lora_a for 'blk.0.ffn_down.weight'"),
        ([("blk.9.attn_q.weight.lora_a", (8, 2), F32, 4), ("blk.9.attn_q.weight.lora_b", (2, 4), F32, 4)], LORA_META,
         "adapts 'blk.9.attn_q.weight', which the base does not have"),
        ([("blk.0.attn_q.weight", (8, 4), F32, 4)], LORA_META, "neither a lora_a nor a lora_b"),
    ],
)
def test_an_adapter_that_does_not_fit_the_base_is_refused_at_write(
    tmp_path: Path, files: dict[str, Path], tensors, metadata, message: str
) -> None:
    bad = make_gguf(tmp_path / "bad.gguf", tensors, metadata)
    with pytest.raises(BundleError, match=message):
        write(tmp_path / "b", files, spec("bad", bad))
    assert not (tmp_path / "b").exists()


def test_adapter_names_and_defaults_are_checked(tmp_path: Path, files: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match="adapter name 'pick up' is not"):
        write(tmp_path / "b", files, spec("pick up", files["pick"]))
    with pytest.raises(BundleError, match="two adapters are named 'Pick'"):
        write(tmp_path / "b", files, spec("pick", files["pick"]), spec("Pick", files["wipe"]))
    with pytest.raises(BundleError, match="default adapter 'mop' is not one of pick"):
        write(tmp_path / "b", files, spec("pick", files["pick"]), default_adapter="mop")
    with pytest.raises(BundleError, match="default_adapter given without adapters"):
        write(tmp_path / "b", files, default_adapter="pick")
    assert not (tmp_path / "b").exists()
    assert write(tmp_path / "b", files, spec("pick", files["pick"])).default_adapter == "pick"  # the first


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=1), "format_version 2 is for bundles with adapters"),
        (lambda d: d.update(adapters={}, default_adapter=None), "format_version 2 is for bundles with adapters"),
        (lambda d: d.update(default_adapter="mop"), "default_adapter 'mop' is not one of the adapters"),
        (lambda d: d["adapters"]["pick"].update(file="lora-missing.gguf"), "is not listed in files"),
        (lambda d: d["adapters"]["pick"].update(file=d["text_model"]), "is also another model file"),
        (lambda d: d["adapters"]["pick"].update(rank=0), r"field 'adapters.pick.rank'"),
        (lambda d: d["adapters"]["pick"].update(extra=1), r"field 'adapters.pick.extra': unknown field"),
        (lambda d: d["adapters"]["pick"]["action_language"].update(grammar_version="99"),
         "adapter 'pick' of bundle b was trained with grammar version 99"),
    ],
)
def test_invalid_adapter_manifests_are_refused(tmp_path: Path, files: dict[str, Path], edit, message: str) -> None:
    bundle = write(tmp_path / "b", files, spec("pick", files["pick"]))
    path = bundle.root / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle.root)


def test_an_adapter_is_added_beside_the_others_without_copying_the_base(tmp_path: Path, files: dict[str, Path]) -> None:
    first = write(tmp_path / "b", files, spec("pick", files["pick"], validation={"a": 1.0}))
    base_inode = first.text_model.stat().st_ino
    specs = [*adapter_specs_of(first), spec("wipe", files["wipe"], rank=4)]
    second = write_bundle(
        first.root, text_model=first.text_model, name=first.manifest.name, base_model=first.manifest.base_model,
        quant_type="Q4_K_M", adapters=specs, default_adapter="pick", link=True, overwrite=True,
    )
    assert set(second.adapters) == {"pick", "wipe"} and second.default_adapter == "pick"
    assert second.adapter("pick").info.validation == {"a": 1.0}
    assert second.text_model.stat().st_ino == base_inode  # hard-linked, not copied
    load_bundle(second.root)  # and every hash still matches
