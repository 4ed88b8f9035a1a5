"""`vlm2vla-edge data ...`: import datasets into episodes, export episodes as a LeRobot dataset, relabel
episodes into language, label policy episodes with the expert's corrections (dagger), show statistics.

Mounted into the main CLI as the `data` sub-app. A mistake in the input (a missing folder, an
unknown layout, an existing destination, a missing API key) ends with one sentence on stderr and
exit code 2; the commands print one line per episode as they go.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

from vlm2vla_edge.runtime.errors import UserError

app = typer.Typer(
    help="Training data: import teleoperation datasets as episodes, relabel episodes into the language dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(func: F) -> F:
    """Turn a `UserError` into one line on stderr and exit code 2 (also when the app runs on its own)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class Format(str, Enum):
    auto = "auto"
    bridge = "bridge"
    lerobot = "lerobot"
    episodes = "episodes"


class AnnotatorName(str, Enum):
    local = "local"
    gemini = "gemini"


def _indices(text: Optional[str], count: int, option: str) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"'{text}' must be {count} comma-separated integers", param_hint=option) from None
    if len(values) != count or any(v < 0 for v in values):
        raise typer.BadParameter(f"'{text}' must be {count} comma-separated non-negative integers", param_hint=option)
    return values


@app.command("import")
@_user_errors
def import_(
    src: Annotated[Path, typer.Argument(help="The dataset folder to import.")],
    dest: Annotated[Path, typer.Argument(help="Folder for the episode folders (created if missing).")],
    format: Annotated[Format, typer.Option("--format", help="Layout of SRC; auto detects it.")] = Format.auto,
    frames: Annotated[bool, typer.Option(help="Import camera frames.")] = True,
    state_xyz: Annotated[
        Optional[str], typer.Option(help="LeRobot: state dimensions of x,y,z (default: from names).")
    ] = None,
    action_xyz: Annotated[Optional[str], typer.Option(help="LeRobot: action dimensions of dx,dy,dz.")] = None,
    action_gripper: Annotated[Optional[int], typer.Option(help="LeRobot: action dimension of the gripper.")] = None,
    absolute_actions: Annotated[bool, typer.Option(help="LeRobot: actions are absolute targets, not deltas.")] = False,
    invert_gripper: Annotated[bool, typer.Option(help="LeRobot: a high gripper value means closed.")] = False,
    image_key: Annotated[Optional[str], typer.Option(help="LeRobot: which image feature to import.")] = None,
) -> None:
    """Convert BridgeData v2 raw, a LeRobot dataset, or our own episodes into episode folders under DEST."""
    from vlm2vla_edge.train.data.importers import LeRobotMapping, detect_format, import_dataset

    fmt = detect_format(src) if format is Format.auto else format.value
    options: dict[str, Any] = {}
    if fmt in ("bridge", "lerobot"):
        options["frames"] = frames
    if fmt == "lerobot":
        options["mapping"] = LeRobotMapping(
            state_xyz=_indices(state_xyz, 3, "--state-xyz"), action_xyz=_indices(action_xyz, 3, "--action-xyz"),  # type: ignore[arg-type]
            action_gripper=action_gripper, action_is_delta=not absolute_actions, invert_gripper=invert_gripper,
            image_key=image_key,
        )
    elif (
        any(v is not None for v in (state_xyz, action_xyz, action_gripper, image_key))
        or absolute_actions
        or invert_gripper
    ):
        raise UserError("--state-xyz, --action-xyz, --action-gripper, --absolute-actions, --invert-gripper and "
                        "--image-key apply to LeRobot datasets only")
    typer.echo(f"importing {src} as {fmt} into {dest}")
    report = import_dataset(src, dest, fmt, progress=lambda episode, steps: typer.echo(f"  {episode}: {steps} steps"),
                            **options)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for skipped in report.skipped:
        typer.echo(f"skipped: {skipped}", err=True)
    typer.echo(f"imported {len(report.imported)} episodes ({report.steps} steps, {report.frames} frames) into {dest}"
               + (f"; skipped {len(report.skipped)}" if report.skipped else ""))
    if not report.imported:
        raise UserError(f"nothing in {src} could be imported")


class ExportFormat(str, Enum):
    lerobot = "lerobot"


class VideoCodec(str, Enum):
    auto = "auto"
    av1 = "av1"
    h264 = "h264"
    mpeg4 = "mpeg4"


@app.command("export")
@_user_errors
def export(
    src: Annotated[Path, typer.Argument(help="An episode folder, or a folder of episode folders.")],
    dest: Annotated[Path, typer.Argument(help="New folder for the dataset (must not exist, or be empty).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="Dataset layout to write.")] = ExportFormat.lerobot,
    fps: Annotated[
        Optional[int], typer.Option(min=1, max=1000, help="Frames per second (default: from the steps' times).")
    ] = None,
    frames: Annotated[
        bool, typer.Option(help="Write the camera frames as videos (needs PyAV: the [video] extra).")
    ] = True,
    vcodec: Annotated[
        VideoCodec, typer.Option(help="Video codec; auto: AV1 (LeRobot's default), else H.264.")
    ] = VideoCodec.auto,
    robot_type: Annotated[
        Optional[str], typer.Option(help="robot_type in meta/info.json (default: the episodes' robot model).")
    ] = None,
) -> None:
    """Write episodes as a LeRobot v3.0 dataset (parquet + MP4 videos) that LeRobot's tools and `data import` read."""
    from vlm2vla_edge.train.data.lerobot_export import ExportSettings, export_lerobot
    from vlm2vla_edge.train.data.video import VideoSettings

    settings = ExportSettings(fps=fps, frames=frames, video=VideoSettings(codec=vcodec.value), robot_type=robot_type)
    typer.echo(f"exporting {src} as a {format.value} dataset into {dest}")
    report = export_lerobot(src, dest, settings, progress=lambda episode, n: typer.echo(f"  {episode}: {n} frames"))
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for skipped in report.skipped:
        typer.echo(f"skipped: {skipped}", err=True)
    video = f", video {report.codec}" if report.codec else ", no video"
    typer.echo(
        f"exported {len(report.episodes)} episodes ({report.frames} frames at {report.fps} fps{video}) into {dest}"
        + (f"; skipped {len(report.skipped)}" if report.skipped else "")
    )


@app.command()
@_user_errors
def relabel(
    src: Annotated[Path, typer.Argument(help="Episode folder, or a folder of episode folders.")],
    dest: Annotated[Path, typer.Argument(help="New folder for the labelled dataset.")],
    annotator: Annotated[
        AnnotatorName, typer.Option(help="local: deterministic rules; gemini: Gemini words the labels.")
    ] = AnnotatorName.local,
    dry_run: Annotated[
        bool, typer.Option(help="Gemini: print the tokens, images and cost a run would send; send nothing.")
    ] = False,
    aux: Annotated[bool, typer.Option(help="Add the auxiliary direction-naming samples.")] = True,
    robot: Annotated[str, typer.Option(help="Robot config (chunk limits): preset name or YAML path.")] = "widowx250s",
    policy: Annotated[str, typer.Option(help="Policy config (action language): preset name or YAML path.")] = "policy",
    model: Annotated[str, typer.Option(help="Gemini model.")] = "gemini-2.5-flash",
    cache: Annotated[Optional[Path], typer.Option(help="Gemini answer cache (default: DEST/../.gemini-cache).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Gemini requests in flight.")] = 4,
    rpm: Annotated[float, typer.Option(min=0.1, max=10000, help="Gemini requests per minute.")] = 60.0,
    max_images: Annotated[int, typer.Option(min=0, max=32, help="Key frames per Gemini request.")] = 6,
    price_input: Annotated[float, typer.Option(min=0, help="US$ per million input tokens (for --dry-run).")] = 0.30,
    price_output: Annotated[float, typer.Option(min=0, help="US$ per million output tokens (for --dry-run).")] = 2.50,
    base_url: Annotated[Optional[str], typer.Option(help="Gemini endpoint override (a proxy).")] = None,
) -> None:
    """Label every episode of SRC into the hierarchical language dataset DEST (subtasks, motion, action, aux)."""
    from vlm2vla_edge.train.data.local_annotator import EpisodeLabels, find_episodes, local_annotator
    from vlm2vla_edge.train.data.local_annotator import relabel as run

    local = local_annotator(policy, robot)
    chosen: Any = local
    if annotator is AnnotatorName.gemini:
        from vlm2vla_edge.train.data.gemini_annotator import GeminiAnnotator, GeminiAnnotatorConfig

        try:
            config = GeminiAnnotatorConfig(
                model=model, cache_dir=cache or dest.resolve().parent / ".gemini-cache", concurrency=concurrency,
                requests_per_minute=rpm, max_images=max_images, price_input_per_m=price_input,
                price_output_per_m=price_output, base_url=base_url,
            )
        except ValueError as exc:
            raise UserError(f"invalid Gemini settings: {exc}") from None
        chosen = GeminiAnnotator(config, local)
        if dry_run:
            estimate = chosen.estimate(find_episodes(src))
            typer.echo(f"dry run of {chosen.name} on {src} (nothing sent):")
            for line in estimate.lines():
                typer.echo(f"  {line}")
            return
    elif dry_run:
        raise UserError("--dry-run estimates the cost of --annotator gemini; the local annotator costs nothing")
    paths = find_episodes(src)
    total = len(paths)
    done = 0

    def progress(path: Path, result: EpisodeLabels | str, samples: int) -> None:
        nonlocal done
        done += 1
        if isinstance(result, str):
            typer.echo(f"[{done}/{total}] {path.name}: skipped ({result})")
            return
        note = f", {len(result.fallbacks)} fallbacks" if result.fallbacks else ""
        typer.echo(f"[{done}/{total}] {path.name}: {len(result.subtasks)} subtasks, {len(result.windows)} chunks, "
                   f"{samples} samples ({result.annotator}{note})")

    info = run(src, dest, chosen, aux=aux, progress=progress)
    counts = ", ".join(f"{n} {stage}" for stage, n in info.counts.items())
    typer.echo(f"wrote {sum(info.counts.values())} samples ({counts}) from {len(info.sources)} episodes to {dest}")
    if not info.sources:
        raise UserError(f"no episode of {src} could be labelled (see the skipped lines above)")


class ExpertName(str, Enum):
    sim = "sim"


@app.command()
@_user_errors
def dagger(
    episodes: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help="Recorded policy episodes (do --local --sim, eval --record, the daemon): episode folders, "
            "folders of them, or eval's OUT folder."
        ),
    ] = None,
    into: Annotated[
        Path, typer.Option("--into", help="The labelled dataset to grow (appended to, atomically), or a new folder.")
    ] = ...,  # type: ignore[assignment]
    expert: Annotated[
        ExpertName,
        typer.Option(
            help="Who labels EPISODES' states: sim, the scripted expert of the simulator (needs the episodes' seeds)."
        ),
    ] = ExpertName.sim,
    corrections: Annotated[
        Optional[Path],
        typer.Option(
            help="Teleoperated corrections (a real robot): episodes a person recorded from states the policy "
            "visited; labelled with the local annotator."
        ),
    ] = None,
    policy: Annotated[
        Optional[str],
        typer.Option(
            help="Policy config whose action language the labels are written in "
            "(default: the dataset's; policy_waypoints for a new one)."
        ),
    ] = None,
    robot: Annotated[
        str, typer.Option(help="Robot config (workspace, chunk limits): preset name or YAML path.")
    ] = "widowx250s",
    aux: Annotated[bool, typer.Option(help="Corrections: add relabel's auxiliary direction-naming samples.")] = False,
    report: Annotated[
        Optional[Path], typer.Option(help="Write the counts and the disagreement figures as JSON here.")
    ] = None,
) -> None:
    """DAgger, the data flywheel: label the states a policy visited with the expert's correction, add them to a dataset.

    \b
    The loop:
      1. record the policy:  vlm2vla-edge eval --bundle B --record --out RUN --seed-start 500000 --allow-training-seeds
      2. label its states:   vlm2vla-edge data dagger RUN --into DATA
      3. retrain:            vlm2vla-edge train --dataset DATA --base BASE --out ADAPTER
      4. convert:            vlm2vla-edge convert --mode adapter --base BASE --adapter ADAPTER --out B2; back to 1

    In the simulator the scripted expert answers from every state the policy reached. The world is rebuilt from the
    episode's seed and the commands the arm executed, and checked against the recording at every step (gripper pose, and
    the scene text of a text-only policy); a state that does not match is reported and not labelled.

    On a real robot a person takes over where the policy went wrong and records the correction by teleoperation
    (--corrections DIR); those episodes get the local annotator's labels, tagged as corrections.

    Prints, per stage, how often the policy disagreed with the expert: subtask list, current subtask, plan offset and
    chunk move (more than 2 cm off), gripper. Exit 2 on bad input (not a policy episode, no seed, another action
    language); the dataset is then unchanged.
    """
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.train.data.dagger import (
        DaggerOptions,
        EpisodeOutcome,
        find_policy_episodes,
        held_out_episodes,
        run_dagger,
    )
    from vlm2vla_edge.train.data.dataset import INFO_FILE, read_dataset
    from vlm2vla_edge.train.data.local_annotator import find_episodes

    if not episodes and corrections is None:
        raise UserError(
            "nothing to label: give recorded policy episodes, or teleoperated corrections with --corrections DIR"
        )
    paths = find_policy_episodes(episodes or [])
    fixes = find_episodes(corrections) if corrections is not None else []
    if policy is not None:
        language = load_policy_config(policy).action_language
    elif (into / INFO_FILE).exists():
        language = read_dataset(into, check_images=False).info.language()
    else:
        language = load_policy_config("policy_waypoints").action_language
        typer.echo("labelling in the action language of policy_waypoints (a new dataset; --policy chooses another)")
    options = DaggerOptions(robot=load_robot_config(robot), language=language, aux=aux)
    held_out = held_out_episodes(paths)
    if held_out:
        typer.echo(
            f"warning: {len(held_out)} episodes are from the held-out evaluation seeds (1000000 on): training on "
            "them makes later held-out figures optimistic; record DAgger runs with --seed-start 500000 "
            "--allow-training-seeds",
            err=True,
        )
    typer.echo(f"dagger: {len(paths)} policy episodes ({expert.value} expert), {len(fixes)} corrections -> {into}")

    def progress(number: int, total: int, path: Path, outcome: EpisodeOutcome) -> None:
        head = f"[{number}/{total}] {path.name}"
        if outcome.note:
            typer.echo(f"{head}: skipped ({outcome.note})")
            return
        if outcome.kind == "correction":
            typer.echo(f"{head}: correction, {outcome.samples} samples")
            return
        d = outcome.disagreement
        skipped = "; ".join(f"{n} {why}" for why, n in outcome.skipped.items())
        typer.echo(f"{head}: {outcome.labelled}/{outcome.states} states labelled, {outcome.samples} samples"
                   + (f" (not labelled: {skipped})" if skipped else "")
                   + f"; policy off: subtask {d.current_subtask}, plan {d.plan_offset}, chunk {d.chunk_move}, "
                   f"gripper {d.gripper}, unusable {d.unusable}")

    result = run_dagger(paths, into, options, corrections=fixes, progress=progress)
    added = ", ".join(f"{n} {stage}" for stage, n in result.samples_added.items())
    typer.echo(f"added {sum(result.samples_added.values())} samples ({added}) to {into}: "
               f"{result.samples_before} -> {result.samples_after}")
    if paths:
        typer.echo("where the policy disagreed with the expert:")
        for line in result.disagreement.lines():
            typer.echo(f"  {line}")
    if report is not None:
        from vlm2vla_edge.runtime.files import atomic_write

        atomic_write(report, (result.model_dump_json(indent=2) + "\n").encode("utf-8"))
        typer.echo(f"wrote {report}")


@app.command("eval")
@_user_errors
def eval_(
    dataset: Annotated[
        Path, typer.Argument(help="A labelled dataset folder (data relabel's output), e.g. of held-out episodes.")
    ],
    bundle: Annotated[Path, typer.Option(help="Model bundle folder (with manifest.json).")],
    policy: Annotated[
        str, typer.Option(help="Policy config (sampling, constraint): preset name or YAML path.")
    ] = "policy",
    max_samples: Annotated[
        Optional[int], typer.Option(min=1, help="At most this many subtask and action samples each (a fixed subset).")
    ] = None,
    teacher_forcing: Annotated[bool, typer.Option(help="Also ask the action stage after the label's plan.")] = True,
    out: Annotated[Optional[Path], typer.Option(help="Write every score as JSON here.")] = None,
) -> None:
    """Open-loop evaluation: ask the bundle every stage of DATASET's samples and score each stage apart.

    Subtask lists (exact, same objects), motion plans (exact, same directions) and action chunks (error of
    the summed move in cm, after the model's own plan and after the label's; sign and gripper agreement),
    by subtask kind and by distance, next to the error of always answering the mean move.
    """
    import contextlib

    from vlm2vla_edge.runtime.config import load_policy_config
    from vlm2vla_edge.runtime.station import load_policy
    from vlm2vla_edge.train.data.dataset import read_dataset
    from vlm2vla_edge.train.data.open_loop import evaluate_open_loop, write_report

    if not bundle.expanduser().is_dir():
        raise UserError(f"the bundle folder {bundle} does not exist")
    labelled = read_dataset(dataset, check_images=False)
    with contextlib.closing(load_policy(bundle.expanduser(), load_policy_config(policy), typer.echo)) as engine:
        report = evaluate_open_loop(engine, labelled, max_samples=max_samples, teacher_forcing=teacher_forcing,
                                    echo=typer.echo)
    typer.echo("")
    typer.echo(report.table())
    if out is not None:
        typer.echo(f"wrote {write_report(report, out)}")


@app.command()
@_user_errors
def stats(
    path: Annotated[Path, typer.Argument(help="A labelled dataset folder, or a folder of episodes.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.")] = False,
) -> None:
    """Figures of a labelled dataset (samples per stage, chunk lengths, fallbacks) or of an episode folder."""
    figures = (
        _dataset_stats(path)
        if (path / "dataset.json").exists() or (path / "samples.jsonl").exists()
        else _episode_stats(path)
    )
    if as_json:
        typer.echo(json.dumps(figures, indent=2, ensure_ascii=False))
        return
    for key, value in figures.items():
        typer.echo(f"{key}: {value}")


def _dataset_stats(path: Path) -> dict[str, Any]:
    from vlm2vla_edge.runtime.parser import parse_action_chunk
    from vlm2vla_edge.train.data.dataset import read_dataset

    dataset = read_dataset(path)
    language = dataset.info.language()
    lengths = [len(parse_action_chunk(s.target, language)) for s in dataset.by_stage("action")]
    annotators = Counter(src.annotator for src in dataset.info.sources)
    subtask_counts = [len(s.subtasks or []) for s in dataset.by_stage("subtasks")]
    return {
        "kind": "labelled dataset",
        "annotator": dataset.info.annotator,
        "episodes": len(dataset.info.sources),
        "skipped episodes": len(dataset.info.skipped),
        "samples": len(dataset),
        "per stage": dict(dataset.info.counts),
        "episodes by annotator": dict(annotators),
        "fallbacks": sum(len(src.fallbacks) for src in dataset.info.sources),
        "subtasks per episode (mean)": round(sum(subtask_counts) / max(1, len(subtask_counts)), 2),
        "actions per chunk (mean)": round(sum(lengths) / max(1, len(lengths)), 2),
        "actions per chunk (max)": max(lengths, default=0),
        "samples with image": sum(1 for s in dataset.samples if s.image),
        "samples with scene text": sum(1 for s in dataset.samples if s.scene),
        "samples sha256": dataset.info.samples_sha256,
    }


def _episode_stats(path: Path) -> dict[str, Any]:
    from vlm2vla_edge.runtime.episode import EpisodeFormatError, EpisodeReader
    from vlm2vla_edge.train.data.local_annotator import find_episodes

    outcomes: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    steps = frames = damaged = 0
    instructions: set[str] = set()
    for episode in find_episodes(path):
        try:
            reader = EpisodeReader(episode)
            records = reader.steps()
        except EpisodeFormatError:
            damaged += 1
            continue
        outcomes[reader.outcome] += 1
        sources[reader.meta.source or "unknown"] += 1
        instructions.add(reader.meta.instruction)
        steps += len(records)
        frames += sum(1 for s in records if s.image)
    return {
        "kind": "episodes",
        "episodes": sum(outcomes.values()),
        "damaged": damaged,
        "steps": steps,
        "frames": frames,
        "distinct instructions": len(instructions),
        "outcomes": dict(outcomes),
        "sources": dict(sources),
    }
