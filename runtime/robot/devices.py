"""Device configs: which arm, which camera (the factory that turns one into a driver is `factory`).

Each backend has its own strict config model, told apart by its `kind` field, so a device section
in a YAML file is validated by exactly one model and a typo is an error, not a silent default.
Vendor SDKs are imported by the drivers only when a device of that kind is connected, so this
module (and the runtime) imports without ROS 2 or pyrealsense2 installed.

A `sim` kind (the simulator's arm and camera, in `runtime/sim/`) is wired in by adding its config
model to the `ArmDeviceConfig` / `CameraDeviceConfig` unions and a branch to `factory.make_arm` /
`factory.make_camera`. The drivers import their config from here, so this module imports no driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from vlm2vla_edge.runtime.config import StrictModel, describe_validation_error
from vlm2vla_edge.runtime.errors import ConfigError, UserError
from vlm2vla_edge.runtime.robot.base import DeviceError


class DeviceSetupError(DeviceError, UserError):
    """A device cannot start because of something the user set up (a missing folder, a wrong model).

    It is a `DeviceError` (the runtime's device handling applies) and a `UserError` (the CLI reports
    it in one sentence with exit code 2).
    """


# --- arm ------------------------------------------------------------------------------------------


class InterbotixArmConfig(StrictModel):
    """An Interbotix X-series arm driven through Interbotix's ROS 2 Python API (`interbotix_xs_modules`)."""

    kind: Literal["interbotix"] = "interbotix"
    robot_model: str = Field(
        "wx250s",
        description="Interbotix model name; only the 6-DOF 'wx250s' can follow sideways (dy) moves.",
    )
    robot_name: str | None = Field(None, description="ROS namespace of the arm; None uses robot_model.")
    group_name: str = Field("arm", description="Joint group of the arm in the xs_sdk motor config.")
    gripper_name: str = Field("gripper", description="Gripper joint in the xs_sdk motor config.")
    pose_moving_time_s: float = Field(
        2.0, ge=0.5, le=10.0, description="Duration of a joint-space move to the home or sleep pose."
    )
    pose_accel_time_s: float = Field(0.3, ge=0.0, le=5.0, description="Acceleration time of those moves.")
    segment_length_m: float = Field(
        0.01, gt=0.0, le=0.03, description="A straight move is executed as cartesian segments at most this long."
    )
    segment_moving_time_s: float = Field(
        0.2, ge=0.05, le=1.0, description="Planned duration of one segment (Interbotix `moving_time`)."
    )
    wp_moving_time_s: float = Field(
        0.1, ge=0.02, le=1.0, description="Motor profile time of each waypoint (Interbotix `wp_moving_time`)."
    )
    wp_accel_time_s: float = Field(
        0.05, ge=0.0, le=0.5, description="Motor acceleration time of each waypoint (`wp_accel_time`)."
    )
    wp_period_s: float = Field(0.05, ge=0.01, le=0.5, description="Time between waypoints (`wp_period`).")
    line_tolerance_m: float = Field(
        0.01,
        gt=0.0,
        le=0.05,
        description="The commanded pose must stay this close to the planned straight line, else the move stops.",
    )
    connect_timeout_s: float = Field(
        30.0, gt=0.0, le=300.0, description="Longest wait for the xs_sdk driver to answer on connect."
    )

    @field_validator("robot_model")
    @classmethod
    def _six_dof(cls, value: str) -> str:
        if value == "wx250s":
            return value
        if value == "wx250":
            raise ValueError(
                "'wx250' is the 5-DOF WidowX 250, whose cartesian moves refuse any sideways (y) motion; "
                "this runtime needs the 6-DOF 'wx250s'"
            )
        raise ValueError(f"robot_model must be 'wx250s' (the 6-DOF WidowX 250), got '{value}'")

    @model_validator(mode="after")
    def _timing(self) -> "InterbotixArmConfig":
        if self.segment_moving_time_s < self.wp_period_s:
            raise ValueError(
                f"segment_moving_time_s ({self.segment_moving_time_s}) must be at least wp_period_s "
                f"({self.wp_period_s}): a segment needs one waypoint"
            )
        if self.wp_accel_time_s > self.wp_moving_time_s / 2:
            raise ValueError("wp_accel_time_s must be at most half of wp_moving_time_s (Interbotix's rule)")
        if self.pose_accel_time_s > self.pose_moving_time_s / 2:
            raise ValueError("pose_accel_time_s must be at most half of pose_moving_time_s (Interbotix's rule)")
        return self

    @property
    def segment_duration_s(self) -> float:
        """How long one segment call blocks (Interbotix sleeps `moving_time + wp_moving_time`)."""
        return self.segment_moving_time_s + self.wp_moving_time_s


# --- cameras --------------------------------------------------------------------------------------


class RealSenseCameraConfig(StrictModel):
    """An Intel RealSense camera's colour stream, through pyrealsense2 (the `realsense` extra)."""

    kind: Literal["realsense"] = "realsense"
    serial_number: str | None = Field(None, description="Camera to open; None takes the only one connected.")
    width: int = Field(640, ge=32, le=3840, description="Colour stream width, pixels.")
    height: int = Field(480, ge=32, le=2160, description="Colour stream height, pixels.")
    fps: int = Field(30, ge=1, le=90, description="Colour stream frame rate.")
    max_age_s: float = Field(
        0.25, gt=0.0, le=5.0, description="A frame older than this when read is dropped (never returned)."
    )
    warmup_frames: int = Field(
        10, ge=0, le=300, description="Frames dropped after connecting, while auto-exposure settles."
    )
    reconnect_attempts: int = Field(5, ge=0, le=50, description="Tries to reopen an unplugged camera.")
    reconnect_backoff_s: float = Field(
        0.5, ge=0.0, le=10.0, description="Wait before the first retry; doubles per try, at most 5 s."
    )


class FolderCameraConfig(StrictModel):
    """Images from a folder (sorted by file name), served as camera frames: replays and tests."""

    kind: Literal["folder"] = "folder"
    path: Path = Field(description="Folder holding .png / .jpg / .jpeg images.")
    loop: bool = Field(True, description="Start again at the first image after the last; False: stop there.")
    width: int | None = Field(None, ge=8, le=8192, description="Resize to this width (with height); None keeps.")
    height: int | None = Field(None, ge=8, le=8192, description="Resize to this height (with width); None keeps.")

    @field_validator("path")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _both_or_neither(self) -> "FolderCameraConfig":
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height to resize, or neither")
        return self


ArmDeviceConfig = Annotated[Union[InterbotixArmConfig], Field(discriminator="kind")]
CameraDeviceConfig = Annotated[Union[RealSenseCameraConfig, FolderCameraConfig], Field(discriminator="kind")]


class DevicesConfig(StrictModel):
    """The devices one robot station uses."""

    arm: ArmDeviceConfig
    camera: CameraDeviceConfig


_ARM_ADAPTER: TypeAdapter[InterbotixArmConfig] = TypeAdapter(ArmDeviceConfig)
_CAMERA_ADAPTER: TypeAdapter[RealSenseCameraConfig | FolderCameraConfig] = TypeAdapter(CameraDeviceConfig)


def parse_arm_config(data: object) -> InterbotixArmConfig:
    """Validate an arm section (a mapping with a `kind`); `ConfigError` naming the field when wrong."""
    try:
        return _ARM_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error("arm config", exc)) from exc


def parse_camera_config(data: object) -> RealSenseCameraConfig | FolderCameraConfig:
    """Validate a camera section (a mapping with a `kind`); `ConfigError` naming the field when wrong."""
    try:
        return _CAMERA_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error("camera config", exc)) from exc
