"""`FolderCamera`: serves the images of a folder, in file-name order, as camera frames.

For replaying recorded episodes (`frames/*.jpg`) and for running the runtime without a camera.
The folder is listed once, on connect; images are decoded on read, so a file that went bad is
reported by name when its turn comes rather than failing the whole camera up front.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm2vla_edge.runtime.robot.base import Camera, DeviceError, DeviceNotConnectedError, Frame
from vlm2vla_edge.runtime.robot.devices import DeviceSetupError, FolderCameraConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


class EndOfFolder(DeviceError):
    """A non-looping folder camera has served its last image."""


class FolderCamera(Camera):
    """Images of one folder as RGB frames, optionally resized, looping or stopping at the end."""

    def __init__(self, config: FolderCameraConfig) -> None:
        self._config = config
        self._files: list[Path] | None = None
        self._position = 0
        self._index = -1

    @property
    def is_connected(self) -> bool:
        return self._files is not None

    @property
    def files(self) -> list[Path]:
        """The images served, in order (empty when not connected)."""
        return list(self._files or [])

    def connect(self) -> None:
        if self._files is not None:
            return
        folder = self._config.path
        if not folder.exists():
            raise DeviceSetupError(f"folder camera: {folder} does not exist")
        if not folder.is_dir():
            raise DeviceSetupError(f"folder camera: {folder} is not a folder")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DeviceSetupError(f"folder camera: {folder} holds no .png, .jpg or .jpeg images")
        self._files, self._position = files, 0
        log.info("event=camera_connected driver=folder path=%s images=%d", folder, len(files))

    def disconnect(self) -> None:
        self._files = None

    def read(self, timeout_s: float = 1.0) -> Frame:
        files = self._files
        if files is None:
            raise DeviceNotConnectedError("FolderCamera is not connected")
        if self._position >= len(files):
            if not self._config.loop:
                raise EndOfFolder(f"folder camera: all {len(files)} images of {self._config.path} were served")
            self._position = 0
        path = files[self._position]
        self._position += 1
        image = self._load(path)
        self._index += 1
        return Frame(image=image, timestamp=time.monotonic(), index=self._index)

    def _load(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
                if self._config.width is not None and self._config.height is not None:
                    size = (self._config.width, self._config.height)
                    if rgb.size != size:
                        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8).copy()
        except FileNotFoundError as exc:
            raise DeviceError(f"folder camera: image {path} disappeared") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DeviceError(f"folder camera: cannot read image {path} ({exc})") from exc
