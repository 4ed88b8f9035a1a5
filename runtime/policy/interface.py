"""What the episode loop needs from a policy, and what a policy hands back.

The llama.cpp policy (`LlamaPolicy`, `runtime/policy/engine.py`) implements this; tests and tools use fakes with the
same shape, so the loop never depends on a model being present.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from vlm2vla_edge.runtime.actions import ActionChunk, MotionPlan, SubtaskList
from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import Vlm2VlaError


class GenerationCancelled(Vlm2VlaError):
    """The caller's cancel flag stopped a generation between two decode steps."""


class PolicyOutputError(Vlm2VlaError):
    """A stage's output did not parse, or was cut off by its token budget; carries the raw text so the
    episode can record it and retry."""

    def __init__(self, stage: str, text: str, reason: str, timings: object | None = None) -> None:
        super().__init__(f"the {stage} stage produced unusable output: {reason}")
        self.stage = stage
        self.text = text
        self.reason = reason
        self.timings = timings


@dataclass(frozen=True, slots=True)
class Observation:
    """What the policy sees: a camera image (vision bundles) or a scene description (text-only bundles)."""

    image: np.ndarray | None = field(default=None, repr=False)  # H x W x 3 uint8 RGB
    scene: str | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.scene is None:
            raise ValueError("an observation needs an image or a scene description")


@dataclass(frozen=True, slots=True)
class StageOutput:
    """One generation: what was asked, what the model wrote, and how long each phase took."""

    stage: str  # "subtasks" | "motion" | "action"
    prompt: str
    raw_text: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds and token counts per phase


@dataclass(frozen=True, slots=True)
class SubtasksResult:
    subtasks: SubtaskList
    output: StageOutput
    timings: object | None = None  # implementation-specific detail (the engine's StageTimings)


@dataclass(frozen=True, slots=True)
class StepResult:
    """The motion plan and action chunk of one step (both parsed; the chunk before post-processing)."""

    motion: MotionPlan
    chunk: ActionChunk
    motion_output: StageOutput
    action_output: StageOutput
    retry: bool = False
    timings: object | None = None  # implementation-specific detail (the engine's StageTimings)


@runtime_checkable
class Policy(Protocol):
    """The three VLM2VLA stages. Implementations raise `GenerationCancelled` when `cancel` is set,
    `PolicyOutputError` for output that does not parse, and `Vlm2VlaError` subclasses for model faults."""

    @property
    def needs_image(self) -> bool:
        """True for vision bundles; False when observations are scene descriptions."""

    @property
    def action_language(self) -> ActionLanguage:
        """How this model writes actions (from its bundle manifest)."""

    @property
    def bundle_id(self) -> str:
        """Identifier of the model bundle, recorded with every episode."""

    def subtasks(
        self, observation: Observation, instruction: str, *, cancel: threading.Event | None = None
    ) -> SubtasksResult:
        """Plan the episode: the list of subtasks from the first observation and the instruction."""

    def step(
        self,
        observation: Observation,
        instruction: str,
        subtask: str,
        *,
        retry: bool = False,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """One step: motion plan then action chunk for the current subtask (`retry` raises temperature)."""
