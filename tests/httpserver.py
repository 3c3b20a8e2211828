"""A real HTTP file server on 127.0.0.1 for download tests, with Range support and fault injection.

Files are served from a directory the test fills. Faults are set per path:
``server.fail(path, status=500, times=2)`` answers with an error status that many times;
``server.drop(path, after=N, times=1)`` sends the headers for the whole file, then closes the connection
after N body bytes (a truncated transfer); ``server.ignore_range = True`` makes it answer 200 to Range;
``server.headers[path]`` adds response headers.
Every request is recorded in ``server.requests`` as (method, path, Range header or None).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FileServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: list[tuple[str, str, str | None]] = []
        self.failures: dict[str, list[int]] = {}
        self.drops: dict[str, list[int]] = {}
        self.ignore_range = False
        # Extra response headers per path (e.g. the Hugging Face Hub's X-Repo-Commit / X-Linked-Etag).
        self.headers: dict[str, dict[str, str]] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, path: str, status: int = 500, times: int = 1) -> None:
        self.failures.setdefault(path.lstrip("/"), []).extend([status] * times)

    def drop(self, path: str, after: int, times: int = 1) -> None:
        self.drops.setdefault(path.lstrip("/"), []).extend([after] * times)

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _serve(self, head: bool) -> None:
                rel = unquote(urlparse(self.path).path).lstrip("/")
                server.requests.append((self.command, rel, self.headers.get("Range")))
                pending = server.failures.get(rel)
                if pending:
                    status = pending.pop(0)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / rel
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range and rng.startswith("bytes="):
                    first = rng.removeprefix("bytes=").split("-")[0]
                    start = int(first or 0)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                    self.send_header("Accept-Ranges", "bytes")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", f'"{hash(data) & 0xFFFFFFFF:x}"')
                for key, value in server.headers.get(rel, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if head:
                    return
                drops = server.drops.get(rel)
                if drops:
                    after = drops.pop(0)
                    self.wfile.write(body[:after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._serve(head=False)

            def do_HEAD(self) -> None:
                self._serve(head=True)

        return Handler
