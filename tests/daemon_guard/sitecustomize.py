"""Installs the system-daemon guard in Python subprocesses started by the tests (see system_daemon_guard.py)."""

import system_daemon_guard

system_daemon_guard.install()
