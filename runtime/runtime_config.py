"""The runtime config (`configs/runtime.yaml`): which robot, policy and bundle, the episode budgets, the
verifier, and the daemon's service settings (socket, TCP with a token, request limits, watchdog).

It lives apart from `runtime/config.py` because it embeds the runner's and the verifier's config
models, and both of those modules import `runtime/config.py`: config.py must not import back (not
even lazily; tests/test_layers.py checks for cycles), so the runtime config and its loader
(`load_runtime_config`) are imported from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vlm2vla_edge.runtime.config import StrictModel, load_config
from vlm2vla_edge.runtime.runner import RunnerConfig
from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig

#: File name of the daemon's socket inside its runtime directory.
SOCKET_NAME = "daemon.sock"
#: The runtime directory systemd creates for the service unit (`RuntimeDirectory=vlm2vla-edge`).
SYSTEM_RUNTIME_DIR = Path("/run/vlm2vla-edge")


class DaemonConfig(StrictModel):
    """How `vlm2vla-edge serve` listens, and what it accepts.

    The Unix socket is always served; its file mode and group decide who may drive the robot. TCP is
    off unless `tcp_port` is set, and then every request needs the bearer token from `token_file`.
    """

    socket_path: Path | None = Field(
        None,
        description=(
            "Unix socket of the API; None: $RUNTIME_DIRECTORY/daemon.sock under systemd, else "
            "$XDG_RUNTIME_DIR/vlm2vla-edge/daemon.sock, else /tmp/vlm2vla-edge-<uid>/daemon.sock."
        ),
    )
    socket_mode: int = Field(
        0o660, description="File mode of the socket (octal, e.g. '0660'); 'other' users never get access."
    )
    socket_group: str | None = Field(
        None, description="Group that owns the socket (members may drive the robot); None keeps the process's group."
    )
    tcp_host: str | None = Field(
        None, description="Also listen on TCP at this address (needs tcp_port and token_file)."
    )
    tcp_port: int | None = Field(None, ge=1, le=65535, description="TCP port; None: no TCP listener.")
    token_file: Path | None = Field(
        None, description="File holding the bearer token TCP clients must send; must be readable by its owner only."
    )
    max_request_bytes: int = Field(
        16_384, ge=256, le=1_048_576, description="Largest request body accepted (413 above)."
    )
    max_instruction_chars: int = Field(500, ge=1, le=4000, description="Longest instruction accepted (400 above).")
    watchdog: bool = Field(
        True, description="Send systemd watchdog pings (at half of WatchdogSec=) while the serving loop is healthy."
    )
    events_per_task: int = Field(5000, ge=100, le=100_000, description="Progress events kept per task for streaming.")
    tasks_kept: int = Field(32, ge=1, le=10_000, description="Finished tasks kept in memory for status queries.")
    shutdown_timeout_s: float = Field(
        10.0, gt=0, le=120, description="On SIGTERM: longest wait for the running episode to stop before the safe pose."
    )
    safe_pose_on_shutdown: Literal["sleep", "home", "hold"] = Field(
        "sleep", description="Where the arm goes on shutdown: its sleep (rest) pose, home pose, or hold where it is."
    )
    api_thread_nice: int | None = Field(
        -10, ge=-20, le=19,
        description=(
            "Nice value of the API's event-loop thread, which handles the e-stop, so it is scheduled ahead of "
            "the model's decoding threads (they keep the process's priority). Needs the unit's LimitNICE= "
            "(or CAP_SYS_NICE); refused, the daemon logs a warning and serves at the process's priority. "
            "None leaves the thread alone."
        ),
    )

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            try:
                return int(text, 8)
            except ValueError:
                raise ValueError(f"socket_mode must be an octal file mode such as '0660', not '{value}'") from None
        return value

    @field_validator("socket_mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError(f"socket_mode must be between 0000 and 0777, got {value:o}")
        if value & 0o007:
            raise ValueError(f"socket_mode {value:04o} gives other users access to the robot; use a group (e.g. 0660)")
        if not value & 0o600 == 0o600:
            raise ValueError(f"socket_mode {value:04o} must let the owner read and write (e.g. 0660)")
        return value

    @field_validator("socket_path", "token_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _tcp_needs_token(self) -> "DaemonConfig":
        if (self.tcp_host is None) != (self.tcp_port is None):
            raise ValueError("tcp_host and tcp_port go together: set both to listen on TCP, or neither")
        if self.tcp_port is not None and self.token_file is None:
            raise ValueError("listening on TCP needs token_file (a bearer token readable by its owner only)")
        return self


class RuntimeConfig(StrictModel):
    """Top-level runtime settings: which robot and policy configs, where episodes go, the daemon."""

    robot: str = Field("widowx250s", description="Robot config: a preset name or a path to a YAML file.")
    policy: str = Field("policy", description="Policy config: a preset name or a path to a YAML file.")
    bundle: Path | None = Field(None, description="Model bundle folder; None uses the demo bundle.")
    episodes_dir: Path = Field(Path("~/.local/share/vlm2vla-edge/episodes"), description="Where episodes are recorded.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    sim: bool = Field(False, description="Drive the built-in simulator instead of real devices.")
    sim_seed: int = Field(0, ge=0, description="Simulator: seed of the first scene.")
    sim_realtime: bool = Field(True, description="Simulator under the daemon: move at the arm's real speed.")
    devices: Path | None = Field(None, description="Real robot: YAML with 'arm:' and 'camera:' device sections.")
    record_frames: bool = Field(True, description="Record camera frames with each episode.")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig, description="The step verifier.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Episode budgets.")
    daemon: DaemonConfig = Field(default_factory=DaemonConfig, description="The `serve` daemon's API settings.")

    @field_validator("episodes_dir", "bundle", "devices")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _robot_source(self) -> "RuntimeConfig":
        if self.sim and self.devices is not None:
            raise ValueError("sim and devices exclude each other: the simulator needs no device file")
        return self


def _user_runtime_dir(environ: dict[str, str] | os._Environ[str]) -> Path:
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vlm2vla-edge"
    return Path(f"/tmp/vlm2vla-edge-{os.getuid()}")


def server_socket_path(config: DaemonConfig, environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """Where the daemon creates its socket: the config's path, else systemd's runtime directory, else the user's."""
    environ = os.environ if environ is None else environ
    if config.socket_path is not None:
        return config.socket_path
    runtime_dir = environ.get("RUNTIME_DIRECTORY")
    if runtime_dir:  # systemd may list several, separated by ':'; the first is ours
        return Path(runtime_dir.split(":")[0]) / SOCKET_NAME
    return _user_runtime_dir(environ) / SOCKET_NAME


def client_socket_candidates(
    config: DaemonConfig, environ: dict[str, str] | os._Environ[str] | None = None
) -> list[Path]:
    """Sockets a client tries, in order: the configured one, or the system service's, then the user's own."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("VLM2VLA_EDGE_SOCKET")
    if explicit:
        return [Path(explicit)]
    if config.socket_path is not None:
        return [config.socket_path]
    candidates = [SYSTEM_RUNTIME_DIR / SOCKET_NAME, _user_runtime_dir(environ) / SOCKET_NAME]
    runtime_dir = environ.get("RUNTIME_DIRECTORY")
    if runtime_dir:
        candidates.insert(0, Path(runtime_dir.split(":")[0]) / SOCKET_NAME)
    return candidates


def load_runtime_config(name_or_path: str | Path = "runtime") -> RuntimeConfig:
    """The runtime config from a preset name (configs/<name>.yaml) or a YAML file; `ConfigError` names the problem."""
    return load_config(name_or_path, RuntimeConfig)
