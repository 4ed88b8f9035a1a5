"""Access: who may talk to the daemon, and where the Gemini API key must never appear.

- `check_socket_access`: the Unix socket gets exactly the configured mode and group, a mode that opens
  it to other users is refused, and a second daemon or a stray file at the socket path is refused.
- `check_tcp_token`: over TCP, no token, a wrong token (same length, other length, prefix, other
  scheme) is 401 with the API's JSON error; the right one is 200; every check goes through
  `hmac.compare_digest` (observed by wrapping it, not by reading the source).
- `scan_key_leaks`: a daemon subprocess with a Gemini key in its environment verifies against a fake
  Gemini server that answers 500s, garbage, an error echoing the request headers (key included) and a
  verdict quoting the key; the daemon's log (DEBUG, all loggers), every episode file, the API's answers
  (status, tasks, events, errors, metrics) are searched for the key. Each place holding it is a leak.
  (A client that types the key into an instruction gets it recorded as its instruction: not tested.)

The fake Gemini server is the tests' (vlm2vla_edge.testing.gemini_server), reused rather than copied.
"""

from __future__ import annotations

import contextlib
import grp
import hmac
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vlm2vla_edge.runtime.daemon.client import DaemonClient
from vlm2vla_edge.runtime.daemon.server import ApiServer, prepare_socket_path
from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.testing.gemini_server import FakeGeminiServer, Reply

from .load import DaemonSubprocess, clean_error, daemon_in_process, raw_exchange, write_runtime_config
from .tally import Tally

TOKEN = "reliability-token-0123456789abcdef"


def _own_groups() -> list[str]:
    names = []
    for gid in dict.fromkeys([os.getegid(), *os.getgroups()]):
        with contextlib.suppress(KeyError):
            names.append(grp.getgrgid(gid).gr_name)
    return names


def check_socket_access() -> Tally:
    """Socket mode and group as configured; wider modes refused; a live or foreign socket path refused."""
    tally = Tally("access", "unix socket")
    groups = _own_groups()
    with tempfile.TemporaryDirectory(prefix="reliability-sock-") as tmp:
        folder = Path(tmp)
        for mode, group in (
            (0o600, None),
            (0o660, groups[-1] if groups else None),
            (0o640, groups[0] if groups else None),
        ):
            config = DaemonConfig(socket_path=folder / f"m{mode:o}.sock", socket_mode=mode, socket_group=group)
            with daemon_in_process(folder / f"d{mode:o}", config) as (_, path):
                info = os.stat(path)
                got_mode, got_gid = stat.S_IMODE(info.st_mode), info.st_gid
                want_gid = grp.getgrnam(group).gr_gid if group else os.getegid()
                tally.record(got_mode == mode and got_gid == want_gid,
                             f"socket mode {got_mode:04o} group {got_gid}, configured {mode:04o} group {want_gid}")
                with contextlib.suppress(UserError):
                    prepare_socket_path(path, None)
                    tally.record(False, "a second daemon could take over the socket of a running one")
                tally.record(True, "")
        for mode in (0o666, 0o604, 0o777, 0o200):
            try:
                DaemonConfig(socket_mode=mode)
                tally.record(False, f"socket_mode {mode:04o} was accepted")
            except ValueError:
                tally.record(True, "")
        stray = folder / "stray.sock"
        stray.write_text("not a socket")
        try:
            prepare_socket_path(stray, None)
            tally.record(False, "a regular file at the socket path would be replaced")
        except UserError:
            tally.record(stray.read_text() == "not a socket", "the stray file at the socket path was changed")
    return tally


@contextlib.contextmanager
def _recording_compare_digest() -> Iterator[list[tuple[int, int]]]:
    """Wrap `hmac.compare_digest` for the duration; yields the (len(a), len(b)) of each call."""
    calls: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def recording(a, b):  # noqa: ANN001, ANN202 - same signature as the C function
        calls.append((len(a), len(b)))
        return original(a, b)

    hmac.compare_digest = recording  # type: ignore[assignment]
    try:
        yield calls
    finally:
        hmac.compare_digest = original  # type: ignore[assignment]


def check_tcp_token() -> Tally:
    """TCP answers 401 (JSON) without the right bearer token, 200 with it; comparison in constant time."""
    tally = Tally("access", "tcp token")
    with tempfile.TemporaryDirectory(prefix="reliability-tcp-") as tmp, daemon_in_process(Path(tmp)) as (daemon, _):
        config = DaemonConfig(socket_path=Path(tmp) / "unused.sock")
        server = ApiServer(daemon, config, tcp=("127.0.0.1", 0), token=TOKEN.encode()).start()
        assert server.tcp_address is not None
        port = server.tcp_address[1]
        wrong = {
            "no header": None,
            "empty bearer": "Bearer ",
            "wrong, same length": "Bearer " + TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1"),
            "wrong, shorter": "Bearer " + TOKEN[:8],
            "prefix plus extra": "Bearer " + TOKEN + "x",
            "other scheme": "Basic " + TOKEN,
            "token without scheme": TOKEN,
            "two tokens": f"Bearer {TOKEN}, Bearer {TOKEN}",
            "non-ascii": "Bearer " + TOKEN[:-1] + "\u00e9",
        }
        try:
            with _recording_compare_digest() as calls:
                for name, header in wrong.items():
                    response = raw_exchange(("127.0.0.1", port), _get("/v1/status", header))
                    problem = clean_error(response)
                    leaked = TOKEN.encode() in response.body
                    tally.record(response.status == 401 and problem is None and not leaked,
                                 f"{name}: HTTP {response.status} ({problem}); token in the answer: {leaked}")
                bearer_attempts = sum(1 for h in wrong.values() if h and h.lower().startswith("bearer "))
                tally.record(len(calls) >= bearer_attempts,
                             f"hmac.compare_digest ran {len(calls)} times for {bearer_attempts} bearer tokens")
                right = raw_exchange(("127.0.0.1", port), _get("/v1/status", "Bearer " + TOKEN))
                tally.record(right.status == 200, f"the right token got HTTP {right.status}")
                tally.record(len(calls) >= bearer_attempts + 1, "the right token was not compared with compare_digest")
        finally:
            server.close()
    return tally


def _get(path: str, authorization: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


# --- the key-leak scan ----------------------------------------------------------------------------


def scan_key_leaks(key: str = "AIzaSyFAKE-reliability-0123456789abcdefXYZ", tasks: int = 3) -> Tally:
    """Run `tasks` episodes with the cloud verifier failing in every way, then search for the key.

    Runs: one per place searched (the log, each episode file, each API answer); survived when the
    key is not in it. `unsafe_commands` stays 0: this suite checks secrets, not motion.
    """
    tally = Tally("access", "gemini key leaks")
    with tempfile.TemporaryDirectory(prefix="reliability-key-") as tmp, FakeGeminiServer() as gemini:
        folder = Path(tmp)
        gemini.default = Reply.error(500, "backend exploded")
        script = [
            Reply(200, b"<html>garbage</html>"), Reply(status=400, echo_headers=True),
            Reply.verdict(False, f"the key is {key}"), Reply.error(503, f"overloaded for key {key}"),
            Reply(200, b'{"candidates": [{"content": {"parts": [{"text": "not json ' + key.encode() + b'"}]}}]}'),
            Reply.error(429, "slow down", headers=(("Retry-After", "0"),)), Reply(status=500, echo_headers=True),
        ]
        gemini.script(*(script * 4))
        verifier = {
            "kind": "auto",
            "gemini": {"base_url": gemini.base_url, "timeout_s": 2.0, "retries": 1, "backoff_initial_s": 0.0,
                       "backoff_max_s": 0.0, "breaker_failures": 1000},
        }
        config = write_runtime_config(folder, verifier=verifier, sim_realtime=False, record_frames=True,
                                      runner={"max_retries_per_subtask": 1, "max_steps": 6})
        socket_path = folder / "d.sock"
        proc = DaemonSubprocess.start(config, socket_path, step_s=0.0, subtasks=2, verifier="config",
                                      env={"GEMINI_API_KEY": key})
        answers: list[tuple[str, bytes]] = []
        try:
            client = DaemonClient(socket_path, timeout_s=30)
            ids = []
            for i in range(tasks):
                task = client.submit(f"lift the carrot {i}")
                ids.append(task["id"])
                deadline = time.monotonic() + 120
                while client.task(task["id"])["state"] == "running" and time.monotonic() < deadline:
                    time.sleep(0.1)
            for path in ("/v1/status", "/metrics", "/v1/health", "/v1/nothing", "/v1/tasks/none-such",
                         *(f"/v1/tasks/{i}" for i in ids), *(f"/v1/tasks/{i}/events" for i in ids)):
                answers.append((f"GET {path}", _read_all(socket_path, path)))
        finally:
            code = proc.stop()
        tally.record(code == 0, f"the daemon exited with {code}")
        tally.record(bool(gemini.requests), "the fake Gemini server was never called: the scan proves nothing")
        sent_key = any(key in str(r.headers) or key in r.path for r in gemini.requests)
        tally.record(sent_key, "the key never reached the Gemini server: the scan proves nothing")
        places = [("daemon log", proc.log_path.read_bytes())]
        places += [(f"episode file {p.relative_to(folder)}", p.read_bytes())
                   for p in sorted((folder / "episodes").rglob("*")) if p.is_file()]
        places += answers
        for name, data in places:
            tally.record(key.encode() not in data, f"the key appears in {name}")
    return tally


def _read_all(socket_path: Path, path: str) -> bytes:
    """The whole answer (an event stream of a finished task ends by itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    data = b""
    try:
        sock.connect(str(socket_path))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return data
