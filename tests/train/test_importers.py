"""Importers on small synthetic folders of each layout (Bridge raw, LeRobot v2/v3, our episodes), and the CLI."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeReader, list_episodes
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.sim.expert import run_expert_episode
from vlm2vla_edge.runtime.sim.tasks import sample_episode
from vlm2vla_edge.train.data.cli import app
from vlm2vla_edge.train.data.dataset import read_dataset
from vlm2vla_edge.train.data.importers import (
    LeRobotMapping,
    UnknownLayoutError,
    detect_format,
    import_bridge,
    import_episodes,
    import_lerobot,
    safe_episode_id,
)
from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, relabel

runner = CliRunner()


def pick_and_place(n_down: int = 8, n_carry: int = 10, step: float = 0.006) -> tuple[np.ndarray, np.ndarray]:
    """Teleop-like small steps: descend, close, lift, carry sideways, open. Returns (actions (T,7), states (T+1,7))."""
    rng = np.random.default_rng(1)
    moves = [(0, 0, -step, 1.0)] * n_down + [(0, 0, 0, 0.0)] + [(0, 0, step, 0.0)] * n_down
    moves += [(0, -step, 0, 0.0)] * n_carry + [(0, 0, -step, 0.0)] * 4 + [(0, 0, 0, 1.0)]
    actions = np.zeros((len(moves), 7))
    actions[:, :3] = np.array([m[:3] for m in moves]) + rng.normal(0, 0.0003, (len(moves), 3))
    actions[:, 3:6] = rng.normal(0, 0.01, (len(moves), 3))
    actions[:, 6] = [m[3] for m in moves]
    states = np.zeros((len(moves) + 1, 7))
    states[0, :3] = (0.3, 0.05, 0.15)
    states[1:, :3] = states[0, :3] + np.cumsum(actions[:, :3], axis=0)
    states[:, 6] = np.concatenate([[1.0], actions[:, 6]])
    return actions, states


def jpeg(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_bridge_trajectory(folder: Path, instruction: str | None = "put the carrot on the plate", *,
                           state_key: str = "full_state", images: bool = True) -> np.ndarray:
    folder.mkdir(parents=True)
    actions, states = pick_and_place()
    obs = {"time_stamp": 1.7e9 + 0.2 * np.arange(len(states)), "qpos": np.zeros((len(states), 6))}
    if state_key == "eef_transform":
        transforms = np.tile(np.eye(4), (len(states), 1, 1))
        transforms[:, :3, 3] = states[:, :3]
        obs["eef_transform"] = transforms
    else:
        obs[state_key] = states
    (folder / "obs_dict.pkl").write_bytes(pickle.dumps(obs))
    (folder / "policy_out.pkl").write_bytes(
        pickle.dumps([{"actions": a, "new_robot_transform": np.eye(4)} for a in actions])
    )
    if instruction is not None:
        (folder / "lang.txt").write_text(f"{instruction}\nplace the carrot onto the plate\nconfidence: 1\n")
    if images:
        (folder / "images0").mkdir()
        for t in range(len(states)):
            (folder / "images0" / f"im_{t}.jpg").write_bytes(jpeg(t))
    return states


@pytest.fixture
def bridge(tmp_path: Path) -> Path:
    root = tmp_path / "bridge"
    raw = root / "toykitchen1" / "put_carrot_on_plate" / "2023-05-01_10-00-00" / "raw" / "traj_group0"
    make_bridge_trajectory(raw / "traj0")
    make_bridge_trajectory(raw / "traj1", state_key="eef_transform", images=False)
    make_bridge_trajectory(raw / "traj2", instruction=None)
    return root


def test_bridge_import(bridge: Path, tmp_path: Path) -> None:
    out = tmp_path / "episodes"
    seen: list[tuple[str, int]] = []
    report = import_bridge(bridge, out, progress=lambda e, n: seen.append((e, n)))
    assert len(report.imported) == 2 and len(seen) == 2
    assert len(report.skipped) == 1 and "lang.txt" in report.skipped[0]
    assert any("no images0" in w for w in report.warnings)
    first = EpisodeReader(out / report.imported[0])
    _, states = pick_and_place()
    steps = first.steps()
    assert first.meta.instruction == "put the carrot on the plate"
    assert first.meta.extra["instruction_alternatives"] == ["place the carrot onto the plate"]
    assert first.meta.source == "import:bridge" and first.outcome == "success"
    assert len(steps) == len(states) and steps[-1].action is None  # the final observation
    assert np.allclose([s.ee_position for s in steps], states[:, :3])
    assert all(s.image for s in steps) and first.frame(steps[3].image).shape == (24, 32, 3)
    closing = next(i for i, s in enumerate(steps) if s.action and s.action[3] == 0.0)
    assert steps[closing].gripper_open and not steps[closing + 1].gripper_open
    assert len(steps[0].extra["rotation_delta"]) == 3
    second = EpisodeReader(out / report.imported[1])
    assert np.allclose([s.ee_position for s in second.steps()], states[:, :3])  # from eef_transform
    # The imported teleop data relabels into parseable labels.
    info = relabel(out, tmp_path / "ds", LocalAnnotator())
    dataset = read_dataset(tmp_path / "ds")
    assert len(info.sources) == 2
    subtasks = dataset.by_stage("subtasks")[0].subtasks
    assert subtasks[:2] == ["Grasp the carrot", "Lift the carrot"] and subtasks[-1] == "Release the carrot"
    for sample in dataset.by_stage("action"):
        chunk = parse_action_chunk(sample.target)
        assert len(chunk) <= load_robot_config().limits.max_chunk_length
        parse_motion_plan(sample.motion_plan)
    # Never over the existing episodes.
    with pytest.raises(UserError, match="never overwritten"):
        import_bridge(bridge, out)


def test_bridge_trajectory_folder_itself(tmp_path: Path) -> None:
    make_bridge_trajectory(tmp_path / "traj0", images=False)
    report = import_bridge(tmp_path / "traj0", tmp_path / "out")
    assert report.imported == ["bridge-traj0"]


def test_bridge_bad_pickle_is_skipped(tmp_path: Path) -> None:
    make_bridge_trajectory(tmp_path / "b" / "traj0", images=False)
    make_bridge_trajectory(tmp_path / "b" / "traj1", images=False)
    (tmp_path / "b" / "traj1" / "policy_out.pkl").write_bytes(b"not a pickle")
    report = import_bridge(tmp_path / "b", tmp_path / "out")
    assert report.imported == ["bridge-traj0"]
    assert "policy_out.pkl cannot be read" in report.skipped[0]


# ---------------------------------------------------------------------------------------------- LeRobot

NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


def make_lerobot(root: Path, *, images: str = "image", version: str = "v2.1", state_names=NAMES) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (root / "meta").mkdir(parents=True)
    features = {
        "observation.state": {"dtype": "float32", "shape": [7], "names": state_names},
        "action": {"dtype": "float32", "shape": [7], "names": NAMES},
        "episode_index": {"dtype": "int64", "shape": [1]},
        "frame_index": {"dtype": "int64", "shape": [1]},
        "timestamp": {"dtype": "float32", "shape": [1]},
        "task_index": {"dtype": "int64", "shape": [1]},
    }
    if images:
        features["observation.images.wrist"] = {"dtype": images, "shape": [24, 32, 3]}
    info = {"codebase_version": version, "robot_type": "widowx", "fps": 5, "features": features,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["put the carrot on the plate", "put the spoon in the pot"]
    if version.startswith("v3"):
        pq.write_table(pa.table({"task_index": [0, 1], "task": tasks}), root / "meta" / "tasks.parquet")
    else:
        (root / "meta" / "tasks.jsonl").write_text(
            "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
        )
    actions, states = pick_and_place()
    n = len(actions)
    rows = []
    for episode in (0, 1):
        # Frames stored out of order: the importer sorts by frame_index.
        for t in reversed(range(n)):
            row = {"observation.state": states[t].tolist(), "action": actions[t].tolist(), "episode_index": episode,
                   "frame_index": t, "timestamp": t / 5, "task_index": episode}
            if images == "image":
                row["observation.images.wrist"] = {"bytes": jpeg(t), "path": f"frame_{t}.jpg"}
            rows.append(row)
    (root / "data" / "chunk-000").mkdir(parents=True)
    if version.startswith("v3"):
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / "chunk-000" / "file-000.parquet")
    else:
        for episode in (0, 1):
            part = [r for r in rows if r["episode_index"] == episode]
            pq.write_table(pa.Table.from_pylist(part), root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet")


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_import_with_image_structs(tmp_path: Path, version: str) -> None:
    make_lerobot(tmp_path / "ds", version=version)
    report = import_lerobot(tmp_path / "ds", tmp_path / "out")
    assert report.imported == ["lerobot-ds-000000", "lerobot-ds-000001"] and not report.warnings
    actions, states = pick_and_place()
    episode = EpisodeReader(tmp_path / "out" / "lerobot-ds-000001")
    steps = episode.steps()
    assert episode.meta.instruction == "put the spoon in the pot" and episode.meta.robot_name == "widowx"
    assert [s.index for s in steps] == list(range(len(actions)))
    assert np.allclose([s.ee_position for s in steps], states[:-1, :3], atol=1e-6)
    assert np.allclose([s.action[:3] for s in steps], actions[:, :3], atol=1e-6)
    assert [s.action[3] for s in steps] == [1.0 if g >= 0.5 else 0.0 for g in actions[:, 6]]
    assert report.frames == 2 * len(actions) and episode.frame(steps[0].image).shape == (24, 32, 3)
    assert episode.steps()[2].t == pytest.approx(0.4)


def test_lerobot_videos_without_their_files(tmp_path: Path) -> None:
    # Decoding real videos is tested in test_lerobot_video.py; here the files are missing.
    make_lerobot(tmp_path / "ds", images="video")
    report = import_lerobot(tmp_path / "ds", tmp_path / "out", frames=False)
    assert len(report.imported) == 2 and report.frames == 0
    pytest.importorskip("av")
    report = import_lerobot(tmp_path / "ds", tmp_path / "out2")
    assert not report.imported and all("is missing" in s for s in report.skipped)


def test_lerobot_joint_states_are_refused(tmp_path: Path) -> None:
    make_lerobot(tmp_path / "ds", images="", state_names=[f"joint_{i}.pos" for i in range(7)])
    with pytest.raises(UserError, match="joint positions"):
        import_lerobot(tmp_path / "ds", tmp_path / "out")
    # Told which dimensions are the end effector's, it imports.
    report = import_lerobot(tmp_path / "ds", tmp_path / "out", mapping=LeRobotMapping(state_xyz=(0, 1, 2)))
    assert len(report.imported) == 2


def test_lerobot_absolute_actions_and_inverted_gripper(tmp_path: Path) -> None:
    make_lerobot(tmp_path / "ds", images="")
    mapping = LeRobotMapping(action_is_delta=False, invert_gripper=True)
    import_lerobot(tmp_path / "ds", tmp_path / "out", mapping=mapping)
    actions, states = pick_and_place()
    steps = EpisodeReader(tmp_path / "out" / "lerobot-ds-000000").steps()
    assert np.allclose([s.action[:3] for s in steps], actions[:, :3] - states[:-1, :3], atol=1e-6)
    assert [s.action[3] for s in steps] == [0.0 if g >= 0.5 else 1.0 for g in actions[:, 6]]


# ---------------------------------------------------------------------------------------------- episodes


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demos")
    for seed in range(3):
        run_expert_episode(sample_episode(seed), load_robot_config(), record_to=root, frames=seed == 0)
    return root


def test_episodes_are_validated_and_copied(demos: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    import shutil

    shutil.copytree(demos, source)
    damaged = source / "sim-0000002" / "steps.jsonl"
    lines = damaged.read_text().splitlines(keepends=True)
    damaged.write_text(lines[0] + "{not json\n" + "".join(lines[2:]))
    (source / "sim-0000000" / "frames" / "000003.jpg").unlink()
    report = import_episodes(source, tmp_path / "out")
    assert report.imported == ["sim-0000001"]
    assert any("sim-0000002" in s and "line 2" in s for s in report.skipped)
    assert any("sim-0000000" in s and "missing" in s for s in report.skipped)
    assert [p.name for p in list_episodes(tmp_path / "out")] == ["sim-0000001"]
    # One episode folder may be given directly.
    single = import_episodes(demos / "sim-0000000", tmp_path / "one")
    assert single.imported == ["sim-0000000"] and (tmp_path / "one" / "sim-0000000" / "frames").is_dir()


def test_detect_and_unknown_layouts(bridge: Path, demos: Path, tmp_path: Path) -> None:
    assert detect_format(bridge) == "bridge"
    assert detect_format(demos) == "episodes"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(UnknownLayoutError, match="expected a BridgeData v2 raw folder"):
        detect_format(tmp_path / "empty")
    with pytest.raises(UnknownLayoutError, match="not a LeRobot dataset folder.*--format bridge"):
        import_lerobot(bridge, tmp_path / "out")


def test_safe_episode_ids() -> None:
    assert safe_episode_id("bridge-toy kitchen/2023-05-01 10:00") == "bridge-toy-kitchen-2023-05-01-10-00"
    long = safe_episode_id("x" * 300)
    assert len(long) <= 128 and long != safe_episode_id("x" * 299)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_import_relabel_stats(bridge: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", str(bridge), str(tmp_path / "eps")])
    assert result.exit_code == 0, result.output
    assert "as bridge" in result.output and "imported 2 episodes" in result.output
    result = runner.invoke(app, ["relabel", str(tmp_path / "eps"), str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    assert "[2/2]" in result.output
    result = runner.invoke(app, ["stats", str(tmp_path / "ds"), "--json"])
    figures = json.loads(result.output)
    assert figures["episodes"] == 2 and figures["per stage"]["subtasks"] == 2
    subtasks = read_dataset(tmp_path / "ds").by_stage("subtasks")[0]
    assert list(parse_subtasks(subtasks.target)) == subtasks.subtasks
    result = runner.invoke(app, ["stats", str(tmp_path / "eps")])
    assert "episodes: 2" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "{missing}", "{out}"], "does not exist"),
        (["import", "{empty}", "{out}"], "no layout"),
        (["import", "{empty}", "{out}", "--format", "lerobot"], "not a LeRobot"),
        (["import", "{empty}", "{out}", "--format", "episodes", "--state-xyz", "0,1,2"], "LeRobot datasets only"),
        (["relabel", "{empty}", "{out}"], "no episode folders"),
        (["relabel", "{empty}", "{out}", "--dry-run"], "local annotator costs nothing"),
        (["stats", "{missing}"], "does not exist"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "out": tmp_path / "out", "empty": tmp_path / "empty"}
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
