"""The episode format: one folder per episode, written by the runtime, the simulator and the importers, read by train/.

An episode folder holds::

    <episode_id>/                e.g. 20261114T103512.123Z-3fa9c1 (sortable UTC time + random suffix)
      meta.json                  EpisodeMeta: instruction, robot, camera, units, bundle, times, outcome
      steps.jsonl                one StepRecord per line, append-only
      frames/000012.jpg          observation image of step 12 (more named images per step allowed,
      frames/000012_after.jpg    e.g. the post-action frame)

Why it is built this way:

- **Crash safety.** `steps.jsonl` is append-only and every `append_step` ends with `fsync`, also of
  the frames written since the previous step, so a crash or a power loss loses at most the step in
  flight. A line cut off by a crash can only be the last one: the reader skips it with a warning and
  sets `EpisodeReader.truncated`; any other malformed line is corruption and raises
  `EpisodeFormatError` naming file and line.
- **meta.json is valid at every moment.** It is written once at creation (outcome `null`, meaning
  "running") and rewritten by `finish` through a temporary file, `fsync`, `os.replace` and an `fsync`
  of the folder. An episode whose outcome is still `null` when read was never finished: the reader
  reports it as `"interrupted"`, and `mark_interrupted` (run by the daemon at start) records that in
  meta.json. A writer holds an exclusive `flock` on its steps.jsonl from before meta.json exists until
  it closes, so an episode still being written is never taken for a dead one; the kernel drops the
  lock when the process dies, SIGKILL included.
- **Plain JSON.** numpy scalars and arrays become numbers and lists; non-finite numbers (NaN, inf)
  are written as `null`, because JSON has none, and numeric vectors read them back as NaN. Nothing
  here holds credentials: the format has no field for them.
- **Disk errors are reported, not hidden.** Any `OSError` (ENOSPC, EIO, ...) while writing becomes
  `EpisodeWriteError`; a half-written line is cut back off so the steps already written stay readable.
- **Versioned.** `meta.json` carries `format_version`; a reader refuses a newer version than it knows
  (a field added to the format bumps the version). The user-facing spec is `EPISODE_FORMAT.md`.

Typical use::

    with EpisodeWriter.create(root, EpisodeMeta(instruction="put the carrot on the plate")) as ep:
        image = ep.write_frame(frame.image)                     # "frames/000000.jpg"
        ep.append_step(StepRecord(index=ep.next_index, t=ep.elapsed(), wall_time=time.time(),
                                  ee_position=state.position, image=image, action=[0, 0, -0.02, 1]))
        ep.finish("success")
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Iterator, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError
from vlm2vla_edge.runtime.files import atomic_write, fsync_dir, write_all

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; mark_interrupted then skips nothing it cannot lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Version of the on-disk format written by this module. Bump it when a field is added or changed.
FORMAT_VERSION = 1

META_FILE = "meta.json"
STEPS_FILE = "steps.jsonl"
FRAMES_DIR = "frames"

Outcome = Literal["success", "failed", "aborted", "error", "interrupted"]
OUTCOMES: tuple[str, ...] = ("success", "failed", "aborted", "error", "interrupted")

#: Stage names the runtime and the simulator write; the field is open so later parts can add stages.
KNOWN_STAGES: tuple[str, ...] = ("subtasks", "motion", "action", "verify", "demo")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class EpisodeFormatError(UserError):
    """An episode folder or file is missing, malformed or of a newer format; the message names file and line."""


class EpisodeWriteError(Vlm2VlaError):
    """Writing an episode failed (disk full, I/O error, finished episode); steps already written stay readable."""


class EpisodeExistsError(UserError):
    """The episode folder already exists; episodes are never overwritten."""


# ---------------------------------------------------------------------------------------------- numbers


def _null_to_nan(value: Any) -> Any:
    return math.nan if value is None else value


#: A float that may be non-finite in memory; written as JSON null, read back as NaN.
Num = Annotated[float, BeforeValidator(_null_to_nan)]
NumVec3 = tuple[Num, Num, Num]  # a `Vec3` (runtime.actions) as episodes store it: NaN allowed, null in JSON


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Plain JSON data from numpy, tuples, dataclasses and models; non-finite floats become None.

    Raises `TypeError` naming `where` for anything JSON cannot hold, so a bad `extra` entry fails when
    the record is built, not halfway through writing it.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, BaseModel):
        return to_jsonable(value.model_dump(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; JSON object keys are strings")
            out[key] = to_jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}, which JSON cannot hold")


def _jsonable_field(value: Any, where: str) -> Any:
    try:
        return to_jsonable(value, where)
    except TypeError as exc:  # pydantic reports ValueError as a validation error
        raise ValueError(str(exc)) from None


def _normalise_input(data: Any) -> Any:
    """numpy values, dataclasses (SafetyDecision, MoveResult) and tuples in constructor input become JSON types."""
    if isinstance(data, dict):
        return {k: (v if isinstance(v, BaseModel) else _plain(v)) for k, v in data.items()}
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return to_jsonable(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(value)
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, BaseModel) else _plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- models


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_input(cls, data: Any) -> Any:
        return _normalise_input(data)


class EpisodeMeta(_Record):
    """What an episode is: written at creation, rewritten once by `finish` with the outcome and end time."""

    format_version: int = Field(FORMAT_VERSION, ge=1, description="On-disk format version (EPISODE_FORMAT.md).")
    episode_id: str | None = Field(None, description="Folder name; set by the writer.")
    instruction: str = Field(description="The task in natural language, as given to the policy.")
    source: str | None = Field(
        None, description='Who wrote the episode: "runtime", "sim", "teleop", "import:bridge", ...'
    )
    robot_name: str | None = Field(None, description="RobotConfig.name of the robot setup.")
    robot_model: str | None = Field(None, description='RobotConfig.model, e.g. "wx250s".')
    camera: str | None = Field(None, description='Which camera took the frames, e.g. "realsense:123456", "sim".')
    action_units: str = Field("m", description="Unit of dx, dy, dz in actions and of positions.")
    grammar_version: str | None = Field(None, description="Version of grammars/ the policy used.")
    bundle_id: str | None = Field(
        None, description="Model bundle identifier (from its manifest); None without a model."
    )
    adapter: str | None = Field(
        None, description="The bundle's LoRA adapter (skill) the policy applied at run time; None for a merged model."
    )
    start_wall_time: Num | None = Field(None, description="Unix time (UTC seconds) of the start; set by the writer.")
    end_wall_time: Num | None = Field(None, description="Unix time of the end; set by finish.")
    outcome: Outcome | None = Field(None, description="None while running (or never finished).")
    outcome_detail: str | None = Field(None, description="One sentence on why the episode ended so.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Free-form JSON for tools; not read by the runtime."
    )

    @field_validator("extra")
    @classmethod
    def _json_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _jsonable_field(value, "extra")


class SafetyRecord(_Record):
    """One safety-limiter decision (mirrors `SafetyDecision.to_dict()`)."""

    rule: str
    verdict: str  # "pass" | "clamp" | "reject"
    reason: str
    index: int | None = None  # position of the action in its chunk; None for chunk-level rules


class ExecutedCommand(_Record):
    """One command sent to the arm and what happened (the fields of `MoveResult`, plus the target)."""

    target: NumVec3 | None = None  # commanded end-effector position, base frame
    gripper_open: bool | None = None
    completed: bool | None = None  # False when stopped (cancel, e-stop) before the target
    reached: NumVec3 | None = None
    error_m: Num | None = None
    duration_s: Num | None = None
    note: str = ""


class VerifierRecord(_Record):
    """A verifier's verdict on a step (the fields of `runtime.verifier.base.Verdict`, which goes in as it is).

    Open to extra fields: a verifier may report more than these.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    success: bool | None = None  # None: no decision
    reason: str = ""
    verifier: str | None = None  # "gemini", "heuristic", ...
    latency_s: Num | None = None
    attempts: int | None = None
    fallback_from: str | None = None
    error: str | None = None
    cancelled: bool = False


class StepRecord(_Record):
    """One line of steps.jsonl. Only index, t and wall_time are required; policy runs fill the rest by stage.

    Poses are in the robot base frame in `EpisodeMeta.action_units`; `action` is the commanded
    `[dx, dy, dz, gripper]` with gripper 1 = open, 0 = closed.
    """

    index: int = Field(ge=0, description="Line number in steps.jsonl, from 0, consecutive.")
    t: Num = Field(description="Seconds since the episode start (monotonic clock).")
    wall_time: Num = Field(description="Unix time when the record was made.")
    ee_position: NumVec3 | None = None
    ee_rpy: NumVec3 | None = None
    gripper_open: bool | None = None
    action: list[Num] | None = None
    image: str | None = Field(None, description='Observation frame, relative path: "frames/000012.jpg".')
    images: dict[str, str] = Field(default_factory=dict, description='Other named images: {"after": "frames/..."}.')
    # Policy runs.
    stage: str | None = None  # one of KNOWN_STAGES, or a later part's own
    subtask_index: int | None = None
    subtask: str | None = None
    prompt: str | None = None  # full text given to the model for this generation
    raw_text: str | None = None  # what the model wrote, unparsed
    subtasks: list[str] | None = None  # parsed subtask list (stage "subtasks")
    motion_plan: str | None = None  # parsed motion text (stage "motion")
    parsed_actions: list[list[Num]] | None = None  # parsed chunk (stage "action")
    safety: list[SafetyRecord] | None = None
    executed: list[ExecutedCommand] | None = None
    verifier: VerifierRecord | None = None
    timings: dict[str, Num] | None = None  # *_s / *_ms durations, other names counts ({"prefill_tokens": 23})
    error: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _json_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _jsonable_field(value, "extra")

    def to_line(self) -> str:
        """One JSON line (no newline), unset fields left out, non-finite numbers as null."""
        data = {k: v for k, v in to_jsonable(self.model_dump(), "step").items() if v is not None}
        if not data.get("images"):
            data.pop("images", None)
        if not data.get("extra"):
            data.pop("extra", None)
        # Numbers that are NaN became None above and must stay as null, not vanish: re-add required ones.
        for key in ("t", "wall_time"):
            data.setdefault(key, None)
        return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _meta_json(meta: EpisodeMeta) -> bytes:
    data = to_jsonable(meta.model_dump(), "meta")
    return (json.dumps(data, ensure_ascii=False, allow_nan=False, indent=2) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------- files


def new_episode_id(now: float | None = None) -> str:
    """A sortable UTC timestamp (milliseconds) plus a random suffix: `20261114T103512.123Z-3fa9c1`."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return f"{stamp:%Y%m%dT%H%M%S}.{stamp.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def _check_name(name: str, what: str) -> None:
    if not _SAFE_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )


def _encode_jpeg(image: np.ndarray | Image.Image, quality: int) -> bytes:
    if isinstance(image, Image.Image):
        pil = image if image.mode == "RGB" else image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"a frame must be an H x W x 3 uint8 RGB array, got shape {array.shape} {array.dtype}")
        pil = Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- writer


class EpisodeWriter:
    """Writes one episode folder. Thread-safe; use `create`, then `write_frame` / `append_step`, then `finish`.

    As a context manager it records outcome "error" (or "interrupted" for KeyboardInterrupt and
    SystemExit) with the exception's message when the block raises before `finish`.
    """

    def __init__(self, path: Path, meta: EpisodeMeta, jpeg_quality: int, fd: int) -> None:
        """Use `EpisodeWriter.create`; this only binds an already-created folder."""
        self.path = path
        self._meta = meta
        self._jpeg_quality = jpeg_quality
        self._fd: int | None = fd
        self._size = os.fstat(fd).st_size  # bytes of complete lines in steps.jsonl
        self._next_index = 0
        self._frames_dirty = False
        self._broken: str | None = None  # why appending is no longer safe
        self._start_monotonic = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        meta: EpisodeMeta,
        episode_id: str | None = None,
        *,
        jpeg_quality: int = 90,
    ) -> "EpisodeWriter":
        """Make `root/<episode_id>/` with meta.json (outcome null), an empty steps.jsonl and frames/.

        The id defaults to `meta.episode_id`, else a new sortable one. An existing folder is never
        overwritten: `EpisodeExistsError`.
        """
        if not 1 <= jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be between 1 and 95, got {jpeg_quality}")
        if meta.outcome is not None:
            raise ValueError(f"a new episode starts without an outcome, got outcome={meta.outcome!r}")
        episode_id = episode_id or meta.episode_id or new_episode_id()
        _check_name(episode_id, "episode id")
        root = Path(root)
        path = root / episode_id
        meta = meta.model_copy(
            update={
                "episode_id": episode_id,
                "format_version": FORMAT_VERSION,
                "start_wall_time": meta.start_wall_time if meta.start_wall_time is not None else time.time(),
            }
        )
        try:
            root.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path)
            except FileExistsError:
                raise EpisodeExistsError(
                    f"episode folder {path} already exists; episodes are never overwritten"
                ) from None
        except OSError as exc:
            raise EpisodeWriteError(f"cannot create episode folder {path}: {exc.strerror or exc}") from exc
        fd: int | None = None
        try:
            (path / FRAMES_DIR).mkdir()
            # The lock comes before meta.json: a folder with a meta.json and an unlocked steps file is dead.
            fd = os.open(path / STEPS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            _try_lock(fd)
            atomic_write(path / META_FILE, _meta_json(meta))
            os.fsync(fd)
            fsync_dir(path)
            fsync_dir(root)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(path, ignore_errors=True)  # a half-made folder is no episode (a full disk, say)
            raise EpisodeWriteError(f"cannot create episode folder {path}: {exc.strerror or exc}") from exc
        log.info("episode=%s event=created path=%s", episode_id, path)
        return cls(path, meta, jpeg_quality, fd)

    # -- state

    @property
    def meta(self) -> EpisodeMeta:
        return self._meta

    @property
    def episode_id(self) -> str:
        return self.path.name

    @property
    def next_index(self) -> int:
        """The index the next `append_step` must carry (steps are numbered 0, 1, 2, ...)."""
        return self._next_index

    @property
    def finished(self) -> bool:
        return self._meta.outcome is not None

    def elapsed(self) -> float:
        """Seconds since `create` on the monotonic clock: the `t` of a step made now."""
        return time.monotonic() - self._start_monotonic

    # -- writing

    def write_frame(self, image: np.ndarray | Image.Image, name: str | None = None, *, tag: str | None = None) -> str:
        """Save a JPEG under frames/ and return its path relative to the episode ("frames/000012.jpg").

        `name` defaults to the next step's index (`000012`), with `_<tag>` appended when a tag is given
        (`tag="after"` -> `000012_after`). Names are never reused. The file is durable once the next
        `append_step` returns.
        """
        if name is None:
            name = f"{self._next_index:06d}" + (f"_{tag}" if tag else "")
        elif tag:
            raise ValueError("give either a frame name or a tag, not both")
        if name.lower().endswith(".jpg"):
            name = name[:-4]
        _check_name(name, "frame name")
        data = _encode_jpeg(image, self._jpeg_quality)
        relative = f"{FRAMES_DIR}/{name}.jpg"
        target = self.path / relative
        with self._lock:
            self._check_writable()
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise EpisodeWriteError(f"frame {target} already exists; frame names are never reused") from None
            except OSError as exc:
                raise EpisodeWriteError(f"cannot write frame {target}: {exc.strerror or exc}") from exc
            try:
                try:
                    write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    target.unlink()
                raise EpisodeWriteError(f"cannot write frame {target}: {exc.strerror or exc}") from exc
            self._frames_dirty = True
        return relative

    def append_step(self, step: StepRecord) -> None:
        """Append one line to steps.jsonl and fsync it (and the frames written before it).

        A failed write is cut back off the file so earlier steps stay readable; if that is impossible
        the writer refuses further steps (the cut line stays last, where the reader tolerates it).
        """
        if not isinstance(step, StepRecord):
            raise TypeError(f"append_step takes a StepRecord, got {type(step).__name__}")
        line = (step.to_line() + "\n").encode("utf-8")
        with self._lock:
            self._check_writable()
            if step.index != self._next_index:
                raise ValueError(
                    f"step index {step.index} is out of order; the next step of {self.path} is {self._next_index}"
                )
            assert self._fd is not None
            try:
                if self._frames_dirty:
                    fsync_dir(self.path / FRAMES_DIR)
                    self._frames_dirty = False
                write_all(self._fd, line)
                os.fsync(self._fd)
            except OSError as exc:
                self._recover_partial_write()
                raise EpisodeWriteError(
                    f"cannot append step {step.index} to {self.path / STEPS_FILE}: {exc.strerror or exc}; "
                    f"the {self._next_index} steps before it are kept"
                ) from exc
            self._size += len(line)
            self._next_index += 1

    def _recover_partial_write(self) -> None:
        assert self._fd is not None
        try:
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
        except OSError as exc:
            self._broken = f"a failed write could not be undone ({exc.strerror or exc})"
            log.error("episode=%s event=steps_file_broken reason=%r", self.episode_id, self._broken)

    def _check_writable(self) -> None:
        if self.finished or self._fd is None:
            raise EpisodeWriteError(
                f"episode {self.path} is closed (outcome {self._meta.outcome!r}); nothing more can be written"
            )
        if self._broken:
            raise EpisodeWriteError(f"episode {self.path} takes no more steps: {self._broken}")

    def finish(self, outcome: Outcome, detail: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """Record the outcome and end time by atomically rewriting meta.json, then close the steps file.

        `extra` is merged into `meta.extra` (summary figures known only at the end).

        If the rewrite fails (`EpisodeWriteError`) the old meta.json stays intact and `finish` may be retried.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        with self._lock:
            if self.finished:
                raise EpisodeWriteError(f"episode {self.path} is already finished with outcome {self._meta.outcome!r}")
            update: dict[str, Any] = {"outcome": outcome, "outcome_detail": detail, "end_wall_time": time.time()}
            if extra:
                update["extra"] = {**self._meta.extra, **to_jsonable(extra)}
            meta = self._meta.model_copy(update=update)
            try:
                atomic_write(self.path / META_FILE, _meta_json(meta))
            except OSError as exc:
                raise EpisodeWriteError(
                    f"cannot record the outcome in {self.path / META_FILE}: {exc.strerror or exc}"
                ) from exc
            self._meta = meta
            self._close_fd()
        log.info("episode=%s event=finished outcome=%s steps=%d", self.episode_id, outcome, self._next_index)

    def close(self) -> None:
        """Release the steps file without an outcome (the episode then reads as "interrupted")."""
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.finished:
            if exc is not None:
                outcome: Outcome = "error" if isinstance(exc, Exception) else "interrupted"
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                try:
                    self.finish(outcome, detail)
                except Vlm2VlaError as finish_exc:  # never hide the exception that ended the block
                    log.error("episode=%s event=finish_failed reason=%r", self.episode_id, str(finish_exc))
            else:
                log.warning("episode=%s event=closed_unfinished (it will read as interrupted)", self.episode_id)
        self.close()


# ---------------------------------------------------------------------------------------------- reader


class EpisodeReader:
    """Reads one episode folder. Tolerates a last line cut off by a crash; rejects any other damage."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not self.path.is_dir():
            raise EpisodeFormatError(f"episode folder {self.path} does not exist")
        if not meta_path.is_file():
            raise EpisodeFormatError(f"{meta_path} is missing: {self.path} is not an episode folder")
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EpisodeFormatError(f"{meta_path} is not valid JSON: {exc}") from exc
        except OSError as exc:
            raise EpisodeFormatError(f"cannot read {meta_path}: {exc.strerror or exc}") from exc
        version = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise EpisodeFormatError(
                f"{meta_path} has format version {version}, newer than {FORMAT_VERSION}; "
                "upgrade vlm2vla-edge to read it"
            )
        try:
            self.meta = EpisodeMeta.model_validate(data)
        except ValidationError as exc:
            raise EpisodeFormatError(f"{meta_path} is not a valid episode meta: {_first_error(exc)}") from exc
        self._steps: list[StepRecord] | None = None
        self._truncated = False

    @property
    def episode_id(self) -> str:
        return self.path.name

    @property
    def outcome(self) -> Outcome:
        """The recorded outcome; an episode never finished (crash, power loss, still running) is "interrupted"."""
        return self.meta.outcome or "interrupted"

    @property
    def truncated(self) -> bool:
        """True when the last line of steps.jsonl was cut off (a crash mid-write) and was skipped."""
        self.steps()
        return self._truncated

    def steps(self) -> list[StepRecord]:
        """Every complete step, in file order (read once, then cached)."""
        if self._steps is None:
            self._steps, self._truncated = self._read_steps()
        return self._steps

    def __len__(self) -> int:
        return len(self.steps())

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.steps())

    def _read_steps(self) -> tuple[list[StepRecord], bool]:
        steps_path = self.path / STEPS_FILE
        try:
            raw = steps_path.read_bytes()
        except FileNotFoundError:
            raise EpisodeFormatError(f"{steps_path} is missing") from None
        except OSError as exc:
            raise EpisodeFormatError(f"cannot read {steps_path}: {exc.strerror or exc}") from exc
        lines = raw.split(b"\n")
        # The text after the last newline is the only place a crash can cut a line.
        tail = lines.pop()
        steps: list[StepRecord] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                steps.append(_parse_step(line))
            except ValueError as exc:
                raise EpisodeFormatError(f"{steps_path} line {number} is not a valid step: {exc}") from exc
        truncated = False
        if tail.strip(b"\x00 \t\r"):
            try:
                steps.append(_parse_step(tail))  # complete record that only lacks its newline
            except ValueError:
                truncated = True
                log.warning(
                    "episode=%s event=truncated_step line=%d bytes=%d (cut off by a crash; skipped)",
                    self.episode_id, len(lines) + 1, len(tail),
                )
        return steps, truncated

    def frame_path(self, name: str) -> Path:
        """Path of a frame given as recorded ("frames/000012.jpg") or by bare name ("000012", "000012.jpg")."""
        relative = name if "/" in name else f"{FRAMES_DIR}/{name if name.lower().endswith('.jpg') else name + '.jpg'}"
        path = (self.path / relative).resolve()
        if not path.is_relative_to((self.path / FRAMES_DIR).resolve()):
            raise EpisodeFormatError(f"frame name {name!r} points outside {self.path / FRAMES_DIR}")
        return path

    def frame(self, name: str) -> np.ndarray:
        """The frame as an H x W x 3 uint8 RGB array."""
        path = self.frame_path(name)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except FileNotFoundError:
            raise EpisodeFormatError(f"frame {path} is missing") from None
        except (OSError, Image.DecompressionBombError) as exc:
            raise EpisodeFormatError(f"frame {path} cannot be decoded: {exc}") from exc


def _parse_step(line: bytes) -> StepRecord:
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return StepRecord.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "record"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {error['msg']}{more}"


def _try_lock(fd: int) -> bool:
    """Take the exclusive advisory lock on an episode's steps file; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


#: Why `mark_interrupted` closed an episode.
INTERRUPTED_DETAIL = "the process recording this episode stopped before it ended (crash, kill or power loss)"


def mark_interrupted(root: str | os.PathLike[str], detail: str = INTERRUPTED_DETAIL) -> list[Path]:
    """Record outcome "interrupted" in every episode under `root` that was never finished and that no live
    writer holds, with its end time taken from the last write to steps.jsonl. Returns those folders.

    Safe while other processes record into `root`: their episodes are locked and left alone. Folders that
    cannot be read or are of a newer format are left as they are (the reader reports them).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    marked: list[Path] = []
    for child in sorted(root.iterdir()):
        meta_path, steps_path = child / META_FILE, child / STEPS_FILE
        if child.name.startswith(".") or not meta_path.is_file() or not steps_path.is_file():
            continue
        try:
            fd = os.open(steps_path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # a live writer
            data = json.loads(meta_path.read_text(encoding="utf-8"))  # read under the lock: final
            if not isinstance(data, dict) or data.get("outcome") is not None:
                continue
            if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
                continue
            meta = EpisodeMeta.model_validate(data).model_copy(
                update={"outcome": "interrupted", "outcome_detail": detail, "end_wall_time": os.fstat(fd).st_mtime}
            )
            atomic_write(meta_path, _meta_json(meta))
            marked.append(child)
            log.warning("episode=%s event=marked_interrupted reason=%r", child.name, detail)
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, invalid meta (the reader says why)
            log.warning("episode=%s event=mark_interrupted_skipped reason=%r", child.name, str(exc)[:200])
        finally:
            os.close(fd)
    return marked


def list_episodes(root: str | os.PathLike[str]) -> list[Path]:
    """Episode folders directly under `root` (those with a meta.json), oldest first by start time.

    Folders whose meta.json cannot be read come last, by name, with a warning; the reader reports why.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"episode folder {root} does not exist")
    keyed: list[tuple[int, float, str, Path]] = []
    for child in root.iterdir():
        if not child.is_dir() or child.name.startswith(".") or not (child / META_FILE).is_file():
            continue
        try:
            start = json.loads((child / META_FILE).read_text(encoding="utf-8")).get("start_wall_time")
            if not isinstance(start, (int, float)):
                raise ValueError("no start_wall_time")
            keyed.append((0, float(start), child.name, child))
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("episode=%s event=unreadable_meta reason=%r", child.name, str(exc))
            keyed.append((1, 0.0, child.name, child))
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]
