"""Recorded frames inlined as `data:` URIs, within a byte budget, so the page needs no files and no network.

The recorded JPEG bytes are embedded as they are (never re-encoded): the page shows exactly what the
policy saw. A frame that cannot be shown (missing, not a JPEG, outside the episode, over budget)
becomes a placeholder that says why.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Iterable

from vlm2vla_edge.runtime.episode import EpisodeFormatError, EpisodeReader, StepRecord

#: One image larger than this is not embedded (a camera frame is tens of kB; this is a broken file).
MAX_IMAGE_BYTES = 4 << 20
#: Embedded image bytes per page; beyond it frames show as placeholders (keeps the page openable).
MAX_TOTAL_IMAGE_BYTES = 48 << 20

_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Frame:
    """One captioned thumbnail: the image as a data URI, or (uri None) why it is not shown."""

    name: str | None  # the recorded file name; None when the step recorded no frame
    caption: str
    uri: str | None = None
    why: str = ""


class FrameEmbedder:
    """Turns recorded frame names into `Frame`s with the file's bytes inlined, within a byte budget."""

    def __init__(self, reader: EpisodeReader, budget: int = MAX_TOTAL_IMAGE_BYTES) -> None:
        self.reader = reader
        self.budget = budget
        self.embedded = 0
        self.missing: list[str] = []
        self._cache: dict[str, str] = {}

    def frame(self, name: str | None, caption: str) -> Frame:
        if not name:
            return Frame(None, caption)
        uri, why = self.data_uri(name)
        return Frame(name, caption, uri, why)

    def data_uri(self, name: str) -> tuple[str | None, str]:
        """(data URI, "") or (None, why it is not shown)."""
        if name in self._cache:
            return self._cache[name], ""
        try:
            path = self.reader.frame_path(name)
        except EpisodeFormatError:
            return None, "path outside the episode"
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                return None, f"too large ({size // 1024} kB)"
            if self.embedded + size > self.budget:
                return None, "omitted: report image budget reached"
            data = path.read_bytes()
        except FileNotFoundError:
            self.missing.append(name)
            return None, "missing"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        if not data.startswith(_JPEG_MAGIC):
            return None, "not a JPEG file"
        self.embedded += len(data)
        uri = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
        self._cache[name] = uri
        return uri, ""

    def any_missing(self, steps: Iterable[StepRecord]) -> bool:
        """Whether some frame named in steps.jsonl is not a file (checked up front, for the header)."""
        for s in steps:
            for name in [s.image, *s.images.values()]:
                if name:
                    try:
                        if not self.reader.frame_path(name).is_file():
                            return True
                    except EpisodeFormatError:
                        return True
        return False
