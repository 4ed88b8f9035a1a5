"""LoRA fine-tuning of a Gemma-3 model on a labelled dataset: the loop, checkpoints, resume, training card.

One script for one CPU, one GPU or many: `accelerate.Accelerator` owns devices, mixed precision,
gradient accumulation and distribution (DDP, or DeepSpeed ZeRO-2 through `accelerate launch
--use_deepspeed --deepspeed_config_file configs/train/deepspeed_zero2.json`). Nothing here spawns or
synchronises processes by hand.

Why the loss is computed here and not by the model: Gemma's output layer maps to 262,144 tokens, and
for small models it is most of the compute (Gemma-3-270M: 168 M of its 268 M parameters). Only the
answer tokens carry loss, so the decoder's hidden states are taken at those positions and the output
layer runs there only (`answer_only_logits`). The loss module wraps the peft model, so the forward
still goes through DDP's wrapper and gradients are synchronised.

Checkpoints hold the adapter only (not the frozen base), the optimizer, the scheduler, every
process's RNG states (accelerate's `save_state`) and `train_state.json` (step, losses so far, wall
time); they are written to a `.partial` folder and renamed when complete, so a crash mid-save leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.files import sha256_file
from vlm2vla_edge.runtime.versions import versions
from vlm2vla_edge.train.data.dataset import read_dataset
from vlm2vla_edge.train.lora.collate import IGNORE_INDEX, Collator, EncodedDataset, ImageTokens, encode_all
from vlm2vla_edge.train.lora.config import LoraTargets, TrainConfig
from vlm2vla_edge.train.lora.samples import AUX_QUESTION_FORMAT, chat_samples

log = logging.getLogger(__name__)

CARD_FILE = "training_card.json"
STATE_FILE = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_SUBDIR = "adapter"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
CARD_VERSION = 1


# --- the base model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseIdentity:
    """What the adapter was trained on top of; the merge step must use the very same weights."""

    path: str
    kind: str  # "hf-vision", "hf-text" or "gguf-text"
    id: str  # base_model_id from the config, else the folder or file name
    sha256: dict[str, str]  # file name → sha256 of the weight files and config


@dataclass
class LoadedBase:
    model: nn.Module
    tokenizer: Any
    image_processor: Any | None  # Gemma3ImageProcessorPil for vision models
    image_tokens: ImageTokens | None
    identity: BaseIdentity

    @property
    def vision(self) -> bool:
        return self.image_tokens is not None


def _hash_files(paths: list[Path]) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(paths)}


def load_base(path: Path, *, dtype: torch.dtype = torch.float32, model_id: str | None = None) -> LoadedBase:
    """A Hugging Face folder (Gemma-3 vision or text) or a GGUF file (text only, dequantized by transformers)."""
    import transformers

    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"--base {path} is a file but not a .gguf; give a GGUF file or a Hugging Face folder")
        kwargs = {"gguf_file": path.name}
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        # Dense weights: transformers >= 5.2x keeps GGUF weights packed and dequantizes them in every matmul,
        # which trained 3-6x slower here (50 vs 190+ tokens/s) and is not what LoRA's gradients need.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=dtype, quantization_config=transformers.GgufConfig(dequantize=True), **kwargs
        )
        identity = BaseIdentity(str(path.resolve()), "gguf-text", model_id or path.stem, _hash_files([path]))
        return LoadedBase(model, tokenizer, None, None, identity)
    if not path.is_dir():
        raise UserError(f"--base {path} does not exist; give a Hugging Face model folder or a GGUF file")
    if not (path / "config.json").is_file():
        raise UserError(f"--base {path} has no config.json: it is not a Hugging Face model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as exc:
        raise UserError(f"--base {path}: cannot read its config.json ({exc})") from exc
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise UserError(f"--base {path} holds no weight files (*.safetensors or *.bin)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    identity_files = weights + [path / "config.json"]
    if getattr(config, "vision_config", None) is not None:
        if config.model_type != "gemma3":
            raise UserError(f"--base {path} is a '{config.model_type}' vision model; only Gemma-3 is supported")
        model = transformers.Gemma3ForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
        processor = transformers.Gemma3ImageProcessorPil.from_pretrained(str(path))
        identity = BaseIdentity(str(path.resolve()), "hf-vision", model_id or path.name, _hash_files(identity_files))
        return LoadedBase(model, tokenizer, processor, ImageTokens.from_config(config), identity)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    identity = BaseIdentity(str(path.resolve()), "hf-text", model_id or path.name, _hash_files(identity_files))
    return LoadedBase(model, tokenizer, None, None, identity)


# --- LoRA and the loss -------------------------------------------------------------------------------

_FROZEN_PARTS = ("vision_tower", "multi_modal_projector", "vision_model")


_ATTENTION_PARTS = ("self_attn", "attn", "attention", "self_attention")


def lora_target_regex(model: nn.Module, targets: LoraTargets = "all_linear") -> str:
    """A regex matching the linear layers of the language model that get LoRA (never the vision side or the
    output layer): every one (`all_linear`), or those inside an attention block (`attention`: q, k, v, o).

    Layer indices are generalised (`layers\\.\\d+\\.`), so the regex stays short for a 48-layer model.
    """
    output_layer = model.get_output_embeddings()
    patterns: dict[str, None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output_layer:
            continue
        parts = name.split(".")
        if any(part in parts for part in _FROZEN_PARTS):
            continue
        if targets == "attention" and not any(part in parts for part in _ATTENTION_PARTS):
            continue
        patterns[re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name))] = None
    if not patterns:
        what = "attention layers" if targets == "attention" else "linear layers"
        raise UserError(f"the base model has no {what} in its language model to put LoRA on")
    return "^(?:" + "|".join(patterns) + ")$"


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap the model with a fresh LoRA adapter; every base weight (vision tower included) is frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_regex(model, config.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, lora)
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad and "lora_" not in name:
            raise RuntimeError(f"a base weight would be trained: {name}")
    return peft_model


class AnswerLoss(nn.Module):
    """Wraps the peft model; forward returns the mean cross-entropy over the answer tokens of the batch.

    With `answer_only=True` the output layer runs only where a label is set; otherwise on every position
    (the model's own forward), which gives the same loss at a much higher cost on a 262k vocabulary.
    """

    def __init__(self, lm: nn.Module, answer_only: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.answer_only = answer_only
        inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        text_config = inner.config.get_text_config()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        labels: torch.Tensor,  # (B, T), IGNORE_INDEX off the answers
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N_images, 3, H, W)
        reduction: str = "mean",  # "sum": the summed cross-entropy of the batch's answer tokens
    ) -> torch.Tensor:
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        if not self.answer_only:
            logits = self.lm(**inputs, use_cache=False).logits  # (B, T, V)
            logits = logits[:, :-1].float()  # (B, T-1, V)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                   reduction=reduction)
        inner = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        decoder = getattr(inner, inner.base_model_prefix)  # the model without its output layer
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, C)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        picked = hidden[:, :-1][keep]  # (N, C), N = answer tokens in the batch
        logits = inner.get_output_embeddings()(picked).float()  # (N, V)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap  # (N, V)
        return F.cross_entropy(logits, targets[keep], reduction=reduction)


# --- bookkeeping -------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint adds to accelerate's state: progress and the loss history for the card."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding input tokens, all processes
    wall_time_s: float = 0.0  # training time summed over runs (a resumed run adds to it)
    losses: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"} per optimizer step
    runs: list[str] = field(default_factory=list)  # UTC start time of each run (several after resumes)
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "TrainState":
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float | None
    wall_time_s: float
    tokens_per_s: float
    skipped_too_long: list[str]
    main_process: bool = True  # False in the other processes of a multi-process run (they print nothing)


def _launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun, mpirun) started for this run."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return max(int(value), 1)
    return 1


def _has_accelerator_device() -> bool:
    """True when torch sees a GPU or another accelerator that a distributed backend can use."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def resolve_precision(requested: str) -> str:
    """'auto' → bf16 on a CUDA GPU that has it, otherwise full precision (CPU bf16 autocast is slow)."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = out_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: p.name) if done else None


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    checkpoint = latest_checkpoint(out_dir)
    if resume:
        if checkpoint is None:
            raise UserError(f"--resume: {out_dir} holds no complete checkpoint to resume from")
        return checkpoint
    if checkpoint is not None or (out_dir / CARD_FILE).exists():
        raise UserError(f"--out {out_dir} already holds a training run; pass --resume or choose a new folder")
    return None


# --- the loop ----------------------------------------------------------------------------------------


def train(
    dataset_dir: Path,
    base: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter; write it, its checkpoints and `training_card.json` under `out_dir`."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_linear_schedule_with_warmup

    out_dir = Path(out_dir).expanduser()
    checkpoint = _check_out_dir(out_dir, resume)
    state = TrainState()
    if checkpoint is not None:
        state = TrainState.load(checkpoint / STATE_FILE)
        changed = sorted(k for k, v in config.model_dump(mode="json").items() if state.config.get(k) != v)
        if changed:
            raise UserError(f"--resume: the config differs from the checkpoint's in {', '.join(changed)}")
    dataset = read_dataset(dataset_dir)  # refuses unfinished or edited datasets

    precision = resolve_precision(config.mixed_precision)
    launched = _launched_processes()
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        # Several processes and no GPU: data parallel on CPU over gloo. accelerate does this only when told
        # (cpu=True); otherwise each process would train alone and all of them would write --out.
        cpu=launched > 1 and not _has_accelerator_device(),
    )
    if accelerator.num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes but accelerate formed a group of {accelerator.num_processes}; "
            "they would train separately and overwrite each other's output (check the accelerate launch settings)"
        )
    say = progress or (lambda line: print(line, flush=True))

    def report(line: str) -> None:
        if accelerator.is_main_process:
            say(line)

    set_seed(config.seed)
    started = time.monotonic()
    # On a GPU the weights take the mixed-precision dtype; on a CPU they stay float32 and autocast runs the
    # matmuls in bf16 (measured on this project's 2-core
    # AVX512-BF16 CPU: 1.9x faster than float32; pure bf16 weights were not).
    half = torch.cuda.is_available() and precision in ("bf16", "fp16")
    dtype = (torch.bfloat16 if precision == "bf16" else torch.float16) if half else torch.float32
    loaded = load_base(base, dtype=dtype, model_id=config.base_model_id)
    report(f"loaded {loaded.identity.kind} base {loaded.identity.id} in {time.monotonic() - started:.1f} s")

    units = dataset.info.language().units
    if units != config.prompts.scene_units:
        # Legal (the scene is an observation, not the action language), but a model that must convert units
        # between the scene and its answers learns a harder task than copying: say so where it is decided.
        report(f"note: the dataset's actions are in {units} but the prompts state the scene in "
               f"{config.prompts.scene_units} (prompts.scene_units in the training config)")
    chats = chat_samples(dataset, vision=loaded.vision, stages=config.stages, templates=config.prompts)
    chats = [chat for chat in chats for _ in range(config.stage_repeats.get(chat.stage, 1))]
    encoded, too_long = encode_all(chats, loaded.tokenizer, loaded.image_tokens, config.max_length)
    if not encoded:
        raise UserError(f"every sample is longer than max_length={config.max_length} tokens; raise it in the config")
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    loader = torch.utils.data.DataLoader(
        EncodedDataset(encoded, loaded.image_processor),
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=Collator(pad_id=pad_id, vision=loaded.vision),
        num_workers=config.dataloader_workers,
        # Its own generator: creating an iterator draws a worker seed, which must not move the global RNG
        # (dropout), or a resumed run would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(config.seed),
    )

    peft_model = apply_lora(loaded.model, config)
    module = AnswerLoss(peft_model, answer_only=config.answer_only_logits)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    micro_per_epoch = math.ceil(len(encoded) / (config.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(micro_per_epoch / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)

    def save_hook(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        # The frozen base is not checkpointed: only the adapter (hundreds of times smaller).
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).lm.save_pretrained(os.path.join(output_dir, ADAPTER_SUBDIR))
        weights.clear()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        adapter = load_file(os.path.join(input_dir, ADAPTER_SUBDIR, "adapter_model.safetensors"))
        for model in models:
            set_peft_model_state_dict(accelerator.unwrap_model(model).lm, adapter)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        report(f"resumed from {checkpoint} at step {state.step}/{total_steps}")
    state.config = config.model_dump(mode="json")
    state.runs.append(datetime.now(timezone.utc).isoformat(timespec="seconds"))

    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in accelerator.unwrap_model(module).parameters())
    report(
        f"samples {len(encoded)} (skipped {len(too_long)} over {config.max_length} tokens), "
        f"steps {total_steps}, processes {accelerator.num_processes}, precision {precision}, "
        f"trainable {n_trainable / 1e6:.2f} M of {n_total / 1e6:.1f} M"
    )

    run_start = time.monotonic()
    run_start_step = state.step
    window_start, window_tokens = time.monotonic(), 0
    uncounted = 0  # this process's tokens not yet added to state.tokens_seen

    def count_tokens() -> int:
        # All processes call this at the same steps (it is a collective); returns the tokens added.
        nonlocal uncounted
        added = int(accelerator.reduce(torch.tensor(uncounted, device=accelerator.device), "sum"))
        state.tokens_seen += added
        uncounted = 0
        return added

    module.train()
    step_losses: list[torch.Tensor] = []
    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        loader.set_epoch(epoch)
        skip = (state.step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with accelerator.accumulate(module):
                # The loss of a micro-batch is the mean over the answer tokens of all processes' parts of it, as
                # one process holding the whole global batch computes it. (Each process's own mean, averaged by
                # DDP, would weight a token by how many answer tokens share its process: another objective.)
                answers = (batch.labels[:, 1:] != IGNORE_INDEX).sum().float()  # () this process's answer tokens
                total = accelerator.reduce(answers, reduction="sum").clamp(min=1.0)  # () every process's
                loss_sum = module(**batch.model_inputs(), labels=batch.labels, reduction="sum")  # ()
                # DDP averages gradients over processes, hence the factor: the result is d(sum / total).
                loss = loss_sum * (accelerator.num_processes / total)  # ()
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach())
            uncounted += batch.tokens
            if not accelerator.sync_gradients:
                continue
            mean_loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean")  # ()
            step_losses.clear()
            state.step += 1
            state.losses.append(
                {"step": state.step, "loss": round(float(mean_loss), 6), "lr": float(scheduler.get_last_lr()[0])}
            )
            if state.step % config.log_every == 0 or state.step == total_steps:
                tokens = window_tokens + count_tokens()
                now = time.monotonic()
                rate = tokens / max(now - window_start, 1e-9)
                per_step = (now - run_start) / (state.step - run_start_step)
                report(
                    f"step {state.step}/{total_steps} loss {float(mean_loss):.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} tokens/s {rate:.0f} "
                    f"s/step {per_step:.2f} eta {_format_eta(per_step * (total_steps - state.step))}"
                )
                window_start, window_tokens = now, 0
            if state.step % config.save_every == 0 and state.step < total_steps:
                window_tokens += count_tokens()  # into the checkpoint's count; still in this log window's rate
                _save_checkpoint(accelerator, out_dir, state, run_start, config.keep_checkpoints)
            if state.step >= total_steps:
                break
    count_tokens()

    run_time = time.monotonic() - run_start
    state.wall_time_s += run_time
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(module).lm.save_pretrained(str(out_dir))
        card = _training_card(dataset, loaded, config, precision, state, too_long, accelerator.num_processes)
        (out_dir / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
        report(f"adapter and {CARD_FILE} written to {out_dir}")
    accelerator.wait_for_everyone()
    tokens_rate = state.tokens_seen / state.wall_time_s if state.wall_time_s > 0 else 0.0
    return TrainResult(
        out_dir=out_dir,
        steps=state.step,
        final_loss=state.losses[-1]["loss"] if state.losses else None,
        wall_time_s=state.wall_time_s,
        tokens_per_s=tokens_rate,
        skipped_too_long=too_long,
        main_process=accelerator.is_main_process,
    )


def _save_checkpoint(accelerator: Any, out_dir: Path, state: TrainState, run_start: float, keep: int) -> None:
    """accelerate's state (adapter via the hook, optimizer, scheduler, RNG) + train_state.json, atomically."""
    folder = out_dir / CHECKPOINTS_DIR
    final = folder / f"step-{state.step:08d}"
    partial = folder / f"{final.name}.partial"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        snapshot = TrainState(**{**state.__dict__, "wall_time_s": state.wall_time_s + time.monotonic() - run_start})
        snapshot.save(partial / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        done = sorted(p for p in folder.iterdir() if _CHECKPOINT_NAME.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint_saved step=%d path=%s", state.step, final)
    accelerator.wait_for_everyone()


def _training_card(
    dataset: Any,
    loaded: LoadedBase,
    config: TrainConfig,
    precision: str,
    state: TrainState,
    too_long: list[str],
    processes: int,
) -> dict[str, Any]:
    """Everything needed to tell what this adapter is and to reproduce it."""
    info_path = dataset.path / "dataset.json"
    return {
        "card_version": CARD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "path": str(dataset.path.resolve()),
            "dataset_json_sha256": sha256_file(info_path),
            "samples_sha256": dataset.info.samples_sha256,
            "counts": dataset.info.counts,
            "action_language": dataset.info.action_language,
            "trained_samples": sum(1 for s in dataset.samples if s.stage in config.stages) - len(too_long),
            "skipped_too_long": too_long,
        },
        "base_model": {
            "id": loaded.identity.id,
            "path": loaded.identity.path,
            "kind": loaded.identity.kind,
            "sha256": loaded.identity.sha256,
            "architecture": type(
                loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
            ).__name__,
        },
        "hyperparameters": config.model_dump(mode="json"),
        "prompts": {"templates": config.prompts.model_dump(mode="json"), "aux_question": AUX_QUESTION_FORMAT},
        "precision": precision,
        "processes": processes,
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "wall_time_s": round(state.wall_time_s, 3),
        "runs": state.runs,
        "losses": state.losses,
        "versions": versions("torch", "transformers", "peft", "accelerate"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
