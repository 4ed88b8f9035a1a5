"""Client of the daemon's API (stdlib `http.client` over a Unix socket, or TCP with a token).

Every wait is bounded: connecting and each request have a timeout, and the event stream's reads time
out well after the server's keep-alive interval, so a wedged daemon ends in `DaemonUnavailable`
instead of a hung terminal. `format_event` turns streamed events into the same lines the in-process
`ProgressPrinter` prints.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vlm2vla_edge.runtime.errors import Vlm2VlaError
from vlm2vla_edge.runtime.runtime_config import DaemonConfig, client_socket_candidates

#: Longest silence on an event stream before the daemon counts as gone (the server pings every 5 s).
STREAM_READ_TIMEOUT_S = 30.0


class DaemonUnavailable(Vlm2VlaError):
    """No daemon answers at the socket or address."""


class DaemonApiError(Vlm2VlaError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class UnixHTTPConnection(http.client.HTTPConnection):
    """`HTTPConnection` over an AF_UNIX stream socket."""

    def __init__(self, path: Path | str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    """One daemon, by socket path or by `http://host:port` URL (then with a bearer token)."""

    def __init__(
        self,
        socket_path: Path | str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path or url")
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.url = url
        self.token = token
        self.timeout_s = timeout_s

    @classmethod
    def locate(
        cls, config: DaemonConfig | None = None, socket_path: Path | None = None, timeout_s: float = 5.0
    ) -> "DaemonClient":
        """The client of the first socket that exists (explicit path, config, system service, user's own)."""
        if socket_path is not None:
            return cls(socket_path, timeout_s=timeout_s)
        candidates = client_socket_candidates(config or DaemonConfig())
        for candidate in candidates:
            if candidate.exists():
                return cls(candidate, timeout_s=timeout_s)
        return cls(candidates[0], timeout_s=timeout_s)

    @property
    def where(self) -> str:
        return str(self.socket_path) if self.socket_path is not None else str(self.url)

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return UnixHTTPConnection(self.socket_path, timeout_s)
        parts = urlsplit(self.url or "")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the daemon URL must look like http://HOST:PORT, not {self.url!r}")
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON or text); `DaemonUnavailable` when nothing answers in time."""
        body = json.dumps(payload).encode("utf-8") if payload is not None else None
        conn = self._connection(self.timeout_s)
        try:
            conn.request(method, path, body=body, headers=self._headers(body))
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(f"no vlm2vla-edge daemon answers at {self.where} ({_why(exc)})") from None
        finally:
            conn.close()
        text = raw.decode("utf-8", "replace")
        if "json" in (response.getheader("Content-Type") or ""):
            try:
                return response.status, json.loads(text)
            except ValueError:
                pass
        return response.status, text

    def _checked(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        status, data = self.request(method, path, payload)
        if status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise DaemonApiError(status, str(error.get("type", "http")), str(error.get("message", data)))
        return data

    # --- endpoints -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._checked("GET", "/v1/health")

    def status(self) -> dict[str, Any]:
        return self._checked("GET", "/v1/status")

    def submit(self, instruction: str, adapter: str | None = None) -> dict[str, Any]:
        """Start a task; `adapter` names one of the bundle's LoRA adapters (None: the bundle's default)."""
        body: dict[str, Any] = {"instruction": instruction}
        if adapter is not None:
            body["adapter"] = adapter
        return self._checked("POST", "/v1/tasks", body)

    def task(self, task_id: str) -> dict[str, Any]:
        return self._checked("GET", f"/v1/tasks/{task_id}")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._checked("POST", f"/v1/tasks/{task_id}/cancel")

    def estop(self, reason: str | None = None) -> dict[str, Any]:
        return self._checked("POST", "/v1/estop", {"reason": reason} if reason else None)

    def reset(self) -> dict[str, Any]:
        return self._checked("POST", "/v1/reset")

    def metrics(self) -> str:
        return str(self._checked("GET", "/metrics"))

    def events(
        self, task_id: str, since: int = 0, read_timeout_s: float = STREAM_READ_TIMEOUT_S
    ) -> Iterator[dict[str, Any]]:
        """The task's events as they happen, until its end; each read waits at most `read_timeout_s`."""
        conn = self._connection(read_timeout_s)
        try:
            try:
                conn.request("GET", f"/v1/tasks/{task_id}/events?since={since}", headers=self._headers(None))
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise DaemonUnavailable(f"no vlm2vla-edge daemon answers at {self.where} ({_why(exc)})") from None
            if response.status != 200:
                raw = response.read().decode("utf-8", "replace")
                try:
                    error = json.loads(raw).get("error", {})
                except (ValueError, AttributeError):
                    error = {}
                raise DaemonApiError(response.status, str(error.get("type", "http")), str(error.get("message", raw)))
            kind, data_lines = "message", []
            while True:
                try:
                    line = response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise DaemonUnavailable(
                        f"the daemon at {self.where} stopped sending progress ({_why(exc)})"
                    ) from None
                if not line:
                    return  # the server closed the stream
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith(":"):
                    continue  # keep-alive
                if text.startswith("event:"):
                    kind = text[6:].strip()
                elif text.startswith("data:"):
                    data_lines.append(text[5:].strip())
                elif text == "":
                    if data_lines:
                        if kind == "end":
                            return
                        try:  # noqa: SIM105 - suppress() around a yield would also swallow what is thrown in
                            yield json.loads("\n".join(data_lines))
                        except ValueError:
                            pass
                    kind, data_lines = "message", []
        finally:
            conn.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, FileNotFoundError):
        return "no socket there"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, PermissionError):
        return "permission denied: is this user in the daemon's group?"
    return getattr(exc, "strerror", None) or type(exc).__name__


def format_event(event: dict[str, Any]) -> list[str]:
    """Console lines for one streamed event (the daemon-side twin of `ProgressPrinter`)."""
    kind = event.get("kind")
    t = f"[{float(event.get('t') or 0.0):6.1f}s]"
    if kind == "episode_start":
        return [f"{t} instruction: {event.get('instruction')}  (model {event.get('bundle_id')})"]
    if kind == "subtasks":
        if "error" in event:
            return [f"{t} subtasks: model output rejected: {event['error']}"]
        return [f"{t} subtasks: " + " -> ".join(event.get("subtasks", []))]
    if kind == "step":
        retry = " (retry)" if event.get("retry") else ""
        index = int(event.get("subtask_index") or 0) + 1
        if "error" in event:
            return [f"{t} subtask {index}{retry}: model output rejected: {event['error']}"]
        text = str(event.get("action_text", ""))
        text = text if len(text) <= 160 else text[:157] + "..."
        return [
            f"{t} subtask {index}{retry} '{event.get('subtask')}': plan: {event.get('motion_plan')}",
            f"{t}   actions: {text}",
        ]
    if kind == "safety":
        notes = [f"{d['rule']} {d['verdict']}" for d in event.get("decisions", [])]
        if notes or event.get("rejected"):
            reason = f" ({event['reason']})" if event.get("reason") else ""
            return [f"{t}   safety: {', '.join(notes) or 'rejected'}{reason}"]
        return []
    if kind == "verified":
        via = str(event.get("verifier")) + (
            f" after {event['fallback_from']} failed" if event.get("fallback_from") else ""
        )
        return [f"{t}   verdict: {'done' if event.get('success') else 'not done'} ({via}): {event.get('reason')}"]
    if kind == "episode_end":
        return [f"{t} outcome: {event.get('outcome')}: {event.get('detail')}"]
    return []
