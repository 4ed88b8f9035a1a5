"""`vlm2vla-edge episode show|report|view`: inspect a recorded episode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vlm2vla_edge.runtime.errors import UserError


def episode_show(
    path: Annotated[Path, typer.Argument(help="An episode folder (with meta.json and steps.jsonl).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a recorded episode: instruction, outcome, steps, and whether its tail was cut by a crash."""
    from vlm2vla_edge.runtime.episode import EpisodeReader

    reader = EpisodeReader(path)
    steps = list(reader.steps())
    summary = {
        "path": str(path),
        "instruction": reader.meta.instruction,
        "outcome": reader.outcome,
        "steps": len(steps),
        "truncated": reader.truncated,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>12}: {value}")


def episode_report(
    path: Annotated[Path, typer.Argument(help="An episode folder (with meta.json and steps.jsonl).")],
    output: Annotated[
        Optional[Path], typer.Option("--out", help="HTML file to write (default: EPISODE/report.html).")
    ] = None,
) -> None:
    """Write a self-contained HTML report of a recorded episode: frames, subtasks, plans, actions,
    safety decisions, verdicts, latencies and a plot of the end-effector path (works offline)."""
    from vlm2vla_edge.runtime.report import write_report

    typer.echo(f"report: {write_report(path, output)}")


def episode_view(
    path: Annotated[Path, typer.Argument(help="An episode folder (with meta.json and steps.jsonl).")],
    output: Annotated[
        Optional[Path], typer.Option("--out", help="Write the recording to this .rrd file (open it with 'rerun FILE').")
    ] = None,
    spawn: Annotated[bool, typer.Option("--spawn", help="Start a Rerun viewer and send the episode to it.")] = False,
    connect: Annotated[
        Optional[str], typer.Option(help="Send to the Rerun viewer at this gRPC URL (rerun+http://HOST:9876/proxy).")
    ] = None,
) -> None:
    """Show a recorded episode in Rerun: frames, end-effector path in 3D, actions, safety decisions and each
    stage's text on one timeline. Without --out it goes to a running viewer, or to EPISODE/episode.rrd when
    none runs. Needs the [viewer] extra; 'episode report' is the zero-dependency view."""
    from vlm2vla_edge.runtime.episode_view import view_episode

    if output is not None and (spawn or connect):
        raise UserError("give --out, --spawn or --connect, not several")
    result = view_episode(path, out=output, spawn=spawn, connect=connect)
    where = (
        f"saved to {result.destination} (open it with: rerun {result.destination})"
        if result.saved
        else f"sent to {result.destination}"
    )
    typer.echo(f"{result.records} records, {result.frames} frames {where}")
