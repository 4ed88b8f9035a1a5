"""What the uvicorn/Starlette API stack changed, checked directly: half-closed clients, body timeouts, the
e-stop never queued behind busy worker threads, and which threads run at which priority."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from reliability_suite.load import clean_error, daemon_in_process, raw_exchange
from vlm2vla_edge.runtime.daemon import http_api
from vlm2vla_edge.runtime.daemon.client import DaemonClient
from vlm2vla_edge.runtime.daemon.priority import PROCESS_NICE
from vlm2vla_edge.runtime.runtime_config import DaemonConfig


@pytest.fixture(scope="module")
def api():
    with tempfile.TemporaryDirectory() as tmp, daemon_in_process(Path(tmp)) as (daemon, path):
        yield daemon, path


def test_a_body_cut_short_by_a_half_close_is_a_400_not_silence(api) -> None:
    _, path = api
    data = b'POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"instr'
    response = raw_exchange(path, data, half_close=True)
    assert response.status == 400 and clean_error(response) is None
    assert "ended early" in response.body.decode()


def test_a_complete_request_then_half_close_still_gets_its_answer(api) -> None:
    _, path = api
    response = raw_exchange(path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", half_close=True)
    assert response.status == 200 and b'"ok": true' in response.body


@pytest.mark.parametrize(
    "data",
    [
        b"GET /v1/status HTTP/1.1\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Long: " + b"z" * 20_000,
    ],
)
def test_protocol_errors_from_h11_are_json_errors(api, data: bytes) -> None:
    _, path = api
    response = raw_exchange(path, data)
    assert response.status == 400 and clean_error(response) is None
    assert response.headers.get("connection") == "close"


def test_a_body_that_never_arrives_is_a_408(api, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = api
    monkeypatch.setattr(http_api, "BODY_TIMEOUT_S", 0.5)
    data = b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{"
    response = raw_exchange(path, data, timeout_s=5)
    assert response.status == 408 and clean_error(response) is None and response.elapsed_s < 4


def test_the_estop_is_not_queued_behind_busy_worker_threads(api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker thread stuck in a slow status call: the e-stop still answers at once (it runs on the loop)."""
    daemon, path = api
    release = threading.Event()
    stuck = threading.Semaphore(0)  # released once per worker thread that is stuck
    original = daemon.status

    def stuck_status() -> dict:
        stuck.release()
        release.wait(60)
        return original()

    monkeypatch.setattr(daemon, "status", stuck_status)
    callers = [threading.Thread(target=lambda: DaemonClient(path, timeout_s=90).status())
               for _ in range(http_api.MAX_WORKERS + 4)]
    for t in callers:
        t.start()
    try:
        for _ in range(http_api.MAX_WORKERS):  # every worker thread is stuck (the last 4 calls wait for one)
            assert stuck.acquire(timeout=30)
        began = time.monotonic()
        DaemonClient(path, timeout_s=30).estop("test: workers busy")
        # Queued behind the workers it would wait the 60 s they are stuck; the bound is for a loaded machine.
        assert time.monotonic() - began < 5.0 and daemon.station.limiter.engaged
    finally:
        release.set()
        for t in callers:
            t.join(90)
        daemon.reset(wait_s=5)


def test_only_the_event_loop_thread_runs_at_the_api_priority(tmp_path: Path) -> None:
    """The loop gets `api_thread_nice`; worker threads and the episode (and so the model) the process's.
    (A *higher* nice value than the process's is always allowed, so the test needs no privilege.)"""
    wanted = min(PROCESS_NICE + 3, 19)
    config = DaemonConfig(socket_path=tmp_path / "d.sock", api_thread_nice=wanted)
    before = set(threading.enumerate())
    with daemon_in_process(tmp_path, config) as (daemon, path):
        loop = next(t for t in threading.enumerate() if t.name == "api" and t not in before)
        assert os.getpriority(os.PRIO_PROCESS, loop.native_id) == wanted
        seen: list[int] = []
        original = daemon.runner.policy.step

        def step(*args, **kwargs):  # the policy's signature
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return original(*args, **kwargs)

        daemon.runner.policy.step = step
        client = DaemonClient(path)
        assert client.health()["ok"]
        task = client.submit("move back and forth")
        assert daemon.task(task["id"]).done.wait(10)
        workers = [t for t in threading.enumerate() if t.name.startswith("api-worker") and t not in before]
        assert workers and all(os.getpriority(os.PRIO_PROCESS, t.native_id) == PROCESS_NICE for t in workers)
        assert seen and set(seen) == {PROCESS_NICE}


def test_closing_the_server_removes_the_socket_and_frees_the_path(tmp_path: Path) -> None:
    config = DaemonConfig(socket_path=tmp_path / "d.sock")
    for _ in range(2):  # the same path again: nothing left behind
        with daemon_in_process(tmp_path, config) as (_, path):
            assert DaemonClient(path).health()["ok"]
        assert not path.exists()
    with pytest.raises(OSError):
        socket.socket(socket.AF_UNIX).connect(str(path))
