"""The Gemini annotator through the real google-genai client against a local fake generateContent server."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("google.genai")

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.parser import parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.sim.expert import run_expert_episode
from vlm2vla_edge.runtime.sim.tasks import sample_episode
from vlm2vla_edge.runtime.verifier.credentials import ApiKey
from vlm2vla_edge.testing.gemini_server import FakeGeminiServer, Reply
from vlm2vla_edge.train.data.cli import app
from vlm2vla_edge.train.data.dataset import read_dataset
from vlm2vla_edge.train.data.gemini_annotator import (
    ANSWER_SCHEMA,
    GeminiAnnotator,
    GeminiAnnotatorConfig,
    RateLimiter,
)
from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, relabel

KEY = "AIzaFAKE-annotator-key-0123456789"
MODEL = "gemini-test"
runner = CliRunner()


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four demonstrations; the first with camera frames."""
    root = tmp_path_factory.mktemp("demos")
    for seed in range(4):
        assert run_expert_episode(sample_episode(seed), load_robot_config(), record_to=root, frames=seed == 0).success
    return root


def paths(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def good_answer(path: Path) -> dict:
    """What a careful labeller would answer: the local structure in other words."""
    local = LocalAnnotator().label(EpisodeReader(path))
    return {
        "subtasks": [f"{s} carefully" for s in local.subtasks],
        "segment_subtasks": local.segment_subtask,
        "motion_plans": [f"Smoothly {p[0].lower()}{p[1:]}" for p in local.plans],
    }


def reply(answer: dict) -> Reply:
    return Reply.text(json.dumps(answer))


def annotator(server: FakeGeminiServer, tmp_path: Path, **overrides) -> GeminiAnnotator:
    values = dict(model=MODEL, base_url=server.base_url, timeout_s=5, retries=1, backoff_initial_s=0.01,
                  backoff_max_s=0.02, concurrency=1, requests_per_minute=10_000, cache_dir=tmp_path / "cache")
    values.update(overrides)
    return GeminiAnnotator(GeminiAnnotatorConfig(**values), LocalAnnotator(), ApiKey(KEY, "test"))


def test_labels_from_gemini_are_validated_and_bad_ones_fall_back(demos: Path, tmp_path: Path) -> None:
    episodes = paths(demos)
    answers = [good_answer(p) for p in episodes]
    # Episode 1: one plan says "up" for a window that goes down, one does not parse.
    local1 = LocalAnnotator().label(EpisodeReader(episodes[1]))
    down = next(i for i, w in enumerate(local1.windows) if w.displacement[2] < -0.03)
    answers[1]["motion_plans"][down] = "Move primarily up, about 5 cm"
    other = next(i for i in range(len(local1.windows)) if i != down)
    answers[1]["motion_plans"][other] = "[[0, 0, 0.1, 1]]"
    # Episode 2: the subtask list jumps; episode 3: wrong number of plans.
    answers[2]["segment_subtasks"] = [0] + [2] * (len(answers[2]["segment_subtasks"]) - 1)
    answers[3]["motion_plans"] = answers[3]["motion_plans"][:-1]
    with FakeGeminiServer() as server:
        server.script(*(reply(a) for a in answers))
        info = relabel(demos, tmp_path / "ds", annotator(server, tmp_path))
        requests = list(server.requests)
    assert len(requests) == 4
    first = requests[0]
    assert first.model == MODEL and first.path.endswith(f"/models/{MODEL}:generateContent")
    config = first.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert set(config["responseSchema"]["properties"]) == set(ANSWER_SCHEMA["properties"])
    parts = first.body["contents"][0]["parts"]
    assert any("inlineData" in p for p in parts)  # the key frames of the episode with frames
    assert "Segments (" in parts[0]["text"] and "Windows (" in parts[0]["text"]
    assert not any("inlineData" in p for p in requests[1].body["contents"][0]["parts"])  # no frames recorded
    assert KEY not in json.dumps(first.body)

    dataset = read_dataset(tmp_path / "ds")
    sources = {s.episode: s for s in info.sources}
    names = [p.name for p in episodes]
    assert sources[names[0]].annotator == f"gemini:{MODEL}" and sources[names[0]].fallbacks == []
    ep0 = [s for s in dataset.samples if s.episode == names[0]]
    assert all(t.endswith(" carefully") for t in next(s for s in ep0 if s.stage == "subtasks").subtasks)
    assert all(s.target.startswith("Smoothly ") for s in ep0 if s.stage == "motion")
    fallbacks = sources[names[1]].fallbacks
    assert len(fallbacks) == 2
    assert any("says 'up' but the gripper moves" in f for f in fallbacks)
    assert any("does not parse" in f for f in fallbacks)
    ep1_motion = [s for s in dataset.samples if s.episode == names[1] and s.stage == "motion"]
    assert ep1_motion[down].target == local1.plans[down] and ep1_motion[other].target == local1.plans[other]
    assert sum(s.target.startswith("Smoothly ") for s in ep1_motion) == len(ep1_motion) - 2
    assert any("jump" in f for f in sources[names[2]].fallbacks)
    assert any("plans" in f and "windows" in f for f in sources[names[3]].fallbacks)
    # Whatever came from Gemini or fell back, every label parses and every action follows its plan.
    for sample in dataset.samples:
        if sample.stage == "subtasks":
            assert list(parse_subtasks(sample.target)) == sample.subtasks
        elif sample.stage in ("motion", "aux"):
            parse_motion_plan(sample.target)
        else:
            motion = next(m for m in dataset.samples if m.id == sample.id.replace("/action", "/motion"))
            assert sample.motion_plan == motion.target


def test_cache_resumes_after_an_interruption(demos: Path, tmp_path: Path) -> None:
    episodes = paths(demos)
    with FakeGeminiServer() as server:
        # The run stops at episode 1: the key was refused (every other request would fail the same way).
        server.script(reply(good_answer(episodes[0])), Reply.error(403, "API key not valid"))
        with pytest.raises(UserError, match="refused the API key"):
            relabel(demos, tmp_path / "ds", annotator(server, tmp_path))
        assert not (tmp_path / "ds" / "dataset.json").exists()  # not a dataset
        assert len(list((tmp_path / "cache").glob("*.json"))) == 1
        sent_first = len(server.requests)
        assert sent_first == 2
        # The rerun into the same folder sends only the episodes not cached.
        server.script(*(reply(good_answer(p)) for p in episodes[1:]))
        info = relabel(demos, tmp_path / "ds", annotator(server, tmp_path))
        assert len(server.requests) - sent_first == 3
        assert all(s.annotator == f"gemini:{MODEL}" and not s.fallbacks for s in info.sources)
        # A third run is served from the cache alone, with the same result.
        again = relabel(demos, tmp_path / "ds3", annotator(server, tmp_path))
        assert len(server.requests) - sent_first == 3
        assert again.samples_sha256 == info.samples_sha256


def test_failures_retry_then_fall_back_to_local_labels(demos: Path, tmp_path: Path) -> None:
    episodes = paths(demos)[:2]
    source = tmp_path / "src"
    source.mkdir()
    for p in episodes:
        (source / p.name).symlink_to(p, target_is_directory=True)
    with FakeGeminiServer() as server:
        server.script(
            Reply.error(503), Reply.error(503),  # episode 0: both attempts fail (retries=1)
            Reply(200, b"<html>proxy error</html>"),  # episode 1: not JSON at all: no retry
        )
        info = relabel(source, tmp_path / "ds", annotator(server, tmp_path))
        assert len(server.requests) == 3
    assert all(s.annotator == "local" for s in info.sources)
    assert all(len(s.fallbacks) == 1 and "all labels are local" in s.fallbacks[0] for s in info.sources)
    assert not list((tmp_path / "cache").glob("*.json"))  # failures are not cached
    local = relabel(source, tmp_path / "local", LocalAnnotator())
    assert info.samples_sha256 == local.samples_sha256


def test_requests_run_concurrently(demos: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(8):  # the same demonstration eight times (the cache is off: each is a request)
        (source / f"ep{i}").symlink_to(paths(demos)[1], target_is_directory=True)
    shaped = {"subtasks": ["Do it"], "segment_subtasks": [], "motion_plans": []}
    with FakeGeminiServer(default=Reply(200, reply(shaped).body, delay_s=0.3)) as server:
        start = time.monotonic()
        info = relabel(source, tmp_path / "ds", annotator(server, tmp_path, concurrency=4, cache_dir=None))
        elapsed = time.monotonic() - start
        assert len(server.requests) == 8
    assert elapsed < 8 * 0.3 * 0.75, elapsed  # one at a time would take 2.4 s
    assert [s.episode for s in info.sources] == [f"ep{i}" for i in range(8)]  # input order kept


def test_rate_limiter_spaces_request_starts() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    limiter = RateLimiter(30, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire()
    assert slept == [2.0, 4.0]  # 30 per minute: starts at 0, 2 and 4 s
    now[0] += 10
    limiter.acquire()
    assert slept == [2.0, 4.0]  # the budget was not exceeded: no wait


def test_the_key_never_leaks(demos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = tmp_path / "src"
    source.mkdir()
    (source / "ep").symlink_to(paths(demos)[1], target_is_directory=True)
    with FakeGeminiServer() as server:
        server.script(Reply(400, b"", echo_headers=True))  # a leaky proxy puts our headers in its error
        gemini = annotator(server, tmp_path)
        info = relabel(source, tmp_path / "ds", gemini)
        assert server.requests[0].headers.get("x-goog-api-key") == KEY  # it was sent, to the server only
    assert info.sources[0].fallbacks and "[redacted]" in info.sources[0].fallbacks[0]
    for file in (tmp_path / "ds").rglob("*"):
        if file.is_file():
            assert KEY not in file.read_text(errors="replace")
    assert KEY not in caplog.text and KEY not in repr(gemini)


def test_dry_run_counts_without_network(demos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    args = ["relabel", str(demos), str(tmp_path / "ds"), "--annotator", "gemini", "--dry-run", "--model", MODEL,
            "--base-url", "http://127.0.0.1:9", "--cache", str(tmp_path / "cache"), "--price-input", "1",
            "--price-output", "10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "episodes: 4 (4 to send, 0 cached" in result.output
    gemini = GeminiAnnotator(
        GeminiAnnotatorConfig(model=MODEL, max_images=6, price_input_per_m=1, price_output_per_m=10)
    )
    estimate = gemini.estimate(paths(demos))
    labels = LocalAnnotator().label(EpisodeReader(paths(demos)[0]))
    key_frames = len({seg.start for seg in labels.segments} | {len(labels.trajectory) - 1})
    assert estimate.images == min(6, key_frames) and estimate.image_tokens == 258 * estimate.images  # 256 px frames
    assert estimate.input_text_tokens > 0 and estimate.output_tokens > 0
    expected = estimate.input_tokens / 1e6 * 1 + estimate.output_tokens / 1e6 * 10
    assert estimate.cost_usd == pytest.approx(expected)
    assert f"${expected:.4f}" in result.output
    assert not (tmp_path / "ds").exists()


def test_missing_key_is_a_usage_error(demos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    result = runner.invoke(app, ["relabel", str(demos), str(tmp_path / "ds"), "--annotator", "gemini",
                                 "--base-url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "GEMINI_API_KEY" in result.output
    assert not (tmp_path / "ds").exists()  # refused before anything was written
