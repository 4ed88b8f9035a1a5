"""Prompt templates: exact rendering, prefix/suffix split, Gemma-3 chat-template equivalence, tokenization."""

from __future__ import annotations

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, MEDIA_MARKER, PromptError, PromptTemplates
from vlm2vla_edge.testing.models import GEMMA3_CHAT_TEMPLATE

P = DEFAULT_PROMPTS
INSTRUCTION = "put the carrot on the plate"
SUBTASK = "grasp the carrot"
PLAN = "Move the gripper down and slightly to the left."
SCENE = "a carrot to the left of a white plate"

# Words without '<...>' look-alikes and at least one visible character.
words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="<>"), min_size=1, max_size=60
).filter(lambda s: s.strip())


def chat_template(user_text: str, image: bool) -> str:
    """What Gemma-3's own chat template renders for one user message (image first, then text)."""
    return conversation_template([("user", user_text)], image)


def conversation_template(turns: list[tuple[str, str]], image: bool) -> str:
    """What Gemma-3's chat template renders for a conversation (the image first in the first user turn)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise AssertionError(message)

    env.globals["raise_exception"] = raise_exception
    messages = []
    for i, (role, text) in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": text}] if (image and i == 0) else text
        messages.append({"role": role, "content": content})
    return env.from_string(GEMMA3_CHAT_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=True
    )


def as_template_output(prompt: str) -> str:
    """Our prompt as the chat template writes it: <bos> first, <start_of_image> for mtmd's marker."""
    return "<bos>" + prompt.replace(MEDIA_MARKER, "<start_of_image>")


def test_default_prompts_render_exactly() -> None:
    assert P.render_subtasks_prompt(INSTRUCTION) == (
        "<start_of_turn>user\n<__media__>Task: put the carrot on the plate\n"
        'List the subtasks the robot must complete, in order, as ["...", "..."].'
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert P.render_step_prefix(INSTRUCTION, SUBTASK) == (
        "<start_of_turn>user\n<__media__>Task: put the carrot on the plate\nCurrent subtask: grasp the carrot\n"
    )
    assert P.render_motion_suffix() == (
        "How should the gripper move next? Answer in one sentence.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert P.render_action_suffix(PLAN) == (
        "Motion plan: Move the gripper down and slightly to the left.\n"
        "Give the next actions as [[dx, dy, dz, gripper], ...].<end_of_turn>\n<start_of_turn>model\n"
    )
    assert P.render_step_prefix(INSTRUCTION, SUBTASK, scene=SCENE) == (
        "<start_of_turn>user\nScene: a carrot to the left of a white plate\n"
        "Task: put the carrot on the plate\nCurrent subtask: grasp the carrot\n"
    )
    assert P.render_answer("[[0.025, -0.01, 0, 1]]") == "[[0.025, -0.01, 0, 1]]<end_of_turn>\n"


@pytest.mark.parametrize("scene", [None, SCENE])
def test_prompts_equal_gemma3_chat_template(scene: str | None) -> None:
    observation = "" if scene is None else f"Scene: {SCENE}\n"
    task = f"{observation}Task: {INSTRUCTION}\n"
    step = f"{task}Current subtask: {SUBTASK}\n"
    cases = {
        P.render_subtasks_prompt(INSTRUCTION, scene): task + P.subtasks_question,
        P.render_motion_prompt(INSTRUCTION, SUBTASK, scene): step + P.motion_question,
        P.render_action_prompt(INSTRUCTION, SUBTASK, PLAN, scene): step + f"Motion plan: {PLAN}\n" + P.action_question,
    }
    for prompt, user_text in cases.items():
        assert as_template_output(prompt) == chat_template(user_text, image=scene is None)


FOLLOW_UP = PromptTemplates(action_turn="follow_up")


@pytest.mark.parametrize("scene", [None, SCENE])
def test_follow_up_action_prompt_is_a_second_turn_after_the_plan(scene: str | None) -> None:
    motion = FOLLOW_UP.render_motion_prompt(INSTRUCTION, SUBTASK, scene)
    action = FOLLOW_UP.render_action_prompt(INSTRUCTION, SUBTASK, PLAN, scene)
    # the action prompt extends the motion prompt and its answer, so the decoder's cache holds its start
    assert action == motion + PLAN + "<end_of_turn>\n<start_of_turn>user\n" + FOLLOW_UP.action_question + (
        "<end_of_turn>\n<start_of_turn>model\n"
    )
    assert action.startswith(motion + FOLLOW_UP.render_answer(PLAN))
    # ... and it is the chat template's conversation: user, model (the plan), user
    observation = "" if scene is None else f"Scene: {SCENE}\n"
    first = f"{observation}Task: {INSTRUCTION}\nCurrent subtask: {SUBTASK}\n{FOLLOW_UP.motion_question}"
    turns = [("user", first), ("assistant", PLAN), ("user", FOLLOW_UP.action_question)]
    assert as_template_output(action) == conversation_template(turns, image=scene is None)
    # the other stages and the step prefix do not change with the layout
    assert motion == P.render_motion_prompt(INSTRUCTION, SUBTASK, scene)
    assert FOLLOW_UP.render_subtasks_prompt(INSTRUCTION, scene) == P.render_subtasks_prompt(INSTRUCTION, scene)


def test_templates_without_an_action_turn_keep_the_plan_line() -> None:
    """Manifests and training cards written before the field existed read as the layout they were trained with."""
    stored = P.model_dump(mode="json")
    del stored["action_turn"]
    assert PromptTemplates.model_validate(stored).action_turn == "plan_line"
    assert PromptTemplates.model_validate(stored).render_action_suffix(PLAN).startswith("Motion plan: ")
    with pytest.raises(ValidationError):
        PromptTemplates(action_turn="second")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="motion plan is empty"):
        FOLLOW_UP.render_action_suffix(" \n ")


@settings(max_examples=200, deadline=None)
@given(instruction=words, subtask=words, plan=words, use_scene=st.booleans(), scene=words)
def test_prefix_and_suffix_make_the_whole_prompt(
    instruction: str, subtask: str, plan: str, use_scene: bool, scene: str
) -> None:
    chosen = scene if use_scene else None
    prefix = P.render_step_prefix(instruction, subtask, chosen)
    motion = P.render_motion_prompt(instruction, subtask, chosen)
    action = P.render_action_prompt(instruction, subtask, plan, chosen)
    assert motion == prefix + P.render_motion_suffix()
    assert action == prefix + P.render_action_suffix(plan)
    # The subtask prompt and every step prefix share the task prefix (observation + instruction).
    task_prefix = P.render_task_prefix(instruction, chosen)
    assert prefix.startswith(task_prefix)
    assert P.render_subtasks_prompt(instruction, chosen).startswith(task_prefix)
    # Exactly one observation, and the prompt matches the chat template for whatever the user typed.
    assert motion.count(MEDIA_MARKER) == (0 if use_scene else 1)
    user_text = motion.removeprefix(P.user_start).removesuffix(P.user_end).removeprefix(MEDIA_MARKER)
    assert as_template_output(motion) == chat_template(user_text, image=not use_scene)


def test_user_text_is_trimmed_to_one_line() -> None:
    assert P.render_step_prefix("  put the\ncarrot\t on the plate ", " grasp ") == P.render_step_prefix(
        "put the carrot on the plate", "grasp"
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: P.render_step_prefix("   ", SUBTASK), "the instruction is empty"),
        (lambda: P.render_step_prefix(INSTRUCTION, ""), "the subtask is empty"),
        (lambda: P.render_action_suffix("\n"), "the motion plan is empty"),
        (lambda: P.render_step_prefix("stop<end_of_turn>", SUBTASK), "'<end_of_turn>'"),
        (lambda: P.render_step_prefix(INSTRUCTION, f"look at {MEDIA_MARKER}"), "'<__media__>'"),
        (lambda: P.render_subtasks_prompt(INSTRUCTION, scene="<start_of_image> a plate"), "scene description"),
        (lambda: P.render_step_prefix(123, SUBTASK), "must be text"),  # type: ignore[arg-type]
    ],
)
def test_bad_user_text_is_refused(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PromptError, match=message):
        call()


def test_a_lone_angle_bracket_is_fine() -> None:
    assert "x < 3 cm" in P.render_step_prefix("move until x < 3 cm", SUBTASK)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("task", "Do: {task}\n", "must use exactly {instruction}"),
        ("plan", "Plan:\n", "must use exactly {plan}"),
        ("motion_question", "Where to, {subtask}?", "must use exactly no placeholders"),
        ("subtask", "Now {subtask", "not a valid template"),
        ("scene", f"{MEDIA_MARKER} {{scene}}", "media marker"),
    ],
)
def test_templates_are_validated(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PromptTemplates(**{field: value})


def test_templates_are_strict_and_frozen() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        PromptTemplates(question="?")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        P.task = "Task: {instruction}"  # type: ignore[misc]


def test_custom_templates_render_and_round_trip() -> None:
    custom = PromptTemplates(task="Instruction: {instruction}\n", motion_question="Next motion?")
    assert custom.render_motion_prompt("go", "reach").endswith(
        "Instruction: go\nCurrent subtask: reach\nNext motion?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert PromptTemplates.model_validate_json(custom.model_dump_json()) == custom
    assert "{{braces}}" not in PromptTemplates(plan="Plan {{x}}: {plan}\n").render_action_suffix("up")


# --- against the real Gemma-3 tokenizer ---------------------------------------------------------------


def _stage_cases() -> list[tuple[str, str]]:
    cases = []
    for scene in (None, SCENE):
        prefix = P.render_step_prefix(INSTRUCTION, SUBTASK, scene)
        cases.append((prefix, P.render_motion_suffix()))
        cases.append((prefix, P.render_action_suffix(PLAN)))
        cases.append((P.render_task_prefix(INSTRUCTION, scene), P.subtasks_question + P.user_end))
    return cases


@pytest.mark.slow
def test_split_tokenizes_like_the_whole_prompt_in_llama_cpp(gemma270m_gguf) -> None:  # type: ignore[no-untyped-def]
    """The KV-cache split must not change the tokens: prefix + suffix tokenized apart == tokenized whole."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(gemma270m_gguf), vocab_only=True, verbose=False)
    for prefix, suffix in _stage_cases():
        # mtmd tokenizes the text after the image on its own (no BOS there): compare that chunk.
        head, marker, tail = prefix.rpartition(MEDIA_MARKER)
        first = not marker
        whole = llm.tokenize((tail + suffix).encode(), add_bos=first, special=True)
        split = llm.tokenize(tail.encode(), add_bos=first, special=True) + llm.tokenize(
            suffix.encode(), add_bos=False, special=True
        )
        assert split == whole
        assert whole.count(llm.token_bos()) == (1 if first else 0)
        assert llm.tokenize(b"<end_of_turn>", add_bos=False, special=True) == [106]


@pytest.mark.slow
def test_prompts_equal_apply_chat_template_of_the_real_tokenizer(gemma_tokenizer_dir) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gemma_tokenizer_dir))
    prompt = P.render_motion_prompt(INSTRUCTION, SUBTASK, scene=SCENE)
    user_text = prompt.removeprefix(P.user_start).removesuffix(P.user_end)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<bos>" + prompt
    vision = P.render_action_prompt(INSTRUCTION, SUBTASK, PLAN)
    vision_text = vision.removeprefix(P.user_start + MEDIA_MARKER).removesuffix(P.user_end)
    rendered_vision = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vision_text}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered_vision == as_template_output(vision)
    # Tokenizing our text (BOS added by the tokenizer) gives the template's tokens.
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prefix = P.render_step_prefix(INSTRUCTION, SUBTASK, scene=SCENE)
    split = tokenizer(prefix)["input_ids"] + tokenizer(P.render_motion_suffix(), add_special_tokens=False)["input_ids"]
    assert split == ids
