"""`RealSenseCamera`: the colour stream of an Intel RealSense camera through pyrealsense2.

pyrealsense2 is an optional dependency (the `realsense` extra) imported when the camera connects; it
needs the system library libusb-1.0 just to import. `read()` never hands out a stale frame: a frame
older than `max_age_s` (by its host-clock timestamp or arrival time) or one already returned is
dropped and the next is awaited, within the caller's timeout. An unplugged camera is reopened a
bounded number of times with growing waits; after that `read()` raises and the camera is
disconnected.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType
from typing import Any

import numpy as np

from vlm2vla_edge.runtime.robot.base import Camera, DeviceError, DeviceNotConnectedError, Frame
from vlm2vla_edge.runtime.robot.devices import RealSenseCameraConfig

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0
_WARMUP_TIMEOUT_S = 5.0  # the first frames after start can take a few seconds


def _import_pyrealsense2() -> ModuleType:
    try:
        return importlib.import_module("pyrealsense2")
    except (ImportError, OSError) as exc:
        text = str(exc)
        if "libusb" in text:
            raise DeviceError(
                f"pyrealsense2 cannot load the system library libusb-1.0 ({text}); "
                "install it with: sudo apt-get install libusb-1.0-0"
            ) from exc
        raise DeviceError(
            "pyrealsense2 is not installed: pip install 'vlm2vla-edge[realsense]' "
            "(it also needs the system library libusb-1.0: sudo apt-get install libusb-1.0-0)"
        ) from exc


class RealSenseCamera(Camera):
    """One RealSense colour stream (RGB, uint8) at the configured size and frame rate."""

    def __init__(self, config: RealSenseCameraConfig) -> None:
        self._config = config
        self._rs: ModuleType | None = None
        self._pipeline: Any = None
        self._serial: str | None = None
        self._last_number: int | None = None
        self._index = -1

    @property
    def _sdk(self) -> ModuleType:
        """The pyrealsense2 module, which connect() imports."""
        if self._rs is None:
            raise DeviceError("the RealSense camera is not connected; call connect() first")
        return self._rs

    @property
    def is_connected(self) -> bool:
        return self._pipeline is not None

    @property
    def serial_number(self) -> str | None:
        """Serial number of the open camera (None when not connected)."""
        return self._serial if self._pipeline is not None else None

    # --- connection -------------------------------------------------------------------------------

    def connect(self) -> None:
        if self.is_connected:
            return
        self._rs = _import_pyrealsense2()
        self._start(self._config.serial_number)
        try:
            for _ in range(self._config.warmup_frames):
                self._pipeline.wait_for_frames(int(_WARMUP_TIMEOUT_S * 1000))
        except RuntimeError as exc:
            self._stop_pipeline()
            raise DeviceError(f"RealSense {self._serial} sent no frames after starting ({exc})") from exc
        log.info("event=camera_connected driver=realsense serial=%s", self._serial)

    def _find_device(self, serial: str | None) -> str:
        rs = self._sdk
        serials = [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]
        if not serials:
            raise DeviceError(
                "no RealSense camera is connected (pyrealsense2 sees no device); check the USB 3 cable, "
                "and that `rs-enumerate-devices` lists it"
            )
        if serial is not None:
            if serial not in serials:
                raise DeviceError(f"no RealSense camera with serial number {serial}; connected: {', '.join(serials)}")
            return serial
        if len(serials) > 1:
            raise DeviceError(
                f"{len(serials)} RealSense cameras are connected ({', '.join(serials)}); "
                "set serial_number to choose one"
            )
        return serials[0]

    def _start(self, serial: str | None) -> None:
        rs, config = self._sdk, self._config
        serial = self._find_device(serial)
        pipeline = rs.pipeline()
        stream = rs.config()
        stream.enable_device(serial)
        stream.enable_stream(rs.stream.color, config.width, config.height, rs.format.rgb8, config.fps)
        try:
            pipeline.start(stream)
        except RuntimeError as exc:
            raise DeviceError(
                f"RealSense {serial} cannot stream RGB {config.width}x{config.height} at {config.fps} fps ({exc})"
            ) from exc
        self._pipeline, self._serial, self._last_number = pipeline, serial, None

    def disconnect(self) -> None:
        if self._pipeline is None:
            return
        self._stop_pipeline()
        log.info("event=camera_disconnected driver=realsense serial=%s", self._serial)

    def _stop_pipeline(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        try:
            pipeline.stop()
        except RuntimeError as exc:  # already stopped, or the device is gone
            log.debug("event=camera_stop_failed error=%r", exc)

    def _device_present(self) -> bool:
        try:
            return any(
                d.get_info(self._sdk.camera_info.serial_number) == self._serial
                for d in self._sdk.context().query_devices()
            )
        except RuntimeError:
            return False

    # --- frames -----------------------------------------------------------------------------------

    def read(self, timeout_s: float = 1.0) -> Frame:
        if self._pipeline is None:
            raise DeviceNotConnectedError("RealSenseCamera is not connected")
        deadline = time.monotonic() + timeout_s
        dropped = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceError(
                    f"no fresh frame from RealSense {self._serial} within {timeout_s:g} s "
                    f"({dropped} stale frames dropped, max_age_s {self._config.max_age_s:g})"
                )
            try:
                frames = self._pipeline.wait_for_frames(max(1, int(remaining * 1000)))
            except RuntimeError as exc:
                if self._device_present():
                    raise DeviceError(f"no frame from RealSense {self._serial} within {timeout_s:g} s ({exc})") from exc
                self._reconnect(exc)
                deadline = time.monotonic() + timeout_s  # the reopened camera gets the full budget
                continue
            color = frames.get_color_frame()
            if not color:
                continue
            number = int(color.get_frame_number())
            age = self._age_s(color)
            if (self._last_number is not None and number <= self._last_number) or (
                age is not None and age > self._config.max_age_s
            ):
                dropped += 1
                continue
            self._last_number = number
            image = self._image(color)
            self._index += 1
            return Frame(image=image, timestamp=time.monotonic() - (age or 0.0), index=self._index)

    def _age_s(self, color: Any) -> float | None:
        """Seconds since capture when the frame tells it in host time; None when it cannot."""
        rs = self._sdk
        domain = color.get_frame_timestamp_domain()
        if domain in (rs.timestamp_domain.system_time, rs.timestamp_domain.global_time):
            captured_ms = float(color.get_timestamp())
        elif color.supports_frame_metadata(rs.frame_metadata_value.time_of_arrival):
            captured_ms = float(color.get_frame_metadata(rs.frame_metadata_value.time_of_arrival))
        else:
            return None  # hardware clock only: the frame-number check alone guards against repeats
        return max(0.0, time.time() - captured_ms / 1000.0)

    def _image(self, color: Any) -> np.ndarray:
        image = np.array(np.asanyarray(color.get_data()), dtype=np.uint8, copy=True)  # the SDK reuses its buffer
        expected = (self._config.height, self._config.width, 3)
        if image.shape != expected:
            raise DeviceError(f"RealSense {self._serial} sent a {image.shape} frame, expected {expected}")
        return image

    def _reconnect(self, cause: Exception) -> None:
        """Reopen the camera after an unplug: bounded attempts with doubling waits, else disconnect."""
        config = self._config
        serial = self._serial
        self._stop_pipeline()
        log.warning("event=camera_lost driver=realsense serial=%s error=%r", serial, cause)
        began = time.monotonic()
        last: Exception = cause
        for attempt in range(config.reconnect_attempts):
            time.sleep(min(_MAX_BACKOFF_S, config.reconnect_backoff_s * 2**attempt))
            try:
                self._start(serial)
            except DeviceError as exc:
                last = exc
                continue
            log.info("event=camera_reconnected driver=realsense serial=%s attempt=%d", serial, attempt + 1)
            return
        raise DeviceError(
            f"RealSense {serial} was lost and did not come back after {config.reconnect_attempts} attempts "
            f"in {time.monotonic() - began:.1f} s (last error: {last})"
        ) from cause
