"""Per-thread CPU priority for the daemon: the e-stop path ahead of the model, the model at the process's priority.

Linux keeps a nice value per thread, and a new thread starts with its creator's. The API's event
loop (which runs the e-stop handler) lowers its own nice value (`DaemonConfig.api_thread_nice`,
allowed by the unit's `LimitNICE=`), so when the CPUs are saturated it is scheduled first inside the
daemon's cgroup; the worker threads it starts for everything else (daemon calls that may block,
event streams, and through them the episode worker, llama.cpp's decoding threads and the arm) go
back to the process's nice value first thing, so the model never runs at the raised priority and
cannot starve the robot's other services.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

#: The process's nice value when this module was imported (the main thread's: what the unit set).
PROCESS_NICE = os.getpriority(os.PRIO_PROCESS, 0)


def set_thread_nice(nice: int) -> bool:
    """Set the calling thread's nice value; False (and one warning) when the system refuses it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning(
            "event=thread_priority_refused thread=%s nice=%d error=%r hint=%s", threading.current_thread().name, nice,
            exc.strerror or str(exc), "the unit's LimitNICE= (or CAP_SYS_NICE) allows it",
        )
        return False
    return True


def thread_nice() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def reset_thread_priority() -> None:
    """Back to the process's nice value (always allowed: it only lowers the priority of a raised thread)."""
    if thread_nice() != PROCESS_NICE:
        set_thread_nice(PROCESS_NICE)
