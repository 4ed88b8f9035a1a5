"""`sim render` and `sim expert`: files a person and the trainer can use; bad input exits 2 in one sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from vlm2vla_edge.runtime.episode import EpisodeReader, list_episodes
from vlm2vla_edge.runtime.sim.cli import app

RUNNER = CliRunner()


def test_render_writes_a_png_of_the_requested_size(tmp_path: Path) -> None:
    out = tmp_path / "scene.png"
    result = RUNNER.invoke(app, ["render", "--seed", "3", "--out", str(out), "--size", "128"])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (128, 128, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    assert "task: " in result.output and "gripper open, holding nothing." in result.output


def test_render_refuses_bad_paths_and_sizes(tmp_path: Path) -> None:
    for args in (
        ["--out", str(tmp_path / "scene.jpg")],
        ["--out", str(tmp_path / "missing" / "scene.png")],
        ["--out", str(tmp_path / "scene.png"), "--size", "10"],
    ):
        result = RUNNER.invoke(app, ["render", "--seed", "1", *args])
        assert result.exit_code == 2, (args, result.output)


def test_expert_writes_loadable_demonstrations(tmp_path: Path) -> None:
    out = tmp_path / "demos"
    result = RUNNER.invoke(
        app, ["expert", "--episodes", "2", "--out", str(out), "--seed", "7", "--no-frames", "--language", "fr"]
    )
    assert result.exit_code == 0, result.output
    folders = list_episodes(out)
    assert [f.name for f in folders] == ["sim-0000007", "sim-0000008"]
    for folder in folders:
        reader = EpisodeReader(folder)
        assert reader.outcome == "success" and len(reader) > 5
    assert "expert solved 2/2 episodes" in result.output
    again = RUNNER.invoke(app, ["expert", "--episodes", "1", "--out", str(out), "--seed", "8"])
    assert again.exit_code == 2 and "never overwritten" in again.output


def test_expert_refuses_bad_input(tmp_path: Path) -> None:
    assert RUNNER.invoke(app, ["expert", "--episodes", "0", "--out", str(tmp_path)]).exit_code == 2
    result = RUNNER.invoke(app, ["expert", "--episodes", "1", "--out", str(tmp_path), "--language", "xx"])
    assert result.exit_code == 2 and "'xx' is not one of en, es, fr, de, hi, zh" in result.output
    file = tmp_path / "file"
    file.write_text("x")
    assert RUNNER.invoke(app, ["expert", "--episodes", "1", "--out", str(file)]).exit_code == 2
