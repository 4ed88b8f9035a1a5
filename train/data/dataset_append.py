"""Add episodes' samples to a labelled dataset that may already exist, losing nothing if the run fails.

`DatasetWriter` never overwrites a dataset, which is right for `data relabel`. The data flywheel
(`data dagger`) needs the opposite: grow one dataset run after run. Appending in place would leave a
window where samples.jsonl and dataset.json (which holds samples.jsonl's hash) disagree, and
`read_dataset` would then refuse the whole dataset. So the grown dataset is written as a new dataset in a
hidden sibling folder (old samples first, in their order, old key frames hard-linked, then the new
ones) and swapped in with two renames only when it is complete. A failure before the swap leaves the
old dataset untouched and removes the sibling; a crash between the two renames leaves the old dataset
complete under `.NAME.old-*`, which the error message names.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.train.data.dataset import (
    IMAGES_DIR,
    INFO_FILE,
    DatasetInfo,
    DatasetWriter,
    LabelledDataset,
    Sample,
    SourceEpisode,
    read_dataset,
)


class LanguageMismatch(UserError):
    """The labels would be written in another action language than the dataset's."""


def describe_language(language: ActionLanguage) -> str:
    return f"{language.actions}, {language.decimals} decimals, at most {language.max_steps} actions"


class DatasetAppender:
    """A dataset being grown: a new one at `path`, or a copy of the existing one that replaces it at `finish`.

    `language` is the action language of the samples to add; an existing dataset written in another one
    is refused (`LanguageMismatch`) before anything is written. `existing_episodes` are the episode ids
    already in the dataset: adding one of them again would duplicate its samples' ids.
    """

    def __init__(self, path: str | os.PathLike[str], language: ActionLanguage, annotator: str,
                 settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.previous: LabelledDataset | None = None
        if (self.path / INFO_FILE).exists():
            self.previous = read_dataset(self.path)
            theirs = self.previous.info.language()
            if theirs != language:
                raise LanguageMismatch(
                    f"{self.path} is written in another action language ({describe_language(theirs)}) than these "
                    f"labels ({describe_language(language)}); pass the policy config it was labelled with "
                    "(--policy), or write a new dataset")
        self.existing_episodes = {s.episode for s in self.previous.info.sources} if self.previous else set()
        self._staging: Path | None = None
        if self.previous is None:
            self.writer = DatasetWriter(self.path, annotator, language, settings)
            return
        info = self.previous.info
        self._staging = self.path.parent / f".{self.path.name}.append-{secrets.token_hex(3)}"
        merged = {**info.settings, **{k: v for k, v in settings.items() if k not in info.settings}}
        self.writer = DatasetWriter(self._staging, info.annotator, language, merged)
        try:
            _link_tree(self.path / IMAGES_DIR, self._staging / IMAGES_DIR)
            self._copy_samples(self.previous)
        except BaseException:
            self.abort()
            raise

    @property
    def previous_count(self) -> int:
        return len(self.previous) if self.previous is not None else 0

    def _copy_samples(self, dataset: LabelledDataset) -> None:
        by_episode: dict[str, list[Sample]] = {}
        for sample in dataset.samples:
            by_episode.setdefault(sample.episode, []).append(sample)
        for source in dataset.info.sources:
            self.writer.add_episode(source, by_episode.pop(source.episode, []))
        if by_episode:  # samples of no listed source (a hand-made dataset): keep them, under a source of their own
            for episode, samples in by_episode.items():
                self.writer.add_episode(SourceEpisode(episode=episode, path="", content_hash="", annotator="unknown",
                                                      samples=len(samples)), samples)
        for entry in dataset.info.skipped:
            episode, _, reason = entry.partition(": ")
            self.writer.skip(episode, reason)

    def copy_image(self, episode: str, source: Path) -> str:
        return self.writer.copy_image(episode, source)

    def add_episode(self, source: SourceEpisode, samples: list[Sample]) -> None:
        if source.episode in self.existing_episodes:
            raise ValueError(f"episode {source.episode} is already in {self.path}")
        self.existing_episodes.add(source.episode)
        self.writer.add_episode(source, samples)

    def skip(self, episode: str, reason: str) -> None:
        self.writer.skip(episode, reason)

    def finish(self) -> DatasetInfo:
        """Complete the dataset; for an append, swap the grown copy in place of the old dataset."""
        info = self.writer.finish()
        if self._staging is None:
            return info
        backup = self.path.parent / f".{self.path.name}.old-{secrets.token_hex(3)}"
        os.rename(self.path, backup)
        try:
            os.rename(self._staging, self.path)
        except OSError as exc:
            try:
                os.rename(backup, self.path)
            except OSError:
                raise UserError(f"cannot swap the grown dataset into {self.path} ({exc.strerror or exc}); the old "
                                f"dataset is complete in {backup} and the new one in {self._staging}") from exc
            raise UserError(f"cannot replace {self.path} ({exc.strerror or exc}); it is unchanged") from exc
        self._staging = None
        shutil.rmtree(backup, ignore_errors=True)
        return info

    def abort(self) -> None:
        """Leave everything as it was: an append's staging copy is removed; a new dataset stays unfinished."""
        self.writer.abort()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` under `target` (a copy where links are not possible)."""
    if not source.is_dir():
        return
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


__all__ = ["DatasetAppender", "LanguageMismatch", "describe_language"]
