"""Where a LeRobot dataset keeps things: path templates and the per-episode video locations, v2.x and v3.

Shared by the importer (`importers.import_lerobot`) and the exporter (`lerobot_export`), so both read
and write the same layout. The two layouts LeRobot has used:

- **v3.0**: many episodes per file. `data/chunk-000/file-000.parquet` (rows of several episodes),
  `videos/<key>/chunk-000/file-000.mp4` (their frames back to back), `meta/episodes/chunk-000/
  file-000.parquet` (one row per episode: `length`, `tasks`, `data/chunk_index`, `data/file_index`,
  `dataset_from_index`/`dataset_to_index`, and per video key `videos/<key>/chunk_index`, `file_index`,
  `from_timestamp`, `to_timestamp`), `meta/tasks.parquet`, `meta/info.json`, `meta/stats.json`.
- **v2.x**: one file per episode. `data/chunk-000/episode_000000.parquet`,
  `videos/chunk-000/<key>/episode_000000.mp4` (the episode's frames from time 0),
  `meta/episodes.jsonl`, `meta/tasks.jsonl`; the chunk is `episode_index // chunks_size`.

`meta/info.json` names the templates (`data_path`, `video_path`); the defaults below are used only when
it does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm2vla_edge.runtime.errors import UserError

CODEBASE_VERSION = "v3.0"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_TASKS_PATH = "meta/tasks.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
DEFAULT_CHUNKS_SIZE = 1000


@dataclass(frozen=True)
class VideoLocation:
    """Where one episode's frames of one camera are: the file, and the time in it of the episode's start."""

    path: Path
    from_timestamp: float


def is_v3(info: dict[str, Any]) -> bool:
    """True for a v3.x dataset (episodes packed into files), False for v2.x and older."""
    version = str(info.get("codebase_version") or "")
    return version.startswith("v3") or "{file_index" in str(info.get("data_path") or "")


def video_locations(
    root: Path, info: dict[str, Any], video_keys: list[str], pq: Any
) -> dict[int, dict[str, VideoLocation]]:
    """episode_index -> video key -> location, for every episode the metadata lists (v3) or may hold (v2.x).

    v2.x needs no metadata (the path follows from the episode index), so it returns an empty mapping
    and `locate` computes the path; v3 reads `meta/episodes/*/*.parquet`.
    """
    if not video_keys or not is_v3(info):
        return {}
    files = sorted((root / "meta" / "episodes").rglob("*.parquet"))
    if not files:
        raise UserError(f"{root / 'meta' / 'episodes'} holds no parquet files: the v3 dataset does not say where "
                        "each episode's video frames are")
    template = str(info.get("video_path") or V3_VIDEO_PATH)
    found: dict[int, dict[str, VideoLocation]] = {}
    for file in files:
        names = set(pq.read_schema(file).names)
        columns = ["episode_index"]
        for key in video_keys:
            columns += [
                c
                for c in (f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp")
                if c in names
            ]
        table = pq.read_table(file, columns=columns).to_pydict()
        for row, episode in enumerate(table["episode_index"]):
            places: dict[str, VideoLocation] = {}
            for key in video_keys:
                try:
                    chunk = int(table[f"videos/{key}/chunk_index"][row])
                    index = int(table[f"videos/{key}/file_index"][row])
                    start = float(table[f"videos/{key}/from_timestamp"][row])
                except (KeyError, TypeError, ValueError):
                    continue  # the episode has no video of this key; the importer says so per episode
                places[key] = VideoLocation(
                    root / template.format(video_key=key, chunk_index=chunk, file_index=index), start
                )
            found[int(episode)] = places
    return found


def locate(root: Path, info: dict[str, Any], episode: int, key: str,
           known: dict[int, dict[str, VideoLocation]]) -> VideoLocation:
    """The video of `episode` for camera `key`; `ValueError` when the dataset does not have it."""
    if is_v3(info):
        place = known.get(episode, {}).get(key)
        if place is None:
            raise ValueError(f"meta/episodes has no video location of {key} for episode {episode}")
    else:
        template = str(info.get("video_path") or V2_VIDEO_PATH)
        chunk = episode // int(info.get("chunks_size") or DEFAULT_CHUNKS_SIZE)
        try:
            path = root / template.format(episode_chunk=chunk, video_key=key, episode_index=episode)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"meta/info.json video_path {template!r} cannot be filled in ({exc})") from None
        place = VideoLocation(path, 0.0)
    if not place.path.is_file():
        raise ValueError(f"the video {place.path} of episode {episode} is missing")
    return place


def read_info(root: Path) -> dict[str, Any]:
    """meta/info.json as a dict; `UserError` when it is missing or not JSON with features."""
    path = root / "meta" / "info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info.get("features"), dict):
            raise ValueError("no 'features' object")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a LeRobot info file with 'features' ({exc})") from None
    return info
