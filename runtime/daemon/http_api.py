"""The daemon's HTTP API as a Starlette app (served by uvicorn, see `server.py`) over a Unix socket and optionally TCP.

JSON in, JSON out; errors are `{"error": {"status", "type", "message"}}` with a one-sentence message,
including the server's own (404, 405, malformed requests: see `server.JsonErrorH11Protocol`). Every
request is bounded: bodies above the configured size are refused unread (413), a body that does not
arrive within `BODY_TIMEOUT_S` is a 408, and the event stream sends keep-alives and gives up on a
client that stops reading (`send_timeout`). On TCP every request needs `Authorization: Bearer <token>`
(compared in constant time). Nothing in a response or a log line carries a secret or a file path from
the client.

    GET  /v1/health                  200 {"ok": true} | 503
    GET  /v1/status                  the daemon's state, e-stop, current task, arm
    POST /v1/tasks                   {"instruction": "...", "adapter": optional LoRA skill name} -> 202 {"id", ...}
                                     | 409 busy | 423 e-stop latched | 503 no model / arm or camera not connected
                                     | 507 episodes disk full
    GET  /v1/tasks/{id}              one task
    GET  /v1/tasks/{id}/events       server-sent events (`?since=N` resumes)
    POST /v1/tasks/{id}/cancel       stop that task (the arm holds; nothing latches)
    POST /v1/estop                   {"reason"?: "..."} latch the e-stop, halt now
    POST /v1/reset                   release the e-stop latch
    GET  /metrics                    Prometheus text format (prometheus_client)

Threads: the e-stop runs on the event loop itself, so it never queues behind the worker threads
that the other endpoints use for daemon calls that may block (status reads the arm, submit creates
the episode folder, cancel and reset wait for the arm); event streams wait for events on their own
bounded pool of threads, so many open streams cannot starve the other endpoints. The event loop's
thread may run at a raised priority (`priority.py`); both pools put their threads back to the
process's priority, and so everything they start (the episode worker, llama.cpp's threads) too.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlm2vla_edge.runtime.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vlm2vla_edge.runtime.daemon.priority import reset_thread_priority
from vlm2vla_edge.runtime.daemon.service import (
    CannotRecord,
    Daemon,
    DaemonBusy,
    EStopLatched,
    InvalidRequest,
    ServiceStopping,
    Unavailable,
    valid_task_id,
    validate_instruction,
)
from vlm2vla_edge.runtime.errors import Vlm2VlaError
from vlm2vla_edge.runtime.runtime_config import DaemonConfig

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Seconds between keep-alive comments on an idle event stream (clients time out well after this).
KEEPALIVE_S = 5.0
#: Seconds a client may take to send a request body, or to accept an event, before it is dropped.
BODY_TIMEOUT_S = 30.0
#: Oversized bodies up to this size are read and dropped before the 413 (so a TCP client gets the
#: answer instead of a reset); larger ones are answered at once and the connection closed.
DRAIN_LIMIT = 1_048_576
#: Event streams waiting for events at the same time (each waits on a worker thread).
MAX_STREAMS = 64
#: Worker threads for the daemon calls that may block (status, submit, cancel, reset, metrics).
MAX_WORKERS = 8
#: Field names that smell of file system access: the API never takes paths from clients.
_PATHLIKE_FIELD = re.compile(r"(path|dir|file|bundle|config|device|socket)", re.IGNORECASE)


class ApiError(Exception):
    """An answer with an error status; becomes the JSON error object."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, dict(headers or {})
        if close:  # the connection cannot be reused (an unread body): say so, and uvicorn closes it
            self.headers["Connection"] = "close"


def error_body(status: int, kind: str, message: str) -> bytes:
    """The API's error object as bytes (also used for the protocol-level 400s in server.py)."""
    return json_bytes({"error": {"status": status, "type": kind, "message": message}})


def json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


class _Json(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return _Json(payload, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})})


def _error_response(exc: ApiError) -> Response:
    return _json(exc.status, {"error": {"status": exc.status, "type": exc.kind, "message": exc.message}}, exc.headers)


def printable(text: str, limit: int = 120) -> str:
    """A client-supplied string made safe for one log line."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return json.dumps(text, ensure_ascii=True)[1:-1]


class Api:
    """The endpoints, bound to one daemon and its limits."""

    def __init__(self, daemon: Daemon, config: DaemonConfig) -> None:
        self.daemon, self.config = daemon, config
        self._workers = ThreadPoolExecutor(MAX_WORKERS, "api-worker", initializer=reset_thread_priority)
        self._streams = ThreadPoolExecutor(MAX_STREAMS, "api-stream", initializer=reset_thread_priority)

    async def _call(self, fn: Callable[..., _T], *args: Any, pool: ThreadPoolExecutor | None = None) -> _T:
        """`fn(*args)` on a worker thread at the process's priority; the event loop stays free for the e-stop."""
        return await asyncio.get_running_loop().run_in_executor(pool or self._workers, functools.partial(fn, *args))

    def close(self) -> None:
        """Let the worker threads go (calls under way finish on their own; none is waited for)."""
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._streams.shutdown(wait=False, cancel_futures=True)

    # --- request helpers -----------------------------------------------------------------------

    async def _body(self, request: Request, required: bool) -> dict[str, Any]:
        """The request's JSON object, read within the size and time limits; {} for an allowed empty body."""
        headers = request.headers
        if "transfer-encoding" in headers:
            raise ApiError(411, "length_required", "send the body with a Content-Length, not chunked", close=True)
        length_text = headers.get("content-length")
        if length_text is None:
            if required:
                raise ApiError(411, "length_required", "a JSON body with a Content-Length is required")
            return {}
        if not (length_text.isascii() and length_text.isdigit()):  # h11 refuses these first; kept as a guard
            raise ApiError(400, "bad_request", "Content-Length must be a number", close=True)
        length = int(length_text)
        limit = self.config.max_request_bytes
        if length > limit:
            if length <= DRAIN_LIMIT:  # read and drop a modest excess, so the client gets the 413, not a reset
                await self._read(request, DRAIN_LIMIT)
            raise ApiError(413, "too_large", f"the request body is {length} bytes; the limit is {limit}", close=True)
        raw = await self._read(request, limit)
        if not raw.strip():
            if required:
                raise ApiError(400, "bad_request", "a JSON object body is required")
            return {}
        content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
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
    async def _read(request: Request, limit: int) -> bytes:
        """The body (h11 frames it by Content-Length), at most `limit` bytes kept, within `BODY_TIMEOUT_S`."""
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= limit:
                        chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408, "timeout", f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", close=True
            ) from None
        return b"".join(chunks)

    @staticmethod
    def _only(data: dict[str, Any], allowed: set[str]) -> None:
        for key in data:
            if key in allowed:
                continue
            if _PATHLIKE_FIELD.search(str(key)):
                raise ApiError(
                    400, "bad_request", f"field '{printable(str(key))}' is not accepted: the API takes no file paths"
                )
            raise ApiError(
                400, "bad_request", f"unknown field '{printable(str(key))}'; allowed: {', '.join(sorted(allowed))}"
            )

    def _find(self, request: Request):  # noqa: ANN202 - a Task
        task_id = request.path_params["task_id"]
        task = self.daemon.task(task_id) if valid_task_id(task_id) else None
        if task is None:
            raise ApiError(404, "not_found", "no such task (finished tasks are kept for a while only)")
        return task

    # --- endpoints -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ok, detail = await self._call(self.daemon.health)
        return _json(200 if ok else 503, {"ok": ok, "detail": detail})

    async def status(self, request: Request) -> Response:
        return _json(200, await self._call(self.daemon.status))

    async def submit(self, request: Request) -> Response:
        data = await self._body(request, required=True)
        self._only(data, {"instruction", "adapter"})
        if "instruction" not in data:
            raise ApiError(400, "bad_request", "the body needs an 'instruction'")
        try:
            validate_instruction(data["instruction"], self.config.max_instruction_chars)
            task = await self._call(self.daemon.submit, data["instruction"], data.get("adapter"))
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
        return _json(202, task.to_json(), {"Location": f"/v1/tasks/{task.id}"})

    async def task(self, request: Request) -> Response:
        return _json(200, self._find(request).to_json())

    async def cancel(self, request: Request) -> Response:
        await self._body(request, required=False)
        task = self._find(request)
        await self._call(self.daemon.cancel, task.id)
        return _json(202 if task.state == "running" else 200, task.to_json())

    async def estop(self, request: Request) -> Response:
        data = await self._body(request, required=False)
        self._only(data, {"reason"})
        reason = "e-stop requested over the API"
        if "reason" in data:
            try:
                reason = validate_instruction(data["reason"], 200)
            except InvalidRequest as exc:
                raise ApiError(400, "bad_request", str(exc).replace("instruction", "reason")) from None
        self.daemon.estop(reason)  # on the loop itself: no queue in front of it (see the module docstring)
        return _json(200, {"estop": {"engaged": True, "reason": reason}})

    async def reset(self, request: Request) -> Response:
        self._only(await self._body(request, required=False), set())
        try:
            await self._call(self.daemon.reset)
        except DaemonBusy as exc:
            raise ApiError(409, "busy", str(exc)) from None
        return _json(200, {"estop": {"engaged": False, "reason": None}})

    async def metrics(self, request: Request) -> Response:
        body = await self._call(self.daemon.metrics.render, self.daemon.station.limiter.engaged)
        return Response(body, 200, {"Cache-Control": "no-store"}, media_type=METRICS_CONTENT_TYPE)

    async def events(self, request: Request) -> Response:
        task = self._find(request)
        since_text = request.query_params.get("since", "0")
        if not (since_text.isascii() and since_text.isdigit()) or len(since_text) > 9:
            raise ApiError(400, "bad_request", "'since' must be a non-negative event number")
        return EventSourceResponse(
            self._stream(task, int(since_text)), ping=KEEPALIVE_S, sep="\n", send_timeout=BODY_TIMEOUT_S,
            headers={"Cache-Control": "no-store", "Connection": "close"},
        )

    async def _stream(self, task: Any, since: int) -> AsyncIterator[ServerSentEvent]:
        """The task's events from `since` until its log closes, then an `end` event."""
        while True:
            items, since, closed = await self._call(task.events.read, since, 1.0, pool=self._streams)
            for n, item in items:
                yield ServerSentEvent(
                    json.dumps(item, ensure_ascii=False, allow_nan=False), event=item["kind"], id=str(n)
                )
            if closed and not items:
                break
        yield ServerSentEvent("{}", event="end")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/health", self.health, methods=["GET"]),  # GET routes answer HEAD too
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/v1/tasks", self.submit, methods=["POST"]),
            Route("/v1/tasks/{task_id}", self.task, methods=["GET"]),
            Route("/v1/tasks/{task_id}/events", self.events, methods=["GET"]),
            Route("/v1/tasks/{task_id}/cancel", self.cancel, methods=["POST"]),
            Route("/v1/estop", self.estop, methods=["POST"]),
            Route("/v1/reset", self.reset, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 as the API's JSON errors."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allowed = sorted(
            m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip() and m.strip() != "HEAD"
        )
        return _error_response(ApiError(405, "method_not_allowed", f"use {' or '.join(allowed)} here",
                                         {"Allow": ", ".join(allowed)}))
    if exc.status_code == 404:
        return _error_response(ApiError(404, "not_found", "no such endpoint"))
    return _error_response(ApiError(exc.status_code, "http", printable(str(exc.detail))))


async def _crash(request: Request, exc: Exception) -> Response:
    return _error_response(ApiError(500, "internal", "internal error (see the daemon's log)"))


class ApiApp:
    """The outermost ASGI layer: bearer token (TCP), one log line and one metric per request, and no
    exception ever escapes to the server (a bug answers 500 once and is logged here, never killing the
    server or the episode)."""

    def __init__(self, app: ASGIApp, api: Api, token: bytes | None) -> None:
        self.app, self.api, self.daemon, self.token = app, api, api.daemon, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        began = time.perf_counter()
        status = 499  # the client went away before an answer
        started = False

        async def sending(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            if self.token is not None and not self._authorized(scope):
                response = _error_response(ApiError(401, "unauthorized", "a valid bearer token is required",
                                                    {"WWW-Authenticate": "Bearer"}))
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except ClientDisconnect:
            pass
        except Exception:  # logged; Starlette has already answered 500 when it could
            log.exception(
                "http event=handler_crash method=%s path=%s", scope.get("method"), printable(scope.get("path", ""))
            )
            status = 500
            if not started:
                await _error_response(ApiError(500, "internal", "internal error (see the daemon's log)"))(
                    scope, receive, send
                )
        finally:
            self.daemon.metrics.count_request(status)
            log.info("http method=%s path=%s status=%d ms=%.1f", scope.get("method"), printable(scope.get("path", "")),
                     status, (time.perf_counter() - began) * 1000)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, given = header.decode("latin-1").partition(" ")
        # compare_digest on bytes: any header value is comparable, and the time does not depend on where it differs
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1", "replace"), self.token
        )


def create_app(daemon: Daemon, config: DaemonConfig, token: bytes | None = None) -> "ApiApp":
    """The API for one listener: the Unix socket (`token=None`) or TCP (every request needs the token).
    Its `api.close()` lets its worker threads go once the server has stopped."""
    api = Api(daemon, config)
    app = Starlette(
        routes=api.routes(),
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _crash},
    )
    app.router.redirect_slashes = False  # "/v1/status/" is a 404, not a redirect our clients would not follow
    return ApiApp(app, api, token)

