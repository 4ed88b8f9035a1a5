"""`vlm2vla-edge eval`: the evaluation harness on the command line (mounted by runtime/cli.py).

Exit codes: 0 when the evaluation ran (whatever its success rate), 2 for a usage or input error,
130 when Ctrl-C stopped it (the episodes finished by then are still written, marked partial).
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
import yaml
from pydantic import ValidationError

from vlm2vla_edge.runtime.config import PolicyConfig, describe_validation_error, load_policy_config
from vlm2vla_edge.runtime.errors import ConfigError, UserError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.evaluation import EvalConfig


class EvalVerifier(str, Enum):
    heuristic = "heuristic"
    auto = "auto"
    gemini = "gemini"


def parse_tasks(text: str) -> tuple[str, ...]:
    """'pick,place' -> ('pick', 'place'); an unknown or repeated kind is a `UserError`."""
    from vlm2vla_edge.runtime.evaluation import TASK_KINDS

    kinds = tuple(part.strip().lower() for part in text.split(","))
    for kind in kinds:
        if kind not in TASK_KINDS:
            shown = kind or "(empty)"
            raise UserError(f"--tasks takes a comma-separated list of {', '.join(TASK_KINDS)}; '{shown}' is not one")
    if len(set(kinds)) != len(kinds):
        raise UserError(f"--tasks names a task kind twice: '{text}'")
    return kinds


def apply_policy_settings(base: PolicyConfig, settings: list[str], constraint: str | None) -> PolicyConfig:
    """`base` with KEY=VALUE overrides (dotted keys into nested sections, YAML values) and --constraint,
    validated by PolicyConfig itself, so the command accepts exactly what the config accepts."""
    data: dict[str, Any] = base.model_dump(mode="json")
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"--policy-set takes KEY=VALUE (e.g. n_threads=2 or sampling.action.temperature=0), not '{item}'"
            )
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = target.get(part)
            if not isinstance(node, dict):
                raise UserError(f"--policy-set: '{key}' does not name a field of the policy config")
            target = node
        try:
            target[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            target[parts[-1]] = raw
    if constraint is not None:
        data["constraint"] = constraint
    try:
        return PolicyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error("policy settings", exc)) from None


def eval_command(
    bundle: Annotated[Optional[Path], typer.Option(help="Model bundle folder (with manifest.json).")] = None,
    episodes: Annotated[int, typer.Option(min=1, max=10_000, help="Episodes per task kind.")] = 10,
    tasks: Annotated[
        str, typer.Option(help="Task kinds, comma-separated: pick, place, composite.")
    ] = "pick,place,composite",
    seed_start: Annotated[
        int, typer.Option(min=0, help="First seed scanned; 1000000 starts the held-out range (training used fewer).")
    ] = 1_000_000,
    allow_training_seeds: Annotated[
        bool, typer.Option("--allow-training-seeds", help="Permit --seed-start below the held-out range.")
    ] = False,
    language: Annotated[
        str, typer.Option(help="Language of the instructions: en, es, fr, de, hi, zh, it, nl, sv, ru, ja, id or vi.")
    ] = "en",
    robot: Annotated[str, typer.Option(help="Robot config (preset name or YAML file).")] = "widowx250s",
    policy: Annotated[str, typer.Option(help="Policy config (preset name or YAML file).")] = "policy",
    constraint: Annotated[
        Optional[str], typer.Option(help="Grammar constraint of the policy (a value PolicyConfig.constraint accepts).")
    ] = None,
    policy_set: Annotated[
        Optional[list[str]], typer.Option("--policy-set", help="Override a policy setting: KEY=VALUE (repeatable).")
    ] = None,
    max_steps: Annotated[int, typer.Option(min=1, max=1000, help="Policy steps allowed per episode.")] = 40,
    max_retries: Annotated[int, typer.Option(min=0, max=20, help="Failed attempts allowed per subtask.")] = 3,
    timeout: Annotated[float, typer.Option(min=1, help="Time budget per episode, seconds.")] = 600.0,
    verifier: Annotated[
        EvalVerifier, typer.Option(help="Step verifier: heuristic (local, offline), auto or gemini.")
    ] = EvalVerifier.heuristic,
    out: Annotated[
        Optional[Path], typer.Option(help="Folder for results.json and episodes.csv; default: eval-results/<time>.")
    ] = None,
    record: Annotated[bool, typer.Option("--record", help="Also record every episode under OUT/episodes.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Print every loop event, not only one line per episode.")
    ] = False,
    per_subtask: Annotated[
        bool,
        typer.Option(
            "--per-subtask",
            help="Score each subtask apart: start it where the scripted expert leaves the "
            "scene, let the policy do that subtask alone, check the simulator's ground truth.",
        ),
    ] = False,
) -> None:
    """Evaluate a model bundle on the simulated task suite: N seeded episodes per task kind.

    Reports ground-truth success, partial credit, plan hit rates, format validity, latency percentiles
    per stage and retries; prints a table and writes results.json and episodes.csv. Exit 0 when it
    ran, 2 on an input error, 130 when Ctrl-C stopped it (the results so far are written, partial).
    """
    from vlm2vla_edge.runtime.evaluation import HELD_OUT_SEED, EvalConfig, evaluate_bundle, write_results
    from vlm2vla_edge.runtime.runner import RunnerConfig
    from vlm2vla_edge.runtime.sim.tasks import ALL_LANGUAGES
    from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig

    kinds = parse_tasks(tasks)
    if language not in ALL_LANGUAGES:
        raise UserError(f"--language must be one of {', '.join(ALL_LANGUAGES)}, not '{language}'")
    if seed_start < HELD_OUT_SEED and not allow_training_seeds:
        raise UserError(
            f"--seed-start {seed_start} is in the training range (below {HELD_OUT_SEED}); "
            "add --allow-training-seeds to evaluate there anyway"
        )
    if bundle is None:
        raise UserError("no model bundle: pass --bundle PATH (a folder with manifest.json)")
    if not bundle.expanduser().is_dir():
        raise UserError(f"the bundle folder {bundle} does not exist")
    out_dir = out or Path("eval-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    config = EvalConfig.build(
        tasks=kinds,
        episodes=episodes,
        seed_start=seed_start,
        allow_training_seeds=allow_training_seeds,
        language=language,
        robot=robot,
        runner=RunnerConfig(max_steps=max_steps, max_retries_per_subtask=max_retries, episode_timeout_s=timeout),
        verifier=VerifierConfig(kind=verifier.value),
        policy=apply_policy_settings(load_policy_config(policy), list(policy_set or []), constraint),
        bundle=bundle.expanduser(),
        record_dir=out_dir / "episodes" if record else None,
    )
    if per_subtask:
        _per_subtask(config, out_dir)
        return
    report = evaluate_bundle(config, echo=typer.echo, verbose=verbose)
    typer.echo("")
    typer.echo(report.table())
    json_path, csv_path = write_results(report, out_dir)
    typer.echo(f"wrote {json_path} and {csv_path}" + (" (partial)" if report.partial else ""))
    if report.partial:
        raise typer.Exit(130)


def _per_subtask(config: "EvalConfig", out_dir: Path) -> None:
    """`eval --per-subtask`: the same held-out seeds, each subtask from the expert's state."""
    import contextlib

    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.evaluation import select_seeds
    from vlm2vla_edge.runtime.files import atomic_write
    from vlm2vla_edge.runtime.sim.session import make_sim_session
    from vlm2vla_edge.runtime.station import load_policy
    from vlm2vla_edge.runtime.subtask_eval import run_subtask_eval
    from vlm2vla_edge.runtime.verifier.fallback import make_verifier

    assert config.bundle is not None
    seeds = [
        seed
        for kind in config.tasks
        for seed in select_seeds(kind, config.episodes, config.seed_start, config.language)
    ]
    with contextlib.closing(load_policy(config.bundle, config.policy, typer.echo)) as policy:
        report = run_subtask_eval(
            policy, load_robot_config(config.robot), seeds, config.language,
            lambda robot, seed, language: make_sim_session(robot, seed, language=language),
            make_verifier(config.verifier), config.runner, echo=typer.echo,
        )
    typer.echo("")
    typer.echo(report.table())
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "per_subtask.json", report.model_dump_json(indent=2).encode())
    typer.echo(f"wrote {out_dir / 'per_subtask.json'}")
