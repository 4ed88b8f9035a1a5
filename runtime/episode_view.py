"""An episode in the Rerun viewer (`vlm2vla-edge episode view DIR`), live or as an `.rrd` file.

The HTML report (`runtime/report/`, needing only Jinja2) is the everyday view; this one is for people who already debug
robots in Rerun: every record of the episode lands on two timelines (`step`: the steps.jsonl index,
`time`: seconds since the episode start), so frames, the end-effector path, actions, safety
decisions and each stage's text can be scrubbed together. `rerun-sdk` is an optional extra
(`pip install 'vlm2vla-edge[viewer]'`), imported only here and only when the command runs.

Entities (all positions in the robot base frame, metres, z up):

- `episode` (static text document): instruction, outcome and where the episode came from;
- `camera/image`: the observation frame of a step (the recorded JPEG, not re-encoded);
  `camera/<name>` for a step's other named images (`after`: the frame after the action);
- `world/path` (static): the whole end-effector path; `world/ee`: the end effector at this step;
- `world/action`: the commanded move as an arrow from the end effector; `world/chunk`: a policy's
  parsed action chunk as the path it would take; `world/executed`: targets the arm was sent and
  where it got to;
- `plot/action/{dx,dy,dz,gripper}`, `plot/gripper_open`: time series;
- `text/<stage>`: per record the subtask list, the motion plan, what the model wrote, the verdict,
  errors (level ERROR), as a text log;
- `safety`: each limiter decision (pass INFO, clamp WARN, reject ERROR) with its rule and reason.

Where the recording goes: `--out FILE.rrd` writes a file; otherwise a Rerun viewer already listening
on this machine (the default gRPC port) receives it, and when none is running it is saved as
`DIR/episode.rrd` (`rerun DIR/episode.rrd` opens it; so does the web viewer). `--spawn` starts a viewer.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vlm2vla_edge.runtime.episode import EpisodeReader, StepRecord
from vlm2vla_edge.runtime.errors import UserError

log = logging.getLogger(__name__)

APPLICATION_ID = "vlm2vla-edge"
RRD_FILE = "episode.rrd"
#: Rerun's default gRPC port: a viewer started with `rerun` listens there.
VIEWER_PORT = 9876

_LEVELS = {"pass": "INFO", "clamp": "WARN", "reject": "ERROR"}


def require_rerun() -> ModuleType:
    """The Rerun SDK, or a `UserError` that says how to install it."""
    try:
        import rerun
    except ImportError:
        raise UserError(
            "episode view needs the Rerun SDK: pip install 'vlm2vla-edge[viewer]' (or pip install rerun-sdk); "
            "'vlm2vla-edge episode report DIR' needs nothing"
        ) from None
    return rerun


def viewer_listening(host: str = "127.0.0.1", port: int = VIEWER_PORT, timeout_s: float = 0.2) -> bool:
    """True when something accepts connections on the viewer's port (a running `rerun`)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class ViewResult:
    """Where the recording went and how much was logged."""

    destination: str  # the .rrd path, or the viewer's address
    saved: bool  # True: written to a file
    records: int  # steps.jsonl records logged
    frames: int  # images logged


def _text(step: StepRecord) -> tuple[str, str] | None:
    """The text of one record for its stage's log, and its level."""
    parts: list[str] = []
    level = "INFO"
    if step.subtask:
        parts.append(
            f"subtask {step.subtask_index}: {step.subtask}"
            if step.subtask_index is not None
            else f"subtask: {step.subtask}"
        )
    if step.subtasks:
        parts.append("subtasks: " + json.dumps(step.subtasks, ensure_ascii=False))
    if step.motion_plan and step.stage != "action":
        parts.append(f"plan: {step.motion_plan}")
    if step.raw_text is not None:
        parts.append(f"model wrote: {step.raw_text}")
    if step.parsed_actions:
        parts.append(f"parsed: {json.dumps(step.parsed_actions)}")
    if step.verifier is not None:
        verdict = {True: "success", False: "not yet", None: "no decision"}[step.verifier.success]
        parts.append(f"verifier ({step.verifier.verifier or '?'}): {verdict}: {step.verifier.reason}")
        level = "INFO" if step.verifier.success else "WARN"
    if step.error:
        parts.append(f"error: {step.error}")
        level = "ERROR"
    return ("\n".join(parts), level) if parts else None


def log_episode(reader: EpisodeReader, recording: Any, rr: ModuleType) -> tuple[int, int]:
    """Log every record of the episode to `recording`; returns (records, frames)."""
    meta = reader.meta
    steps = reader.steps()
    header = [
        f"# {meta.instruction}",
        "",
        f"- outcome: {reader.outcome}" + (f" ({meta.outcome_detail})" if meta.outcome_detail else ""),
        f"- episode: {reader.episode_id}",
        f"- source: {meta.source or 'unknown'}",
        f"- robot: {meta.robot_name or meta.robot_model or 'unknown'}",
        f"- steps: {len(steps)}",
    ]
    if meta.bundle_id:
        header.append(f"- model bundle: {meta.bundle_id}")
    recording.log("episode", rr.TextDocument("\n".join(header), media_type="text/markdown"), static=True)
    recording.log("world", rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
    path = [s.ee_position for s in steps if s.ee_position is not None]
    if len(path) >= 2:
        recording.log("world/path", rr.LineStrips3D([path], colors=[[120, 120, 120]]), static=True)
    frames = 0
    for step in steps:
        recording.set_time("step", sequence=step.index)
        recording.set_time("time", duration=float(step.t) if step.t == step.t else 0.0)
        for name, relative in ([("image", step.image)] if step.image else []) + list(step.images.items()):
            try:
                data = reader.frame_path(relative).read_bytes()
            except OSError as exc:
                log.warning(
                    "episode=%s event=view_frame_missing frame=%s reason=%r", reader.episode_id, relative, str(exc)
                )
                continue
            recording.log(f"camera/{name}", rr.EncodedImage(contents=data, media_type="image/jpeg"))
            frames += 1
        here = step.ee_position
        if here is not None:
            recording.log("world/ee", rr.Points3D([here], radii=[0.008], colors=[[30, 144, 255]]))
        if step.gripper_open is not None:
            recording.log("plot/gripper_open", rr.Scalars([1.0 if step.gripper_open else 0.0]))
        if step.action is not None and len(step.action) >= 4:
            for name, value in zip(("dx", "dy", "dz", "gripper"), step.action[:4]):
                recording.log(f"plot/action/{name}", rr.Scalars([float(value)]))
            if here is not None:
                recording.log(
                    "world/action", rr.Arrows3D(vectors=[step.action[:3]], origins=[here], colors=[[255, 140, 0]])
                )
        if step.parsed_actions and here is not None:
            points = [tuple(here)]
            for move in step.parsed_actions:
                last = points[-1]
                points.append((last[0] + move[0], last[1] + move[1], last[2] + move[2]))
            recording.log("world/chunk", rr.LineStrips3D([points], colors=[[255, 200, 0]]))
        if step.executed:
            targets = [c.target for c in step.executed if c.target is not None]
            reached = [c.reached for c in step.executed if c.reached is not None]
            if targets:
                recording.log("world/executed/target", rr.Points3D(targets, radii=[0.005], colors=[[255, 200, 0]]))
            if reached:
                recording.log("world/executed/reached", rr.Points3D(reached, radii=[0.005], colors=[[0, 200, 80]]))
        for decision in step.safety or []:
            where = f" (action {decision.index})" if decision.index is not None else ""
            recording.log("safety", rr.TextLog(f"{decision.verdict}: {decision.rule}{where}: {decision.reason}",
                                               level=_LEVELS.get(decision.verdict, "INFO")))
        text = _text(step)
        if text is not None:
            recording.log(f"text/{step.stage or 'step'}", rr.TextLog(text[0], level=text[1]))
    return len(steps), frames


def view_episode(path: str | Path, *, out: str | Path | None = None, spawn: bool = False,
                 connect: str | None = None) -> ViewResult:
    """Send the episode at `path` to a Rerun viewer, or save it as an .rrd file (module docstring: which)."""
    rr = require_rerun()
    reader = EpisodeReader(path)
    recording = rr.RecordingStream(APPLICATION_ID, recording_id=reader.episode_id)
    destination: Path | str
    if out is not None:
        destination, saved = Path(out), True
    elif spawn:
        recording.spawn(port=VIEWER_PORT)
        destination, saved = f"viewer on port {VIEWER_PORT} (spawned)", False
    elif connect is not None or viewer_listening():
        recording.connect_grpc(connect)
        destination, saved = connect or f"viewer on port {VIEWER_PORT}", False
    else:
        destination, saved = Path(path) / RRD_FILE, True
    if saved:
        target = Path(destination)
        if target.suffix != ".rrd":
            raise UserError(f"--out {target} must end in .rrd (Rerun's recording file)")
        if not target.parent.is_dir():
            raise UserError(f"--out {target}: the folder {target.parent} does not exist")
        recording.save(str(target))
    records, frames = log_episode(reader, recording, rr)
    recording.flush()
    recording.disconnect()
    return ViewResult(destination=str(destination), saved=saved, records=records, frames=frames)


__all__ = ["RRD_FILE", "ViewResult", "log_episode", "require_rerun", "view_episode", "viewer_listening"]
