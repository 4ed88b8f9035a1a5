"""No test reaches a daemon it did not start (tests/conftest.py and tests/daemon_guard/): discovery points to a
temporary folder, and anything that still aims at the system service's folder is refused and reported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import system_daemon_guard
from vlm2vla_edge.runtime.daemon.client import DaemonClient
from vlm2vla_edge.runtime.runtime_config import DaemonConfig, client_socket_candidates

SYSTEM_SOCKET = f"{system_daemon_guard.SYSTEM_DIR}/daemon.sock"


def test_the_guard_watches_the_products_system_folder() -> None:
    """The product's value, read in a fresh process (the fixture patches it in this one)."""
    code = "from vlm2vla_edge.runtime.runtime_config import SYSTEM_RUNTIME_DIR; print(SYSTEM_RUNTIME_DIR)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == system_daemon_guard.SYSTEM_DIR


def test_discovery_finds_only_this_sessions_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.getbasetemp()
    candidates = client_socket_candidates(DaemonConfig())
    assert candidates and all(base in c.parents for c in candidates), candidates
    located = DaemonClient.locate()
    assert located.socket_path is not None and base in located.socket_path.parents


def test_the_cli_without_a_socket_reaches_no_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    from vlm2vla_edge.runtime.cli import main

    assert main(["status"]) == 2
    assert "no vlm2vla-edge daemon answers at " + str(DaemonClient.locate().where) in capsys.readouterr().err
    assert system_daemon_guard.touches() == []


def test_a_connect_to_the_system_socket_is_refused_and_recorded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log = tmp_path / "guard.log"  # this deliberate touch must not fail the session
    monkeypatch.setenv(system_daemon_guard.LOG_ENV, str(log))
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        pytest.raises(system_daemon_guard.SystemDaemonTouched),
    ):
        sock.connect(SYSTEM_SOCKET)
    with pytest.raises(system_daemon_guard.SystemDaemonTouched):
        DaemonClient(SYSTEM_SOCKET).status()  # not turned into "no daemon answers": the test fails loudly
    with pytest.raises(system_daemon_guard.SystemDaemonTouched):
        open(f"{system_daemon_guard.SYSTEM_DIR}/../vlm2vla-edge/x", "rb")  # noqa: SIM115 - normalised paths too
    assert len(log.read_text().splitlines()) == 3 and "socket.connect" in log.read_text()


def test_python_subprocesses_of_the_tests_are_guarded_too(tmp_path: Path) -> None:
    log = tmp_path / "guard.log"
    code = f"import socket; socket.socket(socket.AF_UNIX).connect({SYSTEM_SOCKET!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, system_daemon_guard.LOG_ENV: str(log)})
    assert result.returncode != 0 and "SystemDaemonTouched" in result.stderr
    assert "socket.connect /run/vlm2vla-edge/daemon.sock" in log.read_text()
