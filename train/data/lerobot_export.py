"""Our episodes as a LeRobot v3.0 dataset (`vlm2vla-edge data export --format lerobot`).

Teleoperation we record, simulator demonstrations, policy runs and DAgger corrections leave here in
the layout LeRobot's tools read (`lerobot_layout` describes it), so labs can train on them, view them
and share them with what they already use. `importers.import_lerobot` reads the result back to the
same episodes (tests/train/test_lerobot_export.py checks the round trip).

What becomes a LeRobot frame (one parquet row): every episode step that has an end-effector position
and a commanded action, in file order. A simulator demonstration or an imported dataset has one such
step per control step; a policy run has one per executed action chunk (its `action` record: the
chunk's first command, the state it was planned from and the frame the model saw). Columns:

- `observation.state` float32: `x, y, z` (metres, robot base frame), `roll, pitch, yaw` (radians;
  only when every exported step has them), `gripper` (1 open, 0 closed);
- `action` float32: `delta_x, delta_y, delta_z` (metres), `gripper` (1 open, 0 closed);
- `timestamp` (= frame_index / fps), `frame_index`, `episode_index`, `index`, `task_index`
  (the instruction, in `meta/tasks.parquet`);
- `observation.images.main` (dtype `video`): the step's observation frame in
  `videos/observation.images.main/chunk-000/file-000.mp4`, encoded with PyAV; a step without a frame
  shows the previous one (the count is reported);
- extra string columns LeRobot carries along and its training ignores (declared as `string`
  features, so its loader accepts them): `vlm2vla.step` (the steps.jsonl index), `vlm2vla.t`
  (the recorded time), `vlm2vla.stage`, `vlm2vla.subtask`, `vlm2vla.motion_plan`,
  `vlm2vla.raw_text` (what the model wrote for this action), `vlm2vla.record` (the whole step
  record as JSON: prompt, parsed chunk, safety decisions, executed commands, verdict, timings) and
  `vlm2vla.events` (JSON list of the records between the previous exported step and this one: the
  subtask list, the motion plan with its own raw text, the verifier's verdicts).

Per episode `meta/episodes/chunk-000/file-000.parquet` holds LeRobot's fields (`episode_index`,
`tasks`, `length`, data and video file indices, `dataset_from_index`/`dataset_to_index`, video
`from_timestamp`/`to_timestamp`) and ours (`vlm2vla/episode_id`, `vlm2vla/outcome`,
`vlm2vla/meta`: meta.json as JSON). `meta/stats.json` has min/max/mean/std/count of the state, the
action and the frames (per channel, 0-1), as LeRobot's normalisation wants.

The fps is given (`--fps`) or taken from the median time between exported steps. Timestamps are
rewritten to frame_index / fps, which LeRobot requires; the recorded time stays in `vlm2vla.t`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlm2vla_edge.runtime.episode import EpisodeFormatError, EpisodeReader, StepRecord, list_episodes
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.train.data.lerobot_layout import (
    CODEBASE_VERSION,
    DEFAULT_CHUNKS_SIZE,
    V3_DATA_PATH,
    V3_EPISODES_PATH,
    V3_TASKS_PATH,
    V3_VIDEO_PATH,
)
from vlm2vla_edge.train.data.video import VideoSettings, VideoWriter, video_info

log = logging.getLogger(__name__)

CAMERA_KEY = "observation.images.main"
STATE_NAMES = ("x", "y", "z")
RPY_NAMES = ("roll", "pitch", "yaw")
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]
EXTRA_COLUMNS = ("vlm2vla.stage", "vlm2vla.subtask", "vlm2vla.motion_plan", "vlm2vla.raw_text", "vlm2vla.record",
                 "vlm2vla.events")
#: Fields of a step record that the LeRobot columns already carry (left out of `vlm2vla.record`).
_IN_COLUMNS = {"ee_position", "ee_rpy", "gripper_open", "action", "image"}

Progress = Callable[[str, int], None]  # (episode id, frames) after each episode


@dataclass(frozen=True)
class ExportSettings:
    """How episodes are written as a LeRobot dataset."""

    fps: int | None = None  # None: 1 / median time between exported steps, rounded (10 when unknown)
    frames: bool = True  # write the camera frames as videos
    video: VideoSettings = VideoSettings()
    robot_type: str | None = None  # None: the episodes' robot_model
    data_file_mb: int = 100  # start a new data parquet after this size (LeRobot's default)
    video_file_mb: int = 200  # start a new video file after this size (LeRobot's default)
    chunks_size: int = DEFAULT_CHUNKS_SIZE  # files per chunk folder


@dataclass
class ExportReport:
    """What an export wrote, what it skipped (with why) and what a reader should know."""

    episodes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    frames: int = 0  # LeRobot frames (rows)
    repeated_frames: int = 0  # rows without an image of their own (showing the previous one)
    fps: int = 0
    codec: str | None = None


@dataclass
class _Episode:
    reader: EpisodeReader
    steps: list[StepRecord]  # the exported ones
    events: list[list[StepRecord]]  # per exported step: the other records since the previous one


def _find(source: Path) -> list[Path]:
    if not source.is_dir():
        raise UserError(f"{source} does not exist or is not a folder")
    if (source / "meta.json").is_file():
        return [source]
    paths = list_episodes(source)
    if not paths:
        raise UserError(f"{source} holds no episode folders (each with meta.json and steps.jsonl)")
    return paths


def _control(step: StepRecord) -> bool:
    return step.ee_position is not None and step.action is not None and len(step.action) >= 4


def _load(path: Path) -> _Episode:
    reader = EpisodeReader(path)
    steps, events, pending = [], [], []
    for step in reader.steps():
        if _control(step):
            steps.append(step)
            events.append(pending)
            pending = []
        else:
            pending.append(step)
    if not steps:
        raise ValueError("no step has both an end-effector position and an action")
    if pending:  # records after the last control step (the last verdict, say) go with it
        events[-1] = events[-1] + pending
    return _Episode(reader, steps, events)


def _infer_fps(episodes: list[_Episode]) -> int:
    gaps = [b.t - a.t for e in episodes for a, b in zip(e.steps, e.steps[1:])]
    gaps = [g for g in gaps if np.isfinite(g) and g > 0]
    if not gaps:
        return 10
    return max(1, int(round(1.0 / float(np.median(gaps)))))


def _record_json(step: StepRecord) -> str:
    data = json.loads(step.to_line())
    return json.dumps({k: v for k, v in data.items() if k not in _IN_COLUMNS}, ensure_ascii=False)


class _Rolling:
    """The chunk/file index of the file being written, moved on when it grows past its size limit."""

    def __init__(self, limit_mb: int, chunks_size: int) -> None:
        self.limit = limit_mb * 1024 * 1024
        self.chunks_size = chunks_size
        self.chunk, self.file = 0, 0

    def full(self, path: Path) -> bool:
        return path.is_file() and path.stat().st_size >= self.limit

    def advance(self) -> None:
        self.file += 1
        if self.file == self.chunks_size:
            self.chunk, self.file = self.chunk + 1, 0


def _episode_frames(episode: _Episode, size: tuple[int, int, int]) -> tuple[list[np.ndarray], int]:
    """One frame per exported step; a step without one shows the previous (leading ones: the first). Returns
    the frames and how many were repeated; `ValueError` when the episode has none or another size."""
    frames: list[np.ndarray | None] = []
    last: np.ndarray | None = None
    for step in episode.steps:
        if step.image:
            last = episode.reader.frame(step.image)
            if last.shape != size:
                raise ValueError(
                    f"its frames are {last.shape[1]}x{last.shape[0]}, the dataset's are {size[1]}x{size[0]}"
                )
            frames.append(last)
        else:
            frames.append(None)
    present = [f for f in frames if f is not None]
    if not present:
        raise ValueError("it has no frames, while the dataset has a camera")
    repeated, previous = 0, present[0]
    filled: list[np.ndarray] = []
    for frame in frames:
        if frame is None:
            repeated += 1
            filled.append(previous)
        else:
            filled.append(frame)
            previous = frame
    return filled, repeated


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("writing LeRobot datasets needs pyarrow (pip install 'pyarrow>=15')") from None
    return pa, pq


def _tasks_table(pa: Any, tasks: list[str]) -> Any:
    """meta/tasks.parquet as pandas writes a frame indexed by task text (LeRobot reads it with pandas)."""
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _stats(values: np.ndarray) -> dict[str, Any]:
    """LeRobot's per-feature statistics over axis 0."""
    return {
        "min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist(), "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(), "count": [int(values.shape[0])],
    }


def export_lerobot(
    source: str | os.PathLike[str], dest: str | os.PathLike[str], settings: ExportSettings = ExportSettings(),
    *, progress: Progress | None = None,
) -> ExportReport:
    """Write the episodes under `source` (one episode folder, or a folder of them) as a LeRobot v3 dataset `dest`."""
    root, out = Path(source), Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; a dataset is never written over: choose a new folder")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise UserError(f"the destination {out} must not be inside the source {root}")
    pa, pq = _pyarrow()
    report = ExportReport()
    episodes: list[_Episode] = []
    for path in _find(root):
        try:
            episodes.append(_load(path))
        except (EpisodeFormatError, ValueError) as exc:
            report.skipped.append(f"{path.name}: {exc}")
    if not episodes:
        raise UserError(f"no episode of {root} can be exported" + (f" ({report.skipped[0]})" if report.skipped else ""))
    fps = settings.fps or _infer_fps(episodes)
    report.fps = fps
    with_rpy = all(s.ee_rpy is not None for e in episodes for s in e.steps)
    state_names = [*STATE_NAMES, *(RPY_NAMES if with_rpy else ()), "gripper"]
    frame_size: tuple[int, int, int] | None = None
    if settings.frames:
        for episode in episodes:
            first = next((s.image for s in episode.steps if s.image), None)
            if first is not None:
                frame_size = tuple(episode.reader.frame(first).shape)
                break
    if settings.frames and frame_size is None:
        report.warnings.append("no exported step has a camera frame: the dataset has no video")
    robot_types = {e.reader.meta.robot_model for e in episodes if e.reader.meta.robot_model}
    robot_type = settings.robot_type or (robot_types.pop() if len(robot_types) == 1 else None)

    out.mkdir(parents=True, exist_ok=True)
    tasks: list[str] = []
    string = pa.string()
    schema = pa.schema(
        [("observation.state", pa.list_(pa.float32(), len(state_names))), ("action", pa.list_(pa.float32(), 4)),
         ("timestamp", pa.float32()), ("frame_index", pa.int64()), ("episode_index", pa.int64()), ("index", pa.int64()),
         ("task_index", pa.int64()), ("vlm2vla.step", pa.int64()), ("vlm2vla.t", pa.float64())]
        + [(name, string) for name in EXTRA_COLUMNS]
    )
    data_roll = _Rolling(settings.data_file_mb, settings.chunks_size)
    video_roll = _Rolling(settings.video_file_mb, settings.chunks_size)
    data_writer: Any = None
    data_path: Path | None = None
    video: VideoWriter | None = None
    video_path: Path | None = None
    video_frames_before = 0  # frames already in the current video file
    episode_rows: list[dict[str, Any]] = []
    states_all, actions_all = [], []
    pixel_sum = np.zeros(3)
    pixel_sq = np.zeros(3)
    pixel_min, pixel_max = np.full(3, 255.0), np.zeros(3)
    pixels = 0
    total = 0
    try:
        for episode in episodes:
            meta = episode.reader.meta
            n = len(episode.steps)
            frames: list[np.ndarray] = []
            if frame_size is not None:
                try:
                    frames, repeated = _episode_frames(episode, frame_size)
                except ValueError as exc:
                    report.skipped.append(f"{episode.reader.episode_id}: {exc}")
                    continue
                report.repeated_frames += repeated
            episode_index = len(report.episodes)
            if meta.instruction not in tasks:
                tasks.append(meta.instruction)
            task_index = tasks.index(meta.instruction)
            states = np.array([[*s.ee_position, *((s.ee_rpy or ()) if with_rpy else ()), 1.0 if s.gripper_open else 0.0]
                               for s in episode.steps], dtype=np.float32)  # (n, S)
            if any(s.gripper_open is None for s in episode.steps):
                held = [s.action[3] for s in episode.steps]  # no gripper state recorded: the previous command
                states[:, -1] = np.array([held[0]] + held[:-1], dtype=np.float32)
            actions = np.array([s.action[:4] for s in episode.steps], dtype=np.float32)  # (n, 4)
            events = [json.dumps([json.loads(r.to_line()) for r in ev], ensure_ascii=False) if ev else None
                      for ev in episode.events]
            table = pa.table({
                "observation.state": pa.array(states.tolist(), schema.field("observation.state").type),
                "action": pa.array(actions.tolist(), schema.field("action").type),
                "timestamp": pa.array(np.arange(n, dtype=np.float32) / np.float32(fps), pa.float32()),
                "frame_index": pa.array(range(n), pa.int64()),
                "episode_index": pa.array([episode_index] * n, pa.int64()),
                "index": pa.array(range(total, total + n), pa.int64()),
                "task_index": pa.array([task_index] * n, pa.int64()),
                "vlm2vla.step": pa.array([s.index for s in episode.steps], pa.int64()),
                "vlm2vla.t": pa.array([float(s.t) for s in episode.steps], pa.float64()),
                "vlm2vla.stage": pa.array([s.stage for s in episode.steps], string),
                "vlm2vla.subtask": pa.array([s.subtask for s in episode.steps], string),
                "vlm2vla.motion_plan": pa.array([s.motion_plan for s in episode.steps], string),
                "vlm2vla.raw_text": pa.array([s.raw_text for s in episode.steps], string),
                "vlm2vla.record": pa.array([_record_json(s) for s in episode.steps], string),
                "vlm2vla.events": pa.array(events, string),
            }, schema=schema)
            if data_writer is not None and data_path is not None and data_roll.full(data_path):
                data_writer.close()
                data_writer = None
                data_roll.advance()
            if data_writer is None:
                data_path = out / V3_DATA_PATH.format(chunk_index=data_roll.chunk, file_index=data_roll.file)
                data_path.parent.mkdir(parents=True, exist_ok=True)
                data_writer = pq.ParquetWriter(str(data_path), schema)
            data_writer.write_table(table)
            row: dict[str, Any] = {
                "episode_index": episode_index, "tasks": [meta.instruction], "length": n,
                "data/chunk_index": data_roll.chunk, "data/file_index": data_roll.file,
                "dataset_from_index": total, "dataset_to_index": total + n,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                "vlm2vla/episode_id": episode.reader.episode_id, "vlm2vla/outcome": episode.reader.outcome,
                "vlm2vla/meta": json.dumps(json.loads((episode.reader.path / "meta.json").read_text(encoding="utf-8")),
                                           ensure_ascii=False),
            }
            if frames:
                if video is not None and video_path is not None and video_roll.full(video_path):
                    video.close()
                    video = None
                    video_roll.advance()
                if video is None:
                    video_path = out / V3_VIDEO_PATH.format(video_key=CAMERA_KEY, chunk_index=video_roll.chunk,
                                                            file_index=video_roll.file)
                    video = VideoWriter(video_path, fps, settings.video)
                    video_frames_before = 0
                for i, frame in enumerate(frames):
                    video.add(frame, keyframe=i == 0)
                    as_float = frame.reshape(-1, 3).astype(np.float64) / 255.0  # (H*W, 3)
                    pixel_sum += as_float.sum(axis=0)
                    pixel_sq += (as_float ** 2).sum(axis=0)
                    pixel_min = np.minimum(pixel_min, as_float.min(axis=0) * 255.0)
                    pixel_max = np.maximum(pixel_max, as_float.max(axis=0) * 255.0)
                    pixels += as_float.shape[0]
                row.update(
                    {
                        f"videos/{CAMERA_KEY}/chunk_index": video_roll.chunk,
                        f"videos/{CAMERA_KEY}/file_index": video_roll.file,
                        f"videos/{CAMERA_KEY}/from_timestamp": video_frames_before / fps,
                        f"videos/{CAMERA_KEY}/to_timestamp": (video_frames_before + n) / fps,
                    }
                )
                video_frames_before += n
                report.codec = video.codec
            episode_rows.append(row)
            states_all.append(states)
            actions_all.append(actions)
            total += n
            report.episodes.append(episode.reader.episode_id)
            report.frames += n
            if progress:
                progress(episode.reader.episode_id, n)
    finally:
        if data_writer is not None:
            data_writer.close()
        if video is not None:
            video.close()
    if not report.episodes:
        shutil.rmtree(out, ignore_errors=True)
        raise UserError(
            f"no episode of {root} could be exported ({report.skipped[0] if report.skipped else 'none found'})"
        )
    if report.repeated_frames:
        report.warnings.append(
            f"{report.repeated_frames} exported steps had no frame of their own and show the previous one"
        )

    # Episode metadata, tasks, stats, info.
    episodes_path = out / V3_EPISODES_PATH.format(chunk_index=0, file_index=0)
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), str(episodes_path))
    pq.write_table(_tasks_table(pa, tasks), str(out / V3_TASKS_PATH))
    stats: dict[str, Any] = {
        "observation.state": _stats(np.concatenate(states_all)), "action": _stats(np.concatenate(actions_all)),
    }
    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": [len(state_names)], "names": state_names},
        "action": {"dtype": "float32", "shape": [4], "names": ACTION_NAMES},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
        "vlm2vla.step": {"dtype": "int64", "shape": [1], "names": None},
        "vlm2vla.t": {"dtype": "float64", "shape": [1], "names": None},
        **{name: {"dtype": "string", "shape": [1], "names": None} for name in EXTRA_COLUMNS},
    }
    has_video = any(f"videos/{CAMERA_KEY}/chunk_index" in r for r in episode_rows)
    if has_video and frame_size is not None and video_path is not None:
        first_video = out / V3_VIDEO_PATH.format(video_key=CAMERA_KEY, chunk_index=0, file_index=0)
        stream = video_info(first_video, report.codec or "")
        if (stream["video.height"], stream["video.width"]) != frame_size[:2]:
            report.warnings.append(f"frames of {frame_size[1]}x{frame_size[0]} were padded to "
                                   f"{stream['video.width']}x{stream['video.height']} (yuv420p needs even sizes)")
        features[CAMERA_KEY] = {
            "dtype": "video", "shape": [stream["video.height"], stream["video.width"], 3],
            "names": ["height", "width", "channels"], "info": stream,
        }
        mean = pixel_sum / pixels
        std = np.sqrt(np.maximum(pixel_sq / pixels - mean ** 2, 0.0))
        per_channel = lambda v: [[[float(x)]] for x in v]  # noqa: E731 - LeRobot's (3, 1, 1) layout
        stats[CAMERA_KEY] = {"min": per_channel(pixel_min / 255.0), "max": per_channel(pixel_max / 255.0),
                             "mean": per_channel(mean), "std": per_channel(std), "count": [pixels]}
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(report.episodes),
        "total_frames": total,
        "total_tasks": len(tasks),
        "chunks_size": settings.chunks_size,
        "data_files_size_in_mb": settings.data_file_mb,
        "video_files_size_in_mb": settings.video_file_mb,
        "fps": fps,
        "splits": {"train": f"0:{len(report.episodes)}"},
        "data_path": V3_DATA_PATH,
        "video_path": V3_VIDEO_PATH if has_video else None,
        "features": features,
    }
    (out / "meta" / "info.json").write_text(json.dumps(info, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "meta" / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    log.info("event=lerobot_export episodes=%d frames=%d fps=%d path=%s", len(report.episodes), total, fps, out)
    return report


__all__ = ["CAMERA_KEY", "ExportReport", "ExportSettings", "export_lerobot"]
