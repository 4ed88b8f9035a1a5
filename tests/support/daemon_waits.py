"""Waiting on a daemon through its client, for tests that drive one (in process or as a subprocess):
until it is idle, or until a task's event stream reaches a phase. Events, not sleeps, say when."""

from __future__ import annotations

import contextlib
import time

from vlm2vla_edge.runtime.daemon.client import DaemonClient


def wait_idle(client: DaemonClient, timeout_s: float = 30.0, poll_s: float = 0.02) -> dict:
    """The daemon's status once neither it nor its task is running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.status()
        # An e-stop shows as state "estop" at once, while the stopped task is still wrapping up: wait
        # for the task itself to have finished too.
        if status["state"] != "running" and (status["task"] or {}).get("state") != "running":
            return status
        time.sleep(poll_s)
    raise AssertionError("the daemon stayed busy")


def wait_for_event(client: DaemonClient, task_id: str, kind: str) -> dict:
    """Follow the task's event stream until an event of `kind`: the episode has reached that phase."""
    with contextlib.closing(client.events(task_id, read_timeout_s=30.0)) as events:
        for event in events:
            if event["kind"] == kind:
                return event
    raise AssertionError(f"task {task_id} ended without a {kind!r} event")
