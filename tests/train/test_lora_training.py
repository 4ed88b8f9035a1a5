"""LoRA training on the tiny random Gemma-3 models: the loss falls, only the adapter changes, the adapter
reloads with identical logits, a resumed run continues exactly, text-only models train, the card is complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from test_lora_samples import make_dataset  # noqa: E402

from vlm2vla_edge.runtime.errors import UserError  # noqa: E402
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates  # noqa: E402
from vlm2vla_edge.testing import models  # noqa: E402
from vlm2vla_edge.train.data.dataset import read_dataset  # noqa: E402
from vlm2vla_edge.train.lora.collate import Collator, EncodedDataset, encode_all  # noqa: E402
from vlm2vla_edge.train.lora.config import TrainConfig  # noqa: E402
from vlm2vla_edge.train.lora.samples import chat_samples  # noqa: E402
from vlm2vla_edge.train.lora.trainer import (  # noqa: E402
    CARD_FILE,
    AnswerLoss,
    apply_lora,
    latest_checkpoint,
    load_base,
    lora_target_regex,
    train,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lora-train") / "ds", episodes=2, steps=2)


@pytest.fixture(scope="module")
def vision_dir(tiny_vision_gguf: models.VisionModelFiles) -> Path:
    return tiny_vision_gguf.hf_dir


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory, gemma_tokenizer_dir: Path) -> Path:
    """A tiny random Gemma3ForCausalLM (text-only, the demo model's architecture) with the real tokenizer."""
    out = tmp_path_factory.mktemp("tiny-text") / "hf"
    torch.manual_seed(1)
    config = transformers.Gemma3TextConfig(**models.TINY_TEXT_CONFIG)
    transformers.Gemma3ForCausalLM(config).save_pretrained(str(out))
    for item in gemma_tokenizer_dir.iterdir():
        shutil.copy2(item, out / item.name)
    return out


def _fixed_batch(loaded, dataset_dir: Path, n: int = 4):  # type: ignore[no-untyped-def]
    chats = chat_samples(read_dataset(dataset_dir), vision=loaded.vision)
    encoded, _ = encode_all(chats, loaded.tokenizer, loaded.image_tokens, 1024)
    data = EncodedDataset(encoded, loaded.image_processor)
    return Collator(pad_id=0, vision=loaded.vision)([data[i] for i in range(n)])


def test_lora_targets_the_language_model_only(vision_dir: Path) -> None:
    model = load_base(vision_dir).model
    peft_model = apply_lora(model, TrainConfig())
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert len(lora_layers) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(".language_model.layers." in name for name in lora_layers)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    fresh = transformers.Gemma3ForConditionalGeneration.from_pretrained(str(vision_dir))
    assert "vision_tower" not in lora_target_regex(fresh)


def test_attention_targets_put_lora_on_the_attention_projections_only(vision_dir: Path) -> None:
    model = load_base(vision_dir).model
    peft_model = apply_lora(model, TrainConfig(lora_targets="attention"))
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert {name.rsplit(".", 1)[1] for name in lora_layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(lora_layers) == 2 * 4 and all(".language_model.layers." in name for name in lora_layers)


def test_training_lowers_the_loss_and_changes_only_the_adapter(
    vision_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    loaded = load_base(vision_dir)
    batch = _fixed_batch(loaded, dataset_dir)
    assert batch.pixel_values is not None and batch.token_type_ids is not None
    base_before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    torch.manual_seed(0)
    module = AnswerLoss(apply_lora(loaded.model, TrainConfig(lora_dropout=0.0)), answer_only=True)
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = module(**batch.model_inputs(), labels=batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(module(**batch.model_inputs(), labels=batch.labels))
    assert final < losses[0] - 0.05, losses + [final]

    # Base weights are bit-identical; every LoRA B matrix moved away from its zero initialisation.
    after = module.lm.get_base_model().state_dict()
    for name, before in base_before.items():
        key = next(k for k in (name, name.replace(".weight", ".base_layer.weight")) if k in after)
        assert torch.equal(after[key], before), name
    lora_b = [p for n, p in module.lm.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)

    # The adapter saves and reloads through peft onto a fresh base: identical logits.
    module.eval()
    module.lm.save_pretrained(str(tmp_path / "adapter"))
    fresh = transformers.Gemma3ForConditionalGeneration.from_pretrained
    reloaded = peft.PeftModel.from_pretrained(fresh(str(vision_dir)), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours = module.lm(**batch.model_inputs()).logits  # (B, T, V)
        theirs = reloaded(**batch.model_inputs()).logits  # (B, T, V)
        plain = fresh(str(vision_dir)).eval()(**batch.model_inputs()).logits  # (B, T, V)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, plain)  # the adapter does change the model


@pytest.mark.parametrize("kind", ["vision", "text"])
def test_answer_only_loss_equals_the_full_logits_loss(
    kind: str, vision_dir: Path, text_dir: Path, dataset_dir: Path
) -> None:
    loaded = load_base(vision_dir if kind == "vision" else text_dir)
    batch = _fixed_batch(loaded, dataset_dir)
    lm = apply_lora(loaded.model, TrainConfig(lora_dropout=0.0)).eval()
    torch.manual_seed(0)
    for name, parameter in lm.named_parameters():  # non-zero adapter, so both paths go through LoRA
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    with torch.no_grad():
        fast = AnswerLoss(lm, answer_only=True)(**batch.model_inputs(), labels=batch.labels)
        full = AnswerLoss(lm, answer_only=False)(**batch.model_inputs(), labels=batch.labels)
        reference = lm(**batch.model_inputs(), labels=batch.labels).loss  # transformers' own loss
    assert torch.allclose(fast, full, rtol=1e-5, atol=1e-5), (float(fast), float(full))
    assert torch.allclose(full, reference, rtol=1e-5, atol=1e-5), (float(full), float(reference))


class _Crash(Exception):
    pass


def test_resume_continues_at_the_right_step_exactly(vision_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(batch_size=2, max_steps=4, save_every=2, log_every=1, learning_rate=2e-3, seed=3)
    straight = train(dataset_dir, vision_dir, tmp_path / "straight", config, progress=lambda line: None)
    assert straight.steps == 4

    def crash_at_step_3(line: str) -> None:
        if line.startswith("step 3/"):
            raise _Crash

    out = tmp_path / "crashed"
    with pytest.raises(_Crash):
        train(dataset_dir, vision_dir, out, config, progress=crash_at_step_3)
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-00000002"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))  # the frozen base is not checkpointed
    with pytest.raises(UserError, match="pass --resume"):
        train(dataset_dir, vision_dir, out, config, progress=lambda line: None)
    with pytest.raises(UserError, match="differs from the checkpoint's in learning_rate"):
        train(dataset_dir, vision_dir, out, config.model_copy(update={"learning_rate": 1e-3}), resume=True)

    lines: list[str] = []
    resumed = train(dataset_dir, vision_dir, out, config, resume=True, progress=lines.append)
    assert any("resumed from" in line and "at step 2/4" in line for line in lines)
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["3/4", "4/4"]
    assert resumed.steps == 4
    card = json.loads((out / CARD_FILE).read_text())
    reference = json.loads((tmp_path / "straight" / CARD_FILE).read_text())
    # Same data order, same dropout draws, same optimizer state: the resumed run repeats the straight one.
    assert [e["step"] for e in card["losses"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in card["losses"]] == pytest.approx([e["loss"] for e in reference["losses"]], abs=1e-5)
    assert [e["lr"] for e in card["losses"]] == pytest.approx([e["lr"] for e in reference["losses"]])
    assert len(card["runs"]) == 2
    from safetensors.torch import load_file

    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_text_only_model_trains_through_the_cli_and_writes_the_card(
    text_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    config_path = tmp_path / "lora.yaml"
    config_path.write_text(
        "batch_size: 4\nepochs: 2\nmax_steps: 3\nlog_every: 1\nlearning_rate: 1.0e-3\nstages: [motion, action]\n"
        "prompts: {action_turn: follow_up}\n"
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vlm2vla_edge.train.lora", "--dataset", str(dataset_dir), "--base", str(text_dir),
               "--out", str(out), "--config", str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all("tokens/s" in line and "eta" in line for line in steps)
    card = json.loads((out / CARD_FILE).read_text())
    info = dataset_dir / "dataset.json"
    import hashlib

    assert card["dataset"]["dataset_json_sha256"] == hashlib.sha256(info.read_bytes()).hexdigest()
    assert card["dataset"]["trained_samples"] == 8  # 2 episodes x 2 steps x (motion, action)
    assert card["base_model"]["kind"] == "hf-text" and card["base_model"]["architecture"] == "Gemma3ForCausalLM"
    assert card["base_model"]["sha256"]["model.safetensors"] == hashlib.sha256(
        (text_dir / "model.safetensors").read_bytes()
    ).hexdigest()
    assert card["hyperparameters"]["lora_rank"] == 16 and card["hyperparameters"]["stages"] == ["motion", "action"]
    # the templates the samples were rendered with are the ones the card ships to the bundle
    assert card["prompts"]["templates"]["action_turn"] == "follow_up"
    assert PromptTemplates.model_validate(card["prompts"]["templates"]) == PromptTemplates(action_turn="follow_up")
    assert [e["step"] for e in card["losses"]] == [1, 2, 3] and card["wall_time_s"] > 0
    assert set(card["versions"]) >= {"torch", "transformers", "peft", "accelerate"}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    # A second run into the same folder without --resume is a usage error.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_training_code_is_not_imported_by_the_runtime() -> None:
    code = (
        "import sys\n"
        "import vlm2vla_edge.runtime.cli, vlm2vla_edge.train.lora.cli, vlm2vla_edge.train.lora.config\n"
        "import vlm2vla_edge.train.lora.samples\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
