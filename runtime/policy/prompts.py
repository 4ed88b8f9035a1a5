"""Prompt templates of the three VLM2VLA stages, in Gemma's chat format; one source for runtime and training.

The VLM2VLA paper (actions as language) asks one fine-tuned VLM three kinds of question:

1. subtasks: from the first observation and the instruction, the list of subtasks (once per episode);
2. motion plan: from the current observation, the instruction and the current subtask, one line
   saying how the gripper should move next;
3. action: the same, plus that motion plan, answered with an action chunk `[[dx, dy, dz, gripper], ...]`.

No code of the paper is public, so the wording here is ours. Its shape is chosen for KV-cache reuse:
the motion and action prompts of one step share a prefix (turn start + observation + instruction +
subtask), and differ only in a short stage suffix. The decoder evaluates the prefix, with its image,
once per step, and appends each stage's suffix to the cached prefix. The subtask prompt shares the
first part of that prefix (turn start + observation + instruction) too. With `action_turn: follow_up` the
action question is a second user turn after the motion plan, so the action prompt extends the motion
prompt and its answer, which the cache still holds: the action stage prefills only the turn change and
its question.

Every prompt is exactly what Gemma-3's chat template (`tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`) renders for one user message whose content is the image followed by the
text, with two differences the consumers must know:

- the `<bos>` the template starts with is not in our strings: both llama.cpp (`add_special=True`) and
  transformers (`add_special_tokens=True`) add it when tokenizing, and writing it as text too would
  give two. Tokenize the prefix (or a whole prompt) with special tokens added, a suffix without;
- the image is llama.cpp mtmd's media marker `<__media__>` where the template writes
  `<start_of_image>`: mtmd replaces the marker by `<start_of_image>`, the image embeddings and
  `<end_of_image>`. (Text-only bundles get a scene description in its place.)

The training side renders its samples with these same methods, and a model answer (the training
target) with `render_answer`.
"""

from __future__ import annotations

import re
import string
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from vlm2vla_edge.runtime.config import StrictModel
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.scene_text import scene_in_units

# llama.cpp mtmd's default media marker (`mtmd_default_marker()`): where the image goes in the text.
MEDIA_MARKER = "<__media__>"

# Text in angle brackets can be read as a control token (llama.cpp tokenizes prompts with special-token
# parsing on, so "<end_of_turn>" typed in an instruction would end the user turn). User text never
# needs it, so it is refused rather than escaped.
_CONTROL_LIKE = re.compile(r"<[A-Za-z0-9_/|]+>")


class PromptError(UserError):
    """An instruction, subtask, plan or scene cannot be put into a prompt as given."""


def clean_text(value: str, what: str, *, one_line: bool = True) -> str:
    """Trimmed (as the chat template's `trim` does), no control-token look-alikes; by default one line
    with single spaces, so a stray newline in an instruction cannot reshape the prompt."""
    if not isinstance(value, str):
        raise PromptError(f"the {what} must be text, not {type(value).__name__}")
    text = " ".join(value.split()) if one_line else value.strip()
    if not text:
        raise PromptError(f"the {what} is empty")
    found = _CONTROL_LIKE.search(text)
    if found:
        raise PromptError(
            f"the {what} must not contain '{found.group(0)}': text in angle brackets can be read as a control token"
        )
    return text


def _fields_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class PromptTemplates(StrictModel):
    """The wording of every prompt, stored in the bundle manifest so the runtime asks what training taught.

    Templates use `{name}` placeholders; each field admits exactly the placeholders listed in its
    description. The defaults are the Gemma-3 chat format and our VLM2VLA wording.
    """

    user_start: str = Field("<start_of_turn>user\n", description="Opens the user turn. No placeholders.")
    user_end: str = Field(
        "<end_of_turn>\n<start_of_turn>model\n",
        description="Closes the user turn and opens the model's (the generation prompt). No placeholders.",
    )
    answer_end: str = Field("<end_of_turn>\n", description="Follows a model answer in training text. No placeholders.")
    scene: str = Field(
        "Scene: {scene}\n", description="Observation of a text-only bundle, in place of the image. {scene}."
    )
    scene_units: Literal["m", "cm"] = Field(
        "m",
        description="Units the scene description's coordinates are written in for the model. Scene sources report "
        "metres; cm rewrites each coordinate exactly (-0.24 -> -24) for a model whose action language is in "
        "centimetres (ActionLanguage.units), so it copies numbers rather than converting them, at 1-3 tokens each "
        "instead of 3-5 (the demo scene: 122 tokens instead of 178).",
    )
    task: str = Field("Task: {instruction}\n", description="The instruction line. {instruction}.")
    subtasks_question: str = Field(
        'List the subtasks the robot must complete, in order, as ["...", "..."].',
        description="Asks for the subtask list. No placeholders.",
    )
    subtask: str = Field("Current subtask: {subtask}\n", description="The current subtask line. {subtask}.")
    motion_question: str = Field(
        "How should the gripper move next? Answer in one sentence.",
        description="Asks for the motion plan. No placeholders.",
    )
    plan: str = Field("Motion plan: {plan}\n", description="The motion plan line of the action prompt. {plan}.")
    action_question: str = Field(
        "Give the next actions as [[dx, dy, dz, gripper], ...].",
        description="Asks for the action chunk. No placeholders.",
    )
    action_turn: Literal["plan_line", "follow_up"] = Field(
        "plan_line",
        description="How the action prompt carries the motion plan. plan_line: one user turn, the step prefix + the "
        "`plan` line + the action question. follow_up: a second user turn after the motion question and the plan "
        "as the model's own answer, so the action stage's prompt starts with the motion stage's prompt and output "
        "and the decoder keeps them in its cache: the action stage prefills only the turn change and the question "
        "(26 tokens instead of 43-51 on the demo's steps), and no plan line is tokenized again. A model answers in the "
        "layout it was trained with: this is part of a bundle's templates, never switched at run time.",
    )
    stop_tokens: tuple[str, ...] = Field(
        ("<end_of_turn>", "<eos>"), min_length=1, description="Token texts that end a generation."
    )

    _PLACEHOLDERS: ClassVar[dict[str, set[str]]] = {
        "user_start": set(),
        "user_end": set(),
        "answer_end": set(),
        "scene": {"scene"},
        "task": {"instruction"},
        "subtasks_question": set(),
        "subtask": {"subtask"},
        "motion_question": set(),
        "plan": {"plan"},
        "action_question": set(),
    }

    @field_validator(
        "user_start", "user_end", "answer_end", "scene", "task", "subtasks_question", "subtask",
        "motion_question", "plan", "action_question",
    )
    @classmethod
    def _placeholders(cls, value: str, info: ValidationInfo) -> str:
        expected = cls._PLACEHOLDERS[str(info.field_name)]  # always set for a field validator
        try:
            found = _fields_of(value)
        except ValueError as exc:
            raise ValueError(f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from exc
        if found != expected:
            want = ", ".join(f"{{{n}}}" for n in sorted(expected)) or "no placeholders"
            raise ValueError(f"must use exactly {want}, found {sorted(found) or 'none'}")
        if MEDIA_MARKER in value:
            raise ValueError(f"must not contain the media marker {MEDIA_MARKER}")
        return value

    # --- rendering -----------------------------------------------------------------------------------

    def render_observation(self, scene: str | None = None) -> str:
        """The image marker (scene=None, vision bundles) or the scene description (text-only bundles)."""
        if scene is None:
            return MEDIA_MARKER
        return self.scene.format(scene=scene_in_units(clean_text(scene, "scene description"), self.scene_units))

    def render_task_prefix(self, instruction: str, scene: str | None = None) -> str:
        """Turn start + observation + instruction: the part shared by the subtask prompt and a step prefix."""
        return (
            self.user_start
            + self.render_observation(scene)
            + self.task.format(instruction=clean_text(instruction, "instruction"))
        )

    def render_subtasks_prompt(self, instruction: str, scene: str | None = None) -> str:
        """Stage 1, once per episode: the whole prompt asking for the subtask list."""
        return self.render_task_prefix(instruction, scene) + self.subtasks_question + self.user_end

    def render_step_prefix(self, instruction: str, subtask: str, scene: str | None = None) -> str:
        """The prefix shared by the motion and action prompts of one step (evaluated once, then cached)."""
        return self.render_task_prefix(instruction, scene) + self.subtask.format(subtask=clean_text(subtask, "subtask"))

    def render_motion_suffix(self) -> str:
        """Stage 2's suffix after the step prefix: the motion-plan question and the turn change."""
        return self.motion_question + self.user_end

    def render_action_suffix(self, plan: str) -> str:
        """Stage 3's suffix after the step prefix: the motion plan (a line of the user turn, or the model's answer
        to the motion question: `action_turn`), the action question, the turn change."""
        plan = clean_text(plan, "motion plan")
        if self.action_turn == "follow_up":  # the plan as the motion stage's answer, as training renders it
            return self.render_motion_suffix() + self.render_answer(plan) + self.user_start + (
                self.action_question + self.user_end
            )
        return self.plan.format(plan=plan) + self.action_question + self.user_end

    def render_motion_prompt(self, instruction: str, subtask: str, scene: str | None = None) -> str:
        """The whole motion prompt (prefix + suffix), e.g. for a training sample."""
        return self.render_step_prefix(instruction, subtask, scene) + self.render_motion_suffix()

    def render_action_prompt(self, instruction: str, subtask: str, plan: str, scene: str | None = None) -> str:
        """The whole action prompt (prefix + suffix), e.g. for a training sample."""
        return self.render_step_prefix(instruction, subtask, scene) + self.render_action_suffix(plan)

    def render_answer(self, answer: str) -> str:
        """A model answer as it follows its prompt in training text (the loss-masked target)."""
        return clean_text(answer, "answer", one_line=False) + self.answer_end


DEFAULT_PROMPTS = PromptTemplates()
