"""Tests of the episode format: round trips, crash tolerance, atomic finish, disk errors, listing."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm2vla_edge.runtime import episode as episode_mod
from vlm2vla_edge.runtime.actions import Action
from vlm2vla_edge.runtime.episode import (
    EpisodeExistsError,
    EpisodeFormatError,
    EpisodeMeta,
    EpisodeReader,
    EpisodeWriteError,
    EpisodeWriter,
    ExecutedCommand,
    StepRecord,
    VerifierRecord,
    list_episodes,
    new_episode_id,
)
from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError
from vlm2vla_edge.runtime.robot.base import MoveResult
from vlm2vla_edge.runtime.safety import SafetyDecision
from vlm2vla_edge.runtime.verifier.base import Verdict


def make_meta(**overrides) -> EpisodeMeta:
    fields = dict(
        instruction="put the carrot on the plate",
        source="runtime",
        robot_name="lab widowx",
        robot_model="wx250s",
        camera="sim",
        grammar_version="1",
        bundle_id="gemma3-270m-test",
    )
    fields.update(overrides)
    return EpisodeMeta(**fields)


def make_step(index: int, **overrides) -> StepRecord:
    fields = dict(
        index=index,
        t=0.1 * index,
        wall_time=1_800_000_000.0 + index,
        ee_position=(0.3, 0.0, 0.2 - 0.01 * index),
        ee_rpy=(0.0, 1.2, 0.0),
        gripper_open=True,
        action=[0.0, 0.0, -0.01, 1.0],
    )
    fields.update(overrides)
    return StepRecord(**fields)


def gradient_image(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_meta_steps_frames(tmp_path: Path) -> None:
    image = gradient_image()
    decisions = [
        SafetyDecision(rule="workspace", verdict="clamp", reason="z 0.01 below floor 0.02; clamped", index=0),
        SafetyDecision(rule="chunk_length", verdict="pass", reason="2 actions <= 16"),
    ]
    move = MoveResult(completed=True, reached=(0.3, 0.0, 0.19), error_m=0.001, duration_s=0.4)
    with EpisodeWriter.create(tmp_path, make_meta(extra={"seed": np.int64(7), "scene": "kitchen"})) as writer:
        name0 = writer.write_frame(image)
        after0 = writer.write_frame(Image.fromarray(image), tag="after")
        writer.append_step(
            make_step(
                0,
                image=name0,
                images={"after": after0},
                stage="action",
                subtask_index=1,
                subtask="grasp the carrot",
                prompt="What action should the robot take?\n<image>",
                raw_text="[[0, 0, -0.01, 1]]",
                parsed_actions=np.array([[0.0, 0.0, -0.01, 1.0]]),
                safety=decisions,
                executed=[ExecutedCommand(target=(0.3, 0.0, 0.19), gripper_open=True, completed=move.completed,
                                          reached=move.reached, error_m=move.error_m, duration_s=move.duration_s)],
                verifier=VerifierRecord(success=True, reason="moved down", verifier="heuristic", pixel_diff=0.12),
                timings={"prefill_s": np.float32(0.25), "decode_s": 1.5},
            )
        )
        name1 = writer.write_frame(image)
        writer.append_step(make_step(1, image=name1, stage="verify", error="timeout"))
        writer.finish("success", "carrot on plate")

    reader = EpisodeReader(writer.path)
    assert reader.meta.instruction == "put the carrot on the plate"
    assert reader.meta.robot_model == "wx250s"
    assert reader.meta.episode_id == writer.path.name
    assert reader.meta.extra == {"seed": 7, "scene": "kitchen"}
    assert reader.outcome == "success"
    assert reader.meta.outcome_detail == "carrot on plate"
    assert reader.meta.start_wall_time <= reader.meta.end_wall_time
    assert not reader.truncated
    steps = reader.steps()
    assert [s.index for s in steps] == [0, 1]
    first = steps[0]
    assert first.image == "frames/000000.jpg" and first.images == {"after": "frames/000000_after.jpg"}
    assert first.parsed_actions == [[0.0, 0.0, -0.01, 1.0]]
    assert [(d.rule, d.verdict, d.index) for d in first.safety] == [
        ("workspace", "clamp", 0),
        ("chunk_length", "pass", None),
    ]
    assert first.executed[0].reached == (0.3, 0.0, 0.19) and first.executed[0].completed is True
    assert first.verifier.success is True and first.verifier.model_extra == {"pixel_diff": 0.12}
    assert first.timings == {"prefill_s": pytest.approx(0.25), "decode_s": 1.5}
    assert first.prompt.endswith("\n<image>")
    assert steps[1].error == "timeout" and steps[1].stage == "verify"
    assert steps == [s for s in reader]
    assert name1 == "frames/000001.jpg"
    # JPEG is lossy: compare loosely, but shape and dtype exactly, by every accepted name form.
    for name in (name0, "000000", "000000.jpg"):
        back = reader.frame(name)
        assert back.shape == image.shape and back.dtype == np.uint8
        assert np.abs(back.astype(int) - image.astype(int)).mean() < 4
    # One record per line, and the file is plain JSON (no NaN literals).
    lines = (writer.path / "steps.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(line)["index"] == i for i, line in enumerate(lines))


def test_steps_accept_dataclasses_and_numpy(tmp_path: Path) -> None:
    """Runtime objects go in as they are: ArmState tuples, numpy vectors, SafetyDecision, MoveResult."""
    step = StepRecord(
        index=0,
        t=np.float64(0.5),
        wall_time=time.time(),
        ee_position=np.array([0.3, 0.01, 0.2], dtype=np.float32),
        gripper_open=np.bool_(False),
        action=Action(0.01, 0.0, 0.0, 1.0).as_list(),
        safety=[SafetyDecision(rule="gripper", verdict="reject", reason="gripper 0.5 is not 0 or 1", index=2)],
        executed=[MoveResult(completed=False, reached=(0.1, 0.2, 0.3), error_m=0.02, duration_s=0.1, note="e-stop")],
        verifier=Verdict(success=False, reason="the gripper did not move", verifier="heuristic", latency_s=0.01,
                         fallback_from="gemini", error="timeout after 5 s"),
    )
    assert step.verifier.success is False and step.verifier.fallback_from == "gemini"
    assert json.loads(step.to_line())["verifier"]["latency_s"] == 0.01
    assert step.ee_position == pytest.approx((0.3, 0.01, 0.2))
    assert step.gripper_open is False
    assert step.executed[0].note == "e-stop" and step.safety[0].verdict == "reject"


def test_nan_and_inf_are_written_as_null(tmp_path: Path) -> None:
    with EpisodeWriter.create(tmp_path, make_meta()) as writer:
        writer.append_step(
            make_step(
                0, ee_position=(np.nan, 0.0, 0.1), action=[np.inf, 0.0, 0.0, 1.0], timings={"decode_s": float("nan")}
            )
        )
        writer.finish("failed")
    line = (writer.path / "steps.jsonl").read_text(encoding="utf-8")
    assert "NaN" not in line and "Infinity" not in line
    raw = json.loads(line)
    assert raw["ee_position"][0] is None and raw["action"][0] is None and raw["timings"]["decode_s"] is None
    step = EpisodeReader(writer.path).steps()[0]
    assert math.isnan(step.ee_position[0]) and math.isnan(step.action[0]) and math.isnan(step.timings["decode_s"])


def test_extra_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra"):
        make_meta(extra={"path": tmp_path})


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-10**6, 10**6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    position=st.tuples(finite_or_not, finite_or_not, finite_or_not),
    text=st.text(max_size=200),
    actions=st.lists(st.lists(finite_or_not, min_size=4, max_size=4), max_size=5),
)
def test_any_step_round_trips(tmp_path_factory, position, text, actions) -> None:
    """Every field comes back equal, with non-finite numbers as NaN, whatever the model wrote."""
    root = tmp_path_factory.mktemp("ep")
    step = make_step(0, ee_position=position, raw_text=text, parsed_actions=actions, extra={"note": text})
    with EpisodeWriter.create(root, make_meta()) as writer:
        writer.append_step(step)
        writer.finish("success")
    (back,) = EpisodeReader(writer.path).steps()
    (line,) = (writer.path / "steps.jsonl").read_bytes().splitlines()  # one record, one line

    def same(a: float, b: float) -> bool:
        return (not math.isfinite(a) and math.isnan(b)) or a == b

    assert all(same(a, b) for a, b in zip(position, back.ee_position))
    assert all(same(a, b) for row, row_back in zip(actions, back.parsed_actions) for a, b in zip(row, row_back))
    assert back.raw_text == text and back.extra == {"note": text}
    assert json.loads(line)["index"] == 0


# ---------------------------------------------------------------------------------------------- damage


def write_lines(path: Path, lines: list[str], tail: bytes = b"") -> None:
    path.write_bytes("".join(line + "\n" for line in lines).encode() + tail)


def test_truncated_last_line_is_skipped_and_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    for i in range(3):
        writer.append_step(make_step(i))
    writer.close()
    steps_file = writer.path / "steps.jsonl"
    half = make_step(3).to_line().encode()[:40]
    with open(steps_file, "ab") as f:
        f.write(half)
    reader = EpisodeReader(writer.path)
    assert [s.index for s in reader.steps()] == [0, 1, 2]
    assert reader.truncated is True
    assert reader.outcome == "interrupted"
    assert "truncated_step" in caplog.text


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.close()
    write_lines(writer.path / "steps.jsonl", [make_step(0).to_line()], make_step(1).to_line().encode())
    reader = EpisodeReader(writer.path)
    assert len(reader) == 2 and not reader.truncated


def test_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.close()
    write_lines(writer.path / "steps.jsonl", [make_step(0).to_line(), '{"index": 1, "t": 0.1', make_step(2).to_line()])
    with pytest.raises(EpisodeFormatError, match=r"steps\.jsonl line 2 is not a valid step"):
        EpisodeReader(writer.path).steps()


def test_invalid_field_in_complete_last_line_is_an_error(tmp_path: Path) -> None:
    """A line ending in a newline was written completely: bad content there is corruption, not a crash."""
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.close()
    write_lines(
        writer.path / "steps.jsonl", [make_step(0).to_line(), json.dumps({"index": -1, "t": 0, "wall_time": 0})]
    )
    with pytest.raises(EpisodeFormatError, match=r"line 2 .*index"):
        EpisodeReader(writer.path).steps()


def test_missing_or_bad_meta_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EpisodeFormatError, match="meta.json is missing"):
        EpisodeReader(tmp_path)
    with pytest.raises(EpisodeFormatError, match="does not exist"):
        EpisodeReader(tmp_path / "nope")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(EpisodeFormatError, match="not valid JSON"):
        EpisodeReader(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(EpisodeFormatError, match="instruction"):
        EpisodeReader(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 99, "instruction": "x"}))
    with pytest.raises(EpisodeFormatError, match="format version 99"):
        EpisodeReader(tmp_path)
    assert issubclass(EpisodeFormatError, UserError)


def test_frame_names_cannot_escape_the_episode(tmp_path: Path) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.close()
    reader = EpisodeReader(writer.path)
    with pytest.raises(EpisodeFormatError, match="outside"):
        reader.frame("../meta.json")
    with pytest.raises(EpisodeFormatError, match="missing"):
        reader.frame("000007")
    with pytest.raises(ValueError, match="frame name"):
        writer2 = EpisodeWriter.create(tmp_path, make_meta())
        writer2.write_frame(gradient_image(), name="../x")


CRASH_CHILD = textwrap.dedent(
    """
    import sys, time
    from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeWriter, StepRecord
    writer = EpisodeWriter.create(sys.argv[1], EpisodeMeta(instruction="crash me"), episode_id="crash")
    i = 0
    while True:
        writer.append_step(StepRecord(index=i, t=writer.elapsed(), wall_time=time.time(),
                                      raw_text="x" * 3000, action=[0.0, 0.0, 0.01, 1.0]))
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_mid_episode_keeps_every_completed_step(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    completed = -1
    try:
        deadline = time.monotonic() + 30
        while completed < 30 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            completed = int(line)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert completed >= 30, child.stderr.read()
    assert child.returncode == -signal.SIGKILL
    reader = EpisodeReader(tmp_path / "crash")
    steps = reader.steps()
    assert len(steps) >= completed + 1  # every step reported complete is there
    assert [s.index for s in steps] == list(range(len(steps)))
    assert reader.outcome == "interrupted" and reader.meta.outcome is None


# ---------------------------------------------------------------------------------------------- finish


def test_failed_finish_leaves_old_meta_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.append_step(make_step(0))

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(EpisodeWriteError, match="cannot record the outcome"):
        writer.finish("success")
    reader = EpisodeReader(writer.path)  # old meta.json: valid, still "running"
    assert reader.meta.outcome is None and reader.outcome == "interrupted"
    assert len(reader) == 1
    assert [p.name for p in writer.path.iterdir() if p.name.startswith(".")] == []  # temp file removed
    monkeypatch.undo()
    writer.finish("success")  # a retry works
    assert EpisodeReader(writer.path).outcome == "success"


def test_meta_is_valid_json_whenever_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading meta.json right before and right after the rename sees a whole file each time."""
    writer = EpisodeWriter.create(tmp_path, make_meta())
    seen: list[str | None] = []
    real_replace = os.replace

    def watching_replace(src, dst):
        seen.append(json.loads(Path(dst).read_text())["outcome"])
        real_replace(src, dst)
        seen.append(json.loads(Path(dst).read_text())["outcome"])

    monkeypatch.setattr(os, "replace", watching_replace)
    writer.finish("aborted", "user pressed stop")
    assert seen == [None, "aborted"]


def test_context_manager_records_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="camera unplugged"):
        with EpisodeWriter.create(tmp_path, make_meta()) as writer:
            writer.append_step(make_step(0))
            raise RuntimeError("camera unplugged")
    reader = EpisodeReader(writer.path)
    assert reader.outcome == "error"
    assert reader.meta.outcome_detail == "RuntimeError: camera unplugged"
    assert len(reader) == 1


def test_context_manager_keeps_an_explicit_outcome_and_marks_interrupts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with EpisodeWriter.create(tmp_path, make_meta()) as finished:
            finished.finish("failed", "dropped the carrot")
            raise ValueError("after finish")
    assert EpisodeReader(finished.path).outcome == "failed"
    with pytest.raises(KeyboardInterrupt):
        with EpisodeWriter.create(tmp_path, make_meta()) as interrupted:
            raise KeyboardInterrupt
    assert EpisodeReader(interrupted.path).meta.outcome == "interrupted"


def test_nothing_is_written_after_finish(tmp_path: Path) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.finish("success")
    with pytest.raises(EpisodeWriteError, match="closed"):
        writer.append_step(make_step(0))
    with pytest.raises(EpisodeWriteError, match="already finished"):
        writer.finish("failed")
    with pytest.raises(ValueError, match="outcome must be one of"):
        EpisodeWriter.create(tmp_path, make_meta()).finish("great")  # type: ignore[arg-type]


def test_step_indices_must_be_consecutive(tmp_path: Path) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    with pytest.raises(ValueError, match="out of order"):
        writer.append_step(make_step(1))
    writer.append_step(make_step(0))
    assert writer.next_index == 1


# ---------------------------------------------------------------------------------------------- creation


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    EpisodeWriter.create(tmp_path, make_meta(), episode_id="ep1").close()
    with pytest.raises(EpisodeExistsError, match="already exists"):
        EpisodeWriter.create(tmp_path, make_meta(), episode_id="ep1")
    with pytest.raises(EpisodeWriteError, match="already exists"):
        writer = EpisodeWriter.create(tmp_path, make_meta())
        writer.write_frame(gradient_image(), name="a")
        writer.write_frame(gradient_image(), name="a")
    with pytest.raises(ValueError, match="episode id"):
        EpisodeWriter.create(tmp_path, make_meta(), episode_id="../evil")


def test_generated_ids_sort_by_time() -> None:
    ids = [new_episode_id(1_800_000_000.0 + dt) for dt in (0.0, 0.001, 0.5, 3600.0, 86400.0 * 400)]
    assert ids == sorted(ids)
    assert ids[0].startswith("20270115T080000.000Z-")


def test_bad_frames_are_refused(tmp_path: Path) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        writer.write_frame(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        writer.write_frame(np.zeros((4, 4), dtype=np.uint8))
    assert writer.write_frame(Image.new("L", (8, 8)), name="gray.jpg") == "frames/gray.jpg"


# ---------------------------------------------------------------------------------------------- disk errors


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_on_append_raises_and_keeps_earlier_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.append_step(make_step(0))
    writer.append_step(make_step(1))
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(fd, data):  # one partial write, then the disk is full
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(EpisodeWriteError, match="No space left on device") as info:
        writer.append_step(make_step(2))
    assert isinstance(info.value, Vlm2VlaError)
    reader = EpisodeReader(writer.path)
    assert [s.index for s in reader.steps()] == [0, 1] and not reader.truncated  # the half line was cut off
    monkeypatch.setattr(os, "write", real_write)  # space freed: the same step can be written now
    writer.append_step(make_step(2))
    writer.finish("success")
    assert [s.index for s in EpisodeReader(writer.path).steps()] == [0, 1, 2]


def test_enospc_on_frame_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(EpisodeWriteError, match="cannot write frame"):
        writer.write_frame(gradient_image())
    assert list((writer.path / "frames").iterdir()) == []


def test_unrecoverable_partial_write_stops_further_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = EpisodeWriter.create(tmp_path, make_meta())
    writer.append_step(make_step(0))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:10])) if len(data) > 10 else enospc())
    monkeypatch.setattr(os, "ftruncate", enospc)
    with pytest.raises(EpisodeWriteError):
        writer.append_step(make_step(1))
    monkeypatch.undo()
    with pytest.raises(EpisodeWriteError, match="no more steps"):
        writer.append_step(make_step(1))
    writer.finish("error", "disk full")  # the outcome can still be recorded
    reader = EpisodeReader(writer.path)
    assert len(reader) == 1 and reader.truncated and reader.outcome == "error"


def test_enospc_on_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(EpisodeWriteError, match="cannot create episode folder"):
        EpisodeWriter.create(tmp_path, make_meta(), episode_id="full")


# ---------------------------------------------------------------------------------------------- listing


def test_list_episodes_by_start_time(tmp_path: Path) -> None:
    # Ids that sort differently from the start times: the order must come from meta.json.
    for episode_id, start in (("c", 300.0), ("a", 200.0), ("b", 100.0)):
        EpisodeWriter.create(tmp_path, make_meta(start_wall_time=start), episode_id=episode_id).close()
    (tmp_path / "not-an-episode").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    broken = tmp_path / "0broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{")
    assert [p.name for p in list_episodes(tmp_path)] == ["b", "a", "c", "0broken"]
    with pytest.raises(UserError, match="does not exist"):
        list_episodes(tmp_path / "missing")


def test_list_episodes_with_generated_ids(tmp_path: Path) -> None:
    made = []
    for _ in range(3):
        writer = EpisodeWriter.create(tmp_path, make_meta())
        writer.finish("success")
        made.append(writer.path)
    assert list_episodes(tmp_path) == made
    assert sorted(p.name for p in made) == [p.name for p in made]


def test_module_writes_no_secret_fields() -> None:
    names = set(EpisodeMeta.model_fields) | set(StepRecord.model_fields)
    assert not any(word in name for name in names for word in ("key", "token", "secret", "password"))
    assert episode_mod.FORMAT_VERSION == 1
