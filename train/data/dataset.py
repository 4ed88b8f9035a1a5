"""The labelled dataset on disk: `dataset.json` + `samples.jsonl` + `images/` (format version 1).

Written by the relabelling tools (`train/data`), read by the LoRA dataset builder (`train/lora`). The
format itself is documented in `vlm2vla_edge.train.data` (the package docstring); this module is its
only writer and reader, so both sides agree by construction.

Why it is built this way:

- **Complete or absent.** `samples.jsonl` and the images are written first; `dataset.json`, which holds
  the content hash of `samples.jsonl`, is written last and atomically. A folder without `dataset.json`
  is an unfinished write, and the reader refuses it; a `samples.jsonl` whose hash does not match is
  refused too (someone edited or truncated it), so a training run never sees half a dataset.
- **Never overwritten.** The writer refuses a destination that holds a dataset or any other files:
  relabelling into a new folder is cheap, losing a labelled dataset is not. An unfinished write (no
  `dataset.json`, only `samples.jsonl` and `images/`) is not a dataset and is started over, so an
  interrupted run can be repeated with the same command.
- **Self-contained.** Key frames are copied into `images/<episode>/`; sample paths are relative to the
  dataset folder, so the folder can be moved or shared as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.files import atomic_write, sha256_file

#: Version of the labelled dataset format written here. Readers refuse newer versions.
FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
SAMPLES_FILE = "samples.jsonl"
IMAGES_DIR = "images"

Stage = Literal["subtasks", "motion", "action", "aux"]
STAGES: tuple[str, ...] = ("subtasks", "motion", "action", "aux")

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DatasetFormatError(UserError):
    """A labelled dataset folder is missing, unfinished, edited or of a newer format; the message says which."""


class Sample(BaseModel):
    """One training sample: the inputs of one stage's prompt and the answer the model must learn.

    Stage by stage (see the package docstring for the full table): `subtasks` answers
    `format_subtasks(subtasks)`; `motion` answers a motion-plan line given `subtask`; `action` answers
    `format_action_chunk(...)` given `subtask` and `motion_plan`; `aux` answers a motion-plan-style
    direction phrase to the self-contained question held in `instruction`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Unique in the dataset: '<episode>/<step:06d>/<stage>'.")
    episode: str = Field(min_length=1, description="Source episode id.")
    step: int = Field(ge=0, description="Index of the episode step (steps.jsonl `index`) the sample is taken at.")
    stage: Stage
    instruction: str = Field(min_length=1, description="The task as given to the robot (aux: the whole question).")
    subtask: str | None = None
    subtask_index: int | None = Field(None, ge=0)
    subtasks: list[str] | None = None
    motion_plan: str | None = Field(None, description="The plan given as input to the action stage.")
    target: str = Field(min_length=1, description="The answer text the model must produce.")
    image: str | None = Field(None, description="Key frame, relative to the dataset folder.")
    scene: str | None = Field(None, description="Text observation for text-only models.")

    @model_validator(mode="after")
    def _stage_fields(self) -> "Sample":
        if self.stage in ("motion", "action") and (self.subtask is None or self.subtask_index is None):
            raise ValueError(f"a {self.stage} sample needs subtask and subtask_index")
        if self.stage == "action" and self.motion_plan is None:
            raise ValueError("an action sample needs the motion_plan it is conditioned on")
        if self.stage == "subtasks" and not self.subtasks:
            raise ValueError("a subtasks sample needs the subtask list")
        if self.image is not None:
            _check_relative(self.image)
        return self


class SourceEpisode(BaseModel):
    """An episode the dataset was made from, with the hash of its content at relabelling time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    episode: str
    path: str = Field(description="Where it was read from (as given on the command line, resolved).")
    content_hash: str = Field(description="sha256 of meta.json, steps.jsonl and frames (episode_content_hash).")
    annotator: str = Field(description="Who labelled this episode: 'local' or 'gemini:MODEL'.")
    samples: int = Field(ge=0)
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Labels the cloud annotator got wrong and the local annotator replaced, one sentence each.",
    )


class DatasetInfo(BaseModel):
    """dataset.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(FORMAT_VERSION, ge=1)
    created: str = Field(description="UTC time of writing, ISO 8601.")
    annotator: str = Field(description="'local' or 'gemini:MODEL'.")
    action_language: dict[str, Any] = Field(description="ActionLanguage.model_dump() the targets are written in.")
    sources: list[SourceEpisode]
    counts: dict[str, int] = Field(description="Samples per stage.")
    samples_sha256: str = Field(description="sha256 of samples.jsonl.")
    skipped: list[str] = Field(default_factory=list, description="Episodes not labelled, with the reason.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Annotator settings (segmentation, wording).")

    def language(self) -> ActionLanguage:
        return ActionLanguage.model_validate(self.action_language)


@dataclass(frozen=True)
class LabelledDataset:
    """A dataset read back: its info and samples, with images resolved against `path`."""

    path: Path
    info: DatasetInfo
    samples: list[Sample]

    def image_path(self, sample: Sample) -> Path | None:
        return None if sample.image is None else self.path / sample.image

    def by_stage(self, stage: str) -> list[Sample]:
        return [s for s in self.samples if s.stage == stage]

    def __len__(self) -> int:
        return len(self.samples)


def _check_relative(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise ValueError(f"image path {path!r} must be relative to the dataset folder, without '..'")


def episode_content_hash(path: str | os.PathLike[str]) -> str:
    """sha256 over an episode's meta.json, steps.jsonl and every file under frames/ (names and bytes).

    The cache of the cloud annotator is keyed by it: an episode that changes in any way is labelled again.
    """
    root = Path(path)
    digest = hashlib.sha256()
    files = [root / "meta.json", root / "steps.jsonl"]
    frames = root / "frames"
    if frames.is_dir():
        files += sorted(p for p in frames.iterdir() if p.is_file())
    for file in files:
        name = file.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(4, "big") + name)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise DatasetFormatError(f"cannot read {file}: {exc.strerror or exc}") from exc
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _sample_line(sample: Sample) -> str:
    return json.dumps(sample.model_dump(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _prepare_destination(path: Path) -> None:
    """Make `path` an empty folder: new, empty, or an unfinished write (no dataset.json) that is cleared.

    A complete dataset, or a folder holding anything else, is refused: nothing of value is deleted.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder")
    if path.is_dir():
        content = {p.name for p in path.iterdir()}
        if INFO_FILE in content:
            raise UserError(f"{path} already holds a labelled dataset; labelled datasets are never overwritten")
        if content - {SAMPLES_FILE, IMAGES_DIR} or ((path / IMAGES_DIR).exists() and not (path / IMAGES_DIR).is_dir()):
            raise UserError(
                f"{path} already exists and holds other files; choose a new folder for the labelled dataset"
            )
        if content:  # an interrupted relabelling run: start it over
            (path / SAMPLES_FILE).unlink(missing_ok=True)
            shutil.rmtree(path / IMAGES_DIR, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


class DatasetWriter:
    """Writes one labelled dataset folder: `add_episode` per labelled episode, then `finish`."""

    def __init__(self, path: str | os.PathLike[str], annotator: str, action_language: ActionLanguage,
                 settings: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        _prepare_destination(self.path)
        self.annotator = annotator
        self.action_language = action_language
        self.settings = settings or {}
        self._samples = open(self.path / SAMPLES_FILE, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._ids: set[str] = set()
        self._sources: list[SourceEpisode] = []
        self._skipped: list[str] = []
        self._counts = {stage: 0 for stage in STAGES}
        self._finished = False

    def copy_image(self, episode: str, source: Path) -> str:
        """Copy a key frame into images/<episode>/ once; return its path relative to the dataset."""
        if not _SAFE_PART.match(episode) or not _SAFE_PART.match(source.name):
            raise ValueError(f"episode {episode!r} / frame {source.name!r} is not a safe file name")
        relative = f"{IMAGES_DIR}/{episode}/{source.name}"
        target = self.path / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target)
            except OSError as exc:
                raise DatasetFormatError(f"cannot copy frame {source}: {exc.strerror or exc}") from exc
        return relative

    def add_episode(self, source: SourceEpisode, samples: Iterable[Sample]) -> None:
        """Append one episode's samples (ids must be new) and record the episode as a source."""
        if self._finished:
            raise RuntimeError("the dataset is already finished")
        count = 0
        lines = []
        for sample in samples:
            if sample.id in self._ids:
                raise ValueError(f"sample id {sample.id!r} occurs twice")
            self._ids.add(sample.id)
            self._counts[sample.stage] += 1
            lines.append(_sample_line(sample) + "\n")
            count += 1
        self._samples.write("".join(lines))
        self._sources.append(source.model_copy(update={"samples": count}))

    def skip(self, episode: str, reason: str) -> None:
        self._skipped.append(f"{episode}: {reason}")

    def finish(self) -> DatasetInfo:
        """Close samples.jsonl and write dataset.json (last, atomically): the dataset is now complete."""
        self._samples.flush()
        os.fsync(self._samples.fileno())
        self._samples.close()
        info = DatasetInfo(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            annotator=self.annotator,
            action_language=self.action_language.model_dump(mode="json"),
            sources=self._sources,
            counts=self._counts,
            samples_sha256=sha256_file(self.path / SAMPLES_FILE),
            skipped=self._skipped,
            settings=self.settings,
        )
        atomic_write(
            self.path / INFO_FILE,
            (json.dumps(info.model_dump(mode="json"), ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
        )
        self._finished = True
        return info

    def abort(self) -> None:
        """Close the samples file without writing dataset.json: the folder stays an unfinished write."""
        if not self._samples.closed:
            self._samples.close()


def write_dataset(
    path: str | os.PathLike[str],
    episodes: Iterable[tuple[SourceEpisode, list[Sample]]],
    *,
    annotator: str,
    action_language: ActionLanguage,
    settings: dict[str, Any] | None = None,
) -> DatasetInfo:
    """Write a whole dataset at once (samples whose `image` is already relative to `path`)."""
    writer = DatasetWriter(path, annotator, action_language, settings)
    try:
        for source, samples in episodes:
            writer.add_episode(source, samples)
        return writer.finish()
    finally:
        writer.abort()


def samples_hash(path: str | os.PathLike[str]) -> str:
    """The content hash of a dataset: sha256 of its samples.jsonl."""
    return sha256_file(Path(path) / SAMPLES_FILE)


def read_dataset(path: str | os.PathLike[str], *, check_images: bool = True) -> LabelledDataset:
    """Read and check a labelled dataset folder (complete, unmodified, known version, images present)."""
    root = Path(path)
    info_path, samples_path = root / INFO_FILE, root / SAMPLES_FILE
    if not root.is_dir():
        raise DatasetFormatError(f"labelled dataset folder {root} does not exist")
    if not info_path.is_file():
        hint = " (an unfinished relabelling run?)" if samples_path.exists() else ""
        raise DatasetFormatError(f"{info_path} is missing: {root} is not a complete labelled dataset{hint}")
    try:
        data = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{info_path} cannot be read as JSON: {exc}") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise DatasetFormatError(
            f"{info_path} has format version {version}, newer than {FORMAT_VERSION}; upgrade vlm2vla-edge"
        )
    try:
        info = DatasetInfo.model_validate(data)
    except ValidationError as exc:
        raise DatasetFormatError(f"{info_path} is not a valid dataset description: {_first_error(exc)}") from exc
    if not samples_path.is_file():
        raise DatasetFormatError(f"{samples_path} is missing")
    actual = sha256_file(samples_path)
    if actual != info.samples_sha256:
        raise DatasetFormatError(f"{samples_path} does not match the hash in {info_path}: it was changed after writing")
    samples: list[Sample] = []
    with open(samples_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                samples.append(Sample.model_validate_json(line))
            except ValidationError as exc:
                raise DatasetFormatError(
                    f"{samples_path} line {number} is not a valid sample: {_first_error(exc)}"
                ) from exc
    dataset = LabelledDataset(root, info, samples)
    if check_images:
        for sample in samples:
            image = dataset.image_path(sample)
            if image is not None and not image.is_file():
                raise DatasetFormatError(f"sample {sample.id} names image {sample.image}, which is missing from {root}")
    return dataset


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "record"
    return f"{where}: {error['msg']}"
