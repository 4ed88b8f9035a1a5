"""A local stand-in for the Gemini API: the real google-genai client talks HTTP to it on 127.0.0.1.

It speaks `POST /{version}/models/{model}:generateContent`, records every request (path, headers,
JSON body), and answers from a script of `Reply` objects (then from `default`): a verdict, an HTTP
error, a delay past the client's timeout, malformed JSON, a wrong schema, or any raw body.
"""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):generateContent$")


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0  # wait this long before answering (a delay past the client's timeout)
    headers: tuple[tuple[str, str], ...] = ()
    echo_headers: bool = False  # put the request's headers in the error body (a leaky proxy)

    @staticmethod
    def text(text: str, finish_reason: str = "STOP") -> "Reply":
        """A 200 answer whose single candidate's text is `text`."""
        body = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": text}]},
                    "finishReason": finish_reason,
                    "index": 0,
                }
            ],
            "usageMetadata": {"promptTokenCount": 600, "candidatesTokenCount": 20, "totalTokenCount": 620},
            "modelVersion": "fake-gemini",
        }
        return Reply(200, json.dumps(body).encode())

    @staticmethod
    def verdict(success: bool, reason: str = "the fingers hold the carrot") -> "Reply":
        return Reply.text(json.dumps({"success": success, "reason": reason}))

    @staticmethod
    def error(status: int, message: str = "scripted failure", headers: tuple[tuple[str, str], ...] = ()) -> "Reply":
        names = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                 503: "UNAVAILABLE"}
        body = {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}
        return Reply(status, json.dumps(body).encode(), headers=headers)

    @staticmethod
    def slow(delay_s: float, success: bool = True) -> "Reply":
        return Reply(200, Reply.verdict(success).body, delay_s=delay_s)


@dataclass
class RecordedRequest:
    method: str
    path: str
    version: str | None
    model: str | None
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it was not JSON


@dataclass
class FakeGeminiServer:
    """Threaded HTTP server on an ephemeral port; use as a context manager."""

    default: Reply = field(default_factory=lambda: Reply.verdict(True))
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw
                match = _PATH.match(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append(
                        RecordedRequest("POST", self.path, match and match["version"], match and match["model"],
                                        headers, body)
                    )
                    reply = server._script.popleft() if server._script else server.default
                if match is None:
                    reply = Reply.error(404, f"unknown path {self.path}")
                if reply.delay_s and server._closing.wait(reply.delay_s):
                    return
                payload = reply.body
                if reply.echo_headers:
                    payload = json.dumps(
                        {"error": {"code": reply.status, "message": f"bad request, headers were {headers}",
                                   "status": "INVALID_ARGUMENT"}}
                    ).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="fake-gemini", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *replies: Reply) -> None:
        """Queue answers for the next requests, in order."""
        with self._lock:
            self._script.extend(replies)

    def start(self) -> "FakeGeminiServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeGeminiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
