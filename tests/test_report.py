"""The per-episode HTML report: runner and expert episodes, damaged folders, hostile text, atomic output."""

from __future__ import annotations

import base64
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm2vla_edge.runtime import files
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeReader, EpisodeWriter, SafetyRecord, StepRecord
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.interface import PolicyOutputError
from vlm2vla_edge.runtime.recording import EpisodeRecorder
from vlm2vla_edge.runtime.report import render_report, write_report
from vlm2vla_edge.runtime.report.grouping import safety_decisions
from vlm2vla_edge.runtime.report.path import path_points, robot_config_for
from vlm2vla_edge.runtime.report.svg import Node
from vlm2vla_edge.runtime.report.units import Figure, Quantity
from vlm2vla_edge.runtime.report.views import MAX_STRIP_FRAMES
from vlm2vla_edge.runtime.runner import EpisodeRunner, SceneHooks
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.sim.expert import run_expert_episode
from vlm2vla_edge.runtime.sim.scene import Scene
from vlm2vla_edge.runtime.sim.tasks import sample_episode
from vlm2vla_edge.runtime.sim.world import SimArm, SimCamera, SimWorld
from vlm2vla_edge.runtime.verifier.base import Verdict, Verifier
from vlm2vla_edge.testing.policies import ScriptedPolicy

ROBOT = load_robot_config()
HOSTILE = "<script>alert('pwned')</script>"
DATA_URI = re.compile(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')


# ------------------------------------------------------------------------------------------- helpers


class YesVerifier(Verifier):
    name = "scripted"

    def verify(self, request, cancel=None) -> Verdict:
        return Verdict(success=True, reason=f"looks done {HOSTILE}", verifier=self.name, latency_s=0.25)


class EventfulPolicy(ScriptedPolicy):
    """First step: unusable output full of markup; then a chunk the limiter refuses, one it clamps, one clean."""

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None):
        if self.steps == 0:
            self.steps += 1
            raise PolicyOutputError("action", f"[[0.02, {HOSTILE}", "not an action chunk")
        return super().step(observation, instruction, subtask, retry=retry, cancel=cancel)


def runner_episode(root: Path, instruction: str = f"pick up the carrot {HOSTILE}") -> Path:
    """A real episode: the loop in the simulator, recorded by the real recorder, with every kind of event."""
    policy = EventfulPolicy(
        actions=[
            "unused",
            # 11 actions that post-processing cannot merge (the gripper alternates): chunk_length refuses them.
            "[" + ", ".join(f"[0.01, 0, 0, {i % 2}]" for i in range(11)) + "]",
            "[[0.2, 0, -0.02, 1], [0, 0.1, 0, 0]]",  # clamped by action_translation and workspace
            "[[0, 0, -0.02, 1]]",
        ]
    )
    world = SimWorld(ROBOT, Scene.random(7, required=("carrot",), n_distractors=1), realtime=False)
    arm, camera = SimArm(world), SimCamera(world)
    arm.connect()
    camera.connect()
    limiter = SafetyLimiter(ROBOT, reachable=world.reachable, clock=world.clock)
    meta = EpisodeMeta(instruction=instruction, source="runtime", robot_name=ROBOT.name, robot_model=ROBOT.model,
                       camera="sim", bundle_id="scripted-fake", extra={"seed": 7})
    writer = EpisodeWriter.create(root, meta)
    runner = EpisodeRunner(policy, arm, camera, YesVerifier(), limiter, hooks=SceneHooks(describe=world.describe),
                           subscribers=[EpisodeRecorder(writer)])
    result = runner.run(instruction)
    assert result.outcome == "success", result.detail
    return writer.path


def expert_episode(root: Path, seed: int = 0) -> Path:
    result = run_expert_episode(sample_episode(seed), ROBOT, record_to=root, frames=True, episode_id=f"sim-{seed:07d}")
    assert result.path is not None
    return result.path


def hand_written_episode(root: Path, steps: int = 4, **meta_fields) -> EpisodeWriter:
    """A small demo-style episode written with the writer, left open (not finished)."""
    meta = EpisodeMeta(instruction=meta_fields.pop("instruction", "stack the cups"), source="test", **meta_fields)
    writer = EpisodeWriter.create(root, meta)
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    for i in range(steps):
        image = writer.write_frame(rgb + (i * 10) % 256)
        writer.append_step(StepRecord(
            index=writer.next_index, t=writer.elapsed(), wall_time=time.time(), stage="demo",
            ee_position=(0.3 + 0.01 * i, 0.0, 0.2 - 0.01 * i), gripper_open=i < 2,
            action=[0.01, 0.0, -0.01, 1.0 if i < 2 else 0.0], image=image,
        ))
    return writer


class TagCollector(HTMLParser):
    """Every tag name and attribute name of a page, to prove hostile text added no markup."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)

    def handle_data(self, data):
        self.text.append(data)


def collect(page: str) -> TagCollector:
    parser = TagCollector()
    parser.feed(page)
    parser.close()
    return parser


ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "header", "nav", "a", "section", "h1", "h2", "h3",
    "div", "span", "b", "small", "code", "pre", "details", "summary", "ol", "li", "table", "tr", "th", "td",
    "figure", "figcaption", "img", "footer", "svg", "text", "rect", "line", "polyline", "circle", "path", "title",
}
ALLOWED_ATTRS = {
    "lang", "charset", "http-equiv", "content", "name", "class", "id", "href", "tabindex", "src", "alt", "title",
    "style", "colspan", "xmlns", "viewbox", "width", "height", "role", "aria-label", "x", "y", "x1", "y1", "x2", "y2",
    "cx", "cy", "r", "d", "points", "fill", "stroke", "text-anchor", "transform", "font-size", "font-weight",
    "font-family", "stroke-width", "stroke-dasharray", "stroke-linejoin", "stroke-linecap",
}


def polyline_points(page: str, cls: str) -> list[int]:
    return [len(m.group(1).split()) for m in re.finditer(rf'<polyline class="{cls}"[^>]*? points="([^"]*)"', page)]


# ------------------------------------------------------------------------------------------- runner episode


@pytest.fixture(scope="module")
def runner_dir(tmp_path_factory) -> Path:
    return runner_episode(tmp_path_factory.mktemp("runner"))


def test_runner_episode_has_every_section(runner_dir: Path) -> None:
    reader = EpisodeReader(runner_dir)
    page = render_report(reader)
    for section in ('id="timeline"', 'id="path"', 'id="latency"', "Subtask planning", "motion plan",
                    "raw action output", "safety decisions", "executed commands", "verifier verdict"):
        assert section in page, section
    # Header: outcome badge, bundle, robot, seed, counts.
    assert '<span class="badge b-success">success</span>' in page
    assert "scripted-fake" in page and ROBOT.name in page and "<b>seed</b>7" in page
    assert "<b>subtasks done</b>2 / 2" in page
    assert "<b>retries</b>2" in page  # after the unusable output and after the refused chunk
    # Unusable output, refused chunk and clamps are all visible.
    assert "Unusable model output" in page
    assert "Chunk refused by the safety limiter" in page and "chunk_length" in page
    assert 'class="dclamp"' in page and 'class="dreject"' in page and "action_translation" in page
    assert '<span class="badge b-done">done</span>' in page and "latency 250 ms" in page
    # Subtask 1 took three attempts (error, refused, clamped+verified); subtask 2 one.
    assert page.count('<div class="attempt">') == 4
    assert "3 attempts" in page and "1 attempt<" in page


def test_runner_episode_counts_each_safety_decision_once(runner_dir: Path) -> None:
    reader = EpisodeReader(runner_dir)
    decisions = [d for s in reader.steps() for d in safety_decisions(s)]
    clamps = sum(d.verdict == "clamp" for d in decisions)
    rejects = sum(d.verdict == "reject" for d in decisions)
    assert clamps >= 2 and rejects == 1
    page = render_report(reader)
    assert f"{clamps} clamps, {rejects} rejection" in page


def test_hostile_text_is_escaped(runner_dir: Path) -> None:
    page = render_report(EpisodeReader(runner_dir))
    assert "<script" not in page.lower()
    escaped = "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"  # Jinja2 (markupsafe) entities
    assert f"pick up the carrot {escaped}" in page  # instruction in <h1> and <title>
    assert f"[[0.02, {escaped}" in page  # raw model output of the unusable step
    assert f"looks done {escaped}" in page  # verifier reason
    parsed = collect(page)
    assert parsed.tags <= ALLOWED_TAGS, parsed.tags - ALLOWED_TAGS
    assert not {a for a in parsed.attrs if a.startswith("on")}


def test_page_is_offline(runner_dir: Path) -> None:
    page = render_report(EpisodeReader(runner_dir))
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    urls = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page)
    assert urls and all(u.startswith(("data:image/jpeg;base64,", "#")) for u in urls), urls
    assert "@import" not in page and "url(" not in page


def test_frames_are_embedded_byte_for_byte(runner_dir: Path) -> None:
    reader = EpisodeReader(runner_dir)
    page = render_report(reader)
    embedded = {base64.b64decode(b) for b in DATA_URI.findall(page)}
    names = {s.image for s in reader.steps() if s.image} | {n for s in reader.steps() for n in s.images.values()}
    assert names and any(n.endswith("_after.jpg") for n in names)
    assert {reader.frame_path(n).read_bytes() for n in names} == embedded


def test_path_plot_has_one_point_per_recorded_position(runner_dir: Path) -> None:
    reader = EpisodeReader(runner_dir)
    page = render_report(reader)
    positions = [s for s in reader.steps() if s.ee_position is not None]
    assert len(positions) == len(reader.steps())
    # Top and side view of the workspace, and (the path is a few cm in a 40 cm box) both zoomed to the path.
    assert polyline_points(page, "ee-path") == [len(positions)] * 4
    assert page.count('<svg class="plot"') == 4
    assert ">Top view, zoomed to the path<" in page and ">Side view, zoomed to the path<" in page
    assert 'class="workspace"' in page  # robot name in meta -> the preset's box
    assert 'class="mark-clamp"' in page and 'class="mark-reject"' in page
    assert 'class="ee-seg closed"' in page and 'class="ee-seg open"' in page


def test_write_report_default_path(runner_dir: Path, tmp_path: Path) -> None:
    path = write_report(runner_dir)
    assert path == runner_dir / "report.html"
    assert path.read_text(encoding="utf-8") == render_report(EpisodeReader(runner_dir))
    path.unlink()  # the module fixture is shared: leave the episode as the recorder wrote it


# ------------------------------------------------------------------------------------------- expert episode


def test_expert_episode(tmp_path: Path) -> None:
    folder = expert_episode(tmp_path)
    reader = EpisodeReader(folder)
    out = write_report(folder, tmp_path / "out" / "expert.html")
    page = out.read_text(encoding="utf-8")
    assert f"Demonstration steps ({len(reader)})" in page
    assert 'id="timeline"' not in page  # no policy stages, no empty subtask section
    assert polyline_points(page, "ee-path") == [len(reader)] * 2  # the expert crosses the workspace: no zoom
    assert "zoomed" not in page
    assert 'class="workspace"' in page and 'class="floor"' in page
    assert len(DATA_URI.findall(page)) == len(reader)  # one strip frame per step (short episode)
    assert "0 clamps, 0 rejections" in page


def test_long_demonstration_strip_is_sampled(tmp_path: Path) -> None:
    writer = hand_written_episode(tmp_path, steps=MAX_STRIP_FRAMES + 12)
    writer.finish("success")
    page = render_report(EpisodeReader(writer.path))
    assert len(DATA_URI.findall(page)) == MAX_STRIP_FRAMES
    assert polyline_points(page, "ee-path") == [MAX_STRIP_FRAMES + 12] * 2


# ------------------------------------------------------------------------------------------- damage


def test_truncated_episode(tmp_path: Path) -> None:
    writer = hand_written_episode(tmp_path, steps=3)
    writer.close()
    steps = writer.path / "steps.jsonl"
    line = StepRecord(index=3, t=9.0, wall_time=time.time(), stage="demo", ee_position=(0.4, 0.1, 0.1)).to_line()
    with open(steps, "ab") as handle:
        handle.write(line.encode()[: len(line) // 2])  # a crash in the middle of the write
    reader = EpisodeReader(writer.path)
    page = render_report(reader)
    assert reader.truncated
    assert "Truncated (crash)" in page
    assert '<span class="badge b-interrupted">interrupted</span>' in page
    assert "never finished" in page and "(unfinished)" in page
    assert polyline_points(page, "ee-path") == [3, 3]


def test_crash_in_the_middle_of_an_attempt(runner_dir: Path, tmp_path: Path) -> None:
    """Cut a runner episode after a motion record: the attempt shows what is there and says what is missing."""
    copy = tmp_path / runner_dir.name
    copy.mkdir()
    (copy / "frames").mkdir()
    for frame in (runner_dir / "frames").iterdir():
        (copy / "frames" / frame.name).write_bytes(frame.read_bytes())
    meta = json.loads((runner_dir / "meta.json").read_text())
    meta["outcome"] = meta["end_wall_time"] = meta["outcome_detail"] = None
    (copy / "meta.json").write_text(json.dumps(meta))
    lines = (runner_dir / "steps.jsonl").read_text().splitlines(keepends=True)
    last_motion = max(i for i, line in enumerate(lines) if '"stage":"motion"' in line)
    (copy / "steps.jsonl").write_text("".join(lines[: last_motion + 1]) + lines[last_motion + 1][:40])
    page = render_report(EpisodeReader(copy))
    assert "Truncated (crash)" in page
    assert "No action / verify record for this attempt" in page
    assert '<span class="badge b-pending">not reached</span>' not in page  # subtask 2 was reached


def test_missing_frame_is_a_placeholder(tmp_path: Path) -> None:
    writer = hand_written_episode(tmp_path, steps=3)
    writer.finish("failed", "the cups fell over")
    (writer.path / "frames" / "000001.jpg").unlink()
    (writer.path / "frames" / "000002.jpg").write_bytes(b"not a jpeg at all")
    page = render_report(EpisodeReader(writer.path))
    assert "frame missing" in page and "frame not a JPEG file" in page
    assert "Some frame files named in steps.jsonl are missing" in page
    assert len(DATA_URI.findall(page)) == 1
    assert '<span class="badge b-failed">failed</span>' in page and "the cups fell over" in page


def test_frame_path_outside_the_episode_is_not_read(tmp_path: Path) -> None:
    writer = hand_written_episode(tmp_path, steps=1)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8\xff secret")
    writer.append_step(StepRecord(index=writer.next_index, t=1.0, wall_time=time.time(), stage="demo",
                                  image="frames/../../secret.jpg"))
    writer.finish("success")
    page = render_report(EpisodeReader(writer.path))
    assert "frame path outside the episode" in page
    assert base64.b64encode(secret.read_bytes()).decode() not in page


def test_not_an_episode_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an episode folder"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "report.html").exists()


# ------------------------------------------------------------------------------------------- output


def test_output_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = hand_written_episode(tmp_path, steps=2)
    writer.finish("success")
    out = tmp_path / "reports" / "r.html"
    assert write_report(writer.path, out) == out
    first = out.read_bytes()
    assert first.startswith(b"<!DOCTYPE html>") and first.rstrip().endswith(b"</html>")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(UserError, match="cannot write the report .*No space left"):
        write_report(writer.path, out)
    assert out.read_bytes() == first  # the old report is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.html"]  # no temporary file left behind


def test_without_robot_config_axes_fit_the_data(tmp_path: Path) -> None:
    writer = hand_written_episode(tmp_path, steps=3, robot_name="some-lab-arm")
    writer.finish("success")
    page = render_report(EpisodeReader(writer.path))
    assert 'class="workspace"' not in page and "workspace unknown" in page
    assert polyline_points(page, "ee-path") == [3, 3]


# ------------------------------------------------------------------------------------------- units


def test_safety_decisions_drop_exact_duplicates() -> None:
    a = SafetyRecord(rule="workspace", verdict="clamp", reason="outside", index=0)
    b = SafetyRecord(rule="workspace", verdict="clamp", reason="outside", index=1)
    step = StepRecord(index=0, t=0.0, wall_time=0.0, safety=[a, b, a, b])
    assert safety_decisions(step) == [a, b]


def test_path_points_skip_non_finite_positions() -> None:
    steps = [
        StepRecord(index=0, t=0.0, wall_time=0.0, ee_position=(0.1, 0.2, 0.3)),
        StepRecord(index=1, t=0.1, wall_time=0.0, ee_position=(float("nan"), 0.2, 0.3)),
        StepRecord(index=2, t=0.2, wall_time=0.0),
        StepRecord(index=3, t=0.3, wall_time=0.0, ee_position=(0.2, 0.2, 0.3), gripper_open=False),
    ]
    assert [p.index for p in path_points(steps)] == [0, 3]


def test_robot_config_is_found_by_name_or_preset_only() -> None:
    assert robot_config_for(ROBOT.name).name == ROBOT.name
    assert robot_config_for("widowx250s").name == ROBOT.name
    assert robot_config_for(None) is None
    assert robot_config_for("/etc/passwd") is None
    assert robot_config_for("configs/robots/widowx250s.yaml") is None


MARKUP = st.sampled_from(["<script>", "</pre>", "<img src=x onerror=alert(1)>", '"', "'", "&amp;", "<!--", "-->",
                          "</textarea>", "<svg onload=x>", "]]>", "<", ">", "javascript:", "\n", "\x00"])
HOSTILE_TEXT = st.lists(st.one_of(MARKUP, st.text(max_size=6)), min_size=1, max_size=8).map("".join)


@settings(max_examples=25)
@given(text=HOSTILE_TEXT)
def test_any_text_adds_no_markup(tmp_path_factory, text: str) -> None:
    root = tmp_path_factory.mktemp("hyp")
    writer = EpisodeWriter.create(root, EpisodeMeta(instruction=text, source=text, extra={text: text}))
    writer.append_step(StepRecord(
        index=0, t=0.0, wall_time=time.time(), stage="action", subtask_index=0, subtask=text, raw_text=text,
        prompt=text, parsed_actions=[[0.01, 0.0, 0.0, 1.0]], error=text,
        safety=[SafetyRecord(rule=text, verdict="reject", reason=text, index=None)],
    ))
    writer.append_step(StepRecord(index=1, t=0.1, wall_time=time.time(), stage=text, raw_text=text))
    writer.finish("error", text)
    page = render_report(EpisodeReader(writer.path))
    parsed = collect(page)
    assert parsed.tags <= ALLOWED_TAGS
    assert parsed.attrs <= ALLOWED_ATTRS
    assert text.strip() == "" or any(text.strip() in chunk for chunk in parsed.text)


# ------------------------------------------------------------------------------------------- figures and their units


POLICY_TIMINGS = {"prefill_tokens": 23.0, "prefill_s": 0.41, "decode_s": 1.2, "generated_tokens": 34.0,
                  "decode_batches": 30.0, "prefix_prefill_tokens": 174.0, "prefix_prefill_s": 0.9, "total_s": 2.5}


def test_recorded_figures_carry_their_unit() -> None:
    assert Figure.recorded("prefill_tokens", 23.0).quantity is Quantity.COUNT
    assert Figure.recorded("decode_batches", 30.0).quantity is Quantity.COUNT
    assert Figure.recorded("prefill_s", 0.41).quantity is Quantity.DURATION
    assert str(Figure.recorded("prefill_tokens", 23.0)) == "23"
    assert str(Figure.recorded("prefix_prefill_tokens", 174.0)) == "174"
    assert str(Figure.recorded("prefill_s", 0.41)) == "410 ms"
    assert str(Figure.recorded("verify_ms", 250.0)) == "250 ms"


def test_token_counts_are_not_printed_as_durations(tmp_path: Path) -> None:
    """The recorder mixes seconds and counts in `timings`: each is printed in its own unit."""
    writer = EpisodeWriter.create(tmp_path, EpisodeMeta(instruction="put the carrot on the plate", source="test"))
    for i in range(2):
        writer.append_step(StepRecord(index=i, t=float(i), wall_time=time.time(), stage="motion", subtask_index=0,
                                      subtask="grasp the carrot", motion_plan="move left", raw_text="move left",
                                      timings=POLICY_TIMINGS))
    writer.finish("success")
    page = render_report(EpisodeReader(writer.path))
    timings = re.findall(r'<div class="mono timings">timings: ([^<]*)</div>', page)
    assert timings and all("prefill_tokens 23 ·" in t and "prefix_prefill_tokens 174 ·" in t for t in timings), timings
    assert "prefill_s 410 ms" in timings[0] and "total_s 2.50 s" in timings[0]
    assert "23.00 s" not in page and "2.9 min" not in page and "174 ms" not in page
    # By stage: durations in one table, counts (tokens, batches) in another, each in its own unit.
    latency = page[page.index('<section id="latency">'):]
    cells = "".join(f"<td>{v}</td>" for v in (2, 23, 23, 23, 46))  # n, mean, median, max, total
    assert f'<td class="l mono">prefill_tokens</td>{cells}' in latency
    cells = "".join(f"<td>{v}</td>" for v in (2, "1.20 s", "1.20 s", "1.20 s", "2.40 s"))
    assert f'<td class="l mono">decode_s</td>{cells}' in latency
    durations, counts = latency.split("counts by stage")
    assert "decode_s" in durations and "prefill_tokens" not in durations
    assert "prefill_tokens" in counts and "decode_s" not in counts


# ------------------------------------------------------------------------------------------- escaping


def test_script_in_instruction_and_subtasks_is_escaped(tmp_path: Path) -> None:
    """An instruction, a planned subtask, a subtask name and a safety reason (an SVG tooltip) carrying <script>."""
    meta = EpisodeMeta(instruction=f"tidy up {HOSTILE}", source="test", robot_name=ROBOT.name)
    writer = EpisodeWriter.create(tmp_path, meta)
    plan = [f"grasp the cup {HOSTILE}", "place it <b>here</b>"]
    writer.append_step(StepRecord(index=0, t=0.0, wall_time=time.time(), stage="subtasks", subtasks=plan,
                                  raw_text="\n".join(plan), ee_position=(0.3, 0.0, 0.2)))
    writer.append_step(StepRecord(index=1, t=0.5, wall_time=time.time(), stage="motion", subtask_index=0,
                                  subtask=plan[0], motion_plan=f"move {HOSTILE}", ee_position=(0.3, 0.0, 0.2)))
    writer.append_step(StepRecord(
        index=2, t=1.0, wall_time=time.time(), stage="action", subtask_index=0, subtask=plan[0],
        parsed_actions=[[0.01, 0.0, 0.0, 1.0]], ee_position=(0.3, 0.0, 0.2),
        safety=[SafetyRecord(rule="workspace", verdict="reject", reason=f"outside {HOSTILE}", index=None)],
    ))
    writer.finish("failed", HOSTILE)
    page = render_report(EpisodeReader(writer.path))
    assert "<script" not in page.lower() and "<b>here</b>" not in page
    escaped = "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"
    assert f"<h1>tidy up {escaped}</h1>" in page and f"<title>tidy up {escaped} — failed" in page
    assert f"<li>grasp the cup {escaped}</li>" in page and "<li>place it &lt;b&gt;here&lt;/b&gt;</li>" in page
    assert f"<h3>1. grasp the cup {escaped} " in page  # the subtask's card
    assert f"<pre>move {escaped}</pre>" in page  # the motion plan
    tooltip = f"<title>step #2 chunk: workspace reject: outside {escaped}</title>"  # the plot's rejection mark
    assert re.search(rf'<path class="mark-reject"[^>]*>{re.escape(tooltip)}', page)
    parsed = collect(page)
    assert parsed.tags <= ALLOWED_TAGS and parsed.attrs <= ALLOWED_ATTRS


def test_svg_nodes_refuse_markup_in_names() -> None:
    """Tag and attribute names are the only SVG parts the templates print unescaped: they are checked."""
    Node("circle", (("cx", "1"), ("stroke-width", "2")))
    for bad in ("svg onload", "a>", ""):
        with pytest.raises(ValueError, match="not an SVG"):
            Node(bad)
        with pytest.raises(ValueError, match="not an SVG"):
            Node("rect", ((bad, "1"),))
