"""`episode view`: an episode logged to Rerun and saved as an .rrd file, read back with Rerun's own reader."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

rr = pytest.importorskip("rerun")

from test_report import expert_episode, runner_episode  # noqa: E402  (tests/ is on the path)
from vlm2vla_edge.runtime import episode_view  # noqa: E402
from vlm2vla_edge.runtime.cli import main  # noqa: E402
from vlm2vla_edge.runtime.episode import EpisodeReader  # noqa: E402
from vlm2vla_edge.runtime.errors import UserError  # noqa: E402


def rows_by_entity(path: Path) -> tuple[Counter[str], set[str]]:
    """Rows logged per entity path, and the timelines, from an .rrd file."""
    rows: Counter[str] = Counter()
    timelines: set[str] = set()
    for chunk in rr.chunk.RrdReader(path).stream().to_chunks():
        rows[chunk.entity_path] += chunk.num_rows
        timelines.update(chunk.timeline_names)
    return rows, timelines


@pytest.fixture(scope="module")
def runner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runner_episode(tmp_path_factory.mktemp("runner"))


def test_policy_run_is_logged_with_every_part(runner_dir: Path, tmp_path: Path) -> None:
    result = episode_view.view_episode(runner_dir, out=tmp_path / "run.rrd")
    assert result.saved and (tmp_path / "run.rrd").stat().st_size > 1000
    reader = EpisodeReader(runner_dir)
    steps = reader.steps()
    rows, timelines = rows_by_entity(tmp_path / "run.rrd")
    assert {"step", "time"} <= timelines
    assert rows["/camera/image"] == sum(1 for s in steps if s.image)
    assert rows["/camera/after"] == sum(1 for s in steps if "after" in s.images) > 0
    assert result.frames == rows["/camera/image"] + rows["/camera/after"]
    assert rows["/safety"] == sum(len(s.safety or []) for s in steps) > 0  # one log line per decision
    assert rows["/world/ee"] == sum(1 for s in steps if s.ee_position is not None)
    assert rows["/world/path"] == 1 and rows["/episode"] == 1
    assert rows["/world/chunk"] == sum(1 for s in steps if s.parsed_actions)
    assert rows["/world/action"] == sum(1 for s in steps if s.action is not None and s.ee_position is not None) > 0
    for stage in ("subtasks", "motion", "action", "verify"):
        assert rows[f"/text/{stage}"] > 0, stage
    assert rows["/plot/action/dx"] > 0 and rows["/plot/gripper_open"] > 0


def test_cli_saves_next_to_the_episode_when_no_viewer_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = expert_episode(tmp_path)
    monkeypatch.setattr(episode_view, "viewer_listening", lambda *a, **k: False)
    assert main(["episode", "view", str(path)]) == 0
    assert "saved to" in capsys.readouterr().out and (path / episode_view.RRD_FILE).stat().st_size > 0
    rows, _ = rows_by_entity(path / episode_view.RRD_FILE)
    demo_steps = EpisodeReader(path).steps()
    assert rows["/camera/image"] == sum(1 for s in demo_steps if s.image) > 0
    assert rows["/plot/action/gripper"] == len([s for s in demo_steps if s.action is not None])
    assert main(["episode", "view", str(path), "--out", str(tmp_path / "x.html")]) == 2
    assert ".rrd" in capsys.readouterr().err
    assert main(["episode", "view", str(tmp_path / "missing"), "--out", str(tmp_path / "y.rrd")]) == 2


def test_missing_sdk_is_a_clear_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rerun", None)
    with pytest.raises(UserError, match=r"vlm2vla-edge\[viewer\]"):
        episode_view.require_rerun()
