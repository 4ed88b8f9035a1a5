"""RealSenseCamera against a fake pyrealsense2: connection, device selection, timeouts, stale frames,
unplug and reconnect, and the import failures a robot computer can show."""

from __future__ import annotations

import importlib.abc
import sys
import time
from typing import Any

import numpy as np
import pytest

from fakes.fake_pyrealsense2 import DOMAIN_HARDWARE, FakeDevice, FakeRealSense, install
from vlm2vla_edge.runtime.robot.base import DeviceError, DeviceNotConnectedError
from vlm2vla_edge.runtime.robot.devices import RealSenseCameraConfig, parse_camera_config
from vlm2vla_edge.runtime.robot.factory import make_camera
from vlm2vla_edge.runtime.robot.realsense import RealSenseCamera


def camera_config(**changes: Any) -> RealSenseCameraConfig:
    return RealSenseCameraConfig(**{"warmup_frames": 2, "reconnect_backoff_s": 0.01, **changes})


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> FakeRealSense:
    return install(monkeypatch, FakeRealSense())


@pytest.fixture
def camera(bus: FakeRealSense) -> RealSenseCamera:
    cam = RealSenseCamera(camera_config())
    cam.connect()
    yield cam
    cam.disconnect()


def test_connect_and_disconnect_are_idempotent(bus: FakeRealSense) -> None:
    cam = RealSenseCamera(camera_config(width=1280, height=720, fps=30))
    cam.connect()
    cam.connect()
    assert cam.is_connected and cam.serial_number == "123456789012"
    assert bus.starts == 1 and bus.waits == 2  # warm-up frames dropped
    assert bus.configs == [
        {"serial": "123456789012", "streams": [("stream.color", 1280, 720, "format.rgb8", 30)]}
    ]
    cam.disconnect()
    cam.disconnect()
    assert not cam.is_connected and bus.stops == 1
    with pytest.raises(DeviceNotConnectedError):
        cam.read()


def test_read_returns_fresh_rgb_frames_in_order(camera: RealSenseCamera) -> None:
    first, second = camera.read(0.5), camera.read(0.5)
    assert first.image.shape == (480, 640, 3) and first.image.dtype == np.uint8
    assert (first.index, second.index) == (0, 1)
    assert first.image[0, 0, 0] != second.image[0, 0, 0]  # distinct frames, not one buffer twice
    assert abs(second.timestamp - time.monotonic()) < 0.5


def test_no_camera_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakeRealSense(devices=[]))
    with pytest.raises(DeviceError, match="no RealSense camera is connected"):
        RealSenseCamera(camera_config()).connect()


def test_camera_selection_by_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    bus = install(monkeypatch, FakeRealSense(devices=[FakeDevice(serial="111"), FakeDevice(serial="222")]))
    with pytest.raises(DeviceError, match="2 RealSense cameras are connected.*serial_number"):
        RealSenseCamera(camera_config()).connect()
    with pytest.raises(DeviceError, match="no RealSense camera with serial number 333; connected: 111, 222"):
        RealSenseCamera(camera_config(serial_number="333")).connect()
    cam = RealSenseCamera(camera_config(serial_number="222"))
    cam.connect()
    assert cam.serial_number == "222" and bus.configs[-1]["serial"] == "222"
    cam.disconnect()


def test_unsupported_stream_mode_is_reported(bus: FakeRealSense) -> None:
    with pytest.raises(DeviceError, match="cannot stream RGB 800x600 at 30 fps"):
        RealSenseCamera(camera_config(width=800, height=600)).connect()


def test_timeout_raises_device_error_in_time(camera: RealSenseCamera, bus: FakeRealSense) -> None:
    bus.device().stalled = True
    began = time.monotonic()
    with pytest.raises(DeviceError, match=r"within 0.1 s \(Frame didn't arrive within \d+\)"):
        camera.read(0.1)
    assert time.monotonic() - began < 0.5
    bus.device().stalled = False
    assert camera.read(0.5).image.shape == (480, 640, 3)  # still usable afterwards


def test_stale_frames_are_dropped_not_returned(camera: RealSenseCamera, bus: FakeRealSense) -> None:
    device = bus.device()
    numbers_before = device.frame_number
    device.lags = [1.0, 0.5]  # two old frames waiting in the queue, then a fresh one
    frame = camera.read(0.5)
    assert frame.image[0, 0, 0] == (numbers_before + 3) % 256
    device.lag_s = 1.0  # everything is old from now on
    with pytest.raises(DeviceError, match=r"no fresh frame .* within 0.05 s \(\d+ stale frames dropped"):
        camera.read(0.05)


def test_a_repeated_frame_is_never_returned_twice(camera: RealSenseCamera, bus: FakeRealSense) -> None:
    camera.read(0.5)
    bus.device().repeat_last = True
    with pytest.raises(DeviceError, match="no fresh frame"):
        camera.read(0.05)


def test_hardware_clock_frames_are_aged_by_arrival_time(monkeypatch: pytest.MonkeyPatch) -> None:
    device = FakeDevice(domain=DOMAIN_HARDWARE, lag_s=1.0)
    install(monkeypatch, FakeRealSense(devices=[device]))
    cam = RealSenseCamera(camera_config())
    cam.connect()
    with pytest.raises(DeviceError, match="no fresh frame"):
        cam.read(0.05)
    device.supports_arrival = False  # no host time at all: only the frame-number check applies
    assert cam.read(0.5).image.shape == (480, 640, 3)
    cam.disconnect()


def test_frame_timestamp_is_the_capture_time(camera: RealSenseCamera, bus: FakeRealSense) -> None:
    bus.device().lags = [0.2]
    frame = camera.read(0.5)
    assert time.monotonic() - frame.timestamp == pytest.approx(0.2, abs=0.05)


def test_unplug_then_reconnect(camera: RealSenseCamera, bus: FakeRealSense) -> None:
    camera.read(0.5)
    bus.device().unplug()
    bus.plug_back_after_queries = bus.queries + 3  # back on the bus during the second retry
    frame = camera.read(0.1)
    assert frame.image.shape == (480, 640, 3) and frame.index == 1
    assert bus.starts == 2 and camera.is_connected


def test_unplugged_for_good_gives_up_after_bounded_attempts(camera: RealSenseCamera, bus: FakeRealSense) -> None:
    bus.device().unplug()
    began = time.monotonic()
    with pytest.raises(
        DeviceError,
        match=r"lost and did not come back after 5 attempts .*\(last error: no RealSense camera is connected",
    ):
        camera.read(0.05)
    assert time.monotonic() - began < 1.0  # 0.05 s timeout + 0.01+0.02+0.04+0.08+0.16 s of waits
    assert not camera.is_connected


class _BrokenImport(importlib.abc.MetaPathFinder):
    def __init__(self, message: str | None) -> None:
        self.message = message

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pyrealsense2":
            if self.message is None:
                raise ModuleNotFoundError("No module named 'pyrealsense2'", name="pyrealsense2")
            raise ImportError(self.message)
        return None


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (None, r"pyrealsense2 is not installed: pip install 'vlm2vla-edge\[realsense\]'.*libusb-1.0-0"),
        (
            "libusb-1.0.so.0: cannot open shared object file: No such file or directory",
            r"cannot load the system library libusb-1.0 .*sudo apt-get install libusb-1.0-0",
        ),
    ],
)
def test_import_failures_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, message: str | None, expected: str
) -> None:
    monkeypatch.delitem(sys.modules, "pyrealsense2", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenImport(message), *sys.meta_path])
    cam = RealSenseCamera(camera_config())
    with pytest.raises(DeviceError, match=expected):
        cam.connect()
    assert not cam.is_connected


def test_factory_and_config_validation(bus: FakeRealSense) -> None:
    cam = make_camera(parse_camera_config({"kind": "realsense", "serial_number": "123456789012", "fps": 15}))
    assert isinstance(cam, RealSenseCamera) and not cam.is_connected
    with pytest.raises(Exception, match="unknown field"):
        parse_camera_config({"kind": "realsense", "fsp": 15})
