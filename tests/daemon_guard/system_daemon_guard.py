"""No test may reach the robot's real daemon: a Python audit hook refuses any connect to, or file
operation on, the system service's runtime folder (/run/vlm2vla-edge, where its socket lives).

Pointing socket discovery elsewhere (tests/conftest.py's autouse fixture) is the first line; this is
the second, for code that bypasses discovery or runs in a subprocess. tests/conftest.py installs the
hook in the test process and puts this folder on PYTHONPATH, so `sitecustomize.py` installs it in every
Python subprocess a test starts too. A refused operation raises `SystemDaemonTouched` (not an OSError:
the client would turn that into "no daemon answers" and a test could pass by accident) and is
appended to the file named by `$VLM2VLA_EDGE_GUARD_LOG`, which the test session checks at its end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The folder the system service's socket lives in (`RuntimeDirectory=vlm2vla-edge`).
SYSTEM_DIR = "/run/vlm2vla-edge"
LOG_ENV = "VLM2VLA_EDGE_GUARD_LOG"
_EVENTS = {"socket.connect", "socket.bind", "open", "os.mkdir", "os.remove", "os.rename", "os.rmdir", "os.chmod",
           "os.chown", "os.listdir", "os.scandir", "os.symlink", "os.link", "os.truncate", "os.utime"}
_installed = False


class SystemDaemonTouched(RuntimeError):
    """A test tried to use the real daemon's folder."""


def _path_of(value: object) -> str | None:
    if isinstance(value, (tuple, int)):  # a TCP address, a file descriptor
        return None
    try:
        path = os.fsdecode(os.fspath(value))  # type: ignore[arg-type]
    except TypeError:
        return None
    return path.lstrip("\0")


def is_system_path(path: str) -> bool:
    normal = os.path.normpath(path) if path.startswith("/") else path
    return normal == SYSTEM_DIR or normal.startswith(SYSTEM_DIR + "/")


def _hook(event: str, args: tuple) -> None:
    if event not in _EVENTS or not args:
        return
    target = args[1] if event.startswith("socket.") and len(args) > 1 else args[0]
    path = _path_of(target)
    if path is None or not is_system_path(path):
        return
    record(f"{event} {path} (pid {os.getpid()}, {' '.join(sys.argv)[:200]})")
    raise SystemDaemonTouched(f"a test tried {event} on {path}: tests must never reach the robot's real daemon")


def record(line: str) -> None:
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as out:  # not under SYSTEM_DIR: the hook lets it through
            out.write(line + "\n")


def touches() -> list[str]:
    """What the session's processes tried so far (one line each)."""
    log = os.environ.get(LOG_ENV)
    if not log or not Path(log).exists():
        return []
    return Path(log).read_text(encoding="utf-8").splitlines()


def install() -> None:
    """Add the audit hook (once per process; audit hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
