"""Open-loop evaluation: a model bundle's answers, stage by stage, against a labelled dataset.

Closed-loop success (`vlm2vla-edge eval`) says *whether* a policy solves tasks; this says *why not*. Every
sample of the dataset is asked of the policy with the label's own inputs, so each stage is measured
apart from the errors of the others:

- subtasks: the list, exact, and whether it names the same objects in the same order;
- motion: the model's own plan for the step (exact, and whether it names the same directions);
- action, two ways: after the model's own plan (what the robot would do) and after the label's plan
  (teacher forcing: the action stage alone). Error is the distance, cm, between the chunk's summed move
  and the label's; also per-axis sign agreement (axes the label moves at least 1 cm) and the final
  gripper value. Broken down by subtask kind (move to an object with the gripper open, move while
  holding, grasp, lift, release, other) and by the label's distance.

The numbers come from the same `LlamaPolicy` a robot runs (the bundle, its grammar and sampling), so what is
measured here is what ships. Samples are taken in a fixed pseudo-random order (a hash of their id), so
`--max-samples` gives the same subset every time.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
from pydantic import BaseModel, Field

from vlm2vla_edge.runtime.actions import ActionChunk
from vlm2vla_edge.runtime.parser import ParseError, parse_action_chunk
from vlm2vla_edge.runtime.policy.interface import Observation, PolicyOutputError
from vlm2vla_edge.train.data.dataset import LabelledDataset, Sample
from vlm2vla_edge.train.data.wording import named_directions

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy

SubtaskKind = Literal["move_open", "move_holding", "grasp", "lift", "release", "other"]
DISTANCE_BUCKETS_CM: tuple[tuple[float, float], ...] = ((0, 5), (5, 15), (15, 30), (30, 1000))
_NOUNS = re.compile(r"\bthe ([a-z][a-z ]*?)(?=$|[^a-z ]| and | then )")


def subtask_kind(subtask: str, label_gripper_closed: bool) -> SubtaskKind:
    """The subtask's kind from its verb; a move is split by whether the gripper is closed (holding)."""
    word = subtask.strip().lower().split(" ", 1)[0]
    if word in ("move", "go", "reach", "approach"):
        return "move_holding" if label_gripper_closed else "move_open"
    if word in ("grasp", "grab", "pick"):
        return "grasp"
    if word in ("lift", "raise"):
        return "lift"
    if word in ("release", "place", "put", "drop"):
        return "release"
    return "other"


def _order(sample: Sample) -> str:
    return hashlib.sha256(sample.id.encode()).hexdigest()


def _nouns(subtasks: list[str]) -> list[str]:
    return [m.group(1) for text in subtasks for m in _NOUNS.finditer(text.lower())]


class ActionScore(BaseModel):
    """One motion/action sample."""

    id: str
    subtask: str
    kind: SubtaskKind
    label_distance_cm: float
    label_plan: str
    plan: str | None = None
    plan_exact: bool = False
    plan_directions_agree: bool = False
    chunk: str | None = None
    error_cm: float | None = Field(None, description="Summed move after the model's own plan vs the label's, cm.")
    forced_chunk: str | None = None
    forced_error_cm: float | None = Field(None, description="The same after the label's plan (teacher forcing).")
    signs_agree: int = 0
    signs_total: int = 0
    gripper_agree: bool = False
    invalid: str | None = None


class SubtasksScore(BaseModel):
    id: str
    instruction: str
    label: list[str]
    predicted: list[str] | None
    exact: bool
    objects_agree: bool
    invalid: str | None = None


class KindSummary(BaseModel):
    n: int
    error_cm_mean: float | None
    error_cm_median: float | None
    forced_error_cm_mean: float | None
    within_1cm: float | None = Field(None, description="Share of own-plan chunks within 1 cm of the label.")
    forced_within_1cm: float | None
    plan_exact: float | None
    sign_agreement: float | None
    gripper_agreement: float | None
    mean_answer_error_cm: float | None = Field(
        None, description="Baseline: always writing the mean label move of this kind (same samples)."
    )


class OpenLoopReport(BaseModel):
    dataset: str
    bundle_id: str
    samples: dict[str, int]
    subtasks_exact: float | None
    subtasks_objects_agree: float | None
    plan_exact: float | None
    plan_directions_agree: float | None
    format_invalid: int
    by_kind: dict[str, KindSummary]
    by_distance: dict[str, KindSummary]
    overall: KindSummary | None
    wall_s: float
    subtask_scores: list[SubtasksScore]
    action_scores: list[ActionScore]

    def table(self) -> str:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.0f}%"

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        lines = [
            f"open-loop evaluation of {self.bundle_id} on {self.dataset}: {self.samples}",
            f"subtasks exact {pct(self.subtasks_exact)}, same objects {pct(self.subtasks_objects_agree)}; "
            f"motion plan exact {pct(self.plan_exact)}, same directions {pct(self.plan_directions_agree)}; "
            f"unparsable outputs {self.format_invalid}",
            "",
            f"{'kind':<14}{'n':>5}{'err cm':>9}{'median':>8}{'forced':>8}{'<=1cm':>7}{'forced<=1':>10}"
            f"{'plan=':>7}{'signs':>7}{'grip':>6}{'mean-ans':>10}",
        ]
        rows = list(self.by_kind.items()) + [("", None)] + list(self.by_distance.items())
        if self.overall is not None:
            rows += [("", None), ("all", self.overall)]
        for name, s in rows:
            if s is None:
                lines.append("")
                continue
            lines.append(
                f"{name:<14}{s.n:>5}{num(s.error_cm_mean):>9}{num(s.error_cm_median):>8}{num(s.forced_error_cm_mean):>8}"
                f"{pct(s.within_1cm):>7}{pct(s.forced_within_1cm):>10}{pct(s.plan_exact):>7}{pct(s.sign_agreement):>7}"
                f"{pct(s.gripper_agreement):>6}{num(s.mean_answer_error_cm):>10}"
            )
        return "\n".join(lines)


def _summed(chunk: ActionChunk) -> np.ndarray:
    return np.array(chunk.total_translation(), dtype=float) * 100.0  # cm


def _summary(scores: list[ActionScore], label_moves: dict[str, np.ndarray]) -> KindSummary:
    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    own = [s.error_cm for s in scores if s.error_cm is not None]
    forced = [s.forced_error_cm for s in scores if s.forced_error_cm is not None]
    signs = sum(s.signs_agree for s in scores), sum(s.signs_total for s in scores)
    moves = [label_moves[s.id] for s in scores]
    mean_move = np.mean(moves, axis=0) if moves else None
    baseline = [float(np.linalg.norm(m - mean_move)) for m in moves] if mean_move is not None else []
    answered = [s for s in scores if s.chunk is not None]
    return KindSummary(
        n=len(scores),
        error_cm_mean=mean(own),
        error_cm_median=float(np.median(own)) if own else None,
        forced_error_cm_mean=mean(forced),
        within_1cm=mean([float(e <= 1.0 + 1e-9) for e in own]),
        forced_within_1cm=mean([float(e <= 1.0 + 1e-9) for e in forced]),
        plan_exact=mean([float(s.plan_exact) for s in scores if s.plan is not None]),
        sign_agreement=signs[0] / signs[1] if signs[1] else None,
        gripper_agreement=mean([float(s.gripper_agree) for s in answered]),
        mean_answer_error_cm=mean(baseline),
    )


def evaluate_open_loop(
    policy: "LlamaPolicy",
    dataset: LabelledDataset,
    *,
    max_samples: int | None = None,
    teacher_forcing: bool = True,
    echo: Callable[[str], None] = print,
) -> OpenLoopReport:
    """Ask `policy` every (or the first `max_samples` per stage, in hash order) subtask and action sample."""
    started = time.monotonic()
    language = policy.action_language
    by_stage: dict[str, list[Sample]] = defaultdict(list)
    for sample in sorted(dataset.samples, key=_order):
        by_stage[sample.stage].append(sample)
    subtask_samples = by_stage["subtasks"][:max_samples]
    action_samples = by_stage["action"][:max_samples]
    if not subtask_samples and not action_samples:
        from vlm2vla_edge.runtime.errors import UserError

        raise UserError(f"dataset {dataset.path} has no subtask or action samples to evaluate")

    def observation(sample: Sample) -> Observation:
        if policy.needs_image:
            from PIL import Image

            if sample.image is None:
                from vlm2vla_edge.runtime.errors import UserError

                raise UserError(f"sample {sample.id} has no image, but {policy.bundle_id} is a vision bundle")
            return Observation(image=np.asarray(Image.open(dataset.path / sample.image).convert("RGB")))
        if sample.scene is None:
            from vlm2vla_edge.runtime.errors import UserError

            raise UserError(f"sample {sample.id} has no scene text, but {policy.bundle_id} is a text-only bundle")
        return Observation(image=np.zeros((1, 1, 3), dtype=np.uint8), scene=sample.scene)

    invalid = 0
    subtask_scores: list[SubtasksScore] = []
    for n, sample in enumerate(subtask_samples, start=1):
        label = list(sample.subtasks or [])
        try:
            predicted = list(policy.subtasks(observation(sample), sample.instruction).subtasks)
            error = None
        except PolicyOutputError as exc:
            predicted, error = None, str(exc)
            invalid += 1
        subtask_scores.append(SubtasksScore(
            id=sample.id, instruction=sample.instruction, label=label, predicted=predicted,
            exact=predicted == label, objects_agree=predicted is not None and _nouns(predicted) == _nouns(label),
            invalid=error,
        ))
        if n % 10 == 0 or n == len(subtask_samples):
            echo(f"  subtasks {n}/{len(subtask_samples)}")

    action_scores: list[ActionScore] = []
    label_moves: dict[str, np.ndarray] = {}
    for n, sample in enumerate(action_samples, start=1):
        assert sample.subtask is not None and sample.motion_plan is not None  # checked by Sample
        label_chunk = parse_action_chunk(sample.target, language)
        label_move = _summed(label_chunk)
        label_moves[sample.id] = label_move
        closed = label_chunk[-1].gripper == 0.0
        score = ActionScore(
            id=sample.id, subtask=sample.subtask, kind=subtask_kind(sample.subtask, closed),
            label_distance_cm=float(np.linalg.norm(label_move)), label_plan=sample.motion_plan,
        )
        obs = observation(sample)
        try:
            step = policy.step(obs, sample.instruction, sample.subtask)
            score.plan = step.motion.text
            score.plan_exact = step.motion.text == sample.motion_plan
            score.plan_directions_agree = named_directions(step.motion.text) == named_directions(sample.motion_plan)
            score.chunk = step.action_output.raw_text
            move = _summed(step.chunk)
            score.error_cm = float(np.linalg.norm(move - label_move))
            for axis in range(3):
                if abs(label_move[axis]) >= 1.0:
                    score.signs_total += 1
                    score.signs_agree += int(math.copysign(1, move[axis]) == math.copysign(1, label_move[axis])
                                             and abs(move[axis]) > 1e-9)
            score.gripper_agree = step.chunk[-1].gripper == label_chunk[-1].gripper
        except (PolicyOutputError, ParseError) as exc:
            score.invalid = str(exc)
            invalid += 1
        if teacher_forcing and hasattr(policy, "act"):
            try:
                forced, text = policy.act(obs, sample.instruction, sample.subtask, sample.motion_plan)
                score.forced_chunk = text
                score.forced_error_cm = float(np.linalg.norm(_summed(forced) - label_move))
            except (PolicyOutputError, ParseError) as exc:
                score.invalid = score.invalid or str(exc)
                invalid += 1
        action_scores.append(score)
        if n % 10 == 0 or n == len(action_samples):
            done = [s.error_cm for s in action_scores if s.error_cm is not None]
            echo(
                f"  actions {n}/{len(action_samples)}  mean error so far "
                f"{np.mean(done) if done else float('nan'):.1f} cm"
            )

    kinds: dict[str, list[ActionScore]] = defaultdict(list)
    distances: dict[str, list[ActionScore]] = defaultdict(list)
    for score in action_scores:
        kinds[score.kind].append(score)
        for lo, hi in DISTANCE_BUCKETS_CM:
            if lo <= score.label_distance_cm < hi:
                distances[f"{lo:.0f}-{hi:.0f} cm" if hi < 1000 else f">={lo:.0f} cm"].append(score)
    planned = [s for s in action_scores if s.plan is not None]

    def rate(values: list[bool]) -> float | None:
        return sum(values) / len(values) if values else None

    return OpenLoopReport(
        dataset=str(dataset.path),
        bundle_id=policy.bundle_id,
        samples={"subtasks": len(subtask_samples), "action": len(action_samples)},
        subtasks_exact=rate([s.exact for s in subtask_scores]),
        subtasks_objects_agree=rate([s.objects_agree for s in subtask_scores]),
        plan_exact=rate([s.plan_exact for s in planned]),
        plan_directions_agree=rate([s.plan_directions_agree for s in planned]),
        format_invalid=invalid,
        by_kind={k: _summary(v, label_moves) for k, v in sorted(kinds.items())},
        by_distance={k: _summary(v, label_moves) for k, v in distances.items()},
        overall=_summary(action_scores, label_moves) if action_scores else None,
        wall_s=time.monotonic() - started,
        subtask_scores=subtask_scores,
        action_scores=action_scores,
    )


def write_report(report: OpenLoopReport, out: Path) -> Path:
    from vlm2vla_edge.runtime.files import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, report.model_dump_json(indent=2).encode())
    return out


__all__ = ["OpenLoopReport", "evaluate_open_loop", "subtask_kind", "write_report"]
