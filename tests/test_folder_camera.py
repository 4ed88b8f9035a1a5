"""FolderCamera: order, looping, stopping, resizing, and the errors for bad folders and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.robot.base import DeviceError, DeviceNotConnectedError
from vlm2vla_edge.runtime.robot.devices import FolderCameraConfig, parse_camera_config
from vlm2vla_edge.runtime.robot.factory import make_camera
from vlm2vla_edge.runtime.robot.folder_camera import EndOfFolder, FolderCamera


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for value, name in enumerate(names, start=1):
        Image.new("RGB", size, (value * 10, 0, 255 - value)).save(folder / name)


def camera(folder: Path, **changes: object) -> FolderCamera:
    cam = FolderCamera(FolderCameraConfig(path=folder, **changes))
    cam.connect()
    return cam


def red(frame_image: np.ndarray) -> int:
    return int(frame_image[0, 0, 0])


def test_images_come_in_name_order_and_loop(tmp_path: Path) -> None:
    write_images(tmp_path, ["b.png", "a.jpg", "c.JPEG"])  # red channel by write order: b=10, a=20, c=30
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder with an image-like name is not an image
    cam = camera(tmp_path)
    assert [p.name for p in cam.files] == ["a.jpg", "b.png", "c.JPEG"]
    frames = [cam.read() for _ in range(4)]
    reds = [red(f.image) for f in frames]
    assert reds[1] == 10 and reds[3] == reds[0]  # b.png (lossless) second; the fourth read loops to a.jpg
    assert abs(reds[0] - 20) <= 3 and abs(reds[2] - 30) <= 3  # jpeg is lossy
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert frames[0].image.shape == (30, 40, 3) and frames[0].image.dtype == np.uint8


def test_stops_at_the_end_when_not_looping(tmp_path: Path) -> None:
    write_images(tmp_path, ["1.png", "2.png"])
    cam = camera(tmp_path, loop=False)
    cam.read(), cam.read()
    with pytest.raises(EndOfFolder, match="all 2 images"):
        cam.read()


def test_resizes_to_the_configured_size(tmp_path: Path) -> None:
    write_images(tmp_path, ["x.png"], size=(64, 48))
    frame = camera(tmp_path, width=32, height=20).read()
    assert frame.image.shape == (20, 32, 3)


def test_greyscale_and_rgba_images_become_rgb(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    Image.new("L", (8, 8), 77).save(tmp_path / "a.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "b.png")
    cam = camera(tmp_path)
    assert cam.read().image[0, 0].tolist() == [77, 77, 77]
    assert cam.read().image[0, 0].tolist() == [1, 2, 3]


def test_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="does not exist") as info:
        camera(tmp_path / "nowhere")
    assert isinstance(info.value, UserError)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DeviceError, match="is not a folder"):
        camera(tmp_path / "file.png")


def test_folder_without_images_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DeviceError, match=r"holds no \.png, \.jpg or \.jpeg images") as info:
        camera(tmp_path)
    assert isinstance(info.value, UserError)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    cam = camera(tmp_path)
    cam.read()
    with pytest.raises(DeviceError, match=r"cannot read image .*b\.jpg"):
        cam.read()
    assert red(cam.read().image) == 10  # the camera goes on with the next image


def test_connect_disconnect_idempotent(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    cam = make_camera(parse_camera_config({"kind": "folder", "path": str(tmp_path)}))
    assert isinstance(cam, FolderCamera)
    with cam:
        cam.connect()
        assert cam.is_connected
    cam.disconnect()
    assert not cam.is_connected
    with pytest.raises(DeviceNotConnectedError):
        cam.read()


def test_config_requires_both_sizes() -> None:
    with pytest.raises(Exception, match="both width and height"):
        parse_camera_config({"kind": "folder", "path": "/tmp", "width": 32})
