"""The three-stage LlamaPolicy: image in, parsed chunk out; per-stage sampling; prefix reuse; cancel; errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vlm2vla_edge.runtime.actions import ActionChunk, MotionPlan, SubtaskList
from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, StageSampling
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
from vlm2vla_edge.runtime.policy.engine import (
    GenerationCancelled,
    LlamaPolicy,
    PolicyOutputError,
    retry_sampling,
)

# The tiny vision model has random weights: its numbers are noise, often beyond the default 0.2 m,
# which the parser rightly refuses. These tests check the pipeline, so they parse with a wide range.
WIDE = ActionLanguage(max_abs_value_m=0.999)
SAMPLING = StageSampling(
    subtasks=Sampling(temperature=0.5, max_tokens=256, seed=1),
    motion=Sampling(temperature=0.1, max_tokens=64, seed=1),
    action=Sampling(temperature=0.5, max_tokens=420, seed=1),
    retry=Sampling(temperature=1.0, max_tokens=420, seed=1),
)


def _config() -> PolicyConfig:
    return PolicyConfig(n_threads=2, n_ctx=1024, n_batch=256, n_ubatch=256)


def test_retry_takes_the_retry_temperature_and_keeps_the_stage_budget() -> None:
    stage = Sampling(temperature=0.1, top_p=0.9, max_tokens=64, seed=3)
    retry = Sampling(temperature=1.0, top_p=0.95, top_k=40, max_tokens=384)
    out = retry_sampling(stage, retry)
    assert (out.temperature, out.top_p, out.top_k, out.max_tokens, out.seed) == (1.0, 0.95, 40, 64, 3)


def test_paper_defaults_per_stage() -> None:
    sampling = PolicyConfig().sampling
    assert (sampling.subtasks.temperature, sampling.motion.temperature, sampling.action.temperature) == (0.5, 0.1, 0.5)
    assert sampling.retry.temperature == 1.0
    assert {s.top_p for s in (sampling.subtasks, sampling.motion, sampling.action, sampling.retry)} == {0.95}


@pytest.fixture(scope="module")
def vision_policy(tiny_vision_bundle):
    decoder = LlamaDecoder(tiny_vision_bundle.text_model, _config(), mmproj_path=tiny_vision_bundle.mmproj)
    with LlamaPolicy(decoder, tiny_vision_bundle.prompts, WIDE, SAMPLING, vision=True) as policy:
        yield policy


def _image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8)


@pytest.mark.slow
def test_image_in_valid_chunk_out_and_action_prefill_excludes_the_image(vision_policy: LlamaPolicy) -> None:
    result = vision_policy.step(_image(), "put the carrot on the plate", "move to the carrot")
    assert isinstance(result.motion, MotionPlan) and isinstance(result.chunk, ActionChunk)
    assert 1 <= len(result.chunk) <= 16
    t = result.timings
    assert t.prefix.image_encode_s > 0
    decoder = vision_policy.decoder
    prompts = vision_policy.prompts
    motion_suffix = decoder.tokenize(prompts.render_motion_suffix())
    action_suffix = decoder.tokenize(prompts.render_action_suffix(result.motion.text))
    # the prefix holds the image; each stage prefills only its own suffix
    assert t.motion.prefill_tokens == len(motion_suffix)
    assert t.action.prefill_tokens + t.action.reused_tokens == len(action_suffix)
    assert t.motion.image_encode_s == 0 and t.action.image_encode_s == 0
    text_only = len(decoder.tokenize(prompts.render_step_prefix("put the carrot on the plate", "move to the carrot")
                                     .replace(decoder.media_marker, ""), add_bos=True))
    assert t.prefix.prefill_tokens > text_only  # the image's tokens are in the prefix, once
    assert t.model_s <= t.wall_s


@pytest.mark.slow
def test_subtasks_from_an_image(vision_policy: LlamaPolicy) -> None:
    try:
        result = vision_policy.subtasks(_image(1), "put the carrot on the plate")
    except PolicyOutputError as exc:  # random weights may run out of budget: the text is still in-grammar
        assert exc.stage == "subtasks" and exc.text.startswith('["')
        return
    assert isinstance(result.subtasks, SubtaskList) and len(result.subtasks) >= 1
    assert result.timings.prefix.image_encode_s > 0


@pytest.mark.slow
def test_observation_must_match_the_bundle_kind(vision_policy: LlamaPolicy) -> None:
    with pytest.raises(UserError, match="RGB image"):
        vision_policy.step("a carrot on a table", "put the carrot on the plate", "move")


@pytest.mark.slow
def test_cancel_raises_and_the_policy_stays_usable(vision_policy: LlamaPolicy) -> None:
    event = threading.Event()
    event.set()
    with pytest.raises(GenerationCancelled):
        vision_policy.step(_image(), "put the carrot on the plate", "move to the carrot", cancel=event)
    result = vision_policy.step(_image(), "put the carrot on the plate", "move to the carrot", retry=True)
    assert result.retry and len(result.chunk) >= 1


@pytest.mark.slow
def test_bundle_bounds_hold_during_decoding(tiny_vision_bundle) -> None:
    """With the bundle's own 0.2 m limit the engine decodes under the narrowed action grammar: the
    random model, whose numbers are noise across the whole v1 range, cannot write one the parser
    refuses, so no out-of-range retry can happen."""
    limit = tiny_vision_bundle.action_language.max_abs_value_m
    with LlamaPolicy.from_bundle(tiny_vision_bundle, _config().model_copy(update={"sampling": SAMPLING})) as policy:
        for seed in range(3):
            try:
                result = policy.step(_image(seed), "put the carrot on the plate", "move to the carrot")
            except PolicyOutputError as exc:  # only the token budget may cut a noise chunk short
                assert "token budget" in exc.reason, exc.reason
                assert exc.stage == "action" and exc.text.startswith("[[") and exc.timings.action is not None
                continue
            assert all(abs(v) <= limit for a in result.chunk for v in a.translation())
            assert len(result.chunk) <= tiny_vision_bundle.action_language.max_steps


@pytest.mark.slow
def test_text_only_bundle_takes_a_scene(gemma270m_bundle) -> None:
    config = _config().model_copy(update={"sampling": SAMPLING})
    decoder = LlamaDecoder(gemma270m_bundle.text_model, config)
    with LlamaPolicy(decoder, gemma270m_bundle.prompts, WIDE, SAMPLING, vision=False) as policy:
        with pytest.raises(UserError, match="scene description"):
            policy.step(_image(), "put the carrot on the plate", "move")
        result = policy.step("A carrot lies left of a plate.", "put the carrot on the plate", "move to the carrot")
        assert len(result.chunk) >= 1 and result.motion.text[:1].isalpha()
        assert result.timings.prefix.image_encode_s == 0


@pytest.mark.slow
def test_follow_up_action_stage_prefills_only_the_turn_change_and_its_question(gemma270m_bundle) -> None:
    """With `action_turn: follow_up` the action prompt extends the motion prompt and the plan the model just
    wrote; the decoder keeps those tokens in its cache, so the action stage evaluates only the turn change
    and the question. (The untrained base writes a plan, greedy, then may run its chunk past the budget:
    the timings are the same either way.)"""
    greedy = StageSampling(
        motion=Sampling(temperature=0.0, max_tokens=128), action=Sampling(temperature=0.0, max_tokens=96)
    )
    prompts = gemma270m_bundle.prompts.model_copy(update={"action_turn": "follow_up"})
    scene = "gripper open, holding nothing. carrot on the table: above (-0.12, 0.05, -0.2), grasp (-0.12, 0.05, -0.28)."
    decoder = LlamaDecoder(gemma270m_bundle.text_model, _config())
    with LlamaPolicy(decoder, prompts, WIDE, greedy, vision=False) as policy:
        try:
            timings = policy.step(scene, "put the carrot on the plate", "Move to the carrot").timings
        except PolicyOutputError as exc:
            assert exc.stage == "action", exc  # the motion stage must finish for this test to mean anything
            timings = exc.timings
        turn_change = decoder.tokenize(
            prompts.answer_end + prompts.user_start + prompts.action_question + prompts.user_end
        )
    assert timings.motion is not None and timings.action is not None
    assert timings.action.prefill_tokens == len(turn_change)
    # what was not evaluated again: the motion stage's question and the plan it generated
    assert timings.action.reused_tokens >= timings.motion.prefill_tokens + 3


@pytest.mark.slow
def test_constraint_none_decodes_without_grammar_and_still_parses(gemma270m_bundle) -> None:
    """Grammar off (format-adherence measurements): the untrained base writes free text, which the parser
    must refuse with the raw text kept; it never becomes an action."""
    config = _config().model_copy(update={"sampling": SAMPLING, "constraint": "none"})
    with LlamaPolicy.from_bundle(gemma270m_bundle, config) as policy:
        assert not policy.constrained
        outcomes = []
        for _ in range(1):
            try:
                result = policy.step(
                    "A carrot lies left of a plate.", "put the carrot on the plate", "move to the carrot"
                )
                outcomes.append(("ok", len(result.chunk)))
            except PolicyOutputError as exc:
                assert exc.stage in ("motion", "action") and isinstance(exc.text, str)
                outcomes.append(("refused", exc.stage))
    assert outcomes and any(kind == "refused" for kind, _ in outcomes)


@pytest.mark.slow
def test_scene_objects_subtasks_name_only_what_the_scene_text_holds(gemma270m_bundle) -> None:
    """Action language `subtasks: scene_objects`: even the untrained base, asked in a language it was never
    tuned on, can only list the annotator's phrases over the objects of the scene text."""
    from vlm2vla_edge.grammars import SUBTASK_PHRASES
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.sim.tasks import sample_episode
    from vlm2vla_edge.runtime.sim.world import SimWorld

    greedy = Sampling(temperature=0.0, max_tokens=128)
    sampling = StageSampling(subtasks=greedy, motion=greedy, action=greedy, retry=greedy)
    language = WIDE.model_copy(update={"subtasks": "scene_objects"})
    decoder = LlamaDecoder(gemma270m_bundle.text_model, _config())
    with LlamaPolicy(decoder, gemma270m_bundle.prompts, language, sampling, vision=False) as policy:
        for seed in (1_000_001, 1_000_002):
            episode = sample_episode(seed, language="es")
            scene = SimWorld(load_robot_config(), episode.scene).describe()
            result = policy.subtasks(scene, episode.task.instruction())
            allowed = {p.format(object=o) for p in SUBTASK_PHRASES for o in episode.scene.objects}
            assert result.subtasks and set(result.subtasks) <= allowed, (result.subtasks, sorted(episode.scene.objects))
        # a text the runtime cannot read as a scene keeps the free grammar
        free = policy.subtasks("A carrot lies left of a plate.", "put the carrot on the plate")
        assert free.subtasks


@pytest.mark.slow
def test_subtask_offset_plans_state_the_subtask_and_an_offset(gemma270m_bundle) -> None:
    """Action language `motion_plan: subtask_offset`: even the untrained base writes the plan the annotator would
    (the subtask as given, an offset in the action's units and bounds, an ending the runtime reads); a subtask
    no plan can hold leaves that plan free."""
    import re

    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.sim.tasks import sample_episode
    from vlm2vla_edge.runtime.sim.world import SimWorld

    greedy = Sampling(temperature=0.0, max_tokens=64)
    sampling = StageSampling(subtasks=greedy, motion=greedy, action=greedy, retry=greedy)
    scene = SimWorld(load_robot_config(), sample_episode(1_000_004).scene).describe()
    language = ActionLanguage(grammar_version="2", units="cm", decimals=2, max_abs_value_m=0.5, max_steps=1,
                              actions="waypoints", chunk_gripper="from_plan", motion_plan="subtask_offset")  # fmt: skip
    plan = re.compile(r"(Move to the lemon|Grasp the lemon): \((0|-?[1-9][0-9]?), (0|-?[1-9][0-9]?), "
                      r"(0|-?[1-9][0-9]?)\)(\.|, then close the gripper\.|, then open the gripper\.|"
                      r", gripper open\.|, gripper closed\.)")  # fmt: skip
    decoder = LlamaDecoder(gemma270m_bundle.text_model, _config())
    with LlamaPolicy(decoder, gemma270m_bundle.prompts, language, sampling, vision=False) as policy:
        for subtask in ("Move to the lemon", "Grasp the lemon", "Move to the lemon."):
            result = policy.step(scene, "pick up the lemon", subtask)
            assert plan.fullmatch(result.motion.text), result.motion.text
            assert result.motion.text.startswith(subtask.rstrip("."))
        assert policy._motion_grammar("Move to the champiñón") is None  # no plan can hold it: free
        assert policy._motion_grammar("Grasp the lemon") is policy._motion_grammar("Grasp the lemon")  # compiled once
        free = policy.step(scene, "pick up the lemon", "Move to the champiñón")
        assert free.motion.text


@pytest.mark.slow
def test_chunk_gripper_from_plan_writes_the_gripper_the_plan_states(gemma270m_bundle) -> None:
    """Action language `chunk_gripper: from_plan`: the chunk's gripper is the one its plan ends by stating, for
    the untrained base too, in metres and in centimetres; a plan that states none leaves it free."""
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.sim.tasks import sample_episode
    from vlm2vla_edge.runtime.sim.world import SimWorld

    greedy = Sampling(temperature=0.0, max_tokens=64)
    sampling = StageSampling(subtasks=greedy, motion=greedy, action=greedy, retry=greedy)
    scene = SimWorld(load_robot_config(), sample_episode(1_000_003).scene).describe()
    cm = ActionLanguage(grammar_version="2", units="cm", decimals=2, max_abs_value_m=0.5, max_steps=2,
                        actions="waypoints", chunk_gripper="from_plan")  # fmt: skip
    metres = cm.model_copy(update={"units": "m", "grammar_version": "1"})
    for language in (cm, metres):
        decoder = LlamaDecoder(gemma270m_bundle.text_model, _config())
        with LlamaPolicy(decoder, gemma270m_bundle.prompts, language, sampling, vision=False) as policy:
            for plan, gripper in (("Move to the lemon: (3, -2, 5), gripper open.", 1.0),
                                  ("Grasp the lemon: (0, 0, -8), then close the gripper.", 0.0),
                                  ("Lift the lemon: (0, 0, 10), gripper closed.", 0.0),
                                  ("Release the lemon: (0, 0, -3), then open the gripper.", 1.0)):  # fmt: skip
                chunk, text = policy.act(scene, "pick up the lemon", plan.split(":")[0], plan)
                assert {a.gripper for a in chunk} == {gripper}, (plan, text)
            assert policy._plan_action_grammar("Move the gripper down.") is None  # no stated gripper: free
