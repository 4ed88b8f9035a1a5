"""Daemon pieces without a process: sd_notify, config checks, token file, metrics, events, the unit file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from vlm2vla_edge.runtime import runtime_config
from vlm2vla_edge.runtime.daemon import sd_notify
from vlm2vla_edge.runtime.daemon.events import TaskEventLog
from vlm2vla_edge.runtime.daemon.metrics import DaemonMetrics
from vlm2vla_edge.runtime.daemon.server import read_token
from vlm2vla_edge.runtime.daemon.service import InvalidRequest, validate_instruction
from vlm2vla_edge.runtime.daemon.unit import UnitOptions, render_unit
from vlm2vla_edge.runtime.errors import ConfigError
from vlm2vla_edge.runtime.events import EpisodeEnded, EpisodeResult, EpisodeStarted
from vlm2vla_edge.runtime.runtime_config import (
    DaemonConfig,
    RuntimeConfig,
    client_socket_candidates,
    load_runtime_config,
    server_socket_path,
)

REPO = Path(__file__).resolve().parents[2]


# --- sd_notify -------------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [True, False])
def test_notify_reaches_a_datagram_socket(abstract: bool, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"vlm2vla-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name}
    else:
        sock.bind(str(tmp_path / "notify"))
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    sock.settimeout(2)
    with sock:
        assert sd_notify.notify("READY=1", env)
        assert sock.recv(100) == b"READY=1"


def test_notify_outside_systemd_is_a_no_op() -> None:
    assert sd_notify.notify("READY=1", {}) is False
    assert sd_notify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sd_notify.watchdog_interval_s({}) is None
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None


# --- config ----------------------------------------------------------------------------------------


def test_daemon_config_checks() -> None:
    assert DaemonConfig().socket_mode == 0o660
    assert DaemonConfig(socket_mode="0640").socket_mode == 0o640
    assert DaemonConfig(socket_mode=0o600).socket_mode == 0o600
    with pytest.raises(ValueError, match="other users"):
        DaemonConfig(socket_mode="0666")
    with pytest.raises(ValueError, match="octal"):
        DaemonConfig(socket_mode="rw-rw----")
    with pytest.raises(ValueError, match="token_file"):
        DaemonConfig(tcp_host="0.0.0.0", tcp_port=8080)
    with pytest.raises(ValueError, match="go together"):
        DaemonConfig(tcp_port=8080, token_file=Path("/tmp/t"))
    with pytest.raises(ValueError, match="exclude"):
        RuntimeConfig(sim=True, devices=Path("devices.yaml"))


def test_shipped_runtime_config_has_the_daemon_section() -> None:
    settings = load_runtime_config()
    assert settings.daemon.socket_mode == 0o660 and settings.daemon.tcp_port is None


def test_socket_paths(tmp_path: Path) -> None:
    config = DaemonConfig()
    assert server_socket_path(config, {"RUNTIME_DIRECTORY": "/run/vlm2vla-edge"}) == Path(
        "/run/vlm2vla-edge/daemon.sock"
    )
    assert server_socket_path(config, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == Path(
        "/run/user/1000/vlm2vla-edge/daemon.sock"
    )
    # the system service's socket first (tests/conftest.py points that folder into the session's temporary
    # folder; tests/test_no_system_daemon.py checks the product's own value, /run/vlm2vla-edge)
    assert client_socket_candidates(config, {})[0] == runtime_config.SYSTEM_RUNTIME_DIR / "daemon.sock"
    assert client_socket_candidates(config, {"VLM2VLA_EDGE_SOCKET": str(tmp_path / "s")}) == [tmp_path / "s"]
    assert server_socket_path(DaemonConfig(socket_path=tmp_path / "x.sock"), {}) == tmp_path / "x.sock"


def test_token_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret-token-0123456789\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == b"s3cret-token-0123456789"
    path.write_text("short")
    with pytest.raises(ConfigError, match="at least"):
        read_token(path)


@pytest.mark.parametrize(
    "text", ["pick\x00up", "pick\x1b[31mup", "lift \u202ethe carrot", "", "   ", "x" * 501, 42, None]
)
def test_instruction_validation_refuses(text: object) -> None:
    with pytest.raises(InvalidRequest):
        validate_instruction(text, 500)


def test_instruction_validation_normalises_whitespace() -> None:
    assert validate_instruction("  levanta\tla\nzanahoria ", 500) == "levanta la zanahoria"
    assert validate_instruction("把胡萝卜放进锅里", 500) == "把胡萝卜放进锅里"


# --- metrics and events ----------------------------------------------------------------------------


def test_metrics_exposition_through_prometheus_client() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = DaemonMetrics()
    result = EpisodeResult("success", "ok", duration_s=1.5, stage_latency_s={"action": [0.02, 0.3], "verify": [0.001]})
    metrics.on_event(EpisodeStarted(t=0.0, instruction="pick up the carrot", bundle_id="fake"))
    metrics.on_event(EpisodeEnded(t=1.5, result=result))
    metrics.count_request(202)
    text = metrics.render(estop_engaged=True).decode("utf-8")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("vlm2vla_episodes_total", (("outcome", "success"),))] == 1
    assert samples[("vlm2vla_stage_latency_seconds_bucket", (("le", "0.025"), ("stage", "action")))] == 1
    assert samples[("vlm2vla_stage_latency_seconds_bucket", (("le", "+Inf"), ("stage", "action")))] == 2
    assert samples[("vlm2vla_stage_latency_seconds_count", (("stage", "action"),))] == 2
    assert samples[("vlm2vla_estop_engaged", ())] == 1
    assert samples[("vlm2vla_episode_running", ())] == 0
    assert samples[("vlm2vla_http_requests_total", (("code", "202"),))] == 1
    assert all(name.startswith("vlm2vla_") for name, _ in samples)
    # each daemon has its own registry (not the library's global one): a second one starts from nothing
    assert b'outcome="success"' not in DaemonMetrics().render(estop_engaged=False)


def test_event_log_is_bounded_and_never_blocks_the_writer() -> None:
    log = TaskEventLog(capacity=100)
    for i in range(250):  # nobody reads: appends must still return at once
        log.append({"kind": "step", "i": i})
    items, next_index, closed = log.read(0, timeout_s=0.01)
    assert [n for n, _ in items] == list(range(150, 250)) and next_index == 250 and not closed
    items, _, _ = log.read(250, timeout_s=0.01)
    assert items == []
    log.append({"kind": "episode_end"}, close=True)
    items, next_index, closed = log.read(250, timeout_s=5)
    assert closed and items[0][1]["kind"] == "episode_end"


# --- the unit file ---------------------------------------------------------------------------------


def test_checked_in_unit_is_the_rendered_default() -> None:
    assert (REPO / "systemd" / "vlm2vla-edge.service").read_text() == render_unit(UnitOptions())


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: apt-get install -y systemd")
        pytest.skip("systemd-analyze is missing")
    exe = tmp_path / "bin" / "vlm2vla-edge"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    key = tmp_path / "gemini_api_key"
    key.write_text("key\n")
    key.chmod(0o600)
    unit = tmp_path / "vlm2vla-edge.service"
    unit.write_text(render_unit(UnitOptions(executable=exe, config=tmp_path / "runtime.yaml", user="root", group="root",
                                            gemini_credential=key)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vlm2vla-edge.service" not in result.stderr, result.stderr  # no warnings about our unit either
    text = unit.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "DeviceAllow=char-usb_device rwm",
        f"LoadCredential=gemini_api_key:{key}",
        "RuntimeDirectory=vlm2vla-edge",
        "StateDirectory=vlm2vla-edge",
    ):
        assert line in text.splitlines()
    assert f"ExecStart={exe} --log-level INFO serve" in text


def test_install_service_renders_for_this_venv(tmp_path: Path) -> None:
    from vlm2vla_edge.runtime.cli import main

    out = tmp_path / "unit.service"
    assert main(["install-service", "--user", "robot", "--output", str(out), "--config", str(tmp_path / "r.yaml")]) == 0
    text = out.read_text()
    assert "User=robot" in text and "Group=robot" in text
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    executable = Path(exec_line.split("=", 1)[1].split()[0])
    assert executable.name == "vlm2vla-edge" and executable.is_file()
    assert f"--config {tmp_path / 'r.yaml'}" in exec_line
