"""Labelled samples → chat-format (prompt, answer) pairs, rendered by the runtime's own prompt templates.

Training must ask exactly what the runtime asks, so every prompt here comes from
`vlm2vla_edge.runtime.policy.prompts.PromptTemplates` (the same object the bundle manifest stores),
and every answer from its `render_answer`. Only the auxiliary stage has no runtime prompt (the robot
never asks it): it is a self-contained question about the direction of a displacement (the dataset puts
the whole question in `instruction`), in the same chat format, so it teaches the words of motion plans
without adding a fourth runtime prompt.

The observation is the media marker for vision models (`collate.py` turns it into the image's tokens
the way llama.cpp's mtmd does) and the scene text for text-only models. No torch here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, MEDIA_MARKER, PromptTemplates, clean_text
from vlm2vla_edge.train.data.dataset import LabelledDataset, Sample

AUX_QUESTION_FORMAT = "Question: {question}\n"
"""The auxiliary prompt's question line (after the observation, before the turn change)."""


@dataclass(frozen=True)
class ChatSample:
    """One training example as text: the user turn up to the model's turn, and the answer to learn."""

    id: str
    stage: str
    prompt: str  # whole prompt, `<bos>` not included (the tokenizer adds it), MEDIA_MARKER where the image goes
    answer: str  # render_answer(target): the target text and the end-of-turn; the only loss-bearing text
    image: Path | None  # absolute path of the key frame, None when the prompt has no image

    @property
    def has_image(self) -> bool:
        return self.image is not None


def render_aux_prompt(templates: PromptTemplates, question: str, scene: str | None, with_image: bool) -> str:
    """The auxiliary prompt: observation (if any) + the self-contained question, in the chat format."""
    observation = ""
    if scene is not None or with_image:
        observation = templates.render_observation(scene)
    return (
        templates.user_start
        + observation
        + AUX_QUESTION_FORMAT.format(question=clean_text(question, "auxiliary question"))
        + templates.user_end
    )


def render_prompt(sample: Sample, templates: PromptTemplates, scene: str | None) -> str:
    """The runtime's prompt for the sample's stage; `scene=None` puts the media marker in for the image."""
    if sample.stage == "subtasks":
        return templates.render_subtasks_prompt(sample.instruction, scene)
    if sample.stage == "motion":
        assert sample.subtask is not None  # the dataset's Sample validates it
        return templates.render_motion_prompt(sample.instruction, sample.subtask, scene)
    if sample.stage == "action":
        assert sample.subtask is not None and sample.motion_plan is not None
        return templates.render_action_prompt(sample.instruction, sample.subtask, sample.motion_plan, scene)
    raise ValueError(f"stage {sample.stage!r} has no runtime prompt")


def to_chat_sample(
    sample: Sample, image: Path | None, *, vision: bool, templates: PromptTemplates = DEFAULT_PROMPTS
) -> ChatSample:
    """Render one labelled sample for a vision model (image, else scene text) or a text-only one (scene text).

    Raises `UserError` when the sample has no observation the model can take.
    """
    use_image = vision and image is not None
    if not use_image and sample.scene is None and sample.stage != "aux":
        need = "an image or a scene text" if vision else "a scene text (a text-only model cannot see images)"
        raise UserError(f"sample {sample.id} has no observation: it needs {need}")
    scene = None if use_image else sample.scene
    if sample.stage == "aux":
        prompt = render_aux_prompt(templates, sample.instruction, scene, with_image=use_image)
    else:
        prompt = render_prompt(sample, templates, scene)
    assert prompt.count(MEDIA_MARKER) == (1 if use_image else 0)
    return ChatSample(
        id=sample.id,
        stage=sample.stage,
        prompt=prompt,
        answer=templates.render_answer(sample.target),
        image=image if use_image else None,
    )


def chat_samples(
    dataset: LabelledDataset,
    *,
    vision: bool,
    stages: tuple[str, ...] = ("subtasks", "motion", "action", "aux"),
    templates: PromptTemplates = DEFAULT_PROMPTS,
) -> list[ChatSample]:
    """Every sample of the chosen stages, rendered; fails on the first sample that cannot be rendered."""
    chosen = [s for s in dataset.samples if s.stage in stages]
    if not chosen:
        counts = dict(Counter(s.stage for s in dataset.samples))
        raise UserError(f"dataset {dataset.path} has no samples of stages {list(stages)} (it has {counts or 'none'})")
    return [to_chat_sample(s, dataset.image_path(s), vision=vision, templates=templates) for s in chosen]
