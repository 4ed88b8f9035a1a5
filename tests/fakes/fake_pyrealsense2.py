"""A fake `pyrealsense2` module: the colour-stream subset of librealsense's Python API.

Same names and failure reports as the real module: `pipeline.start` raises
RuntimeError("No device connected") without a camera, `wait_for_frames(timeout_ms)` raises
RuntimeError("Frame didn't arrive within <timeout_ms>") after waiting that long when no frame comes
(camera stalled or unplugged), a pipeline started before an unplug stays dead after the camera comes
back (it must be restarted), `stop()` before `start()` raises, and a frame carries a frame number, a
timestamp in milliseconds with its domain, and optional `time_of_arrival` metadata.
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

STREAM_COLOR = "stream.color"
FORMAT_RGB8 = "format.rgb8"
INFO_SERIAL = "camera_info.serial_number"
INFO_NAME = "camera_info.name"
DOMAIN_HARDWARE = "timestamp_domain.hardware_clock"
DOMAIN_SYSTEM = "timestamp_domain.system_time"
DOMAIN_GLOBAL = "timestamp_domain.global_time"
META_ARRIVAL = "frame_metadata_value.time_of_arrival"


@dataclass
class FakeDevice:
    """One camera on the fake USB bus."""

    serial: str = "123456789012"
    name: str = "Intel RealSense D435"
    plugged: bool = True
    stalled: bool = False  # connected but sending nothing
    domain: str = DOMAIN_GLOBAL
    supports_arrival: bool = True
    lag_s: float = 0.0  # age of every frame when delivered
    lags: list[float] = field(default_factory=list)  # per-frame ages, consumed first
    repeat_last: bool = False  # deliver the previous frame again (same number, same timestamp)
    frame_interval_s: float = 0.0
    modes: tuple[tuple[int, int, int], ...] = ((640, 480, 30), (640, 480, 15), (1280, 720, 30), (320, 240, 30))
    generation: int = 0  # bumped by every unplug: pipelines started before it are dead
    frame_number: int = 0

    def unplug(self) -> None:
        self.plugged = False
        self.generation += 1

    def plug(self) -> None:
        self.plugged = True


@dataclass
class FakeRealSense:
    """The fake bus: cameras, plus a record of what the driver did."""

    devices: list[FakeDevice] = field(default_factory=lambda: [FakeDevice()])
    starts: int = 0
    stops: int = 0
    waits: int = 0
    configs: list[dict[str, Any]] = field(default_factory=list)
    plug_back_after_queries: int | None = None  # replug unplugged cameras after this many device queries
    queries: int = 0

    def device(self, serial: str | None = None) -> FakeDevice:
        return next(d for d in self.devices if serial is None or d.serial == serial)


def _build_module(bus: FakeRealSense) -> types.ModuleType:
    rs = types.ModuleType("pyrealsense2")
    rs.stream = types.SimpleNamespace(color=STREAM_COLOR, depth="stream.depth")
    rs.format = types.SimpleNamespace(rgb8=FORMAT_RGB8, bgr8="format.bgr8", z16="format.z16")
    rs.camera_info = types.SimpleNamespace(serial_number=INFO_SERIAL, name=INFO_NAME)
    rs.timestamp_domain = types.SimpleNamespace(
        hardware_clock=DOMAIN_HARDWARE, system_time=DOMAIN_SYSTEM, global_time=DOMAIN_GLOBAL
    )
    rs.frame_metadata_value = types.SimpleNamespace(time_of_arrival=META_ARRIVAL)

    class device:
        def __init__(self, hw: FakeDevice) -> None:
            self._hw = hw

        def get_info(self, info: str) -> str:
            if info == INFO_SERIAL:
                return self._hw.serial
            if info == INFO_NAME:
                return self._hw.name
            raise RuntimeError("object doesn't support given camera info")

    class device_list:
        def __init__(self, items: list[device]) -> None:
            self._items = items

        def __len__(self) -> int:
            return len(self._items)

        def __getitem__(self, index: int) -> device:
            return self._items[index]

        def __iter__(self):
            return iter(self._items)

    class context:
        def query_devices(self) -> device_list:
            bus.queries += 1
            if bus.plug_back_after_queries is not None and bus.queries >= bus.plug_back_after_queries:
                for hw in bus.devices:
                    hw.plug()
            return device_list([device(hw) for hw in bus.devices if hw.plugged])

    class config:
        def __init__(self) -> None:
            self.serial: str | None = None
            self.streams: list[tuple[Any, ...]] = []

        def enable_device(self, serial: str) -> None:
            self.serial = serial

        def enable_stream(self, stream_type: str, width: int, height: int, format: str, framerate: int) -> None:
            self.streams.append((stream_type, width, height, format, framerate))

    class video_frame:
        def __init__(
            self, number: int, image: np.ndarray, timestamp_ms: float, domain: str, arrival_ms: float | None
        ) -> None:
            self._number, self._image, self._ts, self._domain, self._arrival = (
                number,
                image,
                timestamp_ms,
                domain,
                arrival_ms,
            )

        def __bool__(self) -> bool:
            return True

        def get_data(self) -> np.ndarray:
            return self._image

        def get_width(self) -> int:
            return self._image.shape[1]

        def get_height(self) -> int:
            return self._image.shape[0]

        def get_frame_number(self) -> int:
            return self._number

        def get_timestamp(self) -> float:
            return self._ts

        def get_frame_timestamp_domain(self) -> str:
            return self._domain

        def supports_frame_metadata(self, value: str) -> bool:
            return value == META_ARRIVAL and self._arrival is not None

        def get_frame_metadata(self, value: str) -> int:
            if not self.supports_frame_metadata(value):
                raise RuntimeError("metadata not supported")
            return int(self._arrival)

    class composite_frame:
        def __init__(self, color: video_frame) -> None:
            self._color = color

        def get_color_frame(self) -> video_frame:
            return self._color

    class pipeline_profile:
        def __init__(self, hw: FakeDevice) -> None:
            self._hw = hw

        def get_device(self) -> device:
            return device(self._hw)

    class pipeline:
        def __init__(self, ctx: Any = None) -> None:
            self._hw: FakeDevice | None = None
            self._generation = -1
            self._mode: tuple[int, int, int] | None = None
            self._last: video_frame | None = None

        def start(self, cfg: config | None = None) -> pipeline_profile:
            if self._hw is not None:
                raise RuntimeError("start() cannot be called before stop()")
            plugged = [hw for hw in bus.devices if hw.plugged]
            if not plugged:
                raise RuntimeError("No device connected")
            serial = cfg.serial if cfg is not None else None
            matches = [hw for hw in plugged if serial is None or hw.serial == serial]
            if not matches:
                raise RuntimeError("No device connected")
            hw = matches[0]
            mode = (640, 480, 30)
            if cfg is not None:
                for stream_type, width, height, fmt, fps in cfg.streams:
                    if stream_type == STREAM_COLOR:
                        if (width, height, fps) not in hw.modes or fmt != FORMAT_RGB8:
                            raise RuntimeError("Couldn't resolve requests")
                        mode = (width, height, fps)
                bus.configs.append({"serial": cfg.serial, "streams": list(cfg.streams)})
            self._hw, self._generation, self._mode = hw, hw.generation, mode
            hw.frame_number = 0
            bus.starts += 1
            return pipeline_profile(hw)

        def stop(self) -> None:
            if self._hw is None:
                raise RuntimeError("stop() cannot be called before start()")
            self._hw = None
            bus.stops += 1

        def wait_for_frames(self, timeout_ms: int = 5000) -> composite_frame:
            if self._hw is None:
                raise RuntimeError("wait_for_frames cannot be called before start()")
            bus.waits += 1
            hw = self._hw
            if not hw.plugged or hw.generation != self._generation or hw.stalled:
                time.sleep(timeout_ms / 1000.0)
                raise RuntimeError(f"Frame didn't arrive within {timeout_ms}")
            if hw.frame_interval_s:
                time.sleep(hw.frame_interval_s)
            if hw.repeat_last and self._last is not None:
                return composite_frame(self._last)
            hw.frame_number += 1
            lag = hw.lags.pop(0) if hw.lags else hw.lag_s
            width, height, _ = self._mode
            image = np.full((height, width, 3), hw.frame_number % 256, dtype=np.uint8)
            wall_ms = (time.time() - lag) * 1000.0
            ts = (
                wall_ms
                if hw.domain in (DOMAIN_SYSTEM, DOMAIN_GLOBAL)
                else time.monotonic() * 1000.0 - lag * 1000.0 + 12345.0
            )
            frame = video_frame(hw.frame_number, image, ts, hw.domain, wall_ms if hw.supports_arrival else None)
            self._last = frame
            return composite_frame(frame)

    rs.device = device
    rs.device_list = device_list
    rs.context = context
    rs.config = config
    rs.pipeline = pipeline
    rs.pipeline_profile = pipeline_profile
    rs.video_frame = video_frame
    rs.composite_frame = composite_frame
    return rs


def install(monkeypatch: pytest.MonkeyPatch, bus: FakeRealSense) -> FakeRealSense:
    """Put the fake `pyrealsense2` into sys.modules for the duration of one test."""
    monkeypatch.setitem(sys.modules, "pyrealsense2", _build_module(bus))
    return bus
