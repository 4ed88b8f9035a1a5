"""The evaluation harness: seeded episodes of the simulated suite, scored by the simulator's ground truth.

For each task kind of the suite (pick, place, composite) the harness runs N episodes whose seeds are
the first N, from a start seed in the held-out range, whose sampled task is of that kind. Every
episode gets a fresh simulated robot; one policy serves the whole run. The runner's own outcome
(every subtask verified) is reported next to the ground truth (`Task.success`), because a verifier can
be fooled: the paper's metrics are the simulator's.

Metrics, per task kind and over all episodes:

- success rate: share of episodes with `task.success(world)` after the episode (ground truth);
  runner success rate: share with runner outcome "success" (what the verifier believed);
- partial credit: mean `task.partial_credit(world)` (the paper's metric for the composite task);
- plan hit rates, from the predicted subtask list (see `plan_hits`);
- format validity: share of generation calls whose output parsed (see `_EpisodeTally`);
- latency percentiles (p50/p90/p99) per stage, pooled over the episodes' `stage_latency_s`;
- retries (mean, max), steps (mean) and wall time per episode.

The checks read the simulator's state only after the episode has ended; nothing of them reaches the
policy or the verifier.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from vlm2vla_edge.runtime.config import (
    PolicyConfig,
    RobotConfig,
    StrictModel,
    describe_validation_error,
    load_robot_config,
)
from vlm2vla_edge.runtime.errors import ConfigError, UserError
from vlm2vla_edge.runtime.events import (
    EpisodeSubscriber,
    LoopEventHandler,
    StepPlanned,
    StepRejected,
    SubtasksPlanned,
    SubtasksRejected,
)
from vlm2vla_edge.runtime.files import atomic_write
from vlm2vla_edge.runtime.local_run import INTERRUPTED, on_interrupt
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig
from vlm2vla_edge.runtime.sim.tasks import LANGUAGES, CompositeTask, Language, PickTask, PlaceTask, Task, sample_episode
from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig, make_verifier
from vlm2vla_edge.runtime.versions import versions

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.policy.interface import Policy
    from vlm2vla_edge.runtime.sim.session import SimSession
    from vlm2vla_edge.runtime.verifier.base import Verifier

log = logging.getLogger(__name__)

#: Seeds below this were used for training data (train/demo_recipe.py); evaluation starts here.
HELD_OUT_SEED = 1_000_000

TaskKind = Literal["pick", "place", "composite"]
TASK_KINDS: tuple[TaskKind, ...] = ("pick", "place", "composite")
STAGES: tuple[str, ...] = ("subtasks", "motion", "action", "execute", "verify")

#: At most this many seeds are scanned per wanted episode (composites are 15% of the suite).
_SCAN_PER_EPISODE = 200


def task_kind(task: Task) -> TaskKind:
    if isinstance(task, CompositeTask):
        return "composite"
    if isinstance(task, PlaceTask):
        return "place"
    if isinstance(task, PickTask):
        return "pick"
    raise TypeError(f"not a task of the suite: {type(task).__name__}")


def select_seeds(kind: TaskKind, n: int, start: int = HELD_OUT_SEED, language: Language = "en") -> list[int]:
    """The first `n` seeds from `start` whose sampled task is of `kind`.

    The language is passed explicitly, so the task drawn for a seed is the same in every language
    (only its instruction text changes) and results of different languages compare episode by episode.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}")
    seeds: list[int] = []
    for seed in range(start, start + max(n, 1) * _SCAN_PER_EPISODE):
        if len(seeds) == n:
            break
        if task_kind(sample_episode(seed, language=language).task) == kind:
            seeds.append(seed)
    if len(seeds) < n:
        raise RuntimeError(f"found only {len(seeds)} {kind} tasks in {n * _SCAN_PER_EPISODE} seeds from {start}")
    return seeds


# --- plan hits -------------------------------------------------------------------------------------------


def task_keywords(task: Task) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(object keywords, destination keywords): the items the task moves and the containers it puts them
    in or on, as English catalogue names, each once, in task order."""
    parts = task.parts if isinstance(task, CompositeTask) else (task,)
    objects: list[str] = []
    destinations: list[str] = []
    for part in parts:
        if isinstance(part, PlaceTask):
            objects.append(part.item)
            destinations.append(part.target)
        elif isinstance(part, PickTask):
            objects.append(part.item)
        else:  # nested composites are not in the suite
            raise TypeError(f"unexpected part {type(part).__name__}")
    return tuple(dict.fromkeys(objects)), tuple(dict.fromkeys(destinations))


def mentions(subtasks: tuple[str, ...] | list[str], keyword: str) -> bool:
    """Whether any subtask names `keyword` as a whole word (case-insensitive; plural -s / -es allowed)."""
    pattern = re.compile(rf"(?<![a-z]){re.escape(keyword.lower())}(?:s|es)?(?![a-z])")
    return any(pattern.search(s.lower()) for s in subtasks)


def plan_hits(task: Task, subtasks: tuple[str, ...] | list[str]) -> tuple[bool, bool | None]:
    """(object hit, destination hit) of a predicted subtask list, after the paper's plan hit rate.

    Object hit: every item the task moves is named in some subtask. Destination hit: every container
    the task puts something in or on is named; None for tasks without a destination (pick). Names are
    the English catalogue names (the subtask language of the models), matched as whole words, case-
    insensitively, plural allowed (`mentions`). An episode without a usable subtask list misses both.
    The plan hits when the object hit and the destination hit (where there is one) both hold.
    """
    objects, destinations = task_keywords(task)
    object_hit = bool(subtasks) and all(mentions(subtasks, k) for k in objects)
    destination_hit = None if not destinations else bool(subtasks) and all(mentions(subtasks, k) for k in destinations)
    return object_hit, destination_hit


# --- configuration -------------------------------------------------------------------------------------


class EvalConfig(StrictModel):
    """What to evaluate and under which budgets; recorded in results.json."""

    tasks: tuple[TaskKind, ...] = Field(TASK_KINDS, description="Task kinds of the suite to run.")
    episodes: int = Field(10, ge=1, le=10_000, description="Episodes per task kind.")
    seed_start: int = Field(HELD_OUT_SEED, ge=0, description="Seeds are scanned from here (held-out range).")
    allow_training_seeds: bool = Field(False, description="Permit a seed_start below the held-out range.")
    language: Language = Field("en", description="Language of the instructions.")
    robot: str = Field("widowx250s", description="Robot config (preset name or YAML file).")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Budgets of each episode.")
    verifier: VerifierConfig = Field(
        default_factory=lambda: VerifierConfig(kind="heuristic"), description="Step verifier (default: offline)."
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="Settings the bundle is loaded with (evaluate_bundle)."
    )
    bundle: Path | None = Field(None, description="The model bundle evaluated (its manifest is recorded).")
    record_dir: Path | None = Field(None, description="Record every episode under this folder; None records none.")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: tuple[TaskKind, ...]) -> tuple[TaskKind, ...]:
        if not tasks:
            raise ValueError("at least one task kind is needed")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task kinds repeat: {list(tasks)}")
        return tasks

    @model_validator(mode="after")
    def _held_out(self) -> "EvalConfig":
        if self.seed_start < HELD_OUT_SEED and not self.allow_training_seeds:
            raise ValueError(
                f"seed_start {self.seed_start} is in the training range (< {HELD_OUT_SEED}); "
                "set allow_training_seeds to evaluate there"
            )
        return self

    @classmethod
    def build(cls, **fields: Any) -> "EvalConfig":
        """Validate, reporting a mistake as one `ConfigError` sentence (for the command line)."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error("evaluation settings", exc)) from None


# --- results -------------------------------------------------------------------------------------------


class BundleInfo(StrictModel):
    """The evaluated bundle, from its manifest."""

    path: str
    name: str
    base_model: str
    quant_type: str
    text_model: str
    text_model_sha256: str
    adapter_sha256: str | None = None


class EpisodeRow(StrictModel):
    """One evaluated episode."""

    kind: TaskKind
    seed: int
    language: Language
    instruction: str
    success: bool = Field(description="Ground truth: task.success(world) after the episode.")
    partial_credit: float = Field(ge=0.0, le=1.0, description="Ground truth: task.partial_credit(world).")
    runner_outcome: str = Field(description="The runner's outcome: success, failed, aborted or error.")
    runner_detail: str
    subtasks: tuple[str, ...] = ()
    object_keywords: tuple[str, ...] = ()
    destination_keywords: tuple[str, ...] = ()
    object_hit: bool = False
    destination_hit: bool | None = None
    plan_hit: bool = False
    outputs: int = Field(0, ge=0, description="Generation calls (subtask list, and one per step).")
    invalid_outputs: int = Field(0, ge=0, description="Calls whose output did not parse.")
    steps: int = 0
    retries: int = 0
    completed_subtasks: int = 0
    duration_s: float = Field(0.0, description="The runner's episode time.")
    wall_s: float = Field(0.0, description="Wall time of the episode with set-up and scoring.")
    stage_latency_s: dict[str, list[float]] = Field(default_factory=dict)
    episode_dir: str | None = None


class Percentiles(StrictModel):
    n: int
    p50: float
    p90: float
    p99: float


class Summary(StrictModel):
    """Aggregates over a set of episodes (one task kind, or all)."""

    kind: str
    episodes: int
    success_rate: float | None
    runner_success_rate: float | None
    mean_partial_credit: float | None
    plan_hit_rate: float | None
    object_hit_rate: float | None
    destination_hit_rate: float | None = Field(description="Over the episodes whose task has a destination.")
    format_validity: float | None = Field(description="Parsed outputs / generation calls, pooled.")
    latency_s: dict[str, Percentiles | None]
    retries_mean: float | None
    retries_max: int | None
    steps_mean: float | None
    wall_s_mean: float | None
    wall_s_total: float


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(kind: str, rows: list[EpisodeRow]) -> Summary:
    latency: dict[str, Percentiles | None] = {}
    for stage in STAGES:
        samples = [v for row in rows for v in row.stage_latency_s.get(stage, [])]
        if samples:
            p50, p90, p99 = (float(v) for v in np.percentile(samples, [50, 90, 99]))
            latency[stage] = Percentiles(n=len(samples), p50=p50, p90=p90, p99=p99)
        else:
            latency[stage] = None
    outputs = sum(r.outputs for r in rows)
    with_destination = [r.destination_hit for r in rows if r.destination_hit is not None]
    return Summary(
        kind=kind,
        episodes=len(rows),
        success_rate=_rate([r.success for r in rows]),
        runner_success_rate=_rate([r.runner_outcome == "success" for r in rows]),
        mean_partial_credit=_mean([r.partial_credit for r in rows]),
        plan_hit_rate=_rate([r.plan_hit for r in rows]),
        object_hit_rate=_rate([r.object_hit for r in rows]),
        destination_hit_rate=_rate(with_destination),
        format_validity=(outputs - sum(r.invalid_outputs for r in rows)) / outputs if outputs else None,
        latency_s=latency,
        retries_mean=_mean([r.retries for r in rows]),
        retries_max=max((r.retries for r in rows), default=None),
        steps_mean=_mean([r.steps for r in rows]),
        wall_s_mean=_mean([r.wall_s for r in rows]),
        wall_s_total=sum(r.wall_s for r in rows),
    )


CSV_COLUMNS: tuple[str, ...] = (
    "kind", "seed", "language", "instruction", "success", "partial_credit", "runner_outcome", "plan_hit",
    "object_hit", "destination_hit", "outputs", "invalid_outputs", "steps", "retries", "completed_subtasks",
    "duration_s", "wall_s", *(f"{stage}_s" for stage in STAGES), "subtasks", "runner_detail", "episode_dir",
)


class EvalReport(StrictModel):
    """Everything one evaluation run produced; `to_json()` is results.json."""

    config: EvalConfig
    bundle_id: str
    bundle: BundleInfo | None = None
    versions: dict[str, str]
    started: datetime
    finished: datetime
    partial: bool = Field(description="True when the run stopped early (Ctrl-C): fewer episodes than planned.")
    stop_reason: str | None = None
    planned_episodes: int
    rows: list[EpisodeRow]
    by_kind: dict[str, Summary]
    overall: Summary

    def table(self) -> str:
        """A fixed-width console table: the metrics per task kind and overall, then latency per stage."""
        head = (f"{'task':<10} {'n':>4} {'success':>8} {'runner':>7} {'partial':>8} {'plan hit':>9} {'obj hit':>8} "
                f"{'dest hit':>9} {'format':>7} {'retries':>11} {'steps':>6} {'s/ep':>7}")
        lines = [head, "-" * len(head)]
        for summary in [*self.by_kind.values(), self.overall]:
            retries = "-" if summary.retries_mean is None else f"{summary.retries_mean:.2f}/{summary.retries_max}"
            lines.append(
                f"{summary.kind:<10} {summary.episodes:>4} {_pct(summary.success_rate):>8} "
                f"{_pct(summary.runner_success_rate):>7} {_num(summary.mean_partial_credit):>8} "
                f"{_pct(summary.plan_hit_rate):>9} {_pct(summary.object_hit_rate):>8} "
                f"{_pct(summary.destination_hit_rate):>9} {_pct(summary.format_validity):>7} {retries:>11} "
                f"{_num(summary.steps_mean, 1):>6} {_num(summary.wall_s_mean, 2):>7}"
            )
        lines.append("")
        lat_head = f"{'latency (s)':<12} {'n':>6} {'p50':>9} {'p90':>9} {'p99':>9}"
        lines += [lat_head, "-" * len(lat_head)]
        for stage in STAGES:
            p = self.overall.latency_s.get(stage)
            if p is None:
                lines.append(f"{stage:<12} {0:>6} {'-':>9} {'-':>9} {'-':>9}")
            else:
                lines.append(f"{stage:<12} {p.n:>6} {p.p50:>9.3f} {p.p90:>9.3f} {p.p99:>9.3f}")
        status = f"PARTIAL ({self.stop_reason}): " if self.partial else ""
        lines.append("")
        lines.append(f"{status}{len(self.rows)} of {self.planned_episodes} episodes; model {self.bundle_id}; "
                     f"language {self.config.language}; seeds from {self.config.seed_start}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def to_csv(self) -> str:
        """One row per episode (CSV_COLUMNS); stage columns hold the stage's total seconds in the episode."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self.rows:
            writer.writerow([
                row.kind, row.seed, row.language, row.instruction, int(row.success), f"{row.partial_credit:.4f}",
                row.runner_outcome, int(row.plan_hit), int(row.object_hit),
                "" if row.destination_hit is None else int(row.destination_hit), row.outputs, row.invalid_outputs,
                row.steps, row.retries, row.completed_subtasks, f"{row.duration_s:.4f}", f"{row.wall_s:.4f}",
                *(f"{sum(row.stage_latency_s.get(stage, [])):.4f}" for stage in STAGES),
                " | ".join(row.subtasks), row.runner_detail, row.episode_dir or "",
            ])
        return buffer.getvalue()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def write_results(report: EvalReport, out_dir: Path) -> tuple[Path, Path]:
    """Write results.json and episodes.csv into `out_dir` (created), each replaced atomically."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = out_dir / "results.json", out_dir / "episodes.csv"
        atomic_write(json_path, (report.to_json() + "\n").encode("utf-8"))
        atomic_write(csv_path, report.to_csv().encode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot write the results to {out_dir}: {exc.strerror or exc}") from None
    return json_path, csv_path


# --- running ---------------------------------------------------------------------------------------------


class SessionFactory(Protocol):
    def __call__(self, robot: RobotConfig, seed: int, language: Language) -> "SimSession":
        """A fresh simulated robot holding the suite's episode `seed`, instruction in `language`."""


def _default_session(robot: RobotConfig, seed: int, language: Language) -> "SimSession":
    from vlm2vla_edge.runtime.sim.session import make_sim_session

    return make_sim_session(robot, seed, language=language)


class _EpisodeTally(LoopEventHandler):
    """Counts generation calls and unusable outputs of one episode from the loop's events.

    One call is the subtask list, and one per step (motion plan + action chunk): a rejected step means
    the motion plan or the action chunk did not parse (or was cut off by its budget).
    """

    def __init__(self) -> None:
        self.outputs = 0
        self.invalid = 0

    def on_subtasks_planned(self, event: SubtasksPlanned) -> None:
        self.outputs += 1

    def on_subtasks_rejected(self, event: SubtasksRejected) -> None:
        self.outputs += 1
        self.invalid += 1

    def on_step_planned(self, event: StepPlanned) -> None:
        self.outputs += 1

    def on_step_rejected(self, event: StepRejected) -> None:
        self.outputs += 1
        self.invalid += 1


class _StopFlag:
    """Ctrl-C during a run: cancel the episode in flight, then stop before the next one."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.runner: EpisodeRunner | None = None

    def second_interrupt_raises(self) -> None:
        """Ctrl-C: the first one stops the run cleanly, a second one raises KeyboardInterrupt as usual."""
        if self.reason is not None:
            raise KeyboardInterrupt
        self.request(INTERRUPTED)

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        runner = self.runner
        if runner is not None:
            runner.cancel(reason)


def bundle_info(path: Path) -> BundleInfo:
    from vlm2vla_edge.runtime.policy.bundle import read_manifest

    manifest = read_manifest(path)
    return BundleInfo(
        path=str(path), name=manifest.name, base_model=manifest.base_model, quant_type=manifest.quant_type,
        text_model=manifest.text_model, text_model_sha256=manifest.files[manifest.text_model].sha256,
        adapter_sha256=manifest.adapter_sha256,
    )


def run_eval(
    policy: "Policy",
    config: EvalConfig,
    echo: Callable[[str], None] = print,
    *,
    verifier: "Verifier | None" = None,
    make_session: SessionFactory = _default_session,
    verbose: bool = False,
) -> EvalReport:
    """Run the evaluation with `policy` (loaded once by the caller) and score every episode.

    Prints one line per finished episode through `echo` (and the loop's events with `verbose`).
    Ctrl-C cancels the episode in flight and returns the episodes finished before it, marked partial
    (the cancelled episode is left out: it did not run to its end). `verifier` replaces the one
    `config.verifier` describes; `make_session` builds each episode's simulated robot.
    """
    robot = load_robot_config(config.robot)
    plan = [(kind, seed) for kind in config.tasks
            for seed in select_seeds(kind, config.episodes, config.seed_start, config.language)]
    info = bundle_info(config.bundle) if config.bundle is not None else None
    verifier = verifier or make_verifier(config.verifier)
    started = datetime.now(timezone.utc)
    rows: list[EpisodeRow] = []
    flag = _StopFlag()
    echo(f"evaluating {policy.bundle_id}: {config.episodes} episode(s) of {', '.join(config.tasks)} "
         f"in '{config.language}', seeds from {config.seed_start}")
    try:
        with on_interrupt(flag.second_interrupt_raises):
            for number, (kind, seed) in enumerate(plan, start=1):
                if flag.reason is not None:
                    break
                row = _run_episode(policy, robot, config, kind, seed, verifier, make_session, flag, echo, verbose)
                if row is None:  # cancelled mid-episode
                    break
                rows.append(row)
                echo(_progress_line(number, len(plan), row))
    except KeyboardInterrupt:
        flag.reason = flag.reason or "interrupted by the user (Ctrl-C)"
    kinds = [k for k in config.tasks if any(r.kind == k for r in rows)]
    return EvalReport(
        config=config,
        bundle_id=policy.bundle_id,
        bundle=info,
        versions=versions("numpy", "llama-cpp-python", "llguidance"),
        started=started,
        finished=datetime.now(timezone.utc),
        partial=len(rows) < len(plan),
        stop_reason=flag.reason,
        planned_episodes=len(plan),
        rows=rows,
        by_kind={k: summarize(k, [r for r in rows if r.kind == k]) for k in kinds},
        overall=summarize("all", rows),
    )


def _run_episode(
    policy: "Policy",
    robot: RobotConfig,
    config: EvalConfig,
    kind: TaskKind,
    seed: int,
    verifier: "Verifier",
    make_session: SessionFactory,
    flag: _StopFlag,
    echo: Callable[[str], None],
    verbose: bool,
) -> EpisodeRow | None:
    """One episode on a fresh simulated robot; None when a stop request cancelled it."""
    began = time.monotonic()
    session = make_session(robot, seed, config.language)
    try:
        task = session.task
        if task is None or task_kind(task) != kind:
            raise RuntimeError(f"seed {seed} did not give a {kind} task of the suite")
        tally = _EpisodeTally()
        subscribers: list[EpisodeSubscriber] = [tally]
        writer = None
        if config.record_dir is not None:
            writer = _open_recording(config.record_dir, session, robot, policy, kind)
            from vlm2vla_edge.runtime.recording import EpisodeRecorder

            subscribers.append(EpisodeRecorder(writer))
        if verbose:
            from vlm2vla_edge.runtime.recording import ProgressPrinter

            subscribers.append(ProgressPrinter(echo=echo))
        runner = EpisodeRunner(
            policy, session.arm, session.camera, verifier, session.limiter,
            config=config.runner, hooks=session.hooks, subscribers=subscribers,
        )
        flag.runner = runner
        try:
            if flag.reason is not None:
                return None
            result = runner.run(session.instruction)
        finally:
            flag.runner = None
        if flag.reason is not None:
            return None
        world = session.world
        success, credit = bool(task.success(world)), float(task.partial_credit(world))
    finally:
        session.close()
    object_hit, destination_hit = plan_hits(task, result.subtasks)
    objects, destinations = task_keywords(task)
    return EpisodeRow(
        kind=kind, seed=seed, language=config.language, instruction=session.instruction,
        success=success, partial_credit=credit,
        runner_outcome=result.outcome, runner_detail=result.detail, subtasks=result.subtasks,
        object_keywords=objects, destination_keywords=destinations, object_hit=object_hit,
        destination_hit=destination_hit, plan_hit=object_hit and destination_hit is not False,
        outputs=tally.outputs, invalid_outputs=tally.invalid, steps=result.steps, retries=result.retries,
        completed_subtasks=result.completed_subtasks, duration_s=result.duration_s,
        wall_s=time.monotonic() - began, stage_latency_s=result.stage_latency_s,
        episode_dir=str(writer.path) if writer is not None else None,
    )


def _open_recording(root: Path, session: "SimSession", robot: RobotConfig, policy: "Policy", kind: TaskKind):  # noqa: ANN202
    from vlm2vla_edge.runtime.episode import EpisodeWriter
    from vlm2vla_edge.runtime.station import Station, episode_meta

    station = Station(session.arm, session.camera, session.limiter, session.hooks, "sim", sim=session)
    meta = episode_meta(session.instruction, robot, station, policy, seed=session.seed)
    meta = meta.model_copy(update={"extra": {**meta.extra, "eval_task_kind": kind}})
    return EpisodeWriter.create(root, meta)


def _progress_line(number: int, total: int, row: EpisodeRow) -> str:
    width = len(str(total))
    return (f"[{number:>{width}}/{total}] {row.kind:<9} seed {row.seed}  "
            f"{'SUCCESS' if row.success else 'fail   '}  partial {row.partial_credit:.2f}  steps {row.steps:>3}  "
            f"{row.wall_s:6.1f}s  runner {row.runner_outcome:<7}  {row.instruction}")


def evaluate_bundle(config: EvalConfig, echo: Callable[[str], None] = print, *, verbose: bool = False) -> EvalReport:
    """Load `config.bundle` with `config.policy` once, run the evaluation, and free the model."""
    from vlm2vla_edge.runtime.station import load_policy

    if config.bundle is None:
        raise UserError("no model bundle: pass --bundle PATH (a folder with manifest.json)")
    with contextlib.closing(load_policy(config.bundle, config.policy, echo)) as policy:
        return run_eval(policy, config, echo, verbose=verbose)


__all__ = [
    "HELD_OUT_SEED", "LANGUAGES", "STAGES", "TASK_KINDS", "BundleInfo", "EpisodeRow", "EvalConfig", "EvalReport",
    "Percentiles", "Summary", "evaluate_bundle", "mentions", "plan_hits", "run_eval", "select_seeds", "summarize",
    "task_keywords", "task_kind", "write_results",
]
