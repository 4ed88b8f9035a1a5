"""systemd's notify protocol in a few lines (no libsystemd): datagrams to `$NOTIFY_SOCKET`.

`Type=notify` units wait for READY=1 before they count as started; `WatchdogSec=` units must send
WATCHDOG=1 more often than the configured interval or systemd restarts them. Outside systemd (no
`NOTIFY_SOCKET`) every call is a no-op, so the daemon runs the same from a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):  # abstract namespace: a leading NUL byte instead of '@'
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    log.warning("event=sd_notify_ignored reason=unsupported_address")  # e.g. vsock: not for a robot service
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one state message ("READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=..."); True if sent."""
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(1.0)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:  # systemd went away or the socket is wrong: the service itself goes on
        log.warning("event=sd_notify_failed error=%r", exc.strerror or str(exc))
        return False
    return True


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to ping: half of `WatchdogSec=` (systemd's advice), or None when no watchdog is asked
    for this process (`WATCHDOG_PID` names another process, or `WATCHDOG_USEC` is absent)."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 / 2 if value > 0 else None
