"""Prove that a converted bundle behaves like the trained model, before it is written.

Two checks, both on the prompts the policy really asks (runtime/policy/prompts.py), rendered from a
labelled dataset (`dataset_cases`) or from a small built-in set (`builtin_cases`):

(a) conversion: the F16 GGUF against the merged transformers model, teacher-forced over the action
    prompt's suffix and its target answer (the positions where the model must get things right):
    top-1 next-token agreement and the largest logit difference. Both sides see the same token ids:
    llama.cpp tokenizes (exactly as the runtime will), and the transformers model gets those ids, with
    the image as the same number of image tokens where mtmd puts the image embeddings.
(b) quantisation: the quantised text model against the F16 one through the runtime decoder with the
    bundle's action grammar, greedy: the parsed action chunks must agree (same length and gripper values,
    translations within a tolerance) and their mean absolute difference is reported in centimetres.

Figures come back as `ValidationReport.figures` (a flat name -> number dict for the manifest's
`validation`), and `ValidationReport.failures` names every threshold missed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.prompts import MEDIA_MARKER, PromptTemplates

log = logging.getLogger(__name__)


# --- thresholds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """What a bundle must meet to be written; each is a command-line option."""

    # (a) share of teacher-forced positions where the F16 GGUF and transformers pick the same next token
    min_top1_agreement: float = 0.99
    # (a) largest |logit difference| at any checked position (logits of a real model span ~20-40)
    max_logit_diff: float = 2.0
    # (b) share of prompts whose quantised action chunk agrees with the F16 one
    min_chunk_agreement: float = 0.75
    # (b) two chunks agree when lengths and grippers match and no translation differs by more than this
    chunk_tolerance_cm: float = 1.0
    # (b) mean |difference| of the translations of agreeing-length chunks, centimetres
    max_mean_abs_diff_cm: float = 1.0
    # (a') adapter mode: share of teacher-forced positions where base + run-time LoRA and the merged F16
    # reference pick the same next token (0.977-0.981 for the demo adapter on the Q4_K_M base: bench/README.md)
    min_adapter_top1_agreement: float = 0.95


# --- cases -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationCase:
    """One held-out prompt: the action (or motion/subtasks) question and its target answer."""

    stage: str  # "action", "motion" or "subtasks"
    instruction: str
    subtask: str | None
    motion_plan: str | None
    target: str
    image: np.ndarray | None  # RGB uint8, already at the model's image size (vision models)
    scene: str | None  # text observation (text-only models)
    source: str

    def prompt(self, prompts: PromptTemplates) -> tuple[str, str]:
        """(prefix, suffix): the prefix holds the observation (evaluated once); the suffix is the stage's
        question; the target answer follows the suffix when teacher-forcing."""
        if self.stage == "subtasks":
            prefix = prompts.render_task_prefix(self.instruction, self.scene)
            return prefix, prompts.render_subtasks_prompt(self.instruction, self.scene)[len(prefix) :]
        prefix = prompts.render_step_prefix(self.instruction, self.subtask or "", self.scene)
        if self.stage == "motion":
            return prefix, prompts.render_motion_suffix()
        return prefix, prompts.render_action_suffix(self.motion_plan or "")


# Built-in held-out prompts: tasks and answers in the style of the Bridge tabletop (not training data).
_BUILTIN = (
    ("put the carrot on the plate", "pick up the carrot", "move the gripper down and left toward the carrot",
     "[[-0.02, 0.015, -0.03, 1], [-0.01, 0.01, -0.025, 1], [0, 0, -0.01, 0]]",
     "a carrot lies left of a white plate on a wooden table"),
    ("put the eggplant in the pan", "move to the eggplant", "move the gripper forward and right",
     "[[0.03, -0.02, 0, 1], [0.025, -0.015, -0.01, 1]]",
     "a purple eggplant is in front of a metal pan"),
    ("place the fish on the plate", "lift the fish", "close the gripper and move up",
     "[[0, 0, 0, 0], [0, 0, 0.03, 0], [0, 0, 0.025, 0]]",
     "the gripper is around a toy fish near a plate"),
    ("move the pan to the left", "grasp the pan handle", "move the gripper down to the handle",
     "[[0, 0.01, -0.04, 1], [0, 0, -0.02, 1], [0, 0, 0, 0]]",
     "a pan with its handle pointing to the robot"),
    ("open the drawer", "reach the drawer handle", "move the gripper forward and down slightly",
     "[[0.04, 0, -0.01, 1], [0.03, 0, 0, 1]]",
     "a closed drawer under the table top"),
    ("put the spoon in the bowl", "place the spoon", "move the gripper right over the bowl and open it",
     "[[0, -0.03, 0, 0], [0, -0.02, -0.01, 0], [0, 0, 0, 1]]",
     "the robot holds a spoon left of a blue bowl"),
)


def synthetic_image(index: int, size: int) -> np.ndarray:
    """A deterministic tabletop-like RGB image (coloured blocks on a brown table), `size` px square."""
    rng = np.random.default_rng(1000 + index)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = (150 + 10 * (index % 3), 110, 70)
    for _ in range(3):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 3, 2)
        image[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return image


def builtin_cases(*, vision: bool, image_size: int | None = None) -> list[ValidationCase]:
    """The built-in held-out action prompts (with synthetic images, or scene texts for text-only models)."""
    cases = []
    for i, (instruction, subtask, plan, target, scene) in enumerate(_BUILTIN):
        image = synthetic_image(i, image_size or 64) if vision else None
        cases.append(
            ValidationCase(
                "action", instruction, subtask, plan, target, image, None if vision else scene, f"builtin-{i}"
            )
        )
    return cases


def _load_image(path: Path, size: int) -> np.ndarray:
    """An RGB image at the model's own size: both sides then see the same pixels (no resampling)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def dataset_cases(
    path: Path, *, vision: bool, image_size: int | None = None, limit: int = 8, stages: tuple[str, ...] = ("action",)
) -> list[ValidationCase]:
    """Up to `limit` samples of a labelled dataset (train/data format), spread evenly over it.

    Vision models take the samples with an image, text-only models those with a scene description.
    """
    from vlm2vla_edge.train.data.dataset import read_dataset

    dataset = read_dataset(path)
    usable = [
        s for s in dataset.samples
        if s.stage in stages and (s.image if vision else s.scene)
        and s.subtask is not None and (s.stage != "action" or s.motion_plan)
    ]
    if not usable:
        need = "an image" if vision else "a scene description"
        raise UserError(f"--dataset {path} has no {'/'.join(stages)} samples with {need} to validate on")
    step = max(1, len(usable) // limit)
    chosen = usable[::step][:limit]
    cases = []
    for s in chosen:
        image = _load_image(dataset.path / s.image, image_size or 64) if vision and s.image else None
        cases.append(
            ValidationCase(s.stage, s.instruction, s.subtask, s.motion_plan, s.target, image,
                           None if vision else s.scene, s.id)
        )
    return cases


# --- (a) the F16 GGUF against transformers ------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """How the transformers model takes an image: the ids mtmd's embeddings stand for, and the pixels."""

    image_token_id: int
    tokens_per_image: int
    processor: Any  # Gemma3ImageProcessorPil


@dataclass
class LogitsComparison:
    positions: int = 0
    top1_agree: int = 0
    max_logit_diff: float = 0.0
    per_case: list[tuple[str, float, float]] = field(default_factory=list)  # (source, agreement, max diff)
    answer_positions: int = 0  # the positions that predict the answer's tokens (not the question's)
    answer_top1_agree: int = 0

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.positions if self.positions else 0.0

    @property
    def answer_top1_agreement(self) -> float:
        return self.answer_top1_agree / self.answer_positions if self.answer_positions else 0.0


def _teacher_forced_llama(decoder: Any, prefix_text: str, image: np.ndarray | None, forced: list[int]) -> np.ndarray:
    """llama.cpp's logits after the prefix and after each forced token but the last, one row each.

    Uses the runtime decoder's own path (prefix with the image through mtmd, then suffix tokens on the
    cached prefix), one new token per call: exactly what the runtime computes.
    """
    greedy = Sampling(temperature=0.0, max_tokens=1)
    prefix = decoder.eval_prefix(prefix_text, image)
    rows = [decoder.last_logits()]
    for k in range(1, len(forced)):
        decoder.generate(forced[:k], None, greedy, prefix=prefix)
        rows.append(decoder.last_logits())
    return np.stack(rows)


def _prefix_ids(decoder: Any, prefix_text: str, image: ImageSpec | None) -> tuple[list[int], list[int]]:
    """Token ids of the prefix as mtmd lays them out (image tokens as placeholders) and the image mask."""
    if image is None or MEDIA_MARKER not in prefix_text:
        ids = decoder.tokenize(prefix_text, add_bos=True)
        return ids, [0] * len(ids)
    before, after = prefix_text.split(MEDIA_MARKER, 1)
    # mtmd (Gemma 3) writes <start_of_image> and <end_of_image> as text around the embeddings.
    a = decoder.tokenize(before + "<start_of_image>", add_bos=True)
    b = decoder.tokenize("<end_of_image>" + after)
    n = image.tokens_per_image
    return a + [image.image_token_id] * n + b, [0] * len(a) + [1] * n + [0] * len(b)


def compare_logits(
    model: Any,
    decoder: Any,
    cases: list[ValidationCase],
    prompts: PromptTemplates,
    image: ImageSpec | None,
    *,
    max_positions: int = 32,
    progress: Callable[[str], None] = lambda line: None,
) -> LogitsComparison:
    """Check (a): transformers `model` (the merged one) against `decoder` (the F16 GGUF)."""
    import torch

    result = LogitsComparison()
    for case in cases:
        prefix_text, suffix = case.prompt(prompts)
        forced = (decoder.tokenize(suffix) + decoder.tokenize(case.target))[:max_positions]
        ids, mask = _prefix_ids(decoder, prefix_text, image if case.image is not None else None)
        t0 = time.perf_counter()
        theirs = _teacher_forced_llama(decoder, prefix_text, case.image, forced)
        t1 = time.perf_counter()
        input_ids = torch.tensor([ids + forced[:-1]])
        kwargs: dict[str, Any] = {}
        if image is not None and case.image is not None:
            pixels = image.processor(images=[case.image], return_tensors="pt")["pixel_values"]
            kwargs["pixel_values"] = pixels.to(next(model.parameters()).dtype)
            kwargs["token_type_ids"] = torch.tensor([mask + [0] * (len(forced) - 1)])
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False, logits_to_keep=len(forced), **kwargs)
        ours = out.logits[0, -len(forced) :].float().numpy()
        t2 = time.perf_counter()
        n_vocab = min(ours.shape[1], theirs.shape[1])  # the GGUF drops out-of-vocabulary rows
        ours, theirs = ours[:, :n_vocab], theirs[:, :n_vocab]
        agree = int((ours.argmax(1) == theirs.argmax(1)).sum())
        diff = float(np.abs(ours - theirs).max())
        result.positions += len(forced)
        result.top1_agree += agree
        result.max_logit_diff = max(result.max_logit_diff, diff)
        result.per_case.append((case.source, agree / len(forced), diff))
        progress(
            f"  {case.source}: top-1 {agree}/{len(forced)}, max |logit diff| {diff:.4f} "
            f"(llama.cpp {t1 - t0:.1f} s, transformers {t2 - t1:.1f} s)"
        )
    return result


# --- (a') two llama.cpp models against each other (run-time adapter vs merged F16) ---------------------------


def _forced_rows(decoder: Any, prefix_text: str, image: np.ndarray | None, forced: list[int]) -> np.ndarray:
    """Like `_teacher_forced_llama`, but the forced tokens go in as one batch with logits at every
    position (`teacher_forced_logits`): the cost of one prefill instead of one decode step per token."""
    prefix = decoder.eval_prefix(prefix_text, image)
    first = decoder.last_logits()[None, :]
    if len(forced) == 1:
        return first
    return np.concatenate([first, decoder.teacher_forced_logits(forced[:-1], prefix)])


def compare_decoders(
    reference: Any,
    candidate: Any,
    cases: list[ValidationCase],
    prompts: PromptTemplates,
    *,
    progress: Callable[[str], None] = lambda line: None,
) -> LogitsComparison:
    """Top-1 agreement of two llama.cpp models (e.g. merged F16 and base + run-time LoRA), teacher-forced
    over each prompt's stage question and target answer, through the runtime decoder's own prefix path."""
    result = LogitsComparison()
    for case in cases:
        prefix_text, suffix = case.prompt(prompts)
        question = reference.tokenize(suffix)
        forced = question + reference.tokenize(case.target)
        if forced != candidate.tokenize(suffix) + candidate.tokenize(case.target):
            raise UserError("the two models tokenize the validation prompts differently: not the same vocabulary")
        ours = _forced_rows(reference, prefix_text, case.image, forced)
        theirs = _forced_rows(candidate, prefix_text, case.image, forced)
        same = ours.argmax(1) == theirs.argmax(1)
        agree = int(same.sum())
        diff = float(np.abs(ours - theirs).max())
        result.positions += len(forced)
        result.top1_agree += agree
        result.answer_positions += len(forced) - len(question)
        result.answer_top1_agree += int(same[len(question) :].sum())
        result.max_logit_diff = max(result.max_logit_diff, diff)
        result.per_case.append((case.source, agree / len(forced), diff))
        progress(f"  {case.source}: top-1 {agree}/{len(forced)}, max |logit diff| {diff:.4f}")
    return result


@dataclass(frozen=True)
class LabelFit:
    """How well a model predicts the labelled answers (teacher-forced, answer tokens and end of turn)."""

    positions: int
    top1: float  # share of answer tokens that are the model's first choice
    nll: float  # mean negative log-likelihood per answer token, nats


def label_fit(decoder: Any, cases: list[ValidationCase], prompts: PromptTemplates) -> LabelFit:
    """Teacher-forced fit of `decoder` (with whatever adapter it applies) to the cases' target answers.

    A cheap check that an adapter is really applied: on the demo adapter's held-out prompts the bare
    base scores about 1.6 nats per answer token and the base + adapter about 0.2.
    """
    positions = agree = 0
    nll = 0.0
    end = decoder.tokenize(prompts.answer_end) if getattr(prompts, "answer_end", "") else []
    for case in cases:
        prefix_text, suffix = case.prompt(prompts)
        question = decoder.tokenize(suffix)
        answer = decoder.tokenize(case.target) + end[:1]
        rows = _forced_rows(decoder, prefix_text, case.image, question + answer)[len(question) :]
        targets = np.asarray(answer)
        top = rows.max(axis=1)
        log_z = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        nll += float((log_z - rows[np.arange(len(targets)), targets]).sum())
        agree += int((rows.argmax(axis=1) == targets).sum())
        positions += len(targets)
    if positions == 0:
        raise UserError("no validation prompts to measure the adapter on")
    return LabelFit(positions, agree / positions, nll / positions)


# --- (b) the quantised model against F16 ----------------------------------------------------------------


@dataclass
class ChunkOutcome:
    source: str
    text: str
    chunk: Any | None  # ActionChunk, or None when the output did not parse
    error: str | None


def greedy_chunks(
    decoder: Any, cases: list[ValidationCase], prompts: PromptTemplates, language: ActionLanguage, max_tokens: int
) -> list[ChunkOutcome]:
    """Greedy action chunks through the runtime decoder with the bundle's action grammar, parsed."""
    from vlm2vla_edge.grammars import action_chunk_gbnf
    from vlm2vla_edge.runtime.parser import ParseError, parse_action_chunk

    grammar = decoder.compile_grammar(
        action_chunk_gbnf(language.max_abs_value_m, language.decimals, language.max_steps, language.units),
        "action_chunk",
    )
    greedy = Sampling(temperature=0.0, max_tokens=max_tokens)
    outcomes = []
    for case in cases:
        if case.stage != "action":
            continue
        prefix_text, suffix = case.prompt(prompts)
        prefix = decoder.eval_prefix(prefix_text, case.image)
        gen = decoder.generate(suffix, grammar, greedy, prefix=prefix)
        if gen.stop_reason == "max_tokens":
            outcomes.append(ChunkOutcome(case.source, gen.text, None, f"cut off at {max_tokens} tokens"))
            continue
        try:
            outcomes.append(ChunkOutcome(case.source, gen.text, parse_action_chunk(gen.text, language), None))
        except ParseError as exc:
            outcomes.append(ChunkOutcome(case.source, gen.text, None, str(exc)))
    return outcomes


@dataclass
class ChunkComparison:
    prompts: int = 0
    agree: int = 0
    compared_values: int = 0
    abs_diff_sum_cm: float = 0.0
    max_abs_diff_cm: float = 0.0
    reference_parsed: int = 0
    candidate_parsed: int = 0

    @property
    def agreement(self) -> float:
        return self.agree / self.prompts if self.prompts else 0.0

    @property
    def mean_abs_diff_cm(self) -> float:
        """NaN when no pair of chunks had the same length (nothing to compare value by value)."""
        return self.abs_diff_sum_cm / self.compared_values if self.compared_values else math.nan


def compare_chunks(
    reference: list[ChunkOutcome], candidate: list[ChunkOutcome], tolerance_cm: float
) -> ChunkComparison:
    """Agreement of two runs' chunks, prompt by prompt. Identical raw text always agrees (also two
    identical failures); parsed chunks agree when lengths and grippers match and every translation is
    within `tolerance_cm`. The mean difference is over translations of equal-length parsed pairs."""
    result = ChunkComparison()
    for ref, cand in zip(reference, candidate, strict=True):
        result.prompts += 1
        result.reference_parsed += ref.chunk is not None
        result.candidate_parsed += cand.chunk is not None
        if ref.chunk is None or cand.chunk is None or len(ref.chunk) != len(cand.chunk):
            result.agree += ref.text == cand.text
            continue
        diffs = [
            abs(a - b) * 100.0
            for ra, ca in zip(ref.chunk, cand.chunk)
            for a, b in zip(ra.translation(), ca.translation())
        ]
        grippers_match = all(ra.gripper == ca.gripper for ra, ca in zip(ref.chunk, cand.chunk))
        result.compared_values += len(diffs)
        result.abs_diff_sum_cm += sum(diffs)
        result.max_abs_diff_cm = max(result.max_abs_diff_cm, max(diffs))
        result.agree += ref.text == cand.text or (grippers_match and max(diffs) <= tolerance_cm + 1e-9)
    return result


# --- the report -------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    logits: LogitsComparison | None = None
    chunks: ChunkComparison | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    seconds: float = 0.0
    adapter_logits: LogitsComparison | None = None  # adapter mode: base + LoRA vs merged F16
    label_fit: LabelFit | None = None  # the final model's fit to the labelled answers
    chunk_label: str = "quant"  # what the chunk figures compare with the reference: "quant" or "adapter"

    @property
    def figures(self) -> dict[str, float]:
        """Flat figures for the manifest's `validation` (all finite numbers)."""
        out: dict[str, float] = {}
        if self.logits is not None:
            out.update(
                f16_top1_agreement=round(self.logits.top1_agreement, 6),
                f16_max_logit_diff=round(self.logits.max_logit_diff, 6),
                f16_positions=float(self.logits.positions),
                f16_prompts=float(len(self.logits.per_case)),
            )
        if self.chunks is not None:
            c = self.chunk_label
            out.update({
                f"{c}_chunk_agreement": round(self.chunks.agreement, 6),
                f"{c}_mean_abs_diff_cm": round(self.chunks.mean_abs_diff_cm, 6),
                f"{c}_max_abs_diff_cm": round(self.chunks.max_abs_diff_cm, 6),
                f"{c}_prompts": float(self.chunks.prompts),
                f"{c}_f16_chunks_parsed": float(self.chunks.reference_parsed),
                f"{c}_chunks_parsed": float(self.chunks.candidate_parsed),
            })
        if self.adapter_logits is not None:
            out.update(
                adapter_top1_agreement=round(self.adapter_logits.top1_agreement, 6),
                adapter_answer_top1_agreement=round(self.adapter_logits.answer_top1_agreement, 6),
                adapter_answer_positions=float(self.adapter_logits.answer_positions),
                adapter_max_logit_diff=round(self.adapter_logits.max_logit_diff, 6),
                adapter_positions=float(self.adapter_logits.positions),
                threshold_min_adapter_top1_agreement=self.thresholds.min_adapter_top1_agreement,
            )
        if self.label_fit is not None:
            out.update(
                label_top1=round(self.label_fit.top1, 6),
                label_nll=round(self.label_fit.nll, 6),
                label_positions=float(self.label_fit.positions),
            )
        t = self.thresholds
        out.update(
            threshold_min_top1_agreement=t.min_top1_agreement,
            threshold_max_logit_diff=t.max_logit_diff,
            threshold_min_chunk_agreement=t.min_chunk_agreement,
            threshold_chunk_tolerance_cm=t.chunk_tolerance_cm,
            threshold_max_mean_abs_diff_cm=t.max_mean_abs_diff_cm,
        )
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    @property
    def failures(self) -> list[str]:
        t = self.thresholds
        failed = []
        if self.logits is not None:
            if self.logits.top1_agreement < t.min_top1_agreement:
                failed.append(f"F16 top-1 agreement {self.logits.top1_agreement:.2%} < {t.min_top1_agreement:.2%}")
            if self.logits.max_logit_diff > t.max_logit_diff:
                failed.append(f"F16 max |logit diff| {self.logits.max_logit_diff:.3f} > {t.max_logit_diff}")
        what = "quantised" if self.chunk_label == "quant" else "run-time adapter"
        if self.chunks is not None:
            if self.chunks.agreement < t.min_chunk_agreement:
                failed.append(f"{what} chunk agreement {self.chunks.agreement:.2%} < {t.min_chunk_agreement:.2%}")
            if self.chunks.compared_values and self.chunks.mean_abs_diff_cm > t.max_mean_abs_diff_cm:
                failed.append(
                    f"{what} mean |diff| {self.chunks.mean_abs_diff_cm:.3f} cm > {t.max_mean_abs_diff_cm} cm"
                )
        if self.adapter_logits is not None and self.adapter_logits.top1_agreement < t.min_adapter_top1_agreement:
            failed.append(
                f"run-time adapter top-1 agreement with merged F16 {self.adapter_logits.top1_agreement:.2%} < "
                f"{t.min_adapter_top1_agreement:.2%}"
            )
        return failed


def validation_decoder_config(n_threads: int | None) -> PolicyConfig:
    """The runtime's policy settings for a validation decoder (CPU, the runtime's batch sizes)."""
    return PolicyConfig(n_threads=n_threads, n_gpu_layers=0, n_ctx=2048)
