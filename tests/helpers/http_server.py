"""A loopback HTTP file server that misbehaves on request, for download tests and the benchmark.

Each route serves bytes (or a file, through sendfile) with optional behaviours: honour or ignore
Range, drop the connection at a fraction of the file, serve wrong bytes, serve slowly, answer a
fixed status (401/404/500) or fail the first N requests, redirect, demand a bearer token, omit
Content-Length. It records every request (method, path, headers) and counts bytes served.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.helpers.black_hole import fill_backlog
from tests.helpers.tls import Cert


@dataclass
class Route:
    data: bytes | None = None
    file: Path | None = None
    status: int | None = None  # answer this status (with a short body) instead of the file
    fail_first: int = 0  # the first N GETs answer fail_status
    fail_status: int = 500
    drop_at: float | None = None  # close the connection once this fraction of the file was sent
    drop_times: int = 1  # ...on this many GETs
    ignore_range: bool = False
    wrong_bytes: bool = False  # flip one byte in the middle (same size, other sha256)
    delay_per_chunk: float = 0.0  # seconds slept between chunks
    slow_from: float = 0.0  # ...once this fraction of the file was sent (fast before it)
    chunk: int = 1 << 16  # bytes per chunk (1 with a delay: a server trickling a byte at a time)
    refuse_ranges: bool = False  # answer 416 to every Range request
    wrong_range: bool = False  # answer every Range request with the file's first bytes (206, bytes 0-...)
    redirect: str | None = None  # Location to send (302) instead of the file
    redirect_status: int = 302
    require_token: str | None = None  # 401 unless "Authorization: Bearer <token>"
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    headers: dict[str, str] = field(default_factory=dict)
    gets: int = 0
    answered: int = 0  # GETs whose answer was sent whole (bytes_sent counts a chunk once it was written)
    bytes_sent: int = 0

    @property
    def size(self) -> int:
        if self.file is not None:
            return self.file.stat().st_size
        return len(self.data or b"")

    def settled_bytes(self, timeout: float = 30.0) -> int:
        """``bytes_sent`` once every GET so far was answered whole or given up: a handler counts a chunk
        after writing it, and one whose client has gone goes on until a write fails. Read a baseline with
        this, not ``bytes_sent``, or a late count of the last transfer lands in the next one."""
        deadline = time.monotonic() + timeout
        while self.answered < self.gets:
            if time.monotonic() > deadline:
                raise AssertionError(f"the server still answers {self.gets - self.answered} GET(s) after {timeout} s")
            time.sleep(0.01)
        return self.bytes_sent


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        owner._seen(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if owner.custom is not None and owner.custom(self, head):
            return
        route = owner.routes.get(path)
        if route is None:
            self.reply(404, b"not found\n")
            return
        with owner.lock:
            if not head:
                route.gets += 1
            nth = route.gets
        if route.require_token is not None and self.headers.get("Authorization") != f"Bearer {route.require_token}":
            self.reply(401, b"unauthorized\n")
            return
        if route.redirect is not None:
            self.reply(route.redirect_status, b"", {"Location": route.redirect})
            return
        if route.status is not None:
            self.reply(route.status, f"status {route.status}\n".encode())
            return
        if not head and nth <= route.fail_first:
            self.reply(route.fail_status, b"try again\n")
            return
        try:
            self._send_file(route, head, nth)
        finally:
            if not head:
                with owner.lock:
                    route.answered += 1

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _range(self, size: int) -> tuple[int, int] | None:
        value = self.headers.get("Range")
        if not value or not value.startswith("bytes="):
            return None
        first, _, last = value[6:].partition("-")
        start = int(first)
        end = int(last) if last else size - 1
        return start, min(end, size - 1)

    def _send_file(self, route: Route, head: bool, nth: int) -> None:
        size = route.size
        span = None if route.ignore_range else self._range(size)
        if_range = self.headers.get("If-Range")
        if span is not None and if_range and if_range not in (route.headers.get("ETag"),
                                                              route.headers.get("Last-Modified")):
            span = None  # RFC 9110: the validator does not match, so the whole (changed) file is sent
        if span is not None and (span[0] >= size or route.refuse_ranges):
            self.reply(416, b"", {"Content-Range": f"bytes */{size}"})
            return
        start, end = span if span is not None else (0, size - 1)
        if span is not None and route.wrong_range:
            start, end = 0, min(end - span[0], size - 1)
        self.send_response(206 if span is not None else 200)
        self.send_header("Accept-Ranges", "none" if route.ignore_range else "bytes")
        for key, value in route.headers.items():
            self.send_header(key, value)
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if route.no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if head:
            return
        stop = end + 1
        dropping = route.drop_at is not None and nth <= route.drop_times
        if dropping:
            stop = min(stop, int(size * (route.drop_at or 0)))
        self._body(route, start, stop)
        if dropping or route.no_length:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                return

    def _body(self, route: Route, start: int, stop: int) -> int:
        sent = 0
        lock = self.server.owner.lock

        def count(n: int) -> None:  # as it goes, so a test can watch a download progress
            with lock:
                route.bytes_sent += n

        try:
            if route.file is not None and not route.wrong_bytes and not route.delay_per_chunk:
                with open(route.file, "rb") as fh:
                    offset = start
                    while offset < stop:
                        n = os.sendfile(self.connection.fileno(), fh.fileno(), offset, min(stop - offset, 1 << 24))
                        if n == 0:
                            break
                        offset += n
                        sent += n
                        count(n)
                return sent
            data = route.data if route.data is not None else route.file.read_bytes()  # type: ignore[union-attr]
            if route.wrong_bytes:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
            step = route.chunk
            for pos in range(start, stop, step):
                piece = data[pos:min(pos + step, stop)]
                self.wfile.write(piece)
                sent += len(piece)
                count(len(piece))
                if route.delay_per_chunk and pos >= route.slow_from * len(data):
                    time.sleep(route.delay_per_chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        return sent


# A loopback address standing for a model server on an endpoint's private network: a worker refuses
# job-named URLs to internal addresses unless its FORGE_DOWNLOAD_ALLOW_NETWORKS opts in, so the
# workers under test that download from a FileServer on this address opt in to it (PRIVATE_MODELS_ENV).
PRIVATE_MODEL_HOST = "127.0.0.2"
PRIVATE_MODELS_ENV = {"FORGE_DOWNLOAD_ALLOW_NETWORKS": f"{PRIVATE_MODEL_HOST}/32"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS is set up in the connection's own thread: a client stalled in its handshake holds only that one.
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up early (the lock's one-byte probe, a cancelled download) is normal here;
        # printed, its traceback would land in the output of a CLI run in-process by the test.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        # Anything else goes to the real stderr, never to sys.stderr: click's CliRunner swaps that for the whole
        # process while a command runs, and a server thread's traceback became part of the command's output
        # (seen in the soak: "Traceback" in `lock`'s output, from socketserver's process_request_thread).
        print(f"test server: error serving {client_address}:", file=sys.__stderr__)
        traceback.print_exc(file=sys.__stderr__)


class FileServer:
    """``with FileServer() as srv: srv.add("/x.bin", data=b"..."); url = srv.url("/x.bin")``."""

    def __init__(self, host: str = "127.0.0.1", tls: Cert | None = None) -> None:
        self.host = host
        self.scheme = "https" if tls is not None else "http"
        self.routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        # A hook for richer fakes (the fake hub): return True when it answered the request.
        self.custom: Callable[[_Handler, bool], bool] | None = None
        self._server = _Server((host, 0), _Handler)
        self._server.owner = self
        self._server.tls = tls.server_context() if tls is not None else None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._dark: list[socket.socket] = []

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str, host: str | None = None) -> str:
        host = host or (self.host if self.host != "0.0.0.0" else "127.0.0.1")
        return f"{self.scheme}://{host}:{self.port}{path}"

    def add(self, path: str, data: bytes | None = None, **behaviour: Any) -> Route:
        route = Route(data=data, **behaviour)
        self.routes[path] = route
        return route

    def _seen(self, seen: Seen) -> None:
        with self.lock:
            self.requests.append(seen)

    def requests_to(self, path: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def go_dark(self) -> None:
        """Stop accepting, the listening socket left open with its queue filled: from here every connect
        hangs (``tests.helpers.black_hole``), as towards a host gone behind a firewall."""
        self._server.shutdown()
        self._dark = fill_backlog("127.0.0.1" if self.host == "0.0.0.0" else self.host, self.port)

    def come_back(self) -> None:
        """After ``go_dark``: serve again (the connections that filled the queue are dropped)."""
        for sock in self._dark:
            sock.close()
        self._dark = []
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for sock in self._dark:
            sock.close()

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
