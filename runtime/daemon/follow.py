"""Following a task the daemon runs (`vlm2vla-edge do` without --local): stream its events until it ends.

The event stream can end before the episode does (the daemon stopped); the task's own state then
gives the outcome ("unknown" while the task still runs: the loop does not reconnect). The first
Ctrl-C asks the daemon to cancel the task and keeps following it to its end, so the user still sees
the outcome; a second Ctrl-C stops waiting.
"""

from __future__ import annotations

from typing import Callable

from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonClient, DaemonUnavailable, format_event

Echo = Callable[[str], None]


def follow_task(
    client: DaemonClient, task_id: str, echo: Echo, echo_err: Echo, call: Callable[[Callable[[], object]], object]
) -> int:
    """Print the task's events as they come; exit code 0 when it succeeded, 1 otherwise (or unknown).

    `call` runs a client request the way the command line does (no daemon -> message and exit 2)."""
    outcome: str | None = None
    cancelled = False
    seen = 0
    while outcome is None:
        try:
            for event in client.events(task_id, since=seen):
                seen += 1
                for line in format_event(event):
                    echo(line)
                if event.get("kind") == "episode_end":
                    outcome = str(event.get("outcome"))
            if outcome is None:  # the stream ended without the end event (e.g. the daemon stopped)
                state = call(lambda: client.task(task_id))
                assert isinstance(state, dict)
                result = state.get("result") or {}
                outcome = str(result.get("outcome") or "unknown")
                if state.get("state") == "running":
                    continue
        except KeyboardInterrupt:
            if cancelled:
                raise
            cancelled = True
            echo_err("cancelling the task (Ctrl-C again to stop waiting)...")
            try:
                client.cancel(task_id)
            except (DaemonUnavailable, DaemonApiError) as exc:
                echo_err(f"error: could not cancel: {exc}")
                return 1
        except DaemonUnavailable as exc:
            echo_err(f"error: {exc}; the task's outcome is unknown (see 'vlm2vla-edge status')")
            return 1
    echo(f"episode recorded by the daemon as {task_id}")
    return 0 if outcome == "success" else 1
