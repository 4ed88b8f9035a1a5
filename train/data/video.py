"""Camera frames as video files: decode the frames a dataset's steps need, encode an episode's frames.

LeRobot datasets keep their cameras as MP4 videos (AV1 by default, H.264 in older or converted
sets), one frame per dataset step at the dataset's fps. This module reads and writes them with PyAV
(`pip install 'vlm2vla-edge[video]'`), whose wheels carry their own FFmpeg: no system FFmpeg, no
torchvision, no GPU. PyAV is imported only when a video is actually touched, so the importers, the
exporter and the runtime work without it on datasets that hold no video.

Why frames are found by timestamp and not by counting: a LeRobot v3 video file holds many episodes
back to back (an episode starts at its `from_timestamp`), encoders may drop or duplicate frames, and
decoders report each frame's presentation time. So a step's frame is the decoded frame whose time is
nearest to the step's timestamp, and a step with no frame within `tolerance_s` is an error (a
misaligned video must not silently feed wrong images to training).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Sequence

import numpy as np

from vlm2vla_edge.runtime.errors import UserError

log = logging.getLogger(__name__)

#: Encoders tried for `codec="auto"`, best first: AV1 (LeRobot's default), then H.264, then MPEG-4 part 2.
AUTO_CODECS: tuple[str, ...] = ("libsvtav1", "libx264", "mpeg4")
#: Short names a user may give for a codec.
CODEC_ALIASES = {"av1": "libsvtav1", "h264": "libx264", "mpeg4": "mpeg4"}


def require_av() -> ModuleType:
    """PyAV, or a `UserError` that says how to install it."""
    try:
        import av
    except ImportError:
        raise UserError(
            "decoding and encoding camera videos needs PyAV: pip install 'vlm2vla-edge[video]' (or pip install av)"
        ) from None
    return av


def _has_encoder(av: Any, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - PyAV raises UnknownCodecError (or ValueError in older releases)
        return False
    return True


def choose_codec(requested: str = "auto") -> str:
    """The FFmpeg encoder for `requested` ("auto", "av1", "h264", "mpeg4" or an encoder name) that this PyAV has."""
    av = require_av()
    if requested == "auto":
        for name in AUTO_CODECS:
            if _has_encoder(av, name):
                return name
        raise UserError(f"this PyAV build has none of the video encoders {', '.join(AUTO_CODECS)}")
    name = CODEC_ALIASES.get(requested, requested)
    if not _has_encoder(av, name):
        raise UserError(f"this PyAV build has no '{name}' video encoder; use --vcodec auto")
    return name


# ---------------------------------------------------------------------------------------------- decoding


def decode_frames(path: str | Path, timestamps: Sequence[float], tolerance_s: float) -> list[np.ndarray]:
    """The RGB frame (H x W x 3 uint8) nearest to each timestamp (seconds on the video's own clock).

    Decodes from the keyframe before the first timestamp up to the last one, and converts only the
    frames that some timestamp picks. Raises `ValueError` naming the file when the file cannot be
    decoded or a timestamp has no frame within `tolerance_s`.
    """
    av = require_av()
    if not timestamps:
        return []
    path = Path(path)
    wanted = np.asarray(timestamps, dtype=float)  # (N,)
    order = np.argsort(wanted, kind="stable")
    first, last = float(wanted[order[0]]), float(wanted[order[-1]])
    best: list[tuple[float, Any] | None] = [None] * len(wanted)  # per timestamp: (distance, frame)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if first - tolerance_s > 0 and stream.time_base:
                container.seek(int((first - tolerance_s) / float(stream.time_base)), stream=stream, backward=True)
            cursor = 0  # first position in `order` whose timestamp can still improve
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base)
                if t > last + tolerance_s:
                    break
                # Timestamps well behind this frame are settled: a later frame is only farther away.
                while cursor < len(order) and wanted[order[cursor]] < t - tolerance_s:
                    cursor += 1
                for i in order[cursor:]:
                    target = float(wanted[i])
                    if target > t + tolerance_s:
                        break
                    distance = abs(t - target)
                    if best[i] is None or distance < best[i][0]:
                        best[i] = (distance, frame)
    except (
        av.error.FFmpegError,
        OSError,
    ) as exc:  # a damaged or missing file (PyAV's errors subclass ValueError/OSError)
        raise ValueError(f"{path} cannot be decoded ({type(exc).__name__}: {exc})") from None
    missing = [float(wanted[i]) for i, found in enumerate(best) if found is None]
    if missing:
        raise ValueError(
            f"{path} has no frame within {tolerance_s * 1000:.0f} ms of {len(missing)} step timestamp(s), first at "
            f"{missing[0]:.3f} s: the video and the data do not line up"
        )
    converted: dict[int, np.ndarray] = {}
    out = []
    for found in best:
        frame = found[1]  # type: ignore[index]
        key = id(frame)
        if key not in converted:
            converted[key] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
        out.append(converted[key])
    return out


# ---------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class VideoSettings:
    """How frames are encoded. Defaults follow LeRobot's recorder: yuv420p, a keyframe every 2 frames
    (cheap random access for training loaders), constant rate factor 30 for AV1 / 23 for H.264."""

    codec: str = "auto"  # "auto", "av1", "h264", "mpeg4" or an FFmpeg encoder name
    crf: int | None = None  # None: the codec's default above
    gop: int = 2
    pix_fmt: str = "yuv420p"


class VideoWriter:
    """Appends RGB frames at a fixed fps to one MP4 file; frame i is shown at i / fps seconds.

    Frames must all have the size of the first one. yuv420p needs even sizes, so odd widths or heights
    are padded by repeating the last row or column (and `padded` says so).
    """

    def __init__(self, path: str | Path, fps: int, settings: VideoSettings = VideoSettings()) -> None:
        self._av = require_av()
        self.path = Path(path)
        self.fps = int(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.settings = settings
        self.codec = choose_codec(settings.codec)
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per file at its default level; errors only
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = self._av.open(str(self.path), mode="w")
        self._stream: Any = None
        self.size: tuple[int, int] | None = None  # (height, width) of the frames given
        self.padded = False
        self.frames = 0

    def _open_stream(self, height: int, width: int) -> None:
        stream = self._container.add_stream(self.codec, rate=Fraction(self.fps, 1))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = self.settings.pix_fmt
        stream.codec_context.time_base = Fraction(1, self.fps)
        stream.codec_context.gop_size = self.settings.gop
        crf = self.settings.crf
        if crf is None:
            crf = 30 if self.codec == "libsvtav1" else 23
        options = {"crf": str(crf)} if self.codec in ("libsvtav1", "libx264") else {"qscale": "3"}
        if self.codec == "libx264":
            # No B-frames (decode order = display order, which Rerun's LeRobot reader needs without an FFmpeg);
            # a forced keyframe is an IDR frame, so an episode can be cut out at its first frame.
            options.update({"bf": "0", "forced-idr": "1"})
        if self.codec == "libsvtav1":
            options["preset"] = "8"  # fast; quality is set by crf
        stream.options = options
        self._stream = stream
        self.size = (height, width)
        self.padded = bool(width % 2 or height % 2)

    def add(self, rgb: np.ndarray, *, keyframe: bool = False) -> None:
        """Encode one frame (H x W x 3 uint8); `keyframe` forces it to be one (an episode's first frame in a file
        shared by many episodes: readers then cut the episode out without decoding its neighbour)."""
        array = np.asarray(rgb)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"a video frame must be an H x W x 3 uint8 RGB array, got {array.shape} {array.dtype}")
        if self._stream is None:
            self._open_stream(array.shape[0], array.shape[1])
        if array.shape[:2] != self.size:
            raise ValueError(f"frame {self.frames} of {self.path} is {array.shape[1]}x{array.shape[0]}, the video is "
                             f"{self.size[1]}x{self.size[0]}: one camera stream has one size")  # type: ignore[index]
        if self.padded:
            array = np.pad(array, ((0, array.shape[0] % 2), (0, array.shape[1] % 2), (0, 0)), mode="edge")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
        frame.pts = self.frames
        frame.time_base = Fraction(1, self.fps)
        if keyframe:
            frame.pict_type = self._av.video.frame.PictureType.I
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self._container is None:
            return
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def video_info(path: str | Path, settings_codec: str) -> dict[str, Any]:
    """The `info` block LeRobot keeps per video feature in meta/info.json (codec, size, fps, pixel format)."""
    av = require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return {
            "video.height": stream.codec_context.height,
            "video.width": stream.codec_context.width,
            "video.codec": stream.codec_context.codec.canonical_name,  # "av1", "h264" (as LeRobot records it)
            "video.pix_fmt": stream.codec_context.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": int(round(float(rate))) if rate else None,
            "video.channels": 3,
            "has_audio": False,
            "encoder": settings_codec,
        }


__all__ = [
    "AUTO_CODECS", "VideoSettings", "VideoWriter", "choose_codec", "decode_frames", "require_av", "video_info",
]
