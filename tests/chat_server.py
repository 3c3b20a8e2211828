"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for testing HTTP judge clients offline.

``POST /v1/chat/completions`` answers with ``reply(messages)`` (canned text, or a real model's output) in
OpenAI's response format; ``GET /v1/models`` lists the served model. ``api_key`` makes it demand
``Authorization: Bearer <key>`` (401 otherwise); ``fail(status, times)`` answers the next requests with an
error status; ``refuse`` names request fields the server rejects with 400, as a server that does not know
them would (``response_format`` on an old one). Every chat request is recorded in ``requests`` as (body,
Authorization header).

``reply`` may also return a :class:`Scripted` reply, text plus the logprobs of its tokens (``token``,
``logprob``, ``top_logprobs``: OpenAI's ``choices[0].logprobs.content``); as OpenAI's and vLLM's servers do,
they are sent only to a request with ``logprobs: true``, and each token's ``top_logprobs`` cut to the
request's ``top_logprobs`` (none without it).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Scripted:
    content: str
    logprobs: list[dict[str, Any]]  # one entry per generated token, most probable alternatives first


def choice_logprobs(reply: str | Scripted, body: dict[str, Any]) -> dict[str, Any] | None:
    """The ``logprobs`` of a chat completion's choice, as asked for by the request ``body``."""
    if not body.get("logprobs") or not isinstance(reply, Scripted):
        return None
    keep = int(body.get("top_logprobs") or 0)
    return {"content": [{**token, "top_logprobs": token["top_logprobs"][:keep]} for token in reply.logprobs]}


class ChatServer:
    def __init__(
        self,
        reply: Callable[[Messages], str | Scripted],
        model: str = "judge",
        api_key: str | None = None,
        refuse: tuple[str, ...] = (),
    ) -> None:
        self.reply = reply
        self.refuse = refuse
        self.model = model
        self.api_key = api_key
        self.requests: list[tuple[dict[str, Any], str | None]] = []
        self.failures: list[int] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def fail(self, status: int, times: int = 1) -> None:
        self.failures.extend([status] * times)

    def start(self) -> ChatServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                auth = self.headers.get("Authorization")
                with server._lock:
                    server.requests.append((body, auth))
                    status = server.failures.pop(0) if server.failures else None
                if status is not None:
                    self._send(status, {"error": {"message": "injected failure"}})
                    return
                if server.api_key and auth != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "invalid API key"}})
                    return
                refused = [name for name in server.refuse if name in body]
                if refused:
                    self._send(400, {"error": {"message": f"unrecognized request argument: {refused[0]}"}})
                    return
                messages = body.get("messages")
                if body.get("model") != server.model or not isinstance(messages, list) or not messages:
                    self._send(
                        400, {"error": {"message": "need the served model and a non-empty messages list"}}
                    )
                    return
                reply = server.reply(messages)
                content = reply.content if isinstance(reply, Scripted) else reply
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": server.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "logprobs": choice_logprobs(reply, body),
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    },
                )

        return Handler
