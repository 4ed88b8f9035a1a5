"""The factory that turns a device config (`devices`) into its driver.

Kept apart from the configs because the drivers import their config models: the configs module must
not import the drivers back. Each driver (and its vendor SDK) is imported only when a device of its
kind is opened, so the runtime imports without ROS 2 or pyrealsense2 installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm2vla_edge.runtime.config import RobotConfig
from vlm2vla_edge.runtime.errors import ConfigError
from vlm2vla_edge.runtime.robot.devices import FolderCameraConfig, InterbotixArmConfig, RealSenseCameraConfig

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.robot.base import Arm, Camera


def make_arm(config: InterbotixArmConfig, robot: RobotConfig) -> "Arm":
    """The driver for an arm config; `robot` supplies the poses and limits it must respect."""
    if isinstance(config, InterbotixArmConfig):
        if config.robot_model != robot.model:
            raise ConfigError(
                f"the arm config drives a '{config.robot_model}' "
                f"but the robot config '{robot.name}' is a '{robot.model}'"
            )
        from vlm2vla_edge.runtime.robot.interbotix import InterbotixArm

        return InterbotixArm(config, robot)
    raise ConfigError(f"arm kind '{getattr(config, 'kind', type(config).__name__)}' is not supported by make_arm")


def make_camera(config: RealSenseCameraConfig | FolderCameraConfig) -> "Camera":
    """The driver for a camera config."""
    if isinstance(config, RealSenseCameraConfig):
        from vlm2vla_edge.runtime.robot.realsense import RealSenseCamera

        return RealSenseCamera(config)
    if isinstance(config, FolderCameraConfig):
        from vlm2vla_edge.runtime.robot.folder_camera import FolderCamera

        return FolderCamera(config)
    raise ConfigError(f"camera kind '{getattr(config, 'kind', type(config).__name__)}' is not supported by make_camera")
