"""`vlm2vla-edge serve`: bind the API, tell systemd we are ready, ping its watchdog, stop cleanly on SIGTERM.

The HTTP server is uvicorn (h11) running the Starlette app of `http_api.py` on an event loop in a
thread of its own (`ApiServer`); this module binds its sockets (the Unix socket's mode and group set
before anyone can connect), and keeps signals, systemd notifications and the shutdown order.

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

import asyncio
import contextlib
import errno
import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlm2vla_edge.runtime.daemon import sd_notify
from vlm2vla_edge.runtime.daemon.http_api import ApiApp, create_app, error_body
from vlm2vla_edge.runtime.daemon.priority import set_thread_nice
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.errors import ConfigError, UserError, Vlm2VlaError
from vlm2vla_edge.runtime.runtime_config import DaemonConfig, RuntimeConfig, server_socket_path

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.config import PolicyConfig
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
#: Pending connections the kernel queues per listener (Python's socketserver kept 5: a burst of
#: clients was refused, an e-stop among them).
LISTEN_BACKLOG = 128
#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_S = 5
#: Seconds open requests (event streams) get to finish when the listeners close, before they are cancelled
#: (whole seconds: uvicorn's setting is an int).
GRACEFUL_CLOSE_S = 3
#: Largest request line plus headers (bytes); more is a 400.
MAX_HEAD_BYTES = 16_384


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two behaviours this API needs on top.

    - A request that is not HTTP/1.1 (a broken request line or header, a bad Content-Length, no Host)
      is answered with the API's JSON error object instead of uvicorn's plain-text 400.
    - A client that half-closes its side after sending (`shutdown(SHUT_WR)`) still gets its answer;
      asyncio's default closes the connection on EOF, before the answer is written. A request whose
      head or body ends at that EOF is a 400 ("ended early"), as HTTP/1.1 asks.
    """

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, "the request is not valid HTTP/1.1 (request line, headers or Content-Length)")

    def _send_error(self, status: int, message: str) -> None:
        body = error_body(status, "bad_request", message)
        headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            output = self.conn.send(h11.Response(status_code=status, headers=headers, reason=b"Bad Request"))
            output += self.conn.send(h11.Data(data=body))
            output += self.conn.send(h11.EndOfMessage())
            self.transport.write(output)
        except h11.LocalProtocolError:  # an answer is already under way on this connection: just close it
            pass
        self.transport.close()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio reads it; uvicorn's annotation says None
        """Keep the writing side open after the client's EOF (True), so the answer can still be sent."""
        if self.cycle is not None and self.cycle.response_started:
            return True  # the answer is being written; the connection closes after it
        their_state, pending = self.conn.their_state, self.conn.trailing_data[0]
        if their_state is h11.SEND_BODY or (their_state is h11.IDLE and pending):
            self.conn.receive_data(b"")
            try:
                self.conn.next_event()
            except h11.RemoteProtocolError:
                self._send_error(400, "the request ended early: the client closed its side before sending all of it")
            return True
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # an idle connection that the client finished with
        return True


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


def bind_unix_socket(path: Path, config: DaemonConfig) -> socket.socket:
    """The listening Unix socket with the configured mode and group (never wider, not even for a moment)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
        os.chmod(path, config.socket_mode)
        if config.socket_group is not None:
            os.chown(path, -1, _group_id(config.socket_group))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.umask(previous)
    return sock


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    """The listening TCP socket (IPv6 when the host has a ':'); port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


class ApiServer:
    """The API's listeners (the Unix socket, and TCP with the token) on one uvicorn event loop in a
    thread of its own: the caller's thread keeps the signals, the watchdog and the shutdown order.

    `start()` binds and returns once uvicorn serves; `close()` stops accepting, gives open requests
    `GRACEFUL_CLOSE_S` to finish, and removes the socket file. Also a context manager.
    """

    def __init__(
        self,
        daemon: Daemon,
        config: DaemonConfig,
        *,
        unix_path: Path | None = None,
        tcp: tuple[str, int] | None = None,
        token: bytes | None = None,
    ) -> None:
        if unix_path is None and tcp is None:
            raise ValueError("an ApiServer needs a Unix socket path, a TCP address, or both")
        if tcp is not None and token is None:
            raise ValueError("TCP needs a bearer token")
        self.daemon, self.config, self.unix_path, self.tcp, self.token = daemon, config, unix_path, tcp, token
        self._servers: list[tuple[uvicorn.Server, socket.socket]] = []
        self._apps: list[ApiApp] = []
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.tcp_address: tuple[str, int] | None = None

    def _server(self, token: bytes | None) -> uvicorn.Server:
        app = create_app(self.daemon, self.config, token)
        self._apps.append(app)
        return uvicorn.Server(uvicorn.Config(
            app,
            http=JsonErrorH11Protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            server_header=False, timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=GRACEFUL_CLOSE_S,
            backlog=LISTEN_BACKLOG, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        ))

    def start(self, ready_timeout_s: float = 10.0) -> "ApiServer":
        """Bind the listeners and serve; `UserError` when an address cannot be used."""
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not its start/stop chatter, only problems
        try:
            if self.unix_path is not None:
                try:
                    sock = bind_unix_socket(self.unix_path, self.config)
                except OSError as exc:
                    raise UserError(f"cannot listen on {self.unix_path}: {exc.strerror or exc}") from None
                self._servers.append((self._server(None), sock))
            if self.tcp is not None:
                host, port = self.tcp
                try:
                    sock = bind_tcp_socket(host, port)
                except OSError as exc:
                    raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
                self.tcp_address = sock.getsockname()[:2]
                self._servers.append((self._server(self.token), sock))
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not all(server.started for server, _ in self._servers):
            if self._failure is not None or not self._thread.is_alive():
                self._release()
                raise UserError(f"the API server did not start: {self._failure!r}")
            if time.monotonic() > deadline:
                self.close()
                raise UserError(f"the API server did not start within {ready_timeout_s:g} s")
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        if self.config.api_thread_nice is not None:  # the e-stop's thread: see priority.py
            set_thread_nice(self.config.api_thread_nice)
        try:
            asyncio.run(self._serve_all())
        except BaseException as exc:  # reported by start() and alive
            self._failure = exc
            log.exception("event=api_server_failed")

    async def _serve_all(self) -> None:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in self._servers))

    @property
    def alive(self) -> bool:
        """The serving thread runs (the watchdog's first check)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout_s: float = GRACEFUL_CLOSE_S + 5.0) -> None:
        """Stop accepting, let open requests finish (bounded), remove the socket file."""
        for server, _ in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("event=api_server_close_timeout seconds=%.1f", timeout_s)
        self._release()

    def _release(self) -> None:
        for app in self._apps:
            app.api.close()
        self._apps.clear()
        for _, sock in self._servers:
            sock.close()
        self._servers.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

    def __enter__(self) -> "ApiServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _self_check(path: Path, timeout_s: float) -> bool:
    """GET /v1/health over our own socket: proves the event loop and the worker threads still work.

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
    tcp = None
    if config.tcp_port is not None:
        assert config.tcp_host is not None and token is not None  # DaemonConfig checks both
        tcp = (config.tcp_host, config.tcp_port)
    api = ApiServer(daemon, config, unix_path=path, tcp=tcp, token=token).start()

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
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
            alive = api.alive
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
            api.close()
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
    from vlm2vla_edge.runtime.station import load_policy, open_station
    from vlm2vla_edge.runtime.verifier.fallback import make_verifier

    chosen_bundle = bundle or settings.bundle
    if chosen_bundle is None:
        raise UserError(
            "no model bundle: pass --bundle PATH (a folder with manifest.json) or set 'bundle' in the runtime config"
        )
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
    load: Callable[[Path, "PolicyConfig", Callable[[str], None]], "LlamaPolicy"],
) -> Iterator[tuple["LlamaPolicy | None", str | None]]:
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
