"""`vlm2vla-edge sim ...`: look at a simulated scene, and record expert demonstrations.

Mounted into the main CLI as the `sim` sub-app. Bad input ends with one sentence and exit code 2
(typer.BadParameter); `expert` exits 1 when the expert failed an episode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from vlm2vla_edge.runtime.config import load_robot_config

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.sim.tasks import Language

app = typer.Typer(
    help="Kinematic WidowX 250 6DOF simulator: render scenes, record expert demonstrations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LANGUAGE_HELP = ("Instruction language: en, es, fr, de, hi, zh (the suite's; default: drawn per episode among them), "
                 "or it, nl, sv, ru, ja, id, vi.")


def _check_language(language: Optional[str]) -> Language | None:
    from vlm2vla_edge.runtime.sim.tasks import ALL_LANGUAGES

    if language is None:
        return None
    for known in ALL_LANGUAGES:  # the matching entry, typed as a Language
        if language == known:
            return known
    raise typer.BadParameter(f"'{language}' is not one of {', '.join(ALL_LANGUAGES)}", param_hint="--language")


@app.command()
def render(
    seed: Annotated[int, typer.Option(min=0, help="Scene seed (the same seed gives the same scene).")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    size: Annotated[int, typer.Option(min=64, max=2048, help="Image width and height in pixels.")] = 256,
    robot: Annotated[str, typer.Option(help="Robot config: preset name or YAML path.")] = "widowx250s",
) -> None:
    """Write a PNG of the scene of episode SEED with the arm at its home pose, and print its description."""
    from vlm2vla_edge.runtime.sim.render import PinholeCamera, save_png
    from vlm2vla_edge.runtime.sim.tasks import sample_episode
    from vlm2vla_edge.runtime.sim.world import SimWorld

    if out.suffix.lower() != ".png":
        raise typer.BadParameter(f"{out} must end in .png", param_hint="--out")
    if not out.parent.is_dir():
        raise typer.BadParameter(f"folder {out.parent} does not exist", param_hint="--out")
    episode = sample_episode(seed)
    world = SimWorld(load_robot_config(robot), episode.scene, camera=PinholeCamera(width=size, height=size))
    save_png(world.render(), str(out))
    typer.echo(f"wrote {out}")
    typer.echo(f"task: {episode.task.instruction()}")
    typer.echo(world.describe())


@app.command()
def expert(
    episodes: Annotated[int, typer.Option(min=1, max=1_000_000, help="How many episodes to record.")],
    out: Annotated[Path, typer.Option(help="Folder for the episode folders (created if missing).")],
    seed: Annotated[int, typer.Option(min=0, help="Seed of the first episode; episode i uses seed + i.")] = 0,
    frames: Annotated[bool, typer.Option(help="Render and save a camera frame per step.")] = True,
    language: Annotated[Optional[str], typer.Option(help=LANGUAGE_HELP)] = None,
    robot: Annotated[str, typer.Option(help="Robot config: preset name or YAML path.")] = "widowx250s",
) -> None:
    """Record scripted-expert demonstrations of the task suite in the episode format."""
    from vlm2vla_edge.runtime.sim.expert import DemoResult, expert_episode_id, record_demonstrations

    chosen = _check_language(language)
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    seeds = range(seed, seed + episodes)
    taken = [expert_episode_id(s) for s in seeds if (out / expert_episode_id(s)).exists()]
    if taken:
        raise typer.BadParameter(
            f"{out} already holds {taken[0]} (episodes are never overwritten); choose another folder or --seed",
            param_hint="--out",
        )

    def report(episode_id: str, result: DemoResult) -> None:
        typer.echo(f"{episode_id} {'ok' if result.success else 'FAILED'} steps={result.steps} {result.instruction}")

    results = record_demonstrations(
        out,
        seeds,
        load_robot_config(robot),
        languages=(chosen,) if chosen else None,
        frames=frames,
        progress=report,
    )
    solved = sum(r.success for r in results)
    typer.echo(f"expert solved {solved}/{episodes} episodes; demonstrations in {out}")
    if solved < episodes:
        raise typer.Exit(code=1)
