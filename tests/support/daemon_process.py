"""Start a daemon as a subprocess under a fake systemd: a datagram socket the test binds as `NOTIFY_SOCKET`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: The fake daemon's module, run with `python -m` (no path games: the package is installed).
FAKE_DAEMON_MODULE = "vlm2vla_edge.testing.fake_daemon"


def cli(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "vlm2vla_edge.runtime.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def write_config(folder: Path, daemon: dict | None = None, **fields: object) -> Path:
    data: dict = {
        "episodes_dir": str(folder / "episodes"),
        "sim": True,
        "sim_realtime": True,
        "verifier": {"kind": "heuristic"},
        "runner": {"max_retries_per_subtask": 1},
        "daemon": {"socket_path": str(folder / "d.sock"), **(daemon or {})},
    }
    data.update(fields)
    path = folder / "runtime.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class DaemonProcess:
    process: subprocess.Popen[str]
    notify: socket.socket
    socket_path: Path
    messages: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, args: list[str], socket_path: Path, watchdog_usec: int | None = 400_000) -> "DaemonProcess":
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"vlm2vla-edge-test-{uuid.uuid4().hex[:12]}"
        notify.bind("\0" + name)  # abstract namespace: NOTIFY_SOCKET=@name, as systemd may hand out
        env = {**os.environ, "NOTIFY_SOCKET": "@" + name, "PYTHONUNBUFFERED": "1"}
        env.pop("VLM2VLA_EDGE_SOCKET", None)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        process = subprocess.Popen(
            [sys.executable, *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        return cls(process, notify, socket_path)

    @classmethod
    def fake(cls, config: Path, socket_path: Path, step_s: float = 0.0, **kwargs: object) -> "DaemonProcess":
        args = ["-m", FAKE_DAEMON_MODULE, "--config", str(config), "--step-s", str(step_s)]
        return cls.start(args, socket_path, **kwargs)

    def read_messages(self, timeout_s: float) -> None:
        self.notify.settimeout(timeout_s)
        try:
            while True:
                self.messages.append(self.notify.recv(4096).decode())
                self.notify.settimeout(0.01)
        except (socket.timeout, BlockingIOError):
            pass

    def wait_for(self, text: str, timeout_s: float = 60.0) -> None:  # generous: a loaded machine starts slowly
        deadline = time.monotonic() + timeout_s
        while not any(text in m for m in self.messages):
            if self.process.poll() is not None:
                out, err = self.process.communicate()
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {text!r}:\n{err[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from the daemon within {timeout_s} s; got {self.messages}")
            self.read_messages(0.2)

    def terminate(self, timeout_s: float = 20.0) -> tuple[int, str, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, err = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            out, err = self.process.communicate()
        self.read_messages(0.05)
        self.notify.close()
        return self.process.returncode, out, err
