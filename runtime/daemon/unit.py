"""The systemd unit of the daemon, rendered for one machine (`vlm2vla-edge install-service`).

`systemd/vlm2vla-edge.service` in the repository is this template rendered with `UnitOptions()`'s
defaults (a test keeps the two identical), so the unit has exactly one source.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from vlm2vla_edge.runtime.errors import UserError

DEFAULT_EXEC = Path("/opt/vlm2vla-edge/.venv/bin/vlm2vla-edge")
DEFAULT_CONFIG = Path("/etc/vlm2vla-edge/runtime.yaml")
DEFAULT_CREDENTIAL = Path("/etc/vlm2vla-edge/gemini_api_key")


@dataclass(frozen=True)
class UnitOptions:
    executable: Path = DEFAULT_EXEC  # the venv's vlm2vla-edge script
    config: Path = DEFAULT_CONFIG  # runtime.yaml (bundle, robot, devices, daemon section)
    user: str = "vlm2vla"
    group: str = "vlm2vla"  # the socket's group: its members may drive the robot
    gemini_credential: Path | None = DEFAULT_CREDENTIAL  # None: no LoadCredential line (offline verifier)
    watchdog_s: int = 30
    sim: bool = False


_TEMPLATE = """\
# vlm2vla-edge daemon: holds the model and the robot, serves the local API (see systemd/README.md).
# Rendered by `vlm2vla-edge install-service`; edit the runtime config, not this file, where you can.
[Unit]
Description=vlm2vla-edge robot policy daemon (VLM2VLA on llama.cpp)
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
User={user}
Group={group}
# The arm's U2D2 serial adapter (/dev/ttyDXL -> ttyUSB*) needs dialout; cameras need video; RealSense USB plugdev.
SupplementaryGroups=dialout video plugdev
# Socket in /run/vlm2vla-edge (group-readable folder, socket mode 0660 from the runtime config).
RuntimeDirectory=vlm2vla-edge
RuntimeDirectoryMode=0750
# Episodes in /var/lib/vlm2vla-edge/episodes.
StateDirectory=vlm2vla-edge
StateDirectoryMode=0750
UMask=0027
{credential}
# READY=1 comes after the model is loaded and the robot connected; a 12B bundle takes minutes to load.
TimeoutStartSec=600
WatchdogSec={watchdog}
Restart=on-failure
RestartSec=5
# Exit 2 is a configuration error: restarting cannot fix it (a missing or damaged model is served as
# 'unhealthy' instead, with the reason in the status and the journal).
RestartPreventExitStatus=2
# SIGTERM: stop the episode (recorded as aborted), park the arm in its sleep pose, exit 0.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=60

# CPU: the e-stop must hold when the robot computer is saturated (bench/estop_latency.py --cpu-load 4).
# The API's event-loop thread (which runs the e-stop) lowers its own nice value to the runtime config's
# daemon.api_thread_nice (-10), which LimitNICE= allows without any capability; every other thread,
# the model's decoding included, keeps nice 0. CPUWeight= gives this service's cgroup 5x the default
# share against other services when the CPUs are contended (not a reservation: idle CPU is anyone's).
# No real-time policy: a runaway thread must not be able to freeze the machine; RestrictRealtime= stays on.
LimitNICE=-10
CPUWeight=500

# Sandboxing: read-only system, no home folders, private /tmp, no privilege gain, only the robot's devices.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=
# AF_NETLINK: libusb/udev device discovery; AF_INET*: the Gemini verifier and the optional TCP API.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# MemoryDenyWriteExecute is left off: ctypes callbacks (llama.cpp's log hook) need libffi trampolines.
# Devices: nothing but the arm's USB serial adapter, raw USB (RealSense) and video devices.
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=char-ttyUSB rw
DeviceAllow=char-ttyACM rw
DeviceAllow=char-usb_device rwm
DeviceAllow=char-video4linux rw

[Install]
WantedBy=multi-user.target
"""


def render_unit(options: UnitOptions = UnitOptions()) -> str:
    """The unit text for these paths and accounts."""
    args = [str(options.executable), "--log-level", "INFO", "serve", "--config", str(options.config)]
    if options.sim:
        args.append("--sim")
    exec_start = " ".join(_quote(a) for a in args) + " --episodes-dir %S/vlm2vla-edge/episodes"  # %S: /var/lib
    if options.gemini_credential is not None:
        credential = (
            "# The Gemini API key as a systemd credential "
            "($CREDENTIALS_DIRECTORY/gemini_api_key); the file must exist.\n"
            f"LoadCredential=gemini_api_key:{options.gemini_credential}"
        )
    else:
        credential = "# No Gemini credential: the verifier runs offline (heuristic). See systemd/README.md to add one."
    return _TEMPLATE.format(
        exec_start=exec_start,
        user=options.user,
        group=options.group,
        credential=credential,
        watchdog=options.watchdog_s,
    )


def installed_executable(argv0: str | None = None) -> Path:
    """The `vlm2vla-edge` script the unit should start: the one running now, else the one next to this
    Python (a venv's bin/), else the one on PATH; a `UserError` when none exists (not installed)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = Path(argv0).resolve() if Path(argv0).name == "vlm2vla-edge" else None
    if executable is None or not executable.is_file():
        found = Path(sys.executable).parent / "vlm2vla-edge"
        executable = found if found.is_file() else Path(shutil.which("vlm2vla-edge") or found)
    if not executable.is_file():
        raise UserError(f"cannot find the vlm2vla-edge executable (looked at {executable}); install the package first")
    return executable


def _quote(arg: str) -> str:
    """systemd's ExecStart= quoting is close to the shell's for plain paths; refuse what it is not."""
    if any(c in arg for c in "\n\"'\\$;") or not arg:
        raise ValueError(f"cannot put {arg!r} into a unit's ExecStart= line; use a path without quotes, '$' or ';'")
    arg = arg.replace("%", "%%")  # '%' starts a systemd specifier
    return shlex.quote(arg) if " " in arg else arg
