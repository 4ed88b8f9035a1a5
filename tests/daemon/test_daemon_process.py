"""The daemon as systemd runs it: a subprocess with a fake NOTIFY_SOCKET, driven through the real CLI.

The fake daemon (vlm2vla_edge.testing.fake_daemon) is the product's `Daemon` + `serve` on the real-time
simulator with a scripted policy whose steps "generate" for a set time; the real-model test at the end
uses `serve`. Every test here starts processes (a daemon, the CLI), so the module is in the slow set;
tests/daemon/test_daemon_in_process.py checks the same API and CLI behaviour in the quick set.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonClient
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.testing.daemon_process import DaemonProcess, cli, write_config
from vlm2vla_edge.testing.daemon_waits import wait_for_event, wait_idle
from vlm2vla_edge.testing.fake_daemon import UNTIL_CANCELLED

pytestmark = pytest.mark.slow  # processes: seconds each (the quick set has the in-process twins)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """One fake daemon for the API tests (steps take 0.3 s, so an episode lasts about two seconds)."""
    folder = tmp_path_factory.mktemp("daemon")
    limits = {"socket_mode": "0640", "max_request_bytes": 1024, "max_instruction_chars": 80}
    config = write_config(folder, daemon=limits)
    proc = DaemonProcess.fake(config, folder / "d.sock", step_s=0.3)
    try:
        proc.wait_for("READY=1")
        proc.config = config  # type: ignore[attr-defined]
        proc.folder = folder  # type: ignore[attr-defined]
        yield proc
    finally:
        code, _, err = proc.terminate()
        assert code == 0, err[-2000:]


def _client(daemon: DaemonProcess) -> DaemonClient:
    return DaemonClient(daemon.socket_path, timeout_s=5)


def test_ready_then_watchdog_pings_and_socket_mode(daemon: DaemonProcess) -> None:
    assert any(m.startswith("READY=1") for m in daemon.messages)
    daemon.wait_for("WATCHDOG=1", timeout_s=5)  # WATCHDOG_USEC=0.4 s: a ping every 0.2 s
    before = sum(m == "WATCHDOG=1" for m in daemon.messages)
    daemon.read_messages(0.6)
    assert sum(m == "WATCHDOG=1" for m in daemon.messages) > before  # it keeps pinging
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o640


def test_do_streams_progress_and_exits_by_outcome(daemon: DaemonProcess) -> None:
    config = str(daemon.config)  # type: ignore[attr-defined]
    result = cli("do", "levanta la zanahoria", "--config", config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "subtasks: Move to the carrot -> Grasp the carrot" in out
    assert "plan: Move primarily forward" in out and "actions: [[" in out and "verdict: done" in out
    assert "outcome: success" in out
    task_id = out.split("task ", 1)[1].split()[0]
    reader = EpisodeReader(daemon.folder / "episodes" / task_id)  # type: ignore[attr-defined]
    assert reader.outcome == "success" and reader.meta.instruction == "levanta la zanahoria"

    failed = cli("do", "please fail to lift the carrot", "--config", config)
    assert failed.returncode == 1, failed.stderr
    assert "outcome: failed" in failed.stdout

    status = cli("status", "--config", config)
    assert status.returncode == 0 and "daemon: idle" in status.stdout and "e-stop: released" in status.stdout


def test_second_task_while_busy_is_409(daemon: DaemonProcess) -> None:
    client = _client(daemon)
    wait_idle(client, timeout_s=15.0, poll_s=0.05)
    first = client.submit(f"lift the carrot {UNTIL_CANCELLED}")  # busy however slow the machine
    with pytest.raises(DaemonApiError) as refused:
        client.submit("lift the carrot again")
    assert refused.value.status == 409
    busy = cli("do", "lift the eggplant", "--config", str(daemon.config))  # type: ignore[attr-defined]
    assert busy.returncode == 1 and "409" in busy.stderr
    client.cancel(first["id"])
    wait_idle(client, timeout_s=15.0, poll_s=0.05)
    assert client.task(first["id"])["result"]["outcome"] == "aborted"


def test_stop_latches_and_reset_releases(daemon: DaemonProcess) -> None:
    client = _client(daemon)
    config = str(daemon.config)  # type: ignore[attr-defined]
    wait_idle(client, timeout_s=15.0, poll_s=0.05)
    task = client.submit(f"put the carrot on the plate {UNTIL_CANCELLED}")
    wait_for_event(client, task["id"], "subtasks")  # planned: the first step is generating
    stopped = cli("stop", "--config", config, "--reason", "hand in the workspace")
    assert stopped.returncode == 0, stopped.stderr
    status = wait_idle(client, timeout_s=15.0, poll_s=0.05)
    assert status["state"] == "estop" and status["estop"]["reason"] == "hand in the workspace"
    assert client.task(task["id"])["result"]["outcome"] == "aborted"
    latched = cli("do", "lift the carrot", "--config", config)
    assert latched.returncode == 1 and "423" in latched.stderr
    assert cli("status", "--config", config).stdout.count("LATCHED") == 1
    assert cli("reset", "--config", config).returncode == 0
    assert client.status()["state"] == "idle"
    metrics = client.metrics()
    assert 'vlm2vla_episodes_total{outcome="aborted"}' in metrics and "vlm2vla_estops_total 1" in metrics


def test_a_client_that_goes_away_does_not_disturb_the_episode(daemon: DaemonProcess) -> None:
    client = _client(daemon)
    wait_idle(client, timeout_s=15.0, poll_s=0.05)
    task = client.submit("lift the carrot")
    for _ in range(3):  # open the stream, read a little, vanish
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(daemon.socket_path))
        sock.sendall(f"GET /v1/tasks/{task['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert b"200 OK" in sock.recv(200)
        sock.close()
    events = list(client.events(task["id"]))  # a well-behaved client still gets everything from 0
    assert events[0]["kind"] == "episode_start" and events[-1]["kind"] == "episode_end"
    assert events[-1]["outcome"] == "success"
    assert client.health()["ok"] is True


def test_sigterm_mid_episode_parks_the_arm_and_records_the_episode(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = DaemonProcess.fake(config, tmp_path / "d.sock", step_s=2.0, watchdog_usec=None)
    try:
        proc.wait_for("READY=1")
        client = DaemonClient(tmp_path / "d.sock", timeout_s=5)
        task = client.submit("lift the carrot")
        wait_for_event(client, task["id"], "subtasks")  # the first step generates for 2 s
    finally:
        code, out, err = proc.terminate()
    assert code == 0, err[-2000:]
    assert any(m.startswith("STOPPING=1") for m in proc.messages)
    sleep_joints = load_robot_config().sleep_joints
    final = json.loads(out.strip().splitlines()[-1].split("=", 1)[1])
    assert final == pytest.approx(list(sleep_joints), abs=1e-6)
    reader = EpisodeReader(tmp_path / "episodes" / task["id"])
    assert reader.outcome == "aborted" and "SIGTERM" in (reader.meta.outcome_detail or "")
    assert not (tmp_path / "d.sock").exists()
    assert "event=safe_pose pose=sleep" in err


def test_tcp_needs_the_bearer_token(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text("tcp-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    config = write_config(tmp_path, daemon={"tcp_host": "127.0.0.1", "tcp_port": port, "token_file": str(token_file)})
    proc = DaemonProcess.fake(config, tmp_path / "d.sock", watchdog_usec=None)
    try:
        proc.wait_for("READY=1")

        def get(headers: dict[str, str]) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/v1/status", headers=headers)
                response = conn.getresponse()
                body = response.read().decode()
                assert "tcp-token" not in body
                return response.status
            finally:
                conn.close()

        assert get({}) == 401
        assert get({"Authorization": "Bearer wrong-token-0123456789abcdef"}) == 401
        assert get({"Authorization": "Basic dGNwLXRva2Vu"}) == 401
        assert get({"Authorization": "Bearer tcp-token-0123456789abcdef"}) == 200
        over_tcp = DaemonClient(url=f"http://127.0.0.1:{port}", token="tcp-token-0123456789abcdef")
        assert over_tcp.status()["state"] == "idle"
        assert DaemonClient(tmp_path / "d.sock").status()["state"] == "idle"  # the Unix socket needs no token
    finally:
        code, _, err = proc.terminate()
    assert code == 0, err[-2000:]
    assert "tcp-token-0123456789abcdef" not in err  # never in the log


def test_do_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = cli("do", "lift the carrot", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 2
    assert "no vlm2vla-edge daemon answers" in result.stderr and "--local" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for command in ("status", "stop", "reset"):
        assert cli(command, "--socket", str(tmp_path / "none.sock")).returncode == 2


def test_real_model_daemon_via_serve(gemma270m_bundle, tmp_path: Path) -> None:
    """`vlm2vla-edge serve --sim` with the real Gemma-3-270M bundle: ready, one task end to end, SIGTERM."""
    config = write_config(tmp_path, runner={"max_retries_per_subtask": 0, "max_steps": 2})
    proc = DaemonProcess.start(
        ["-m", "vlm2vla_edge.runtime.cli", "serve", "--config", str(config), "--bundle", str(gemma270m_bundle.root)],
        tmp_path / "d.sock",
        watchdog_usec=2_000_000,
    )
    try:
        proc.wait_for("READY=1", timeout_s=120)
        result = cli("do", "pick up the carrot", "--config", str(config), timeout=240)
        assert result.returncode in (0, 1), result.stderr
        assert "instruction: pick up the carrot  (model gemma-3-270m-test" in result.stdout
        assert "outcome: " in result.stdout
        proc.wait_for("WATCHDOG=1", timeout_s=5)
        status = DaemonClient(tmp_path / "d.sock").status()
        assert status["state"] == "idle" and status["episodes"] == 1
    finally:
        code, _, err = proc.terminate(timeout_s=60)
    assert code == 0, err[-2000:]
    episodes = list((tmp_path / "episodes").iterdir())
    assert len(episodes) == 1 and EpisodeReader(episodes[0]).outcome in ("success", "failed")
