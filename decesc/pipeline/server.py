"""The HTTP side of ``tools.serve``: an OpenAI-compatible API on the standard library's
``http.server``, one thread per connection, the answering left to a
:class:`~decesc.pipeline.serving.Batcher`.

    POST /v1/chat/completions    a chat completion (decesc.pipeline.completions), or with
                                 "stream": true server-sent events ending with "data: [DONE]"
    GET  /v1/models              the served models
    GET  /v1/models/{id}         one of them

Every refusal is an HTTP status with the API's error body (400 a bad request, 401 a missing or
wrong key, 404 an unknown model or path, 405 a wrong method, 411 no Content-Length, 413 a body
over ``max_body_bytes``, 503 a full queue); the connection is closed after an error whose body
was not read, and the server goes on. With ``api_key`` every request needs the header
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from decesc.pipeline import completions as api
from decesc.pipeline.completions import APIError
from decesc.pipeline.serving import Batcher, Engine

MAX_BODY_BYTES = 4 << 20  # the largest request body read (4 MiB)


class Server(ThreadingHTTPServer):
    """The HTTP server of an :class:`Engine` and its :class:`Batcher`; ``quiet`` leaves out the
    log line of every request."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, batcher: Batcher, api_key: str | None = None,
                 quiet: bool = False, max_body_bytes: int = MAX_BODY_BYTES):
        super().__init__(address, Handler)
        self.engine, self.batcher, self.api_key, self.quiet = engine, batcher, api_key, quiet
        self.max_body_bytes, self.created = max_body_bytes, int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def server_close(self) -> None:
        self.batcher.close()
        super().server_close()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive: the clients reuse their connections
    timeout = 600  # seconds a connection may idle (or a send block) before its thread ends

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(data)
        except ConnectionError:  # the client left before its answer: nothing to tell it
            self.close_connection = True

    def _error(self, error: APIError, close: bool = False) -> None:
        self._send(error.status, error.body(), close)

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def _authorized(self) -> bool:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key is None or hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        self._error(APIError(401, "a valid API key is needed: send the header \"Authorization: Bearer <key>\"",
                             None, "invalid_api_key"), close=True)
        return False

    def do_GET(self):  # noqa: N802 (http.server's name)
        if not self._authorized():
            return
        ids, created, path = self.server.engine.model_ids, self.server.created, self._path()
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [api.model_object(m, created) for m in ids]})
        if path.startswith("/v1/models/"):
            model = path[len("/v1/models/"):]
            if model in ids:
                return self._send(200, api.model_object(model, created))
            return self._error(APIError(404, f"model: {model!r} is not served here (served: {', '.join(ids)})",
                                        "model", "model_not_found"))
        if path == "/v1/chat/completions":
            return self._error(APIError(405, "use POST for /v1/chat/completions", None, "method_not_allowed"))
        self._error(APIError(404, f"no such path: {path}", None, "not_found"))

    def do_POST(self):  # noqa: N802
        if not self._authorized():
            return
        path = self._path()
        if path != "/v1/chat/completions":
            status = 405 if path.startswith("/v1/models") else 404
            return self._error(APIError(status, f"no POST on {path} (POST /v1/chat/completions)", None,
                                        "not_found" if status == 404 else "method_not_allowed"), close=True)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(APIError(411, "a request body with a Content-Length header is needed", None,
                                        "length_required"), close=True)
        if int(length) > self.server.max_body_bytes:
            return self._error(APIError(413, f"the request body has {int(length):,} bytes, over the "
                                             f"{self.server.max_body_bytes:,} read", None, "request_too_large"),
                               close=True)
        raw = self.rfile.read(int(length))
        engine = self.server.engine
        try:
            job = engine.prepare(api.parse_request(raw, engine.model_ids, engine.limits))
            self.server.batcher.submit(job)
        except APIError as e:
            return self._error(e)
        if not job.request.stream:
            try:
                body = job.result()
            except APIError as e:
                return self._error(e)
            return self._send(200, body)
        self._stream(job)

    def _stream(self, job) -> None:
        """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``; a failure
        after the first event is sent as an error event. The connection is closed at the end."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        try:
            try:
                for body in job.chunks():
                    self._event(json.dumps(body))
            except APIError as e:
                self._event(json.dumps(e.body()))
            self._event("[DONE]")
        except OSError:  # the client left: the rest of its reply is dropped
            self.log_message("the client left during a stream")

    def _event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()
