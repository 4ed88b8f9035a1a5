"""Bring public teleoperation datasets, and our own episodes, into the episode format (EPISODE_FORMAT.md).

Three layouts are read; `detect_format` tells them apart and names what it expected otherwise:

- **BridgeData v2, raw** (`import_bridge`): any folder holding trajectory folders, each with
  `obs_dict.pkl` (`full_state` rows `[x, y, z, roll, pitch, yaw, ...]`, else `state`, else
  `eef_transform` 4x4 matrices), `policy_out.pkl` (per step `actions` = `[dx, dy, dz, droll, dpitch,
  dyaw, gripper]`, metres and radians in the WidowX base frame, gripper >= 0.5 meaning open),
  `lang.txt` (the instruction on the first line; further lines other phrasings, `confidence: ...`
  lines ignored) and `images0/im_<t>.jpg`. Bridge ships its observations and actions as Python
  **pickles**, and unpickling can run code: this importer unpickles only the files under the folder
  the user names on the command line, i.e. data the user chose to trust; it never fetches pickles.
  Every trajectory becomes an episode with one step per action plus a last step with the final
  observation (no action); the gripper state before step t is the command of step t-1 (step 0:
  its own command), rotation deltas and the raw gripper value go to the step's `extra`.
- **LeRobot** (`import_lerobot`; v2.x `data/chunk-000/episode_000000.parquet` and v3
  `data/chunk-000/file-000.parquet` alike: rows are grouped by `episode_index`): `meta/info.json`
  (features), `meta/tasks.jsonl` or `meta/tasks.parquet`, per frame `observation.state`, `action`,
  `task_index`, `frame_index`, `timestamp`. Which state and action dimensions are the end
  effector's x, y, z and the gripper comes from the features' `names` where they say so, else from
  `LeRobotMapping`; the gripper state before a step is the state's gripper dimension where its names
  name one, else the previous step's gripper command. Frames stored as image structs
  (`observation.images.*` of dtype `image`) and frames stored as **videos** (dtype `video`: the
  frame nearest each step's timestamp, decoded with PyAV, `pip install 'vlm2vla-edge[video]'`;
  v2.x one file per episode, v3 episodes back to back from their `from_timestamp`, see
  `lerobot_layout`) are imported. Parquet is read with pyarrow, imported lazily (`pip install pyarrow`).
- **Our own episodes** (`import_episodes`): every episode is read in full (meta, every step, every
  referenced frame decoded) and copied as it is; a damaged episode is skipped with the reason.

Imported episodes are never written over: ids already present in the destination are refused before
anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image

from vlm2vla_edge.runtime.episode import (
    EpisodeExistsError,
    EpisodeFormatError,
    EpisodeMeta,
    EpisodeReader,
    EpisodeWriter,
    StepRecord,
    list_episodes,
)
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.train.data.lerobot_layout import VideoLocation, locate, read_info, video_locations
from vlm2vla_edge.train.data.video import decode_frames, require_av

log = logging.getLogger(__name__)

ImportFormat = Literal["bridge", "lerobot", "episodes"]
FORMATS: tuple[str, ...] = ("bridge", "lerobot", "episodes")

EXPECTED = {
    "bridge": "a BridgeData v2 raw folder (trajectory folders with obs_dict.pkl, policy_out.pkl, lang.txt, images0/)",
    "lerobot": "a LeRobot dataset folder (meta/info.json and data/chunk-*/*.parquet)",
    "episodes": "episode folders (each with meta.json and steps.jsonl), or one such folder",
}

_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class UnknownLayoutError(UserError):
    """The source folder is not in the layout asked for (or in none this module reads)."""


@dataclass
class ImportReport:
    """What an import did: episodes written, sources skipped (with why), and warnings worth reading."""

    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    steps: int = 0
    frames: int = 0


Progress = Callable[[str, int], None]  # (episode id, steps) after each episode


def safe_episode_id(text: str) -> str:
    """A valid episode id from any text: unsafe characters become '-', long ids get a hash suffix."""
    clean = _ID_CHARS.sub("-", text).strip("-.") or "episode"
    if not clean[0].isalnum():
        clean = "e" + clean
    if len(clean) > 128:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        clean = clean[:117] + "-" + digest
    return clean


def detect_format(source: str | os.PathLike[str]) -> ImportFormat:
    """Which layout `source` is in; `UnknownLayoutError` naming the three expected layouts otherwise."""
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"{root} does not exist or is not a folder")
    if (root / "meta" / "info.json").is_file():
        return "lerobot"
    if (root / "meta.json").is_file() or any((c / "meta.json").is_file() for c in root.iterdir() if c.is_dir()):
        return "episodes"
    if _bridge_trajectories(root, limit=1):
        return "bridge"
    raise UnknownLayoutError(
        f"{root} is in no layout this importer reads; expected {EXPECTED['bridge']}, {EXPECTED['lerobot']}, "
        f"or {EXPECTED['episodes']}"
    )


def _check_layout(root: Path, wanted: ImportFormat) -> None:
    try:
        found = detect_format(root)
    except UnknownLayoutError:
        raise UnknownLayoutError(f"{root} is not {EXPECTED[wanted]}") from None
    if found != wanted:
        raise UnknownLayoutError(
            f"{root} is not {EXPECTED[wanted]}; it looks like {EXPECTED[found]} (--format {found})"
        )


def _check_free(dest: Path, ids: Sequence[str]) -> None:
    taken = [i for i in ids if (dest / i).exists()]
    if taken:
        raise EpisodeExistsError(
            f"{dest} already holds episode {taken[0]}" + (f" and {len(taken) - 1} more" if len(taken) > 1 else "")
            + "; episodes are never overwritten: import into another folder"
        )
    if len(set(ids)) != len(ids):
        raise UserError("two source episodes map to the same episode id; import them into separate folders")


def import_dataset(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    fmt: ImportFormat | Literal["auto"] = "auto",
    *,
    progress: Progress | None = None,
    **options: Any,
) -> ImportReport:
    """Import `source` in layout `fmt` (or the detected one) into the episode folder `dest`."""
    root = Path(source)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "bridge":
        return import_bridge(root, dest, progress=progress, **options)
    if fmt == "lerobot":
        return import_lerobot(root, dest, progress=progress, **options)
    if fmt == "episodes":
        return import_episodes(root, dest, progress=progress, **options)
    raise UserError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------- Bridge


def _bridge_trajectories(root: Path, limit: int | None = None) -> list[Path]:
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "policy_out.pkl" in files and "obs_dict.pkl" in files:
            found.append(Path(folder))
            dirs.clear()
            if limit is not None and len(found) >= limit:
                break
    return found


def _unpickle(path: Path) -> Any:
    """Unpickle a file of the user's own dataset (see the module docstring on trust)."""
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
        raise ValueError(f"{path.name} cannot be read ({type(exc).__name__}: {exc})") from None


def _bridge_positions(obs: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(obs, dict):
        raise ValueError(f"obs_dict.pkl holds a {type(obs).__name__}, expected a dict")
    for key in ("full_state", "state"):
        if key in obs:
            state = np.asarray(obs[key], dtype=float)
            if state.ndim != 2 or state.shape[1] < 3:
                raise ValueError(f"obs_dict.pkl '{key}' has shape {state.shape}, expected (T, >=3)")
            return state[:, :3], (state[:, 3:6] if state.shape[1] >= 6 else None)
    if "eef_transform" in obs:
        transforms = np.asarray(obs["eef_transform"], dtype=float)
        if transforms.ndim != 3 or transforms.shape[1:] != (4, 4):
            raise ValueError(f"obs_dict.pkl 'eef_transform' has shape {transforms.shape}, expected (T, 4, 4)")
        return transforms[:, :3, 3], None
    raise ValueError(f"obs_dict.pkl has none of full_state, state, eef_transform (keys: {', '.join(map(str, obs))})")


def _bridge_actions(policy: Any) -> np.ndarray:
    if isinstance(policy, dict) and "actions" in policy:
        actions = np.asarray(policy["actions"], dtype=float)
    elif isinstance(policy, (list, tuple)) and policy and all(isinstance(p, dict) and "actions" in p for p in policy):
        actions = np.asarray([np.asarray(p["actions"], dtype=float).reshape(-1) for p in policy])
    else:
        raise ValueError("policy_out.pkl must be a list of dicts with 'actions' (or a dict of an 'actions' array)")
    if actions.ndim != 2 or actions.shape[1] < 4:
        raise ValueError(f"policy_out.pkl actions have shape {actions.shape}, expected (T, 7)")
    return actions


def _bridge_language(folder: Path) -> tuple[str, list[str]] | None:
    path = folder / "lang.txt"
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.lower().startswith("confidence")]
    return (lines[0], lines[1:]) if lines else None


def import_bridge(
    source: str | os.PathLike[str], dest: str | os.PathLike[str], *, progress: Progress | None = None,
    frames: bool = True, robot_name: str = "bridge-widowx",
) -> ImportReport:
    """Import every BridgeData v2 raw trajectory under `source` (module docstring) into `dest`."""
    root, out = Path(source), Path(dest)
    _check_layout(root, "bridge")
    trajectories = _bridge_trajectories(root)
    ids = {t: safe_episode_id("bridge-" + ("-".join(t.relative_to(root).parts) or root.name)) for t in trajectories}
    _check_free(out, list(ids.values()))
    report = ImportReport()
    for folder in trajectories:
        episode_id = ids[folder]
        try:
            steps = _import_bridge_trajectory(folder, out, episode_id, frames, robot_name, report)
        except ValueError as exc:
            report.skipped.append(f"{folder}: {exc}")
            log.warning("event=import_skip source=%s reason=%r", folder, str(exc))
            continue
        report.imported.append(episode_id)
        report.steps += steps
        if progress:
            progress(episode_id, steps)
    return report


def _import_bridge_trajectory(folder: Path, out: Path, episode_id: str, frames: bool, robot_name: str,
                              report: ImportReport) -> int:
    language = _bridge_language(folder)
    if language is None:
        raise ValueError("no instruction (lang.txt is missing or empty)")
    obs = _unpickle(folder / "obs_dict.pkl")
    positions, rpy = _bridge_positions(obs)
    actions = _bridge_actions(_unpickle(folder / "policy_out.pkl"))
    n_actions = len(actions)
    if len(positions) < n_actions:
        report.warnings.append(
            f"{folder}: {len(positions)} states for {n_actions} actions; the extra actions are dropped"
        )
        n_actions = len(positions)
    if n_actions == 0:
        raise ValueError("the trajectory has no actions")
    n_steps = min(len(positions), n_actions + 1)
    try:
        stamps = np.asarray(obs.get("time_stamp", []), dtype=float).reshape(-1)
    except (TypeError, ValueError):  # time stamps of another type: steps are then spaced at Bridge's 5 Hz
        stamps = np.array([])
    timed = len(stamps) >= n_steps and np.all(np.isfinite(stamps[:n_steps]))
    start = float(stamps[0]) if timed and stamps[0] > 1e9 else (folder / "policy_out.pkl").stat().st_mtime
    images = folder / "images0"
    if frames and not images.is_dir():
        report.warnings.append(f"{folder}: no images0/ folder; imported without frames")
    meta = EpisodeMeta(
        instruction=language[0], source="import:bridge", robot_name=robot_name, robot_model="wx250s",
        camera="bridge:images0" if frames and images.is_dir() else None, action_units="m", start_wall_time=start,
        extra={"bridge_path": str(folder), "instruction_alternatives": language[1]},
    )
    gripper_cmd = actions[:n_actions, -1] >= 0.5
    with EpisodeWriter.create(out, meta, episode_id) as writer:
        for t in range(n_steps):
            image = None
            frame_file = images / f"im_{t}.jpg"
            if frames and frame_file.is_file():
                with Image.open(frame_file) as pil:
                    image = writer.write_frame(pil.convert("RGB"))
                report.frames += 1
            has_action = t < n_actions
            extra: dict[str, Any] = {}
            if has_action:
                row = actions[t]
                extra = {"gripper_raw": float(row[-1])}
                if row.shape[0] >= 7:
                    extra["rotation_delta"] = [float(v) for v in row[3:6]]
            seconds = float(stamps[t] - stamps[0]) if timed else t * 0.2  # Bridge records at 5 Hz
            writer.append_step(StepRecord(
                index=writer.next_index, t=seconds, wall_time=start + seconds,
                ee_position=tuple(float(v) for v in positions[t]),
                ee_rpy=tuple(float(v) for v in rpy[t]) if rpy is not None else None,
                gripper_open=bool(gripper_cmd[t - 1] if t > 0 else gripper_cmd[0]),
                action=[*(float(v) for v in actions[t, :3]), 1.0 if gripper_cmd[t] else 0.0] if has_action else None,
                image=image, stage="demo" if has_action else None, extra=extra,
            ))
        writer.finish("success", "imported from BridgeData v2 (teleoperated demonstration)")
    return n_steps


# ---------------------------------------------------------------------------------------------- LeRobot


@dataclass(frozen=True)
class LeRobotMapping:
    """Which vector dimensions hold the end effector's position and the gripper.

    None means: from the feature's `names` (x, y, z / *_x, *_y, *_z and a name containing
    "gripper"), else the first three dimensions and the last one. Actions are end-effector deltas
    unless `action_is_delta` is False (absolute targets: the delta is target - current position).
    """

    state_xyz: tuple[int, int, int] | None = None
    action_xyz: tuple[int, int, int] | None = None
    action_gripper: int | None = None
    action_is_delta: bool = True
    gripper_open_above: float = 0.5
    invert_gripper: bool = False  # for datasets whose gripper value 1 means closed
    image_key: str | None = None  # which image feature; None: the first one


def _require_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading LeRobot datasets needs pyarrow (pip install 'pyarrow>=15')") from None
    return pq


def _flat_names(feature: dict[str, Any]) -> list[str] | None:
    names = feature.get("names")
    if isinstance(names, dict):
        names = [n for group in names.values() for n in (group if isinstance(group, list) else [group])]
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return [n.lower() for n in names]
    return None


def _xyz_from_names(names: list[str] | None) -> tuple[int, int, int] | None:
    if not names:
        return None
    found = []
    for axis in ("x", "y", "z"):
        pattern = re.compile(rf"(?:^|[._\s-]){axis}$")
        hits = [i for i, n in enumerate(names) if n == axis or pattern.search(n)]
        if not hits:
            return None
        found.append(hits[0])
    return tuple(found)  # type: ignore[return-value]


def _gripper_from_names(names: list[str] | None) -> int | None:
    if not names:
        return None
    hits = [i for i, n in enumerate(names) if "gripper" in n]
    return hits[0] if hits else None


def _lerobot_tasks(root: Path, pq: Any) -> dict[int, str]:
    tasks: dict[int, str] = {}
    jsonl = root / "meta" / "tasks.jsonl"
    if jsonl.is_file():
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    tasks[int(row["task_index"])] = str(row["task"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise UserError(f"{jsonl} line {number} is not a task record ({exc})") from None
        return tasks
    table_path = root / "meta" / "tasks.parquet"
    if table_path.is_file():
        table = pq.read_table(table_path).to_pydict()
        text_col = (
            "task" if "task" in table else next((k for k, v in table.items() if v and isinstance(v[0], str)), None)
        )
        if text_col is None or "task_index" not in table:
            raise UserError(f"{table_path} has no task text and task_index columns")
        return {int(i): str(t) for i, t in zip(table["task_index"], table[text_col])}
    raise UserError(
        f"{root / 'meta'} has neither tasks.jsonl nor tasks.parquet: the episodes would have no instruction"
    )


def import_lerobot(
    source: str | os.PathLike[str], dest: str | os.PathLike[str], *, progress: Progress | None = None,
    mapping: LeRobotMapping = LeRobotMapping(), frames: bool = True, robot_name: str | None = None,
) -> ImportReport:
    """Import a LeRobot dataset folder (module docstring) into `dest`, one episode per `episode_index`."""
    root, out = Path(source), Path(dest)
    _check_layout(root, "lerobot")
    pq = _require_pyarrow()
    info_path = root / "meta" / "info.json"
    info = read_info(root)
    features: dict[str, Any] = info["features"]
    for key in ("observation.state", "action"):
        if key not in features:
            raise UserError(
                f"{info_path} has no '{key}' feature; the episode format needs end-effector states and actions"
            )
    report = ImportReport()
    state_names, action_names = _flat_names(features["observation.state"]), _flat_names(features["action"])
    state_xyz = mapping.state_xyz or _xyz_from_names(state_names)
    action_xyz = mapping.action_xyz or _xyz_from_names(action_names)
    gripper = mapping.action_gripper if mapping.action_gripper is not None else _gripper_from_names(action_names)
    state_gripper = _gripper_from_names(state_names)
    if state_xyz is None:
        if state_names and any(".pos" in n or "joint" in n or "shoulder" in n for n in state_names):
            raise UserError(
                f"the state of {root} looks like joint positions ({', '.join(state_names[:4])}, ...), "
                "not an end-effector "
                "pose; the episode format needs end-effector x, y, z: give the dimensions with --state-xyz"
            )
        state_xyz = (0, 1, 2)
        report.warnings.append(
            "observation.state has no x/y/z names: dimensions 0, 1, 2 taken as the end-effector position"
        )
    if action_xyz is None:
        action_xyz = (0, 1, 2)
        report.warnings.append("action has no x/y/z names: dimensions 0, 1, 2 taken as the end-effector deltas")
    if gripper is None:
        gripper = -1
        report.warnings.append("action has no gripper name: its last dimension is taken as the gripper")
    images = sorted(k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") == "image")
    videos = sorted(k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") == "video")
    image_key = mapping.image_key or (images[0] if images else videos[0] if videos else None)
    if mapping.image_key and mapping.image_key not in images + videos:
        raise UserError(f"{mapping.image_key} is not a camera feature of {root} (image and video features: "
                        f"{', '.join(images + videos) or 'none'})")
    if frames and image_key is None:
        report.warnings.append(f"{root} has no camera frames; the episodes are imported without frames")
    video_places: dict[int, dict[str, VideoLocation]] | None = None
    if frames and image_key in videos:
        try:
            require_av()
        except UserError as exc:
            raise UserError(
                f"{root} stores its camera frames as videos; {exc}; or import without frames (--no-frames)"
            ) from None
        video_places = video_locations(root, info, [image_key], pq)
    tasks = _lerobot_tasks(root, pq)
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise UnknownLayoutError(f"{root / 'data'} holds no parquet files; {root} is not {EXPECTED['lerobot']}")
    fps = float(info.get("fps") or 10.0)
    prefix = safe_episode_id(f"lerobot-{root.name}")
    rows_by_episode: dict[int, list[tuple[Path, int]]] = {}
    tables: dict[Path, dict[str, list[Any]]] = {}
    wanted = ["observation.state", "action", "episode_index", "frame_index", "timestamp", "task_index"]
    if frames and image_key in images:
        wanted.append(image_key)
    for path in files:
        schema = pq.read_schema(path)
        columns = [c for c in wanted if c in schema.names]
        if "episode_index" not in columns:
            raise UserError(f"{path} has no episode_index column")
        table = pq.read_table(path, columns=columns).to_pydict()
        tables[path] = table
        for row, episode in enumerate(table["episode_index"]):
            rows_by_episode.setdefault(int(episode), []).append((path, row))
    ids = {e: f"{prefix}-{e:06d}" for e in rows_by_episode}
    _check_free(out, list(ids.values()))
    for episode in sorted(rows_by_episode):
        rows = rows_by_episode[episode]
        try:
            steps = _import_lerobot_episode(
                rows,
                tables,
                out,
                ids[episode],
                tasks,
                state_xyz,
                action_xyz,
                gripper,
                mapping,
                image_key if frames else None,
                fps,
                robot_name or info.get("robot_type"),
                root,
                report,
                state_gripper=state_gripper,
                video=(lambda e=episode: locate(root, info, e, image_key, video_places))
                if video_places is not None
                else None,
            )
        except ValueError as exc:
            report.skipped.append(f"episode {episode}: {exc}")
            continue
        report.imported.append(ids[episode])
        report.steps += steps
        if progress:
            progress(ids[episode], steps)
    return report


def _decode_image(value: Any, root: Path) -> Image.Image | None:
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return Image.open(io.BytesIO(data)).convert("RGB")
        if path and (root / path).is_file():
            return Image.open(root / path).convert("RGB")
    return None


def _import_lerobot_episode(
    rows: list[tuple[Path, int]],
    tables: dict[Path, dict[str, list[Any]]],
    out: Path,
    episode_id: str,
    tasks: dict[int, str],
    state_xyz: tuple[int, int, int],
    action_xyz: tuple[int, int, int],
    gripper: int,
    mapping: LeRobotMapping,
    image_key: str | None,
    fps: float,
    robot_name: str | None,
    root: Path,
    report: ImportReport,
    *,
    state_gripper: int | None = None,
    video: Callable[[], VideoLocation] | None = None,
) -> int:
    def value(column: str, at: tuple[Path, int]) -> Any:
        table = tables[at[0]]
        return table[column][at[1]] if column in table else None

    rows = sorted(rows, key=lambda at: (value("frame_index", at) if value("frame_index", at) is not None else at[1]))
    task_index = value("task_index", rows[0])
    if task_index is None or int(task_index) not in tasks:
        raise ValueError(f"task_index {task_index} has no task text")
    states = np.array([np.asarray(value("observation.state", at), dtype=float) for at in rows])
    actions = np.array([np.asarray(value("action", at), dtype=float) for at in rows])
    if states.ndim != 2 or actions.ndim != 2:
        raise ValueError("observation.state and action must be vectors of one length")
    if (
        max(state_xyz) >= states.shape[1]
        or max(action_xyz) >= actions.shape[1]
        or not -actions.shape[1] <= gripper < actions.shape[1]
    ):
        raise ValueError(
            f"the mapping names dimensions beyond state ({states.shape[1]}) or action ({actions.shape[1]}) length"
        )
    positions = states[:, list(state_xyz)]
    moves = actions[:, list(action_xyz)]
    if not mapping.action_is_delta:
        moves = moves - positions
    grip = actions[:, gripper] >= mapping.gripper_open_above
    if mapping.invert_gripper:
        grip = ~grip
    # Gripper state before each step: measured (the state's gripper) where the dataset has it.
    held = np.concatenate([grip[:1], grip[:-1]])
    if state_gripper is not None and state_gripper < states.shape[1]:
        held = (states[:, state_gripper] >= mapping.gripper_open_above) != mapping.invert_gripper
    stamps = [value("timestamp", at) for at in rows]
    seconds = [float(s) if s is not None and math.isfinite(float(s)) else t / fps for t, s in enumerate(stamps)]
    video_frames: list[np.ndarray] | None = None
    if video is not None:
        place = video()
        # The frame a step shows is the one nearest its timestamp; farther than half a frame is misalignment.
        video_frames = decode_frames(place.path, [place.from_timestamp + s for s in seconds], tolerance_s=0.5 / fps)
    start = time.time()
    meta = EpisodeMeta(
        instruction=tasks[int(task_index)], source="import:lerobot", robot_name=robot_name, robot_model=None,
        camera=f"lerobot:{image_key}" if image_key else None, action_units="m", start_wall_time=start,
        extra={"lerobot_path": str(root), "task_index": int(task_index)},
    )
    with EpisodeWriter.create(out, meta, episode_id) as writer:
        for t, at in enumerate(rows):
            image = None
            if video_frames is not None:
                image = writer.write_frame(video_frames[t])
                report.frames += 1
            elif image_key is not None:
                pil = _decode_image(value(image_key, at), root)
                if pil is not None:
                    image = writer.write_frame(pil)
                    report.frames += 1
            writer.append_step(StepRecord(
                index=writer.next_index, t=seconds[t], wall_time=start + seconds[t],
                ee_position=tuple(float(v) for v in positions[t]),
                gripper_open=bool(held[t]),
                action=[*(float(v) for v in moves[t]), 1.0 if grip[t] else 0.0],
                image=image, stage="demo", extra={"gripper_raw": float(actions[t, gripper])},
            ))
        writer.finish("success", "imported from a LeRobot dataset")
    return len(rows)


# ---------------------------------------------------------------------------------------------- episodes


def validate_episode(path: Path) -> EpisodeReader:
    """Read an episode completely: meta, every step, every frame it names (decoded); raises on damage."""
    reader = EpisodeReader(path)
    for step in reader.steps():
        for name in ([step.image] if step.image else []) + list(step.images.values()):
            reader.frame(name)
    return reader


def import_episodes(
    source: str | os.PathLike[str], dest: str | os.PathLike[str], *, progress: Progress | None = None
) -> ImportReport:
    """Validate our own episode folders (one, or all directly under `source`) and copy them into `dest`."""
    root, out = Path(source), Path(dest)
    _check_layout(root, "episodes")
    paths = [root] if (root / "meta.json").is_file() else list_episodes(root)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise UserError(f"the destination {out} must not be inside the source {root}")
    _check_free(out, [p.name for p in paths])
    report = ImportReport()
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        try:
            reader = validate_episode(path)
        except EpisodeFormatError as exc:
            report.skipped.append(f"{path.name}: {exc}")
            continue
        if reader.truncated:
            report.warnings.append(
                f"{path.name}: its last step was cut off by a crash (copied as it is; readers skip it)"
            )
        shutil.copytree(path, out / path.name)
        report.imported.append(path.name)
        report.steps += len(reader)
        if progress:
            progress(path.name, len(reader))
    return report


__all__ = [
    "EXPECTED", "FORMATS", "ImportReport", "LeRobotMapping", "UnknownLayoutError", "detect_format", "import_bridge",
    "import_dataset", "import_episodes", "import_lerobot", "safe_episode_id", "validate_episode",
]
