"""The local, deterministic annotator, and the relabelling loop every annotator shares.

`LocalAnnotator.label` turns one demonstration into `EpisodeLabels` (segments, subtask names, chunk
windows with their motion plans; the rules are in `segment`), and `build_samples` turns labels into
training samples of the four stages. `relabel` drives an annotator over many episodes into a
labelled dataset folder. The cloud annotator (`gemini_annotator`) produces the same `EpisodeLabels`
with its own wording and falls back to these labels wherever its answer does not hold up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from vlm2vla_edge.runtime.action_text import format_subtasks
from vlm2vla_edge.runtime.config import ActionLanguage, RobotConfig, load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeFormatError, EpisodeReader, list_episodes
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.train.data.chunks import ChunkLimits, Window, settings_dict, waypoint_windows, windows
from vlm2vla_edge.train.data.dataset import DatasetInfo, DatasetWriter, Sample, SourceEpisode, episode_content_hash
from vlm2vla_edge.train.data.instruction import parse_instruction
from vlm2vla_edge.train.data.segment import Segment, SegmentRules, segment
from vlm2vla_edge.train.data.subtasks import name_subtasks
from vlm2vla_edge.train.data.trajectory import NotADemonstration, Trajectory, load_trajectory
from vlm2vla_edge.train.data.wording import WordingRules, direction_phrase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeLabels:
    """Everything an episode's samples are made of. `plans[i]` is the motion plan of `windows[i]`."""

    trajectory: Trajectory
    segments: list[Segment]
    windows: list[Window]
    subtasks: list[str]
    segment_subtask: list[int]  # per segment: index into `subtasks`
    plans: list[str]
    annotator: str = "local"
    fallbacks: list[str] = field(default_factory=list)  # labels replaced by the local ones, one sentence each

    def window_subtask(self, window: Window) -> int:
        return self.segment_subtask[window.segment]


class LocalAnnotator:
    """Segments a demonstration and words every label from the recorded motion (see `segment`)."""

    name = "local"

    def __init__(
        self,
        language: ActionLanguage | None = None,
        robot: RobotConfig | None = None,
        *,
        segment_rules: SegmentRules = SegmentRules(),
        wording: WordingRules = WordingRules(),
        limits: ChunkLimits | None = None,
    ) -> None:
        self.language = language or ActionLanguage()
        self.segment_rules = segment_rules
        self.wording = wording
        self.limits = limits or ChunkLimits.for_robot(robot or load_robot_config(), self.language)

    def settings(self) -> dict[str, object]:
        return settings_dict(self.segment_rules, self.wording, self.limits)

    def label(self, reader: EpisodeReader) -> EpisodeLabels:
        """Labels of one episode; `NotADemonstration` when it has no steps with pose and action."""
        traj = load_trajectory(reader)
        return self.label_trajectory(traj)

    def label_trajectory(self, traj: Trajectory) -> EpisodeLabels:
        segments = segment(traj, self.segment_rules)
        parsed = parse_instruction(traj.instruction, traj.instruction_en)
        subtasks, segment_subtask = name_subtasks(traj, segments, parsed)
        if self.language.actions == "waypoints":
            names = [subtasks[i] for i in segment_subtask]
            wins = waypoint_windows(traj, segments, self.language, names, self.limits)
        else:
            wins = windows(traj, segments, self.language, self.limits, self.wording)
        return EpisodeLabels(traj, segments, wins, subtasks, segment_subtask, [w.plan for w in wins])

    def prepare(self) -> None:
        """Nothing to check: the local annotator needs no key and no network."""

    def label_all(self, paths: Iterable[Path]) -> Iterator[tuple[Path, EpisodeLabels | str]]:
        """Labels per episode, in order; a reason instead of labels for an episode that cannot be labelled."""
        for path in paths:
            try:
                yield path, self.label(EpisodeReader(path))
            except (NotADemonstration, EpisodeFormatError) as exc:
                yield path, str(exc)


def _cm(value: float) -> str:
    return f"{value * 100:+.1f} cm"


def aux_question(displacement: tuple[float, float, float]) -> str:
    """The directional question of an auxiliary sample (self-contained: no image, no subtask)."""
    dx, dy, dz = displacement
    return (
        "In the robot base frame (x forward, y left, z up) the gripper moves by "
        f"dx = {_cm(dx)}, dy = {_cm(dy)}, dz = {_cm(dz)}. Which direction is that?"
    )


def build_samples(labels: EpisodeLabels, writer: DatasetWriter | None = None, *, aux: bool = True) -> list[Sample]:
    """The samples of one labelled episode: subtasks once, then motion + action (+ aux) per window.

    With a `writer`, key frames are copied into the dataset and samples point at the copies; without
    one, `image` is None.
    """
    traj = labels.trajectory
    episode = traj.episode_id
    subtasks_text = format_subtasks(labels.subtasks)

    def image(row: int) -> str | None:
        frame = traj.frame_file(row)
        if writer is None or frame is None:
            return None
        return writer.copy_image(episode, frame)

    samples = [
        Sample(
            id=f"{episode}/{traj.indices[0]:06d}/subtasks", episode=episode, step=traj.indices[0], stage="subtasks",
            instruction=traj.instruction, subtasks=list(labels.subtasks), target=subtasks_text,
            image=image(0), scene=traj.scenes[0],
        )
    ]
    asked: set[tuple[int, int]] = set()  # (segment, end) of the windows that got a directional question
    for window, plan in zip(labels.windows, labels.plans):
        step = traj.indices[window.start]
        index = labels.window_subtask(window)
        common = dict(
            episode=episode, step=step, instruction=traj.instruction, subtask=labels.subtasks[index],
            subtask_index=index, subtasks=list(labels.subtasks), image=image(window.start),
            scene=traj.scenes[window.start],
        )
        samples.append(Sample(id=f"{episode}/{step:06d}/motion", stage="motion", target=plan, **common))
        samples.append(Sample(id=f"{episode}/{step:06d}/action", stage="action", motion_plan=plan,
                              target=window.chunk_text, **common))
        phrase = direction_phrase(window.displacement)
        # Waypoint windows of one segment share their end: one directional question per segment is enough.
        first_of_end = (window.segment, window.end) not in asked
        asked.add((window.segment, window.end))
        if aux and phrase is not None and first_of_end:
            samples.append(Sample(
                id=f"{episode}/{step:06d}/aux", episode=episode, step=step, stage="aux",
                instruction=aux_question(window.displacement), target=phrase,
            ))
    return samples


class Annotator(Protocol):
    """What `relabel` needs of an annotator."""

    name: str
    language: ActionLanguage

    def settings(self) -> dict[str, object]: ...

    def prepare(self) -> None:
        """Check what the run needs (a key, an SDK) before anything is written; raise `UserError` if missing."""

    def label_all(self, paths: Iterable[Path]) -> Iterator[tuple[Path, EpisodeLabels | str]]: ...


def find_episodes(source: str | os.PathLike[str]) -> list[Path]:
    """Episode folders of `source`: the folder itself when it is one, else the episodes directly under it."""
    root = Path(source)
    if (root / "meta.json").is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"{root} does not exist or is not a folder")
    found = list_episodes(root)
    if not found:
        raise UserError(f"{root} holds no episode folders (folders with a meta.json); import a dataset first")
    return found


Progress = Callable[[Path, "EpisodeLabels | str", int], None]


def local_annotator(policy: str = "policy", robot: str = "widowx250s") -> LocalAnnotator:
    """The local annotator for a policy config's action language and a robot config's chunk limits
    (preset names or YAML paths), as `data relabel` builds it."""
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config

    return LocalAnnotator(load_policy_config(policy).action_language, load_robot_config(robot))


def relabel(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    annotator: Annotator,
    *,
    aux: bool = True,
    progress: Progress | None = None,
) -> DatasetInfo:
    """Label every episode under `source` into a new dataset folder `dest`; `progress(path, labels or
    reason, samples)` is called per episode. An interrupted run leaves no dataset.json (not a dataset)."""
    paths = find_episodes(source)
    annotator.prepare()
    writer = DatasetWriter(dest, annotator.name, annotator.language, annotator.settings())
    try:
        for path, result in annotator.label_all(paths):
            if isinstance(result, str):
                writer.skip(path.name, result)
                log.warning("event=relabel_skip episode=%s reason=%r", path.name, result)
                if progress:
                    progress(path, result, 0)
                continue
            samples = build_samples(result, writer, aux=aux)
            writer.add_episode(
                SourceEpisode(episode=result.trajectory.episode_id, path=str(path.resolve()),
                              content_hash=episode_content_hash(path), annotator=result.annotator,
                              samples=len(samples), fallbacks=result.fallbacks),
                samples,
            )
            if progress:
                progress(path, result, len(samples))
        return writer.finish()
    finally:
        writer.abort()


__all__ = [
    "Annotator", "EpisodeLabels", "LocalAnnotator", "aux_question", "build_samples", "find_episodes", "relabel",
]
