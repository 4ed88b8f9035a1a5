"""The daemon's API and the CLI that talks to it, in this process: the fake daemon of
tests/daemon/test_daemon_process.py (the product's `Daemon` and `ApiServer` on the simulator with a
scripted policy) on a Unix socket, the CLI through its `main`.

These are the quick set's checks of what a user does with a running daemon (`do`, `status`, `stop`,
`reset`, a busy daemon, bad requests, a client that goes away, a shutdown mid-episode). The subprocess
tests (marked slow) add what needs a real process: systemd's READY/WATCHDOG, SIGTERM, the installed
command line, TCP with a token.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlm2vla_edge.runtime.cli import main
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonClient, UnixHTTPConnection
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.runtime_config import load_runtime_config
from vlm2vla_edge.testing.daemon_process import write_config
from vlm2vla_edge.testing.daemon_waits import wait_for_event, wait_idle
from vlm2vla_edge.testing.fake_daemon import UNTIL_CANCELLED, fake_daemon_in_process, fake_station_daemon


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """One in-process fake daemon for the module and its runtime config: the simulator not in real time
    (episodes take milliseconds); "until cancelled" instructions keep it busy where a test needs that."""
    folder = tmp_path_factory.mktemp("daemon")
    limits = {"socket_mode": "0640", "max_request_bytes": 1024, "max_instruction_chars": 80}
    config = write_config(folder, daemon=limits, sim_realtime=False)
    with fake_daemon_in_process(config) as daemon:
        yield daemon, config


def _client(config: Path) -> DaemonClient:
    return DaemonClient(config.parent / "d.sock", timeout_s=10)


def test_do_streams_progress_and_exits_by_outcome(served, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = served
    wait_idle(_client(config))
    assert main(["do", "levanta la zanahoria", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "subtasks: Move to the carrot -> Grasp the carrot" in out
    assert "plan: Move primarily forward" in out and "actions: [[" in out and "verdict: done" in out
    assert "outcome: success" in out
    task_id = out.split("task ", 1)[1].split()[0]
    reader = EpisodeReader(config.parent / "episodes" / task_id)
    assert reader.outcome == "success" and reader.meta.instruction == "levanta la zanahoria"

    assert main(["do", "please fail to lift the carrot", "--config", str(config)]) == 1
    assert "outcome: failed" in capsys.readouterr().out

    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "daemon: idle" in out and "e-stop: released" in out


def test_second_task_while_busy_is_409(served, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = served
    client = _client(config)
    wait_idle(client)
    first = client.submit(f"lift the carrot {UNTIL_CANCELLED}")
    with pytest.raises(DaemonApiError) as refused:
        client.submit("lift the carrot again")
    assert refused.value.status == 409
    assert main(["do", "lift the eggplant", "--config", str(config)]) == 1
    assert "409" in capsys.readouterr().err
    client.cancel(first["id"])
    wait_idle(client)
    assert client.task(first["id"])["result"]["outcome"] == "aborted"


def test_stop_latches_and_reset_releases(served, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = served
    client = _client(config)
    wait_idle(client)
    task = client.submit(f"put the carrot on the plate {UNTIL_CANCELLED}")
    wait_for_event(client, task["id"], "subtasks")  # planned: the first step is generating
    assert main(["stop", "--config", str(config), "--reason", "hand in the workspace"]) == 0
    status = wait_idle(client)
    assert status["state"] == "estop" and status["estop"]["reason"] == "hand in the workspace"
    assert client.task(task["id"])["result"]["outcome"] == "aborted"
    capsys.readouterr()
    assert main(["do", "lift the carrot", "--config", str(config)]) == 1
    assert "423" in capsys.readouterr().err
    assert main(["status", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("LATCHED") == 1
    assert main(["reset", "--config", str(config)]) == 0
    assert client.status()["state"] == "idle"
    metrics = client.metrics()
    assert 'vlm2vla_episodes_total{outcome="aborted"}' in metrics and "vlm2vla_estops_total 1" in metrics


def test_a_client_that_goes_away_does_not_disturb_the_episode(served) -> None:
    _, config = served
    client = _client(config)
    wait_idle(client)
    task = client.submit("lift the carrot")
    for _ in range(3):  # open the stream, read a little, vanish
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(config.parent / "d.sock"))
        sock.sendall(f"GET /v1/tasks/{task['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert b"200 OK" in sock.recv(200)
        sock.close()
    events = list(client.events(task["id"]))  # a well-behaved client still gets everything from 0
    assert events[0]["kind"] == "episode_start" and events[-1]["kind"] == "episode_end"
    assert events[-1]["outcome"] == "success"
    assert client.health()["ok"] is True


def test_the_socket_gets_the_configured_mode(served) -> None:
    _, config = served
    assert stat.S_IMODE(os.stat(config.parent / "d.sock").st_mode) == 0o640


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "needle"),
    [
        ("POST", "/v1/tasks", b"{not json", {"Content-Type": "application/json"}, 400, "JSON"),
        ("POST", "/v1/tasks", b'["lift"]', {}, 400, "object"),
        ("POST", "/v1/tasks", json.dumps({"instruction": "lift\u0007 it"}).encode(), {}, 400, "control"),
        ("POST", "/v1/tasks", json.dumps({"instruction": "x" * 81}).encode(), {}, 400, "limit is 80"),
        ("POST", "/v1/tasks", json.dumps({"instruction": "lift", "bundle": "/etc/passwd"}).encode(), {}, 400,
         "no file paths"),
        ("POST", "/v1/tasks", json.dumps({"instruction": "lift", "episodes_dir": "/"}).encode(), {}, 400,
         "no file paths"),
        ("POST", "/v1/tasks", json.dumps({"instruction": "x" * 2000}).encode(), {}, 413, "limit"),
        ("POST", "/v1/tasks", b'{"instruction": "lift"}', {"Content-Type": "text/plain"}, 415, "json"),
        ("GET", "/v1/tasks", None, {}, 405, "POST"),
        ("DELETE", "/v1/estop", None, {}, 405, "POST"),
        ("GET", "/v1/nothing", None, {}, 404, "endpoint"),
        ("GET", "/v1/tasks/..%2F..%2Fetc", None, {}, 404, ""),
        ("GET", "/v1/tasks/20000101T000000.000Z-000000", None, {}, 404, "no such task"),
    ],
)
def test_bad_requests_get_clear_json_errors(served, method, path, body, headers, status, needle) -> None:
    _, config = served
    conn = UnixHTTPConnection(config.parent / "d.sock", timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        got, data = response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()
    assert got == status
    assert data["error"]["status"] == status and needle.lower() in data["error"]["message"].lower()


def test_shutdown_mid_episode_parks_the_arm_and_records_the_episode(tmp_path: Path) -> None:
    """What SIGTERM makes `serve` do (tests/daemon/test_daemon_process.py sends the real signal)."""
    settings = load_runtime_config(write_config(tmp_path, sim_realtime=False))
    with fake_station_daemon(settings) as (daemon, station):
        task = daemon.submit(f"lift the carrot {UNTIL_CANCELLED}")
        since, kinds, deadline = 0, [], time.monotonic() + 30
        while "subtasks" not in kinds and time.monotonic() < deadline:  # planned: the first step is generating
            items, since, _ = task.events.read(since, 1.0)
            kinds += [item["kind"] for _, item in items]
        assert "subtasks" in kinds
        daemon.shutdown("daemon stopping (SIGTERM)")
        joints = station.arm.read_state().joints
    assert joints == pytest.approx(list(load_robot_config().sleep_joints), abs=1e-6)
    reader = EpisodeReader(task.episode_dir)
    assert reader.outcome == "aborted" and "SIGTERM" in (reader.meta.outcome_detail or "")


@pytest.mark.parametrize("command", [["do", "lift the carrot"], ["status"], ["stop"], ["reset"]])
def test_commands_without_a_daemon_say_so(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--socket", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert "no vlm2vla-edge daemon answers" in err and len(err.strip().splitlines()) == 1
