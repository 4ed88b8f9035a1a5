"""`vlm2vla-edge demo`: the whole system offline, on no hardware, in one command.

The demo model (convert/demo_bundle.py) runs one episode in the simulator with the local (heuristic)
verifier: no network, no camera, no arm, and the same runner, parser and safety limiter as on the
robot. Each episode gets an HTML report. The main command line mounts `demo_command` as `demo` when
the conversion tools are installed (runtime/cli.py, `_mount_optional_subapps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlm2vla_edge.convert.demo_bundle import find_or_build_bundle
from vlm2vla_edge.runtime.errors import UserError

DEFAULT_INSTRUCTION = "put the carrot in the pot"


def default_episodes_dir() -> Path:
    return Path("~/vlm2vla-edge-demo/episodes").expanduser()


def demo_command(
    instruction: Annotated[
        Optional[str], typer.Argument(help="The task, in any language (default: 'put the carrot in the pot').")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Simulator scene seed.")] = 0,
    bundle: Annotated[
        Optional[Path], typer.Option(help="Run this model bundle instead of the built-in demo model.")
    ] = None,
    episodes_dir: Annotated[
        Optional[Path],
        typer.Option(help="Where the episode and its report go (default: ~/vlm2vla-edge-demo/episodes)."),
    ] = None,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(help="Where the demo bundle is built and kept (default: ~/.cache/vlm2vla-edge/demo)."),
    ] = None,
    max_retries: Annotated[
        int,
        typer.Option(min=0, max=20, help="Failed attempts allowed per subtask (a long reach takes several chunks)."),
    ] = 4,
    timeout: Annotated[float, typer.Option(min=1, help="Episode time budget, seconds.")] = 300.0,
    realtime: Annotated[bool, typer.Option(help="Move the simulated arm at the real arm's speed.")] = False,
    threads: Annotated[
        Optional[int], typer.Option(min=1, help="CPU threads for llama.cpp (default: all cores).")
    ] = None,
    speculative: Annotated[
        bool,
        typer.Option(
            help="Verify drafts copied from the prompt and earlier outputs in one batch (same greedy text, "
            "fewer forward passes: bench/step_latency.py).",
        ),
    ] = True,
) -> None:
    """The offline field demo: the demo policy (Gemma-3-270M + LoRA) runs one episode in the simulator.

    No network, no robot, no camera: the model writes subtasks, motion plans and action chunks, the
    safety limiter checks every command, the local verifier checks every step, and the episode is
    recorded with an HTML report (frames, plans, actions, safety decisions, verdicts, the gripper's
    path). The first run builds the demo model bundle (a few minutes) and caches it. Exit 0 when the
    task succeeded, 1 when it failed, 2 on a usage error.
    """
    text = DEFAULT_INSTRUCTION if instruction is None else instruction
    if not text.strip():
        raise UserError("the instruction is empty")
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.runtime.local_run import LocalRunOptions, run_local
    from vlm2vla_edge.runtime.report import write_report
    from vlm2vla_edge.runtime.runner import RunnerConfig
    from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig

    if bundle is None:
        bundle = find_or_build_bundle(cache_dir, echo=typer.echo, threads=threads).path
    settings: dict[str, object] = {"speculative": speculative}
    if threads is not None:
        settings["n_threads"] = threads
    policy = load_policy_config("policy").model_copy(update=settings)
    options = LocalRunOptions(
        instruction=text,
        bundle=bundle,
        robot=load_robot_config("widowx250s"),
        policy=policy,
        episodes_dir=(episodes_dir or default_episodes_dir()).expanduser(),
        sim=True,
        seed=seed,
        verifier=VerifierConfig(kind="heuristic"),
        runner=RunnerConfig(max_retries_per_subtask=max_retries, episode_timeout_s=timeout),
        realtime=realtime,
    )
    outcome = run_local(options, echo=typer.echo)
    report = write_report(outcome.episode_dir)
    result = outcome.result
    typer.echo(
        f"outcome: {result.outcome} ({result.detail}); {result.completed_subtasks}/{len(result.subtasks)} subtasks, "
        f"{result.steps} steps, {result.duration_s:.1f} s"
    )
    typer.echo(f"episode: {outcome.episode_dir}")
    typer.echo(f"report:  {report}")
    if result.outcome != "success":
        raise typer.Exit(1)
