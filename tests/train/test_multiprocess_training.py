"""Data-parallel LoRA training, proven: `accelerate launch --num_processes 2` on CPU (gloo) against one process
with the same global batch, on the tiny random Gemma-3 text model.

What must hold for a lab that moves from one GPU to several: the same samples make each optimizer step
(4 per step: 4 x 1 process, or 2 x 2 processes), so the losses and the adapter match within float
tolerance; one process writes the adapter, the training card and each checkpoint (the others do not
race it), and progress is printed once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from test_lora_samples import make_dataset  # noqa: E402

from vlm2vla_edge.testing import models  # noqa: E402
from vlm2vla_edge.train.lora.trainer import CARD_FILE, CHECKPOINTS_DIR  # noqa: E402

pytestmark = pytest.mark.slow

#: Loss agreement between 1 and 2 processes. Both runs see the same samples per step and weight every answer
#: token alike; what differs is float summation order (padding to 2 vs 4 samples, gloo's all-reduce).
LOSS_TOLERANCE = 1e-4
#: Adapter weights after 3 steps at lr 1e-3, same reason.
WEIGHT_TOLERANCE = 1e-5

CONFIG = """\
lora_dropout: 0.0
learning_rate: 1.0e-3
max_steps: 3
save_every: 2
keep_checkpoints: 5
log_every: 1
seed: 0
mixed_precision: "no"
batch_size: {batch_size}
gradient_accumulation_steps: {accumulation}
"""


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory, gemma_tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny-text") / "hf"
    torch.manual_seed(1)
    config = transformers.Gemma3TextConfig(**models.TINY_TEXT_CONFIG)
    transformers.Gemma3ForCausalLM(config).save_pretrained(str(out))
    for item in gemma_tokenizer_dir.iterdir():
        shutil.copy2(item, out / item.name)
    return out


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ddp") / "ds", episodes=2, steps=2)  # 16 samples, 4 stages


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(tmp: Path, name: str, dataset: Path, base: Path, processes: int, batch_size: int,
           accumulation: int = 1) -> tuple[subprocess.CompletedProcess[str], Path]:
    config = tmp / f"{name}.yaml"
    config.write_text(CONFIG.format(batch_size=batch_size, accumulation=accumulation))
    out = tmp / name
    args = ["-m", "vlm2vla_edge.train.lora", "--dataset", str(dataset), "--base", str(base), "--out", str(out),
            "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           # no user-level accelerate config may change the launch
           "HF_HOME": str(tmp / "hf-home")}
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, out


def test_two_processes_match_one_with_the_same_global_batch(text_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    one, one_out = _train(tmp_path, "one", dataset_dir, text_dir, processes=1, batch_size=4)
    two, two_out = _train(tmp_path, "two", dataset_dir, text_dir, processes=2, batch_size=2)

    card_one = json.loads((one_out / CARD_FILE).read_text())
    card_two = json.loads((two_out / CARD_FILE).read_text())
    assert card_one["processes"] == 1 and card_two["processes"] == 2
    assert [e["step"] for e in card_two["losses"]] == [1, 2, 3]
    losses_one = [e["loss"] for e in card_one["losses"]]
    losses_two = [e["loss"] for e in card_two["losses"]]
    assert losses_two == pytest.approx(losses_one, abs=LOSS_TOLERANCE), (losses_one, losses_two)
    assert [e["lr"] for e in card_two["losses"]] == pytest.approx([e["lr"] for e in card_one["losses"]])
    assert card_two["tokens_seen"] == card_one["tokens_seen"]  # every process's tokens counted, none twice

    ours, theirs = (
        load_file(str(two_out / "adapter_model.safetensors")),
        load_file(str(one_out / "adapter_model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst < WEIGHT_TOLERANCE, worst
    assert any(float(v.abs().max()) > 0 for k, v in ours.items() if "lora_B" in k)  # it did train

    # One writer: one card, one adapter, one checkpoint per save, nothing half-written left behind.
    checkpoints = sorted(p.name for p in (two_out / CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["step-00000002"], checkpoints
    saved = two_out / CHECKPOINTS_DIR / "step-00000002"
    assert (saved / "adapter" / "adapter_model.safetensors").is_file() and (saved / "train_state.json").is_file()
    assert sorted(p.name for p in saved.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert not list(saved.glob("model*.safetensors"))  # the frozen base is never checkpointed
    # Progress and the closing line come from the main process only.
    steps = [line for line in two.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"], two.stdout
    assert sum(line.startswith("done:") for line in two.stdout.splitlines()) == 1, two.stdout
