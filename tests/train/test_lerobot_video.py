"""LeRobot datasets with videos: import of v2.1 and v3.0 layouts with encoded frames (PyAV), and our episodes
exported as a LeRobot v3.0 dataset that the importer reads back to the same episodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402
from test_importers import make_lerobot, pick_and_place  # noqa: E402  (tests/train is on the path)

from vlm2vla_edge.runtime.config import load_robot_config  # noqa: E402
from vlm2vla_edge.runtime.episode import (  # noqa: E402
    EpisodeMeta,
    EpisodeReader,
    EpisodeWriter,
    SafetyRecord,
    StepRecord,
    VerifierRecord,
)
from vlm2vla_edge.runtime.errors import UserError  # noqa: E402
from vlm2vla_edge.runtime.sim.expert import run_expert_episode  # noqa: E402
from vlm2vla_edge.runtime.sim.tasks import sample_episode  # noqa: E402
from vlm2vla_edge.train.data.cli import app  # noqa: E402
from vlm2vla_edge.train.data.importers import LeRobotMapping, import_lerobot  # noqa: E402
from vlm2vla_edge.train.data.lerobot_export import CAMERA_KEY, ExportSettings, export_lerobot  # noqa: E402
from vlm2vla_edge.train.data.video import VideoSettings, VideoWriter, decode_frames  # noqa: E402

runner = CliRunner()
KEY = "observation.images.wrist"
FPS = 5


def shade(episode: int, t: int) -> int:
    """The grey level of frame t of an episode: distinct per step (7 levels apart), so a wrong frame shows."""
    return 10 + 7 * t + 3 * episode


def frame(episode: int, t: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    image = np.full((*size, 3), shade(episode, t), np.uint8)
    image[:, :, 2] = 200 - shade(episode, t) // 2  # a second channel level, so colour order is checked too
    return image


def add_videos(root: Path, version: str, codec: str, *, drop_last: int = 0) -> None:
    """Encode the frames of make_lerobot's two episodes in `version`'s video layout (and v3's episode metadata)."""
    n = len(pick_and_place()[0])
    if version.startswith("v3"):
        path = root / "videos" / KEY / "chunk-000" / "file-000.mp4"
        with VideoWriter(path, FPS, VideoSettings(codec=codec)) as writer:
            for episode in (0, 1):
                for t in range(n - (drop_last if episode == 1 else 0)):
                    writer.add(frame(episode, t))
        info = json.loads((root / "meta" / "info.json").read_text())
        info.update(codebase_version="v3.0", data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
        (root / "meta" / "info.json").write_text(json.dumps(info))
        episodes = pa.table(
            {
                "episode_index": [0, 1],
                "length": [n, n],
                "tasks": [["put the carrot on the plate"], ["put the spoon in the pot"]],
                f"videos/{KEY}/chunk_index": [0, 0],
                f"videos/{KEY}/file_index": [0, 0],
                f"videos/{KEY}/from_timestamp": [0.0, n / FPS],
                f"videos/{KEY}/to_timestamp": [n / FPS, 2 * n / FPS],
            }
        )
        (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
        pq.write_table(episodes, root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    else:
        for episode in (0, 1):
            path = root / "videos" / "chunk-000" / KEY / f"episode_{episode:06d}.mp4"
            with VideoWriter(path, FPS, VideoSettings(codec=codec)) as writer:
                for t in range(n - (drop_last if episode == 1 else 0)):
                    writer.add(frame(episode, t))


@pytest.mark.parametrize(("version", "codec"), [("v2.1", "h264"), ("v3.0", "av1")])
def test_lerobot_video_frames_are_imported(tmp_path: Path, version: str, codec: str) -> None:
    make_lerobot(tmp_path / "ds", images="video", version=version)
    add_videos(tmp_path / "ds", version, codec)
    report = import_lerobot(tmp_path / "ds", tmp_path / "out")
    n = len(pick_and_place()[0])
    assert len(report.imported) == 2 and report.frames == 2 * n and not report.skipped, report
    for episode in (0, 1):
        reader = EpisodeReader(tmp_path / "out" / f"lerobot-ds-{episode:06d}")
        steps = reader.steps()
        assert all(s.image for s in steps)
        # Each step got its own frame (the episode's, at its timestamp): levels 7 apart, codec error ~1.
        levels = [float(reader.frame(s.image)[:, :, 0].mean()) for s in steps]
        assert levels == pytest.approx([shade(episode, t) for t in range(n)], abs=3)
        blue = float(reader.frame(steps[4].image)[:, :, 2].mean())
        assert blue == pytest.approx(200 - shade(episode, 4) // 2, abs=3)


def test_lerobot_video_that_does_not_line_up_skips_the_episode(tmp_path: Path) -> None:
    make_lerobot(tmp_path / "ds", images="video", version="v2.1")
    add_videos(tmp_path / "ds", "v2.1", "h264", drop_last=3)
    report = import_lerobot(tmp_path / "ds", tmp_path / "out")
    assert report.imported == ["lerobot-ds-000000"]
    assert "do not line up" in report.skipped[0] and "episode 1" in report.skipped[0]
    # Without frames the video is not needed.
    report = import_lerobot(tmp_path / "ds", tmp_path / "out2", frames=False)
    assert len(report.imported) == 2 and report.frames == 0


def test_lerobot_video_missing_file_and_wrong_key(tmp_path: Path) -> None:
    make_lerobot(tmp_path / "ds", images="video", version="v2.1")
    report = import_lerobot(tmp_path / "ds", tmp_path / "out")
    assert not report.imported and all("is missing" in s for s in report.skipped)
    with pytest.raises(UserError, match="not a camera feature"):
        import_lerobot(tmp_path / "ds", tmp_path / "out3", mapping=LeRobotMapping(image_key="observation.images.top"))


def test_decode_frames_picks_the_nearest_frame_within_tolerance(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "v.mp4", 10, VideoSettings(codec="h264")) as writer:
        for t in range(20):
            writer.add(frame(0, t))
    got = decode_frames(tmp_path / "v.mp4", [1.2, 0.0, 0.51, 1.9], tolerance_s=0.05)
    assert [round(float(g[:, :, 0].mean())) for g in got] == pytest.approx([shade(0, t) for t in (12, 0, 5, 19)], abs=3)
    with pytest.raises(ValueError, match="no frame within 50 ms"):
        decode_frames(tmp_path / "v.mp4", [2.5], tolerance_s=0.05)
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot be decoded"):
        decode_frames(tmp_path / "bad.mp4", [0.0], tolerance_s=0.05)


# ---------------------------------------------------------------------------------------------- export


def policy_run(root: Path) -> Path:
    """A short policy run as the runtime records it: subtasks, then motion / action / verify per step."""
    meta = EpisodeMeta(instruction="lift the carrot", source="runtime", robot_model="wx250s", camera="sim")
    rng = np.random.default_rng(5)
    with EpisodeWriter.create(root, meta, "run-000001") as writer:
        first = writer.write_frame(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        writer.append_step(
            StepRecord(
                index=0,
                t=0.0,
                wall_time=time.time(),
                ee_position=(0.3, 0.0, 0.2),
                gripper_open=True,
                stage="subtasks",
                image=first,
                raw_text='["Grasp the carrot", "Lift the carrot"]',
                subtasks=["Grasp the carrot", "Lift the carrot"],
            )
        )
        position = np.array([0.3, 0.0, 0.2])
        for step in range(3):
            image = first if step == 0 else writer.write_frame(np.full((48, 64, 3), 40 * step, np.uint8))
            common = {
                "subtask_index": 0,
                "subtask": "Grasp the carrot",
                "ee_position": tuple(position),
                "gripper_open": step < 2,
            }
            writer.append_step(
                StepRecord(
                    index=writer.next_index,
                    t=1.0 + step,
                    wall_time=time.time(),
                    stage="motion",
                    image=image,
                    raw_text="Move down.",
                    motion_plan="Move the gripper down.",
                    **common,
                )
            )
            chunk = [[0.0, 0.0, -0.02, 1.0 if step < 1 else 0.0], [0.0, 0.01, 0.0, 0.0]]
            writer.append_step(StepRecord(
                index=writer.next_index, t=1.2 + step, wall_time=time.time(), stage="action", image=image,
                raw_text=json.dumps(chunk), parsed_actions=chunk, action=chunk[0], motion_plan="Move the gripper down.",
                safety=[SafetyRecord(rule="workspace", verdict="pass", reason="inside", index=0)], **common))
            position = position + np.array(chunk[0][:3]) + np.array(chunk[1][:3])
            writer.append_step(
                StepRecord(
                    index=writer.next_index,
                    t=1.8 + step,
                    wall_time=time.time(),
                    stage="verify",
                    verifier=VerifierRecord(success=step == 2, reason="looks done" if step == 2 else "not yet"),
                    **common,
                )
            )
        writer.finish("success", "lifted")
    return root / "run-000001"


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for seed in range(2):
        run_expert_episode(sample_episode(seed), load_robot_config(), record_to=root, frames=True)
    return root


def test_demos_round_trip_through_a_lerobot_dataset(demos: Path, tmp_path: Path) -> None:
    report = export_lerobot(demos, tmp_path / "lr")
    assert len(report.episodes) == 2 and not report.skipped and report.codec in ("libsvtav1", "libx264")
    root = tmp_path / "lr"
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 2 and info["total_frames"] == report.frames
    assert info["features"]["observation.state"]["names"] == ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
    assert info["features"]["action"]["names"] == ["delta_x", "delta_y", "delta_z", "gripper"]
    assert (
        info["features"][CAMERA_KEY]["dtype"] == "video"
        and info["features"][CAMERA_KEY]["info"]["video.fps"] == report.fps
    )
    for path in ("data/chunk-000/file-000.parquet", f"videos/{CAMERA_KEY}/chunk-000/file-000.mp4",
                 "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet", "meta/stats.json"):
        assert (root / path).is_file(), path
    data = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").to_pydict()
    assert data["index"] == list(range(report.frames))
    assert data["timestamp"][:3] == pytest.approx([0.0, 1 / report.fps, 2 / report.fps])
    episodes = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in episodes] == [0, episodes[0]["length"]]
    assert episodes[1][f"videos/{CAMERA_KEY}/from_timestamp"] == pytest.approx(episodes[0]["length"] / report.fps)
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert len(stats["action"]["mean"]) == 4 and np.shape(stats[CAMERA_KEY]["mean"]) == (3, 1, 1)

    back = import_lerobot(root, tmp_path / "back")
    assert len(back.imported) == 2 and not back.warnings and not back.skipped
    for original_path, imported_id in zip(sorted(p for p in demos.iterdir() if p.is_dir()), back.imported):
        original, imported = EpisodeReader(original_path), EpisodeReader(tmp_path / "back" / imported_id)
        kept = [s for s in original.steps() if s.action is not None]
        steps = imported.steps()
        assert imported.meta.instruction == original.meta.instruction
        assert len(steps) == len(kept)
        assert np.allclose([s.ee_position for s in steps], [s.ee_position for s in kept], atol=1e-6)  # float32
        assert np.allclose([s.action for s in steps], [s.action for s in kept], atol=1e-6)
        assert [s.gripper_open for s in steps] == [s.gripper_open for s in kept]
        errors = [
            np.abs(imported.frame(a.image).astype(float) - original.frame(b.image)).mean() for a, b in zip(steps, kept)
        ]
        assert max(errors) < 4.0, errors  # JPEG + video tolerance, grey levels 0-255


def test_policy_run_exports_its_language_in_extra_columns(tmp_path: Path) -> None:
    run = policy_run(tmp_path / "runs")
    report = export_lerobot(run, tmp_path / "lr", ExportSettings(fps=2, video=VideoSettings(codec="h264")))
    assert report.episodes == ["run-000001"] and report.frames == 3 and report.fps == 2 and report.codec == "libx264"
    info = json.loads((tmp_path / "lr" / "meta" / "info.json").read_text())
    assert info["features"]["observation.state"]["names"] == ["x", "y", "z", "gripper"]  # no orientation recorded
    assert info["features"]["vlm2vla.raw_text"]["dtype"] == "string" and info["robot_type"] == "wx250s"
    rows = pq.read_table(tmp_path / "lr" / "data" / "chunk-000" / "file-000.parquet").to_pylist()
    assert [r["vlm2vla.stage"] for r in rows] == ["action"] * 3
    assert [r["vlm2vla.step"] for r in rows] == [2, 5, 8]
    assert json.loads(rows[0]["vlm2vla.raw_text"]) == [[0.0, 0.0, -0.02, 1.0], [0.0, 0.01, 0.0, 0.0]]
    assert rows[0]["vlm2vla.motion_plan"] == "Move the gripper down."
    record = json.loads(rows[0]["vlm2vla.record"])
    assert record["safety"][0]["rule"] == "workspace" and record["parsed_actions"][1] == [0.0, 0.01, 0.0, 0.0]
    events = [json.loads(r["vlm2vla.events"]) for r in rows]
    assert [e["stage"] for e in events[0]] == ["subtasks", "motion"]
    assert events[0][0]["subtasks"] == ["Grasp the carrot", "Lift the carrot"]
    assert [e["stage"] for e in events[2]] == ["verify", "motion", "verify"]  # the last verdict goes with the last step
    episode = pq.read_table(tmp_path / "lr" / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()[0]
    assert episode["vlm2vla/outcome"] == "success" and json.loads(episode["vlm2vla/meta"])["outcome_detail"] == "lifted"
    back = import_lerobot(tmp_path / "lr", tmp_path / "back")
    steps = EpisodeReader(tmp_path / "back" / back.imported[0]).steps()
    assert [s.gripper_open for s in steps] == [True, True, False]  # the recorded state, not the previous command
    assert [s.action[3] for s in steps] == [1.0, 0.0, 0.0]


def test_tasks_parquet_reads_as_lerobot_reads_it(demos: Path, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    export_lerobot(demos, tmp_path / "lr", ExportSettings(frames=False))
    tasks = pd.read_parquet(tmp_path / "lr" / "meta" / "tasks.parquet")
    instructions = [EpisodeReader(p).meta.instruction for p in sorted(demos.iterdir()) if p.is_dir()]
    assert list(tasks.index) == list(dict.fromkeys(instructions)) and list(tasks["task_index"]) == list(
        range(len(tasks))
    )
    info = json.loads((tmp_path / "lr" / "meta" / "info.json").read_text())
    assert CAMERA_KEY not in info["features"] and info["video_path"] is None


def test_cli_export_and_its_errors(demos: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(demos), str(tmp_path / "lr"), "--format", "lerobot", "--vcodec", "h264"])
    assert result.exit_code == 0, result.output
    assert "exported 2 episodes" in result.output and "video libx264" in result.output
    result = runner.invoke(app, ["export", str(demos), str(tmp_path / "lr")])
    assert result.exit_code == 2 and "never written over" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "empty"), str(tmp_path / "lr2")])
    assert result.exit_code == 2 and "holds no episode folders" in result.output
    result = runner.invoke(app, ["import", str(tmp_path / "lr"), str(tmp_path / "back")])
    assert result.exit_code == 0 and "as lerobot" in result.output and "imported 2 episodes" in result.output


@pytest.mark.parametrize("codec", ["av1", "h264"])
def test_rerun_lerobot_reader_reads_the_export(demos: Path, tmp_path: Path, codec: str) -> None:
    """A LeRobot reader that is not ours (Rerun's, in Rust) loads every episode, video included: the second
    episode starts mid-file, so its first frame must be a keyframe and H.264 must have no B-frames."""
    experimental = pytest.importorskip("rerun.experimental")
    report = export_lerobot(demos, tmp_path / "lr", ExportSettings(video=VideoSettings(codec=codec)))
    reader = experimental.LeRobotReader(tmp_path / "lr")
    assert reader.version == "v3" and reader.episodes() == [0, 1]
    lengths = [
        e["length"]
        for e in pq.read_table(tmp_path / "lr" / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    ]
    assert sum(lengths) == report.frames
    for episode, length in zip(reader.episodes(), lengths):
        rows: dict[str, int] = {}
        for chunk in reader.stream(episode).to_chunks():
            if "frame_index" in chunk.timeline_names:
                rows[chunk.entity_path] = rows.get(chunk.entity_path, 0) + chunk.num_rows
        assert rows["/action"] == length and rows["/observation.state"] == length
        assert rows[f"/{CAMERA_KEY}"] >= length  # video samples, decodable without an FFmpeg on the system
