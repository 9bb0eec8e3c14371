"""A threaded HTTP/1.1 reverse proxy for tests that injects faults on demand.

``FaultProxy(upstream)`` listens on a free 127.0.0.1 port and forwards every request to
``upstream`` (``http://host:port``) with the request line's path and query and the ``Host``
header exactly as received, so SigV4 presigned URLs signed for the proxy's address still
validate at the S3 server behind it. Bodies stream through in 64 KiB pieces both ways
(Content-Length and chunked), so uploads of hundreds of MB never sit in memory.

Faults are rules matched in the order they were added: an HTTP ``method`` (any if ``None``)
and a ``path_regex`` searched in the request target (path + query, e.g.
``r"partNumber=2"``), consumed ``times`` times (``None``: until :meth:`clear`)::

    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.fail("PUT", r"partNumber=2", status=500)   # answer 500, do not forward
        proxy.hang("PUT", seconds=5)                     # read, then go silent and close
        proxy.reset("PUT")                               # read part of the body, send RST
        proxy.down(); proxy.up()                         # refuse connections, then accept
        assert proxy.requests("PUT", r"partNumber=2") == 1

Every request that reached the proxy is counted, whether forwarded or faulted.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

CHUNK_BYTES = 64 * 1024
LOOPBACK = "127.0.0.1"
# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the two
# the proxy re-frames itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
FAULT_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>InjectedFault</Code><Message>injected by FaultProxy</Message></Error>"
)

FaultKind = Literal["fail", "hang", "reset"]


@dataclass
class _Rule:
    kind: FaultKind
    method: str | None
    path: re.Pattern[str] | None
    remaining: int | None
    status: int = 500
    seconds: float = 0.0
    after_bytes: int | None = None

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or self.path.search(target) is not None


class _ClientGone(Exception):
    """The client closed its connection before its request body ended."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.active: set[socket.socket] = set()
        self.active_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.active_lock:
            self.active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.active_lock:
            self.active.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut every open client connection (what a crashed server does to them)."""
        with self.active_lock:
            connections = list(self.active)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read counters, not logs

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _handle(self) -> None:
        try:
            self._serve()
        except (_ClientGone, OSError, ValueError):
            self.close_connection = True  # a client that went away or sent garbage

    def _serve(self) -> None:
        proxy = self.server.proxy
        rule = proxy._record(self.command, self.path)
        if rule is None:
            self._forward(proxy)
        elif rule.kind == "fail":
            self._drain()
            self._reply(rule.status, FAULT_BODY, "application/xml")
        elif rule.kind == "hang":
            self._drain()
            proxy._released.wait(rule.seconds)
            self.close_connection = True  # and never answer
        else:
            self._read_some(rule.after_bytes)
            self._abort()

    # --- request bodies ---------------------------------------------------------------

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.strip().isdigit() else None

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body(self, limit: int | None = None) -> Iterator[bytes]:
        """The request body in pieces (only its first ``limit`` bytes if given)."""
        pieces = (
            self._chunked_pieces()
            if self._is_chunked()
            else self._sized_pieces(self._content_length() or 0)
        )
        if limit is None:
            yield from pieces
            return
        left = limit
        for piece in pieces:
            if left <= 0:
                return
            yield piece[:left]
            left -= len(piece)

    def _sized_pieces(self, length: int) -> Iterator[bytes]:
        remaining = length
        while remaining > 0:
            piece = self.rfile.read(min(CHUNK_BYTES, remaining))
            if not piece:
                raise _ClientGone("client closed the connection mid-body")
            remaining -= len(piece)
            yield piece

    def _chunked_pieces(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _ClientGone("client closed the connection mid-body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield from self._sized_pieces(size)
            self.rfile.readline(1024)  # the CRLF after the chunk

    def _drain(self) -> None:
        for _ in self._body():
            pass

    def _read_some(self, after_bytes: int | None) -> None:
        length = self._content_length()
        if after_bytes is None:
            after_bytes = min(CHUNK_BYTES, length // 2) if length else 0
        for _ in self._body(limit=after_bytes):
            pass

    def _abort(self) -> None:
        # Linger 0: close() sends RST, as when a middlebox or crashed server drops the socket.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    # --- responses ----------------------------------------------------------------------

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, proxy: FaultProxy) -> None:
        upstream = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=proxy.timeout
        )
        try:
            try:
                response = self._send_upstream(upstream)
            except _ClientGone:
                self.close_connection = True
                return
            except TimeoutError:
                self._reply(504, b"upstream timed out", "text/plain")
                return
            except OSError as exc:
                self._reply(502, f"upstream unreachable: {exc}".encode(), "text/plain")
                return
            self._relay(response)
        finally:
            upstream.close()

    def _send_upstream(self, upstream: http.client.HTTPConnection) -> http.client.HTTPResponse:
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                upstream.putheader(name, value)
        chunked = self._is_chunked()
        if chunked:
            upstream.putheader("Transfer-Encoding", "chunked")
        upstream.endheaders()
        for piece in self._body():
            upstream.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            upstream.send(b"0\r\n\r\n")
        return upstream.getresponse()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        for name, value in headers:
            self.send_header(name, value)
        bodyless = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        sized = any(k.lower() == "content-length" for k, _ in headers)
        if not bodyless and not sized:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if bodyless:
            return
        while piece := response.read(CHUNK_BYTES):
            self.wfile.write(piece if sized else b"%x\r\n%s\r\n" % (len(piece), piece))
        if not sized:
            self.wfile.write(b"0\r\n\r\n")


class FaultProxy:
    """A reverse proxy in front of ``upstream`` whose failures a test programs."""

    def __init__(
        self, upstream: str, *, host: str = LOOPBACK, port: int = 0, timeout: float = 60.0
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.timeout = timeout
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._log: list[tuple[str, str]] = []
        self._released = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen (on a free port the first time) and serve in a daemon thread."""
        self.up()
        return self

    def up(self) -> None:
        """Accept connections again, on the same port."""
        if self._server is not None:
            return
        self._released = threading.Event()
        self._server = _Server((self.host, self.port), self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def down(self) -> None:
        """Refuse connections: close the listening socket and cut open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        self._released.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop(self) -> None:
        self.down()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    # --- faults -------------------------------------------------------------------------

    def fail(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        status: int = 500,
        times: int | None = 1,
    ) -> None:
        """Answer matching requests with ``status`` (body read, nothing forwarded)."""
        self._add(_Rule("fail", method, _compile(path_regex), times, status=status))

    def hang(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        seconds: float = 30.0,
        times: int | None = 1,
    ) -> None:
        """Read matching requests, then stay silent ``seconds`` and close without answering."""
        self._add(_Rule("hang", method, _compile(path_regex), times, seconds=seconds))

    def reset(
        self,
        method: str | None = None,
        path_regex: str | None = None,
        times: int | None = 1,
        after_bytes: int | None = None,
    ) -> None:
        """Read ``after_bytes`` of the body (default: half, at most 64 KiB), then send RST."""
        self._add(_Rule("reset", method, _compile(path_regex), times, after_bytes=after_bytes))

    def clear(self) -> None:
        """Forget every fault not yet used up."""
        with self._lock:
            self._rules.clear()

    def requests(self, method: str | None = None, path_regex: str | None = None) -> int:
        """How many requests matching ``method`` and ``path_regex`` reached the proxy."""
        probe = _Rule("fail", method, _compile(path_regex), None)
        with self._lock:
            return sum(1 for m, target in self._log if probe.matches(m, target))

    def _add(self, rule: _Rule) -> None:
        if rule.remaining is not None and rule.remaining < 1:
            raise ValueError("times must be at least 1 (or None for always)")
        with self._lock:
            self._rules.append(rule)

    def _record(self, method: str, target: str) -> _Rule | None:
        """Count the request; the fault it triggers (one use of it), if any."""
        with self._lock:
            self._log.append((method, target))
            for rule in self._rules:
                if rule.matches(method, target):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining == 0:
                            self._rules.remove(rule)
                    return rule
        return None


def _compile(path_regex: str | None) -> re.Pattern[str] | None:
    return re.compile(path_regex) if path_regex is not None else None
