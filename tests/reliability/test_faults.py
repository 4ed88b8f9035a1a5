"""Every fault scenario of the reliability suite must be survived: arm stopped, daemon serving, a clear
error in the task's status, the episode recorded (bench/reliability_suite/faults.py says how each is
injected and checked). The last tests break the product on purpose to show the checks can fail."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Callable

import pytest

from reliability_suite import Tally, faults
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.service import Daemon, Unavailable
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeReader, EpisodeWriter, mark_interrupted
from vlm2vla_edge.runtime.recording import EpisodeRecorder
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.runtime.sim.session import make_sim_session
from vlm2vla_edge.runtime.station import Station
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier

_GEMINI = importlib.util.find_spec("google") is not None and importlib.util.find_spec("google.genai") is not None
_NEEDS_GEMINI = {faults.verifier_timeout, faults.verifier_http_500, faults.verifier_garbage}


def _survived(tally: Tally) -> None:
    assert tally.category == "fault" and tally.tried >= 1
    assert tally.unsafe_commands == 0, tally.failures
    assert tally.survived == tally.tried, "\n".join(tally.failures)


@pytest.mark.parametrize("scenario", faults.FAST, ids=lambda f: f.__name__)
def test_in_process_fault_is_survived(scenario: Callable[..., Tally], tmp_path: Path) -> None:
    if scenario in _NEEDS_GEMINI and not _GEMINI:
        pytest.skip("google-genai is not installed (the 'gemini' extra)")
    _survived(scenario(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", faults.PROCESS, ids=lambda f: f.__name__)
def test_daemon_process_fault_is_survived(scenario: Callable[..., Tally]) -> None:
    _survived(scenario())  # its own short temporary folder: socket paths are limited to ~100 characters


def test_checks_fail_when_health_hides_an_unplugged_camera(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(Daemon, "health", lambda self: (True, "ok"))
    tally = faults.camera_unplug(tmp_path)
    assert tally.survived == 0 and tally.tried == 1
    assert "/v1/health answered 200" in tally.failures[0]


def test_checks_fail_when_the_recorder_swallows_a_full_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    original = EpisodeRecorder.on_event

    def swallowing(self: EpisodeRecorder, event) -> None:  # the pre-fix behaviour
        with contextlib.suppress(Exception):
            original(self, event)

    monkeypatch.setattr(EpisodeRecorder, "on_event", swallowing)
    tally = faults.episodes_disk_full(tmp_path)
    assert tally.survived == 0 and tally.unsafe_commands > 0
    assert "arm commands ran after the fault" in tally.failures[0]


def test_run_faults_reports_a_crashing_scenario(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Tally:
        raise RuntimeError("boom")

    monkeypatch.setattr(faults, "FAST", (broken,))
    tallies = faults.run_faults(include_processes=False)
    assert [(t.name, t.tried, t.survived) for t in tallies] == [("broken", 1, 0)]
    assert "RuntimeError: boom" in tallies[0].failures[0]


# --- the product guarantees behind the scenarios, checked directly (fast) --------------------------------


def test_mark_interrupted_closes_dead_episodes_only(tmp_path: Path) -> None:
    live = EpisodeWriter.create(tmp_path, EpisodeMeta(instruction="live"), episode_id="live")
    EpisodeWriter.create(tmp_path, EpisodeMeta(instruction="dead"), episode_id="dead").close()  # never finished
    done = EpisodeWriter.create(tmp_path, EpisodeMeta(instruction="done"), episode_id="done")
    done.finish("success")
    try:
        assert mark_interrupted(tmp_path) == [tmp_path / "dead"]
        dead = EpisodeReader(tmp_path / "dead").meta
        assert dead.outcome == "interrupted" and dead.outcome_detail and dead.end_wall_time is not None
        assert EpisodeReader(tmp_path / "live").meta.outcome is None  # its writer holds the lock
        assert EpisodeReader(tmp_path / "done").meta.outcome == "success"
        assert mark_interrupted(tmp_path) == []  # once only
    finally:
        live.close()
    assert mark_interrupted(tmp_path) == [tmp_path / "live"]  # closed unfinished: now it is dead too
    assert mark_interrupted(tmp_path / "missing") == []


def test_a_daemon_without_a_model_is_unhealthy_refuses_tasks_and_still_estops(tmp_path: Path) -> None:
    robot = load_robot_config()
    session = make_sim_session(robot, realtime=False)
    station = Station(session.arm, session.camera, session.limiter, session.hooks, "sim", sim=session)
    with pytest.raises(ValueError, match="policy_error"):
        Daemon(None, station, HeuristicVerifier(), robot=robot, episodes_dir=tmp_path, config=DaemonConfig())
    daemon = Daemon(None, station, HeuristicVerifier(), robot=robot, episodes_dir=tmp_path, config=DaemonConfig(),
                    policy_error="model bundle folder /x does not exist")
    try:
        assert daemon.health() == (False, "no model loaded: model bundle folder /x does not exist")
        status = daemon.status()
        assert status["state"] == "unhealthy" and "does not exist" in status["error"] and status["bundle_id"] is None
        with pytest.raises(Unavailable, match="no model loaded"):
            daemon.submit("lift the carrot")
        daemon.estop("hand in the workspace")
        assert daemon.status()["state"] == "estop" and session.limiter.engaged
        daemon.reset()
        daemon.shutdown()
        assert list(tmp_path.iterdir()) == []  # no episode was started
    finally:
        session.close()
