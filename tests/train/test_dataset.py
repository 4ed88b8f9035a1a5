"""The labelled dataset format: round trip, completeness, tamper detection, sample rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.train.data import (
    DatasetFormatError,
    DatasetWriter,
    Sample,
    SourceEpisode,
    read_dataset,
    samples_hash,
    write_dataset,
)
from vlm2vla_edge.train.data.dataset import episode_content_hash

SUBTASKS = ["Move to the carrot", "Grasp the carrot"]


def samples_for(episode: str) -> list[Sample]:
    common = dict(episode=episode, instruction="pick up the carrot", subtasks=SUBTASKS)
    return [
        Sample(
            id=f"{episode}/000000/subtasks",
            step=0,
            stage="subtasks",
            target='["Move to the carrot", "Grasp the carrot"]',
            **common,
        ),
        Sample(
            id=f"{episode}/000000/motion",
            step=0,
            stage="motion",
            subtask=SUBTASKS[0],
            subtask_index=0,
            target="Move primarily down, about 5 cm",
            **common,
        ),
        Sample(
            id=f"{episode}/000000/action",
            step=0,
            stage="action",
            subtask=SUBTASKS[0],
            subtask_index=0,
            motion_plan="Move primarily down, about 5 cm",
            target="[[0, 0, -0.05, 1]]",
            scene="carrot at x=30",
            **common,
        ),
        Sample(
            id=f"{episode}/000000/aux",
            episode=episode,
            step=0,
            stage="aux",
            instruction="Which way is dz = -5 cm?",
            target="Move primarily down",
        ),
    ]


def source(episode: str, n: int = 4) -> SourceEpisode:
    return SourceEpisode(episode=episode, path=f"/data/{episode}", content_hash="ab" * 32, annotator="local", samples=n)


def test_round_trip(tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    language = ActionLanguage(decimals=2)
    info = write_dataset(dest, [(source("ep1"), samples_for("ep1")), (source("ep2"), samples_for("ep2"))],
                         annotator="local", action_language=language, settings={"rule": 1})
    assert info.counts == {"subtasks": 2, "motion": 2, "action": 2, "aux": 2}
    dataset = read_dataset(dest)
    assert dataset.samples == samples_for("ep1") + samples_for("ep2")
    assert dataset.info.language() == language
    assert dataset.info.samples_sha256 == samples_hash(dest)
    assert [s.episode for s in dataset.info.sources] == ["ep1", "ep2"]
    assert len(dataset.by_stage("action")) == 2
    # Every key is present on every line, null where it does not apply (the consumer relies on it).
    first = json.loads((dest / "samples.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "episode", "step", "stage", "instruction", "subtask", "subtask_index", "subtasks",
                          "motion_plan", "target", "image", "scene"}
    assert first["motion_plan"] is None


def test_images_are_copied_and_checked(tmp_path: Path) -> None:
    frame = tmp_path / "000003.jpg"
    frame.write_bytes(b"\xff\xd8 not really a jpeg, only copied")
    writer = DatasetWriter(tmp_path / "ds", "local", ActionLanguage())
    relative = writer.copy_image("ep1", frame)
    assert relative == "images/ep1/000003.jpg"
    sample = Sample(
        id="ep1/000003/aux",
        episode="ep1",
        step=3,
        stage="aux",
        instruction="q",
        target="Move primarily up",
        image=relative,
    )
    writer.add_episode(source("ep1", 1), [sample])
    writer.finish()
    dataset = read_dataset(tmp_path / "ds")
    assert dataset.image_path(dataset.samples[0]).read_bytes() == frame.read_bytes()
    (tmp_path / "ds" / relative).unlink()
    with pytest.raises(DatasetFormatError, match="missing"):
        read_dataset(tmp_path / "ds")


def test_edited_samples_are_refused(tmp_path: Path) -> None:
    write_dataset(
        tmp_path / "ds", [(source("ep1"), samples_for("ep1"))], annotator="local", action_language=ActionLanguage()
    )
    path = tmp_path / "ds" / "samples.jsonl"
    path.write_text(path.read_text().replace("-0.05", "-0.06"))
    with pytest.raises(DatasetFormatError, match="changed after writing"):
        read_dataset(tmp_path / "ds")


def test_unfinished_dataset_is_refused(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "local", ActionLanguage())
    writer.add_episode(source("ep1"), samples_for("ep1"))
    writer.abort()  # an interrupted run: no dataset.json
    with pytest.raises(DatasetFormatError, match="unfinished"):
        read_dataset(tmp_path / "ds")


def test_newer_version_is_refused(tmp_path: Path) -> None:
    write_dataset(
        tmp_path / "ds", [(source("ep1"), samples_for("ep1"))], annotator="local", action_language=ActionLanguage()
    )
    info_path = tmp_path / "ds" / "dataset.json"
    info = json.loads(info_path.read_text())
    info["format_version"] = 2
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="newer"):
        read_dataset(tmp_path / "ds")


def test_never_overwrites(tmp_path: Path) -> None:
    write_dataset(
        tmp_path / "ds", [(source("ep1"), samples_for("ep1"))], annotator="local", action_language=ActionLanguage()
    )
    with pytest.raises(UserError, match="never overwritten"):
        DatasetWriter(tmp_path / "ds", "local", ActionLanguage())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other files"):
        DatasetWriter(tmp_path / "other", "local", ActionLanguage())
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_an_unfinished_write_is_started_over(tmp_path: Path) -> None:
    frame = tmp_path / "000000.jpg"
    frame.write_bytes(b"jpeg")
    writer = DatasetWriter(tmp_path / "ds", "local", ActionLanguage())
    writer.copy_image("old", frame)
    writer.add_episode(source("old"), samples_for("old"))
    writer.abort()
    write_dataset(
        tmp_path / "ds", [(source("ep1"), samples_for("ep1"))], annotator="local", action_language=ActionLanguage()
    )
    dataset = read_dataset(tmp_path / "ds")
    assert {s.episode for s in dataset.samples} == {"ep1"}
    assert not (tmp_path / "ds" / "images" / "old").exists()


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "ds", "local", ActionLanguage())
    writer.add_episode(source("ep1"), samples_for("ep1"))
    with pytest.raises(ValueError, match="twice"):
        writer.add_episode(source("ep1"), samples_for("ep1"))
    writer.abort()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(stage="action", subtask="s", subtask_index=0), "motion_plan"),
        (dict(stage="motion"), "subtask"),
        (dict(stage="subtasks"), "subtask list"),
        (dict(stage="aux", image="../outside.jpg"), "relative"),
        (dict(stage="aux", image="/abs.jpg"), "relative"),
        (dict(stage="nonsense"), "stage"),
    ],
)
def test_sample_rules(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Sample(id="x", episode="e", step=0, instruction="i", target="t", **fields)


def test_episode_content_hash_sees_every_file(tmp_path: Path) -> None:
    episode = tmp_path / "ep"
    (episode / "frames").mkdir(parents=True)
    (episode / "meta.json").write_text("{}")
    (episode / "steps.jsonl").write_text("")
    (episode / "frames" / "000000.jpg").write_bytes(b"a")
    first = episode_content_hash(episode)
    (episode / "frames" / "000000.jpg").write_bytes(b"b")
    second = episode_content_hash(episode)
    (episode / "frames" / "000000.jpg").write_bytes(b"a")
    assert first != second and episode_content_hash(episode) == first
