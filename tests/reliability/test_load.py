"""Load at CI scale: the daemon keeps answering, refuses concurrent submissions cleanly, and stops the
arm under load (bench/reliability_suite/load.py; the bench runs 1,000 requests and 100 submissions)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from reliability_suite.load import LoadStats, daemon_in_process, load_during_episode
from vlm2vla_edge.runtime.daemon.client import DaemonClient


def test_a_burst_of_clients_is_queued_not_refused() -> None:
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, daemon_in_process(Path(tmp)) as (_, path):
        def hit() -> None:
            client = DaemonClient(path, timeout_s=10)
            for _ in range(10):
                try:
                    client.status()
                except Exception as exc:  # noqa: BLE001 - collected
                    errors.append(str(exc))

        threads = [threading.Thread(target=hit) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []


@pytest.mark.slow
def test_status_and_estop_under_moderate_load() -> None:
    """Within the backlog (3 clients at a time): every request answered, submissions refused with 409
    while busy and exactly one accepted when idle, and the e-stop halts the arm under load."""
    stats = LoadStats()
    tally = load_during_episode(status_requests=150, submits=4, estop_trials=3, threads=3, stats=stats)
    not_timing = [f for f in tally.failures if not f.startswith("trial ")]
    assert not_timing == []
    assert tally.unsafe_commands == 0 and stats.running_seen > 20
    assert len(stats.arm_halted_ms) == 3
    assert max(stats.arm_halted_ms) < 250  # the bench holds p99 to 50 ms; CI shares two busy cores


@pytest.mark.slow
def test_bench_load_all_requests_answered() -> None:
    tally = load_during_episode(status_requests=300, submits=100, estop_trials=2, threads=8)
    assert [f for f in tally.failures if not f.startswith("trial ")] == []
