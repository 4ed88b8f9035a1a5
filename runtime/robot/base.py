"""The `Arm` and `Camera` interfaces every driver implements (real hardware, simulator, test fakes).

An arm moves only through `Arm.execute(SafeCommand)`: a `SafeCommand` can be made by the
`SafetyLimiter` alone, so no model output, instruction or caller can reach the motors unchecked.
Drivers implement the protected `_move_to` / `_set_gripper` hooks; the public template methods
here enforce the safety contract once for every driver.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from vlm2vla_edge.runtime.errors import Vlm2VlaError
from vlm2vla_edge.runtime.safety import SafeCommand


class DeviceError(Vlm2VlaError):
    """A hardware or driver fault (the episode ends with outcome 'error' after a safe stop)."""


class DeviceNotConnectedError(DeviceError):
    """The device was used before `connect()` or after `disconnect()`."""


class CommandRefusedError(DeviceError):
    """The arm refused a command (for instance inverse kinematics failed on the robot)."""


@dataclass(frozen=True, slots=True)
class ArmState:
    """What the arm reports about itself."""

    position: tuple[float, float, float]  # end effector (ee_gripper_link) in the base frame, metres
    rpy: tuple[float, float, float]  # end-effector roll, pitch, yaw, radians
    gripper_open: bool  # True when the gripper is (commanded) open
    joints: tuple[float, ...] = ()  # joint positions, radians, in the robot's joint order
    timestamp: float = 0.0  # time.monotonic() when read
    # Measured finger opening, 0 = fully closed, 1 = fully open; None when the driver cannot measure it.
    # A closed command that stops well above 0 means the fingers closed on something (a grasp).
    gripper_opening: float | None = None


@dataclass(frozen=True, slots=True)
class MoveResult:
    """What happened to one executed command."""

    completed: bool  # False when stopped (cancel or e-stop) before reaching the target
    reached: tuple[float, float, float]  # end-effector position after the move
    error_m: float  # distance between the commanded target and `reached`
    duration_s: float
    note: str = ""


class Arm(ABC):
    """A robot arm commanded in end-effector space. Thread-safe `stop()`; everything else one caller."""

    #: Positional tolerance between the pose a command was checked from and the pose at execution.
    stale_tolerance_m: float = 0.02

    def __enter__(self) -> "Arm":
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    @abstractmethod
    def connect(self) -> None:
        """Open the connection to the arm (idempotent)."""

    @abstractmethod
    def disconnect(self) -> None:
        """Stop and release the arm (idempotent); never leaves it moving."""

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True between `connect()` and `disconnect()`."""

    @abstractmethod
    def read_state(self) -> ArmState:
        """Current end-effector pose, gripper and joints."""

    @abstractmethod
    def stop(self) -> None:
        """Halt now and hold the present position; callable from any thread, also mid-move."""

    @abstractmethod
    def go_home(self) -> None:
        """Move to the robot config's home pose (a fixed, known-safe pose)."""

    @abstractmethod
    def go_sleep(self) -> None:
        """Move to the robot config's sleep (rest) pose."""

    @abstractmethod
    def _move_to(self, target: tuple[float, float, float], cancel: threading.Event | None) -> MoveResult:
        """Driver hook: move the end effector in a straight line to `target`, interruptibly."""

    @abstractmethod
    def _set_gripper(self, open_: bool) -> None:
        """Driver hook: open or close the gripper."""

    def execute(self, command: SafeCommand, cancel: threading.Event | None = None) -> MoveResult:
        """Execute one limiter-approved command: move to its checked target, then set the gripper.

        Refuses anything that is not a `SafeCommand`, and a command checked from a pose the arm is no
        longer at (the limiter's verdict would not hold from here).
        """
        if not isinstance(command, SafeCommand):
            raise TypeError("Arm.execute takes only a SafeCommand made by the SafetyLimiter")
        if not self.is_connected:
            raise DeviceNotConnectedError(f"{type(self).__name__} is not connected")
        state = self.read_state()
        drift = float(np.linalg.norm(np.subtract(state.position, command.start)))
        if drift > self.stale_tolerance_m:
            raise CommandRefusedError(
                f"command was checked from {command.start} but the arm is at {state.position} "
                f"({drift * 100:.1f} cm away); re-check it with the limiter"
            )
        wait_s = command.authorize()  # e-stop latch, one-shot, rate limit: raises when refused
        if wait_s > 0 and _wait_or_cancel(wait_s, cancel):
            return MoveResult(completed=False, reached=state.position, error_m=0.0, duration_s=0.0, note="cancelled")
        result = self._move_to(command.target, cancel)
        if result.completed and command.gripper_open != state.gripper_open:
            self._set_gripper(command.gripper_open)
        return result


def _wait_or_cancel(seconds: float, cancel: threading.Event | None) -> bool:
    """Sleep up to `seconds`; True if `cancel` was set meanwhile."""
    if cancel is None:
        threading.Event().wait(seconds)
        return False
    return cancel.wait(seconds)


@dataclass(frozen=True, slots=True)
class Frame:
    """One colour image from a camera."""

    image: np.ndarray = field(repr=False)  # H x W x 3, uint8, RGB
    timestamp: float  # time.monotonic() at capture
    index: int  # frame counter of this camera, starting at 0


class Camera(ABC):
    """A colour camera. `read()` returns a fresh frame or raises; it never returns a stale one silently."""

    def __enter__(self) -> "Camera":
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    @abstractmethod
    def connect(self) -> None:
        """Open the camera (idempotent)."""

    @abstractmethod
    def disconnect(self) -> None:
        """Release the camera (idempotent)."""

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True between `connect()` and `disconnect()`."""

    @abstractmethod
    def read(self, timeout_s: float = 1.0) -> Frame:
        """The next frame, waiting at most `timeout_s`; raises `DeviceError` on timeout or fault."""
