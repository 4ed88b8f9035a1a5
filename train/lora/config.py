"""The LoRA training recipe (`configs/train/lora.yaml`), validated by pydantic.

Defaults are the VLM2VLA paper's recipe: LoRA rank 16, alpha 32, dropout 0.05 on every linear layer of
the language model, AdamW at 5e-5 with linear decay, bf16 where the hardware has it, one epoch. This
module imports no torch, so a bad config fails in a fraction of a second, before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vlm2vla_edge.runtime.config import StrictModel, load_config, packaged_configs_dir
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

Stage = Literal["subtasks", "motion", "action", "aux"]
LoraTargets = Literal["all_linear", "attention"]


class TrainConfig(StrictModel):
    """Hyper-parameters and bookkeeping of one LoRA run; recorded whole in the training card."""

    # LoRA adapter on every linear layer of the language model (the vision tower and projector stay frozen).
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: LoraTargets = Field(
        "all_linear",
        description="Which linear layers of the language model get LoRA. all_linear: every one (the paper). "
        "attention: the attention projections only (q, k, v, o). llama.cpp applies a run-time adapter as two small "
        "matmuls, a scale and an add per adapted layer, which on a small model costs per graph node rather than "
        "per FLOP: on Gemma-3-270M (2 CPU threads) all seven projections added 15% to a decode and a 200-token "
        "prefill, the four attention ones about 5% (bench/README.md, issue 19 section).",
    )

    # Optimiser: AdamW with linear decay to zero after an optional linear warm-up.
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay (on the adapter weights).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up before the linear decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null turns clipping off.")

    # Schedule: epochs over the dataset, optionally cut at max_steps optimizer steps.
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the dataset.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (null: all epochs).")
    batch_size: int = Field(4, ge=1, le=4096, description="Samples per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=16, le=131072, description="Longest sample in tokens; longer ones are skipped.")

    # How samples are asked: the runtime's prompt templates, recorded in the card and shipped in the bundle.
    prompts: PromptTemplates = Field(
        default_factory=PromptTemplates,
        description="Prompt templates the samples are rendered with (the runtime asks with the same ones), e.g. "
        "{action_turn: follow_up} to ask for the action chunk as a second turn after the motion plan.",
    )

    # Which samples to train on.
    stages: tuple[Stage, ...] = Field(
        ("subtasks", "motion", "action", "aux"), min_length=1, description="Dataset stages to train on."
    )
    stage_repeats: dict[Stage, int] = Field(
        default_factory=dict,
        description="Times each sample of a stage appears per epoch (default 1). A dataset holds one subtask-list "
        "sample per episode against a dozen motion and action samples: repeating the rare stage balances it.",
    )

    # Numerics and speed.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on a GPU that supports it, full precision otherwise."
    )
    answer_only_logits: bool = Field(
        True,
        description="Apply the output layer only at answer positions (the 262k-vocabulary layer dominates the step).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")
    dataloader_workers: int = Field(0, ge=0, le=64, description="Worker processes decoding images.")

    # Bookkeeping.
    seed: int = Field(0, ge=0, description="Seed of the data order, LoRA initialisation and dropout.")
    save_every: int = Field(500, ge=1, description="Write a resumable checkpoint every this many optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Print progress every this many optimizer steps.")
    base_model_id: str | None = Field(
        None, description="Name of the base model for the card (e.g. google/gemma-3-4b-it); default: the folder name."
    )

    @model_validator(mode="after")
    def _checks(self) -> "TrainConfig":
        if any(n < 1 or n > 100 for n in self.stage_repeats.values()):
            raise ValueError("stage_repeats must be 1 to 100 per stage")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat a stage, got {list(self.stages)}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must both lie in [0, 1), got {list(self.adam_betas)}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


def default_config_path() -> Path:
    """The packaged recipe, `configs/train/lora.yaml`."""
    return packaged_configs_dir() / "train" / "lora.yaml"


def load_train_config(path: str | Path | None = None) -> TrainConfig:
    """Read and validate a training YAML (the packaged default when None); errors are `ConfigError`s."""
    return load_config(Path(path) if path is not None else default_config_path(), TrainConfig)
