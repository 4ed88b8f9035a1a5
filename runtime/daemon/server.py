"""`vlm2vla-edge serve`: bind the API, tell systemd we are ready, ping its watchdog, stop cleanly on SIGTERM.

`serve()` takes an already-built `Daemon` (policy loaded, station connected) and runs until SIGTERM or
SIGINT; `serve_from_config()` builds that daemon from the runtime config (bundle, simulator or
devices, verifier) and calls `serve()`. Order on start: listeners bound -> READY=1. Order on stop:
STOPPING=1 -> episode stopped and recorded -> arm to its safe pose (the e-stop endpoint still
answers meanwhile) -> listeners closed -> socket removed -> exit 0.

A model bundle that is missing or corrupted does not stop the daemon: it serves without a model,
unhealthy (503 on /v1/health, the reason in /v1/status, in systemd's STATUS= and once in the journal),
refusing tasks, with the e-stop working. Exiting would not help: the unit's `Restart=on-failure`
would start it again every few seconds, failing the same way each time. The watchdog checks that the
API answers (200 or 503), not that the daemon is healthy, for the same reason. Configuration errors
(a bad runtime YAML, no bundle configured at all) still exit with code 2 and one clear line.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import signal
import socket
import socketserver
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from vlm2vla_edge.runtime.daemon import sd_notify
from vlm2vla_edge.runtime.daemon.http_api import ApiHandler
from vlm2vla_edge.runtime.daemon.metrics import DaemonMetrics
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.errors import ConfigError, UserError, Vlm2VlaError
from vlm2vla_edge.runtime.runtime_config import DaemonConfig, RuntimeConfig, server_socket_path

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.config import PolicyConfig
    from vlm2vla_edge.runtime.policy.engine import Policy

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16


class ApiServerMixin:
    """What the handler needs from its server."""

    daemon: Daemon
    config: DaemonConfig
    metrics: DaemonMetrics
    token: bytes | None


class UnixApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer, ApiServerMixin):
    daemon_threads = True
    request_queue_size = 128  # the default 5 refuses bursts of clients, an e-stop among them
    block_on_close = False

    def __init__(self, path: Path, daemon: Daemon, config: DaemonConfig) -> None:
        self.daemon, self.config, self.metrics, self.token = daemon, config, daemon.metrics, None
        self.path = path
        super().__init__(str(path), ApiHandler, bind_and_activate=False)

    def server_bind(self) -> None:
        # The socket must never exist with a wider mode than configured, not even for a moment.
        previous = os.umask(0o177)
        try:
            super().server_bind()
        finally:
            os.umask(previous)
        os.chmod(self.path, self.config.socket_mode)
        if self.config.socket_group is not None:
            os.chown(self.path, -1, _group_id(self.config.socket_group))


class TcpApiServer(socketserver.ThreadingMixIn, socketserver.TCPServer, ApiServerMixin):
    daemon_threads = True
    request_queue_size = 128  # the default 5 refuses bursts of clients, an e-stop among them
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, host: str, port: int, daemon: Daemon, config: DaemonConfig, token: bytes) -> None:
        self.daemon, self.config, self.metrics, self.token = daemon, config, daemon.metrics, token
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), ApiHandler)


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group '{name}' does not exist on this machine") from None


def read_token(path: Path) -> bytes:
    """The TCP bearer token; refuses a file that anyone but its owner can read, or a weak token."""
    try:
        info = os.stat(path)
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the token file {path} is not UTF-8 text") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the token file {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run 'chmod 600 {path}'"
        )
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"the token file {path} belongs to another user; it must be this service's or root's")
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise ConfigError(f"the token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters")
    return text.encode("utf-8")


def prepare_socket_path(path: Path, group: str | None) -> None:
    """Create the socket's folder, and remove a stale socket; refuse when another daemon answers there."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750 if group else 0o700)
        if group:
            os.chown(path.parent, -1, _group_id(group))
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise UserError(f"{path} exists and is not a socket; remove it or choose another socket_path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # left behind by a daemon that died
            return
        raise UserError(f"cannot check the existing socket {path}: {exc.strerror or exc}") from None
    else:
        raise UserError(f"another vlm2vla-edge daemon already listens on {path}")
    finally:
        probe.close()


def _self_check(path: Path, timeout_s: float) -> bool:
    """GET /v1/health over our own socket: proves the accept loop and a handler thread still work.

    An unhealthy answer (503: no model, a device unplugged) counts as alive: a restart would not fix
    it, and withholding the ping would have systemd restart the daemon in a loop."""
    from vlm2vla_edge.runtime.daemon.client import DaemonClient, DaemonUnavailable

    try:
        status, _ = DaemonClient(path, timeout_s=timeout_s).request("GET", "/v1/health")
    except DaemonUnavailable:
        return False
    return status in (200, 503)


def serve(
    daemon: Daemon,
    config: DaemonConfig,
    *,
    on_ready: Callable[[Path], None] | None = None,
) -> int:
    """Serve the API until SIGTERM/SIGINT; returns the exit code (0 after a clean stop)."""
    path = server_socket_path(config)
    token = read_token(config.token_file) if config.tcp_port is not None and config.token_file is not None else None
    prepare_socket_path(path, config.socket_group)
    servers: list[socketserver.BaseServer] = []
    unix = UnixApiServer(path, daemon, config)
    try:
        unix.server_bind()
        unix.server_activate()
    except OSError as exc:
        unix.server_close()
        raise UserError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    servers.append(unix)
    if config.tcp_port is not None:
        assert config.tcp_host is not None and token is not None  # DaemonConfig checks both
        try:
            servers.append(TcpApiServer(config.tcp_host, config.tcp_port, daemon, config, token))
        except OSError as exc:
            unix.server_close()
            os.unlink(path)
            raise UserError(f"cannot listen on {config.tcp_host}:{config.tcp_port}: {exc.strerror or exc}") from None

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, name=f"api-{i}", daemon=True)
        for i, s in enumerate(servers)
    ]
    for thread in threads:
        thread.start()
    where = str(path) + (f" and {config.tcp_host}:{config.tcp_port} (token)" if config.tcp_port else "")
    log.info("event=serving socket=%s mode=%04o tcp=%s", path, config.socket_mode,
             f"{config.tcp_host}:{config.tcp_port}" if config.tcp_port else "off")
    healthy, why = daemon.health()
    state = f"serving on {where}" if healthy else f"UNHEALTHY ({why[:300]}); serving on {where}"
    sd_notify.notify(f"READY=1\nSTATUS={state}\nMAINPID={os.getpid()}")
    if on_ready is not None:
        on_ready(path)
    interval = sd_notify.watchdog_interval_s() if config.watchdog else None
    try:
        while not stop.wait(interval if interval is not None else 1.0):
            if interval is None:
                continue
            alive = all(t.is_alive() for t in threads)
            if alive and _self_check(path, timeout_s=min(interval, 2.0)):
                sd_notify.notify("WATCHDOG=1")
            else:  # no ping: systemd restarts us after WatchdogSec
                log.error("event=watchdog_skipped threads_alive=%s", alive)
    finally:
        reason = f"daemon stopping ({received[0] if received else 'exit'})"
        log.warning("event=stopping signal=%s", received[0] if received else "-")
        sd_notify.notify("STOPPING=1\nSTATUS=stopping: parking the arm")
        try:
            daemon.shutdown(reason)
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.warning("event=stopped")
    return 0


def serve_from_config(
    settings: RuntimeConfig,
    *,
    bundle: Path | None = None,
    sim: bool | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Load the bundle, connect the station (simulator or devices), and serve until stopped."""
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.runtime.local_run import load_policy, open_station
    from vlm2vla_edge.runtime.verifier.fallback import make_verifier

    chosen_bundle = bundle or settings.bundle
    if chosen_bundle is None:
        raise UserError("no model bundle: pass --bundle PATH (a folder with manifest.json) or set 'bundle' in the runtime config")
    use_sim = settings.sim if sim is None else sim
    robot = load_robot_config(settings.robot)
    policy_config = load_policy_config(settings.policy)
    verifier = make_verifier(settings.verifier)
    # Until the serve loop installs its own handler, SIGTERM unwinds through the context managers below
    # (arm disconnected, model freed) instead of killing the process mid-set-up.
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        sd_notify.notify("STATUS=loading the model bundle")
        with _policy_or_error(chosen_bundle, policy_config, echo, load_policy) as (policy, policy_error):
            sd_notify.notify("STATUS=connecting the robot")
            with open_station(
                robot, sim=use_sim, seed=settings.sim_seed, devices=settings.devices, realtime=settings.sim_realtime,
            ) as station:
                daemon = Daemon(
                    policy, station, verifier, robot=robot, episodes_dir=settings.episodes_dir,
                    config=settings.daemon, runner_config=settings.runner, record_frames=settings.record_frames,
                    sim_seed=settings.sim_seed, policy_error=policy_error,
                )
                return serve(daemon, settings.daemon)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _policy_or_error(
    bundle: Path,
    config: "PolicyConfig",
    echo: Callable[[str], None],
    load: Callable[[Path, "PolicyConfig", Callable[[str], None]], "Policy"],
) -> Iterator[tuple["Policy | None", str | None]]:
    """The loaded policy (closed on exit), or None and why it could not be loaded."""
    try:
        policy = load(bundle, config, echo)
    except Exception as exc:  # noqa: BLE001 - any bad bundle (missing, corrupt, unloadable) is reported, not fatal
        error = str(exc) if isinstance(exc, Vlm2VlaError) else f"{type(exc).__name__}: {exc}"
        log.error("event=model_unavailable bundle=%s error=%r", bundle, error)
        echo(f"error: cannot load the model bundle: {error}")
        echo("serving without a model: /v1/health answers 503 and tasks are refused until the bundle is fixed "
             "and the daemon restarted; the e-stop works")
    else:
        with contextlib.closing(policy):
            yield policy, None
        return
    yield None, error


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
