"""The three-stage VLM2VLA policy: subtasks once per episode, then per step a motion plan and an action chunk.

One model answers all three questions (the paper's design). A base + adapters bundle holds one base and
several LoRA adapters (skills): the base is loaded once, every adapter is loaded next to it (a few MB each),
and `use_adapter` switches the one llama.cpp applies, together with that adapter's prompts, action language
and grammars, in milliseconds and without reloading the base. Each step evaluates the shared prefix (turn
start + observation + instruction + subtask) once, image included, and both stages append their short suffix
to it, so the image is encoded and prefilled once per step and the action stage prefills only its suffix (with
templates whose `action_turn` is `follow_up`, only the turn change and its question: the motion question and
the plan the model wrote are still in the cache). Every output is generated inside its grammar and then parsed
by the parser, which trusts nothing: a chunk that fails (out of range, too long, cut off by the token budget)
raises `PolicyOutputError` with the raw text, for the episode runner to record and retry.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from vlm2vla_edge.grammars import GrammarError as LanguageGrammarError
from vlm2vla_edge.grammars import action_chunk_gbnf, load_gbnf, scene_subtasks_gbnf, waypoint_plan_gbnf
from vlm2vla_edge.runtime.action_text import WAYPOINT_PLAN_ENDINGS, plan_gripper_text
from vlm2vla_edge.runtime.actions import ActionChunk
from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, StageSampling
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.parser import ParseError, parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.bundle import Bundle, BundleError
from vlm2vla_edge.runtime.policy.decoder import Generation, Grammar, LlamaDecoder, Prefix, Timings
from vlm2vla_edge.runtime.policy.interface import (
    GenerationCancelled,
    Observation,
    PolicyOutputError,
    StageOutput,
    StepResult,
    SubtasksResult,
)
from vlm2vla_edge.runtime.policy.prompts import PromptTemplates
from vlm2vla_edge.runtime.scene_text import scene_object_names

log = logging.getLogger(__name__)

__all__ = [
    "GenerationCancelled", "LlamaPolicy", "PolicyOutputError", "Skill", "StageTimings", "effective_sampling",
    "retry_sampling",
]


@dataclass(frozen=True)
class Skill:
    """What one adapter of a base + adapters bundle brings: its prompts and action language (and the
    grammars compiled for them), and how llama.cpp applies it."""

    adapter: str
    prompts: PromptTemplates
    language: ActionLanguage
    scale: float
    bundle_id: str  # the bundle and this adapter, as episodes record it
    sampling: StageSampling  # the adapter's own (its manifest entry's) unless the policy config sets one


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Per-stage figures of one call: the shared prefix (image encode + prefill) and each stage."""

    prefix: Timings
    motion: Timings | None = None
    action: Timings | None = None
    subtasks: Timings | None = None
    wall_s: float = 0.0

    @property
    def model_s(self) -> float:
        """Time spent in the model (image encode, prefills, decoding)."""
        stages = (self.prefix, self.motion, self.action, self.subtasks)
        return sum(t.model_s for t in stages if t is not None)


def _flat(timings: Timings, prefix: str = "") -> dict[str, float]:
    """A decoder `Timings` as the plain numbers an episode records."""
    return {f"{prefix}{key}": float(value) for key, value in asdict(timings).items()}


def _stage_output(stage: str, prompt: str, gen: Generation, prefix: Timings | None, total_s: float) -> StageOutput:
    """The recorded view of one generation; the shared prefix's cost is reported with the first stage."""
    figures = _flat(gen.timings)
    if prefix is not None:
        figures.update(_flat(prefix, "prefix_"))
    figures["total_s"] = total_s
    figures["generated_tokens"] = float(gen.timings.generated_tokens)
    return StageOutput(stage=stage, prompt=prompt, raw_text=gen.text, timings=figures)


def effective_sampling(recommended: StageSampling | None, configured: StageSampling) -> StageSampling:
    """The sampling a policy runs with: the bundle's recommendation (what the model was validated with) when
    the policy config keeps the paper's default sampling; a policy config that sets its own always wins."""
    return recommended if recommended is not None and configured == StageSampling() else configured


def retry_sampling(stage: Sampling, retry: Sampling) -> Sampling:
    """A stage's settings for an out-of-distribution retry: the retry's temperature and nucleus, the
    stage's own token budget (a motion plan never needs the action stage's budget)."""
    return stage.model_copy(update={"temperature": retry.temperature, "top_p": retry.top_p, "top_k": retry.top_k})


class LlamaPolicy:
    """The policy engine over one decoder: the llama.cpp implementation of the `Policy` protocol
    (`interface.py`); not thread-safe (one episode at a time)."""

    def __init__(
        self,
        decoder: LlamaDecoder,
        prompts: PromptTemplates,
        language: ActionLanguage,
        sampling: StageSampling,
        *,
        vision: bool,
        bundle_id: str = "unnamed",
        constrained: bool = True,
    ) -> None:
        self.decoder = decoder
        # False only for measuring format adherence (policy constraint "none"): the parser and the safety
        # limiter still stand between the text and the arm, so unconstrained output can fail but not move it.
        self.constrained = constrained
        self._bundle_id = bundle_id
        self.prompts = prompts
        self.language = language
        self.sampling = sampling
        self.vision = vision
        if vision and not decoder.has_vision:
            raise UserError("a vision policy needs a decoder loaded with a vision projector (mmproj)")
        self._grammar_cache: dict[tuple[str, str], Grammar] = {}
        self._recent_grammars: dict[str, dict[str, Grammar]] = {}  # by name, then GBNF text: see _compiled_recent
        self._skills: dict[str, Skill] = {}
        self._adapter: str | None = None
        self.default_adapter: str | None = None  # a task that names no adapter gets this one
        self.grammars: dict[str, Grammar] = self._grammars_for(language)

    def _grammars_for(self, language: ActionLanguage) -> dict[str, Grammar]:
        """The three stage grammars for an action language, compiled once per distinct GBNF text.

        Compiled at load so that a grammar that does not compile fails then, not mid-episode. The action
        grammar is narrowed to the language's bounds, so nothing it admits can fail the parser.
        """
        sources = {
            "subtasks": load_gbnf("subtasks"),
            "motion_plan": load_gbnf("motion_plan"),
            "action_chunk": action_chunk_gbnf(
                language.max_abs_value_m, language.decimals, language.max_steps, language.units
            ),
        }
        return {name: self._compiled(name, text) for name, text in sources.items()}

    def _compiled(self, name: str, source: str) -> Grammar:
        """`source` compiled once per distinct text (adapters sharing a language share its grammars)."""
        key = (name, source)
        if key not in self._grammar_cache:
            self._grammar_cache[key] = self.decoder.compile_grammar(source, name)
        return self._grammar_cache[key]

    def _compiled_recent(self, name: str, source: str) -> Grammar:
        """`source` compiled once while it is among the last 64 distinct texts of grammar `name`: for grammars
        built per scene or per subtask, of which a long-running daemon sees many."""
        cache = self._recent_grammars.setdefault(name, {})
        if source not in cache:
            if len(cache) >= 64:
                cache.pop(next(iter(cache)))
            cache[source] = self.decoder.compile_grammar(source, name)
        return cache[source]

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, config: PolicyConfig | None = None, adapter: str | None = None
    ) -> "LlamaPolicy":
        """Load a verified bundle: its model, prompts and action language (the manifest's, not the config's).

        A base + adapters bundle loads its base once and every adapter beside it, and starts with
        `adapter` (None: the bundle's default); a merged bundle refuses an adapter name.
        """
        config = config or PolicyConfig()
        if adapter is not None:
            bundle.adapter(adapter)  # a clear BundleError before minutes of loading

        def sampling_for(recommended: StageSampling | None) -> StageSampling:
            return effective_sampling(recommended, config.sampling)

        with contextlib.ExitStack() as on_error:  # the decoder is closed if anything below fails
            decoder = on_error.enter_context(LlamaDecoder(bundle.text_model, config, mmproj_path=bundle.mmproj))
            digest = bundle.manifest.files[bundle.text_model.name].sha256[:12]
            base_id = f"{bundle.manifest.name}@{digest}"
            policy = cls(
                decoder, bundle.prompts, bundle.action_language, sampling_for(bundle.manifest.sampling),
                vision=bundle.is_vision, bundle_id=base_id, constrained=config.constraint != "none",
            )
            for name, entry in bundle.adapters.items():
                decoder.load_adapter(name, entry.path)
                policy.add_skill(Skill(
                    adapter=name, prompts=entry.prompts, language=entry.action_language, scale=entry.info.scale,
                    bundle_id=f"{base_id}+{name}@{entry.sha256[:12]}", sampling=sampling_for(entry.info.sampling),
                ))
            if bundle.default_adapter is not None:  # set exactly when the bundle has adapters (manifest check)
                policy.default_adapter = bundle.default_adapter
                policy.use_adapter(adapter or bundle.default_adapter)
            on_error.pop_all()
        return policy

    # --- adapters (skills) ---------------------------------------------------------------------------

    def add_skill(self, skill: Skill) -> None:
        """Register an adapter the decoder has loaded, with its prompts and action language (grammars
        are compiled now, so a bad one fails at load)."""
        if skill.adapter not in self.decoder.adapter_names:
            raise ValueError(f"the decoder has no adapter '{skill.adapter}' loaded")
        self._grammars_for(skill.language)
        self._skills[skill.adapter] = skill

    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of the adapters this policy can switch between (empty for a merged model)."""
        return tuple(self._skills)

    @property
    def adapter(self) -> str | None:
        """The adapter applied now (None: a merged model, or the bare base)."""
        return self._adapter

    def use_adapter(self, name: str) -> float:
        """Switch to adapter `name`: llama.cpp applies it from the next evaluation (the KV cache is cleared,
        since it holds the previous adapter's computation), and the prompts, action language and grammars
        become that adapter's. Returns the seconds it took (milliseconds: the base is not reloaded).
        Not while a step runs: the caller (runner, daemon) switches between episodes."""
        if name not in self._skills:
            known = ", ".join(self._skills) or "none: this bundle's model is merged"
            raise BundleError(f"unknown adapter '{name}'; this bundle's adapters: {known}")
        t0 = time.perf_counter()
        skill = self._skills[name]
        self.decoder.use_adapter(name, skill.scale)
        self.prompts = skill.prompts
        self.language = skill.language
        self.sampling = skill.sampling
        self.grammars = self._grammars_for(skill.language)
        self._adapter = name
        self._bundle_id = skill.bundle_id
        seconds = time.perf_counter() - t0
        log.info("event=adapter_switch adapter=%s seconds=%.4f", name, seconds)
        return seconds

    @property
    def needs_image(self) -> bool:
        return self.vision

    @property
    def action_language(self) -> ActionLanguage:
        return self.language

    @property
    def bundle_id(self) -> str:
        return self._bundle_id

    def close(self) -> None:
        self.decoder.close()

    def __enter__(self) -> "LlamaPolicy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stages --------------------------------------------------------------------------------------

    def subtasks(
        self, observation: Observation, instruction: str, *, cancel: threading.Event | None = None
    ) -> SubtasksResult:
        """Stage 1 (once per episode): the list of subtasks for the instruction."""
        t0 = time.perf_counter()
        image, scene = self._split(observation)
        prefix_text = self.prompts.render_task_prefix(instruction, scene)
        whole = self.prompts.render_subtasks_prompt(instruction, scene)
        prefix = self._prefix(prefix_text, image, cancel)
        gen = self._generate(
            whole[len(prefix_text) :], "subtasks", self.sampling.subtasks, prefix, cancel,
            grammar_override=self._subtask_grammar(scene),
        )
        timings = StageTimings(prefix=prefix.timings, subtasks=gen.timings, wall_s=time.perf_counter() - t0)
        try:
            parsed = parse_subtasks(self._finished(gen, "subtasks", timings))
        except ParseError as exc:
            raise PolicyOutputError("subtasks", gen.text, str(exc), timings) from exc
        output = _stage_output("subtasks", whole, gen, prefix.timings, timings.wall_s)
        return SubtasksResult(parsed, output, timings)

    def step(
        self,
        observation: Observation,
        instruction: str,
        subtask: str,
        retry: bool = False,
        *,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Stages 2 and 3 on one observation: a motion plan, then the action chunk that follows it."""
        t0 = time.perf_counter()
        image, scene = self._split(observation)
        motion_sampling, action_sampling = self.sampling.motion, self.sampling.action
        if retry:
            motion_sampling = retry_sampling(motion_sampling, self.sampling.retry)
            action_sampling = retry_sampling(action_sampling, self.sampling.retry)
        prefix_text = self.prompts.render_step_prefix(instruction, subtask, scene)
        prefix = self._prefix(prefix_text, image, cancel)

        motion_suffix = self.prompts.render_motion_suffix()
        motion_gen = self._generate(motion_suffix, "motion_plan", motion_sampling, prefix, cancel,
                                    grammar_override=self._motion_grammar(subtask))
        t_motion = time.perf_counter() - t0
        timings = StageTimings(prefix=prefix.timings, motion=motion_gen.timings, wall_s=t_motion)
        try:
            motion = parse_motion_plan(self._finished(motion_gen, "motion", timings))
        except ParseError as exc:
            raise PolicyOutputError("motion", motion_gen.text, str(exc), timings) from exc

        action_suffix = self.prompts.render_action_suffix(motion.text)
        action_gen = self._generate(action_suffix, "action_chunk", action_sampling, prefix, cancel,
                                    grammar_override=self._plan_action_grammar(motion.text))
        timings = StageTimings(
            prefix=prefix.timings, motion=motion_gen.timings, action=action_gen.timings, wall_s=time.perf_counter() - t0
        )
        try:
            chunk = parse_action_chunk(self._finished(action_gen, "action", timings), self.language)
        except ParseError as exc:
            raise PolicyOutputError("action", action_gen.text, str(exc), timings) from exc
        log.info(
            "event=policy_step retry=%s actions=%d motion_tokens=%d action_tokens=%d model_s=%.3f wall_s=%.3f",
            retry, len(chunk), len(motion_gen.tokens), len(action_gen.tokens), timings.model_s, timings.wall_s,
        )
        return StepResult(
            motion=motion,
            chunk=chunk,
            motion_output=_stage_output("motion", prefix_text + motion_suffix, motion_gen, prefix.timings, t_motion),
            action_output=_stage_output(
                "action", prefix_text + action_suffix, action_gen, None, timings.wall_s - t_motion
            ),
            retry=retry,
            timings=timings,
        )

    def act(
        self, observation: Observation, instruction: str, subtask: str, plan: str,
        *, cancel: threading.Event | None = None,
    ) -> tuple[ActionChunk, str]:
        """Stage 3 alone, given a motion plan (teacher forcing: the open-loop evaluation gives the label's
        plan to measure the action stage apart from the motion stage). Returns the chunk and its text."""
        image, scene = self._split(observation)
        prefix = self._prefix(self.prompts.render_step_prefix(instruction, subtask, scene), image, cancel)
        suffix = self.prompts.render_action_suffix(plan)
        gen = self._generate(suffix, "action_chunk", self.sampling.action, prefix, cancel,
                             grammar_override=self._plan_action_grammar(plan))
        timings = StageTimings(prefix=prefix.timings, action=gen.timings, wall_s=0.0)
        text = self._finished(gen, "action", timings)
        try:
            return parse_action_chunk(text, self.language), text
        except ParseError as exc:
            raise PolicyOutputError("action", text, str(exc), timings) from exc

    # --- helpers -------------------------------------------------------------------------------------

    def _split(self, observation: Observation | np.ndarray | str) -> tuple[np.ndarray | None, str | None]:
        """(image, scene): vision bundles take an image, text-only bundles a scene description.
        A bare array or string is accepted as the image or the scene."""
        if isinstance(observation, Observation):
            image, scene = observation.image, observation.scene
        elif isinstance(observation, np.ndarray):
            image, scene = observation, None
        else:
            image, scene = None, observation
        if self.vision:
            if not isinstance(image, np.ndarray):
                raise UserError("this is a vision bundle: the observation must be an RGB image (numpy array)")
            return image, None
        if not isinstance(scene, str):
            raise UserError("this is a text-only bundle: the observation must be a scene description (text)")
        return None, scene

    def _prefix(self, text: str, image: np.ndarray | None, cancel: threading.Event | None) -> Prefix:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("cancelled before the prompt was evaluated")
        return self.decoder.eval_prefix(text, image, cancel=cancel)

    def _subtask_grammar(self, scene: str | None) -> Grammar | None:
        """The subtask grammar of this scene's objects when the action language asks for it (None: the
        stage's own grammar, also for a scene text this runtime cannot read)."""
        if self.language.subtasks != "scene_objects" or scene is None or not self.constrained:
            return None
        names = tuple(sorted(scene_object_names(scene)))
        if not names:
            log.warning("event=scene_objects_unread detail=%r", "no object names in the scene text; free subtasks")
            return None
        return self._compiled_recent("scene_subtasks", scene_subtasks_gbnf(names))

    def _motion_grammar(self, subtask: str) -> Grammar | None:
        """The plan grammar about this subtask when the action language asks for it (`motion_plan:
        subtask_offset`); None: the stage's own grammar (also for a subtask a plan cannot hold)."""
        language = self.language
        if language.motion_plan != "subtask_offset" or not self.constrained:
            return None
        lead = " ".join(subtask.split()).rstrip(".")  # as the annotator leads its plan with it
        try:
            source = waypoint_plan_gbnf(
                lead, WAYPOINT_PLAN_ENDINGS, language.max_abs_value_m, language.decimals, language.units
            )
        except LanguageGrammarError as exc:
            log.info("event=free_motion_plan subtask=%r reason=%s", subtask, exc)
            return None
        return self._compiled_recent("waypoint_plan", source)

    def _plan_action_grammar(self, plan: str) -> Grammar | None:
        """The action grammar whose gripper is the one the plan states, when the action language asks for it
        (`chunk_gripper: from_plan`); None: the stage's own grammar (also for a plan that states none)."""
        language = self.language
        if language.chunk_gripper != "from_plan" or not self.constrained:
            return None
        text = plan_gripper_text(plan, language)
        if text is None:
            return None
        source = action_chunk_gbnf(
            language.max_abs_value_m, language.decimals, language.max_steps, language.units, gripper=text
        )
        return self._compiled(f"action_chunk_gripper_{text}", source)

    def _generate(
        self,
        suffix: str,
        grammar: str,
        sampling: Sampling,
        prefix: Prefix,
        cancel: threading.Event | None,
        *,
        grammar_override: Grammar | None = None,
    ) -> Generation:
        compiled = (grammar_override or self.grammars[grammar]) if self.constrained else None
        gen = self.decoder.generate(suffix, compiled, sampling, prefix=prefix, cancel=cancel)
        if gen.stop_reason == "cancelled":
            raise GenerationCancelled(f"cancelled during the {grammar} stage")
        return gen

    @staticmethod
    def _finished(gen: Generation, stage: str, timings: StageTimings) -> str:
        """The text of a generation that ended on its own; a cut-off one is refused with its reason."""
        if gen.stop_reason == "max_tokens":
            raise PolicyOutputError(
                stage, gen.text, f"the output reached the {len(gen.tokens)}-token budget before it was complete",
                timings,
            )
        return gen.text
