"""The daemon's HTTP/1.1 API (stdlib `http.server`), served over a Unix socket and optionally TCP.

JSON in, JSON out; errors are `{"error": {"status", "type", "message"}}` with a one-sentence message.
Every request is bounded: bodies above the configured size are refused unread (413), sockets time
out, and the event stream sends keep-alives so a vanished client is noticed by a failed write, which
ends only that stream. On TCP every request needs `Authorization: Bearer <token>` (compared in
constant time). Nothing in a response or a log line carries a secret or a file path from the client.

    GET  /v1/health                  200 {"ok": true} | 503
    GET  /v1/status                  the daemon's state, e-stop, current task, arm
    POST /v1/tasks                   {"instruction": "..."} -> 202 {"id", ...} | 409 busy | 423 e-stop latched
                                     | 503 no model / arm or camera not connected | 507 episodes disk full
    GET  /v1/tasks/{id}              one task
    GET  /v1/tasks/{id}/events       server-sent events (`?since=N` resumes)
    POST /v1/tasks/{id}/cancel       stop that task (the arm holds; nothing latches)
    POST /v1/estop                   {"reason"?: "..."} latch the e-stop, halt now
    POST /v1/reset                   release the e-stop latch
    GET  /metrics                    Prometheus text format
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from vlm2vla_edge.runtime.daemon.service import (
    CannotRecord,
    DaemonBusy,
    EStopLatched,
    InvalidRequest,
    ServiceStopping,
    Unavailable,
    valid_task_id,
    validate_instruction,
)
from vlm2vla_edge.runtime.errors import Vlm2VlaError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.daemon.server import ApiServerMixin

log = logging.getLogger(__name__)

#: Seconds between keep-alive comments on an idle event stream (clients time out well after this).
KEEPALIVE_S = 5.0
#: Seconds a client may take to send its request, or to accept our bytes, before the socket is dropped.
SOCKET_TIMEOUT_S = 30.0
#: Field names that smell of file system access: the API never takes paths from clients.
#: Oversized bodies up to this size are read and dropped before the 413; larger ones just close the connection.
_DRAIN_LIMIT = 1_048_576
_PATHLIKE_FIELD = re.compile(r"(path|dir|file|bundle|config|device|socket)", re.IGNORECASE)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class ApiHandler(BaseHTTPRequestHandler):
    """One connection; `server` holds the daemon, config, metrics and (TCP) the token."""

    server: "ApiServerMixin"
    protocol_version = "HTTP/1.1"
    server_version = "vlm2vla-edge"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S
    error_content_type = "application/json"
    error_message_format = '{"error": {"status": %(code)d, "type": "http", "message": "%(message)s"}}'

    # --- plumbing ------------------------------------------------------------------------------

    def address_string(self) -> str:  # AF_UNIX peers have no address
        return self.client_address[0] if isinstance(self.client_address, tuple) and self.client_address else "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request is written by _finish_log (without headers, so never a token)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def parse_request(self) -> bool:
        if not super().parse_request():
            if not self.requestline:  # the standard library closes silently on an empty request line
                self.send_error(400, "empty request line")
            return False
        if self.request_version == "HTTP/0.9":  # no status line, no headers: not an answer our clients can read
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (broken request lines, unknown methods) as our JSON errors,
        always with a status line, and the connection closed after them."""
        if self.request_version in ("HTTP/0.9", "", None):
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        text = _printable(message or explain or "bad request")
        try:
            self._send_json(code, {"error": {"status": code, "type": "bad_request" if code < 500 else "unsupported",
                                             "message": text}})
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        began = time.perf_counter()
        self._body_read = self.headers.get("Content-Length") in (None, "0") and not self.headers.get("Transfer-Encoding")
        status = 500
        path = urlsplit(self.path).path
        try:
            self._authorize()
            handler, allowed = self._route(path)
            if handler is None:
                raise ApiError(404, "not_found", "no such endpoint")
            if method not in allowed:
                raise ApiError(405, "method_not_allowed", f"use {' or '.join(sorted(allowed))} here",
                               {"Allow": ", ".join(sorted(allowed))})
            status = handler()
        except ApiError as exc:
            status = exc.status
            if not self._body_read:  # an unread body must not be parsed as the next request
                self.close_connection = True
            try:
                self._send_error(exc)
            except OSError:  # the client left before the answer: nothing to tell it
                status = 499
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            status = 499  # the client went away; nothing to answer
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug answers 500, never kills the server or the episode
            log.exception("http event=handler_crash method=%s path=%s", method, _printable(path))
            status = 500
            try:
                self._send_error(ApiError(500, "internal", "internal error (see the daemon's log)"))
            except OSError:
                pass
        finally:
            self.server.metrics.count_request(status)
            log.info(
                "http method=%s path=%s status=%d ms=%.1f", method, _printable(path), status,
                (time.perf_counter() - began) * 1000,
            )

    def _route(self, path: str) -> tuple[Callable[[], int] | None, set[str]]:
        parts = [p for p in path.split("/") if p]
        fixed: dict[tuple[str, ...], tuple[Callable[[], int], set[str]]] = {
            ("v1", "health"): (self._health, {"GET", "HEAD"}),
            ("v1", "status"): (self._status, {"GET"}),
            ("v1", "tasks"): (self._submit, {"POST"}),
            ("v1", "estop"): (self._estop, {"POST"}),
            ("v1", "reset"): (self._reset, {"POST"}),
            ("metrics",): (self._metrics, {"GET"}),
        }
        if tuple(parts) in fixed:
            return fixed[tuple(parts)]
        if len(parts) >= 3 and parts[:2] == ["v1", "tasks"] and valid_task_id(parts[2]):
            task_id = parts[2]
            if len(parts) == 3:
                return (lambda: self._task(task_id)), {"GET"}
            if len(parts) == 4 and parts[3] == "events":
                return (lambda: self._events(task_id)), {"GET"}
            if len(parts) == 4 and parts[3] == "cancel":
                return (lambda: self._cancel(task_id)), {"POST"}
        return None, set()

    def _authorize(self) -> None:
        token = self.server.token
        if token is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)
        if not ok:
            raise ApiError(401, "unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})

    def _body(self, required: bool) -> dict[str, Any]:
        """The request's JSON object, read within the size limit; {} for an allowed empty body."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "length_required", "send the body with a Content-Length, not chunked")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if required:
                raise ApiError(411, "length_required", "a JSON body with a Content-Length is required")
            return {}
        if not (length_text.isascii() and length_text.isdigit()):  # "²".isdigit() is True, int("²") fails
            self.close_connection = True
            raise ApiError(400, "bad_request", "Content-Length must be a number")
        length = int(length_text)
        limit = self.server.config.max_request_bytes
        if length > limit:
            self.close_connection = True  # an unread body must not be parsed as the next request
            if length <= _DRAIN_LIMIT:  # read and drop a modest excess, so the client gets the 413, not EPIPE
                self.rfile.read(length)
            raise ApiError(413, "too_large", f"the request body is {length} bytes; the limit is {limit}")
        raw = self.rfile.read(length) if length else b""
        self._body_read = True
        if len(raw) < length:
            raise ApiError(400, "bad_request", "the request body ended early")
        if not raw.strip():
            if required:
                raise ApiError(400, "bad_request", "a JSON object body is required")
            return {}
        content_type = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[" * 3000
            raise ApiError(400, "bad_json", "the body is not valid UTF-8 JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        return data

    @staticmethod
    def _only(data: dict[str, Any], allowed: set[str]) -> None:
        for key in data:
            if key in allowed:
                continue
            if _PATHLIKE_FIELD.search(str(key)):
                raise ApiError(400, "bad_request", f"field '{_printable(str(key))}' is not accepted: the API takes no file paths")
            raise ApiError(400, "bad_request", f"unknown field '{_printable(str(key))}'; allowed: {', '.join(sorted(allowed))}")

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> int:
        body = (json.dumps(payload, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_error(self, exc: ApiError) -> None:
        self._send_json(exc.status, {"error": {"status": exc.status, "type": exc.kind, "message": exc.message}}, exc.headers)

    # --- endpoints -----------------------------------------------------------------------------

    def _health(self) -> int:
        ok, detail = self.server.daemon.health()
        return self._send_json(200 if ok else 503, {"ok": ok, "detail": detail})

    def _status(self) -> int:
        return self._send_json(200, self.server.daemon.status())

    def _submit(self) -> int:
        data = self._body(required=True)
        self._only(data, {"instruction"})
        if "instruction" not in data:
            raise ApiError(400, "bad_request", "the body needs an 'instruction'")
        try:
            validate_instruction(data["instruction"], self.server.config.max_instruction_chars)
            task = self.server.daemon.submit(data["instruction"])
        except InvalidRequest as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        except DaemonBusy as exc:
            raise ApiError(409, "busy", str(exc)) from None
        except EStopLatched as exc:
            raise ApiError(423, "estop_latched", str(exc)) from None
        except ServiceStopping as exc:
            raise ApiError(503, "stopping", str(exc)) from None
        except Unavailable as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        except CannotRecord as exc:
            raise ApiError(507, "insufficient_storage", str(exc)) from None
        except Vlm2VlaError as exc:  # e.g. the episode folder cannot be created
            log.error("http event=submit_failed error=%r", str(exc))
            raise ApiError(500, "internal", "the task could not be started (see the daemon's log)") from None
        return self._send_json(202, task.to_json(), {"Location": f"/v1/tasks/{task.id}"})

    def _find(self, task_id: str):  # noqa: ANN202 - a Task
        task = self.server.daemon.task(task_id)
        if task is None:
            raise ApiError(404, "not_found", "no such task (finished tasks are kept for a while only)")
        return task

    def _task(self, task_id: str) -> int:
        return self._send_json(200, self._find(task_id).to_json())

    def _cancel(self, task_id: str) -> int:
        self._body(required=False)
        task = self._find(task_id)
        self.server.daemon.cancel(task_id)
        return self._send_json(202 if task.state == "running" else 200, task.to_json())

    def _estop(self) -> int:
        data = self._body(required=False)
        self._only(data, {"reason"})
        reason = "e-stop requested over the API"
        if "reason" in data:
            try:
                reason = validate_instruction(data["reason"], 200)
            except InvalidRequest as exc:
                raise ApiError(400, "bad_request", str(exc).replace("instruction", "reason")) from None
        self.server.daemon.estop(reason)
        return self._send_json(200, {"estop": {"engaged": True, "reason": reason}})

    def _reset(self) -> int:
        self._only(self._body(required=False), set())
        try:
            self.server.daemon.reset()
        except DaemonBusy as exc:
            raise ApiError(409, "busy", str(exc)) from None
        return self._send_json(200, {"estop": {"engaged": False, "reason": None}})

    def _metrics(self) -> int:
        body = self.server.metrics.render(self.server.daemon.station.limiter.engaged).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        return 200

    def _events(self, task_id: str) -> int:
        task = self._find(task_id)
        query = parse_qs(urlsplit(self.path).query)
        since_text = (query.get("since") or ["0"])[0]
        if not (since_text.isascii() and since_text.isdigit()) or len(since_text) > 9:
            raise ApiError(400, "bad_request", "'since' must be a non-negative event number")
        since = int(since_text)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        while True:
            items, since, closed = task.events.read(since, KEEPALIVE_S)
            chunks = [
                f"id: {n}\nevent: {item['kind']}\ndata: {json.dumps(item, ensure_ascii=False, allow_nan=False)}\n\n"
                for n, item in items
            ]
            if not chunks:
                if closed:
                    break
                chunks = [": keep-alive\n\n"]  # a write to a vanished client fails here: the stream ends
            self.wfile.write("".join(chunks).encode("utf-8"))
            self.wfile.flush()
            if closed and not items:
                break
            if self.server.daemon.stopping and closed:
                break
        self.wfile.write(b"event: end\ndata: {}\n\n")
        return 200


def _printable(text: str, limit: int = 120) -> str:
    """A client-supplied string made safe for one log line."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return json.dumps(text, ensure_ascii=True)[1:-1]
