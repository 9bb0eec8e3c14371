"""The test fault proxy (tests/support/faultproxy.py) against a tiny upstream server."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.support.faultproxy import FaultProxy

MIB = 1024 * 1024
PIECE = bytes(range(256)) * 256  # 64 KiB


def pieces(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = PIECE[: min(len(PIECE), total - sent)]
        sent += len(piece)
        yield piece


def digest_of(total: int) -> str:
    h = hashlib.sha256()
    for piece in pieces(total):
        h.update(piece)
    return h.hexdigest()


class Upstream(BaseHTTPRequestHandler):
    """Echoes what it received as JSON; ``GET /bytes?n=N`` streams N bytes back."""

    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> tuple[int, str]:
        h, n = hashlib.sha256(), 0
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while size := int(self.rfile.readline().split(b";")[0] or b"0", 16):
                data = self.rfile.read(size)
                h.update(data)
                n += len(data)
                self.rfile.readline()
            self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                h.update(data)
                n += len(data)
                left -= len(data)
        return n, h.hexdigest()

    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        if self.path.startswith("/bytes"):
            total = int(self.path.split("n=")[1])
            self.send_response(200)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            for piece in pieces(total):
                self.wfile.write(piece)
            return
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for word in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(word), word))
            self.wfile.write(b"0\r\n\r\n")
            return
        length, sha = self._body()
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("Host"),
                "length": length,
                "sha256": sha,
                "x_custom": self.headers.get("X-Custom"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream: ThreadingHTTPServer) -> Iterator[FaultProxy]:
    host, port = upstream.server_address[:2]
    with FaultProxy(f"http://{host!s}:{port}") as p:
        yield p


def hits(upstream: ThreadingHTTPServer) -> int:
    return int(upstream.hits)  # type: ignore[attr-defined]


def test_forwards_path_query_and_host_unchanged(proxy: FaultProxy) -> None:
    target = "/bucket/a%3Ab/key.bin?X-Amz-Signature=abc&partNumber=2&uploadId=u%2B1"
    response = httpx.put(proxy.url + target, content=b"payload", headers={"X-Custom": "kept"})
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == target
    assert seen["host"] == f"127.0.0.1:{proxy.port}"  # what the client sent, not upstream's
    assert seen["x_custom"] == "kept"
    assert (seen["length"], seen["sha256"]) == (7, hashlib.sha256(b"payload").hexdigest())
    assert proxy.requests() == 1
    assert proxy.requests("PUT", r"partNumber=2") == 1
    assert proxy.requests("GET") == 0


def test_streams_large_bodies_both_ways_without_buffering(proxy: FaultProxy) -> None:
    total = 64 * MIB
    tracemalloc.start()
    try:
        up = httpx.put(
            proxy.url + "/sized",
            content=pieces(total),
            headers={"Content-Length": str(total)},
            timeout=60,
        )
        chunked = httpx.put(proxy.url + "/upload-chunked", content=pieces(3 * MIB), timeout=60)
        down = hashlib.sha256()
        with httpx.stream("GET", f"{proxy.url}/bytes?n={total}", timeout=60) as response:
            assert response.headers["content-length"] == str(total)
            for data in response.iter_bytes():
                down.update(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert up.json()["length"] == total
    assert up.json()["sha256"] == digest_of(total)
    assert chunked.json()["sha256"] == digest_of(3 * MIB)
    assert down.hexdigest() == digest_of(total)
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB: bodies were buffered"


def test_relays_chunked_and_bodiless_responses(proxy: FaultProxy) -> None:
    assert httpx.get(proxy.url + "/chunked").text == "hello chunked world"
    head = httpx.head(proxy.url + "/thing")
    assert head.status_code == 200
    assert int(head.headers["content-length"]) > 0
    assert head.content == b""


def test_fail_answers_without_forwarding_then_runs_out(
    proxy: FaultProxy, upstream: ThreadingHTTPServer
) -> None:
    proxy.fail("PUT", r"partNumber=2", status=503, times=2)
    with httpx.Client() as client:  # one keep-alive connection throughout
        first = client.put(proxy.url + "/k?partNumber=2", content=b"x" * 100_000)
        other = client.put(proxy.url + "/k?partNumber=3", content=b"y")
        second = client.put(proxy.url + "/k?partNumber=2", content=b"x")
        third = client.put(proxy.url + "/k?partNumber=2", content=b"x")
    assert [first.status_code, second.status_code] == [503, 503]
    assert "InjectedFault" in first.text
    assert other.status_code == third.status_code == 200
    assert hits(upstream) == 2
    assert proxy.requests("PUT", r"partNumber=2") == 3
    assert proxy.requests("put") == 4


def test_fail_without_times_limit_lasts_until_cleared(proxy: FaultProxy) -> None:
    proxy.fail(status=500, times=None)
    assert [httpx.get(proxy.url + "/x").status_code for _ in range(3)] == [500] * 3
    proxy.clear()
    assert httpx.get(proxy.url + "/x").status_code == 200


def test_hang_makes_the_client_time_out(proxy: FaultProxy, upstream: ThreadingHTTPServer) -> None:
    proxy.hang("POST", seconds=10)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + "/slow", content=b"body", timeout=0.5)
    assert time.monotonic() - started < 5
    assert hits(upstream) == 0
    assert httpx.post(proxy.url + "/slow", content=b"body").status_code == 200


def test_reset_cuts_the_upload_midway(proxy: FaultProxy, upstream: ThreadingHTTPServer) -> None:
    proxy.reset("PUT", after_bytes=1000)
    with pytest.raises(httpx.TransportError):
        httpx.put(
            proxy.url + "/big", content=pieces(8 * MIB), headers={"Content-Length": str(8 * MIB)}
        )
    assert hits(upstream) == 0
    assert httpx.put(proxy.url + "/big", content=b"ok").status_code == 200


def test_down_refuses_connections_and_up_serves_on_the_same_port(proxy: FaultProxy) -> None:
    url = proxy.url
    with httpx.Client() as client:
        assert client.get(url + "/a").status_code == 200
        proxy.down()
        assert not proxy.is_up
        with pytest.raises(httpx.TransportError):
            client.get(url + "/b")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/c")
        proxy.up()
        assert proxy.url == url
        assert client.get(url + "/d").status_code == 200


def test_a_dead_upstream_is_a_502(upstream: ThreadingHTTPServer) -> None:
    host, port = upstream.server_address[:2]
    upstream.shutdown()
    upstream.server_close()
    with FaultProxy(f"http://{host!s}:{port}") as proxy:
        response = httpx.get(proxy.url + "/x")
    assert response.status_code == 502


def test_rejects_bad_upstreams_and_times() -> None:
    with pytest.raises(ValueError, match="upstream"):
        FaultProxy("https://example.com")
    proxy = FaultProxy("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="times"):
        proxy.fail(times=0)
