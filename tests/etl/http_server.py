"""A real HTTP server on 127.0.0.1 for the urls source tests (stdlib http.server in a thread).

Routes:
  /img/<name>                 200 with the bytes registered under <name>
  /status/<code>              that status
  /flaky/<id>/<n>             500 for the first <n> requests of <id>, then the image "flaky"
  /slow                       sleeps SLOW_SECONDS before answering
  /drip                       declares 1000 bytes, sends one every 0.1 s
  /big/<mode>/<size>          <size> bytes; mode: cl (honest Content-Length), nocl (none, the
                              close ends the body), under (claims 1000), over (claims size*10,
                              sends size then closes)
  /redirect/<n>               302 chain of <n> hops ending at /img/good
  /to/<scheme>                302 to <scheme>://127.0.0.1/x
  /relative                   302 with a relative Location to ../img/good
"""
from __future__ import annotations

import collections
import http.server
import ssl
import threading
import time
import urllib.parse

SLOW_SECONDS = 2.0


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes, unless declared

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers=None, length: int | None = -1):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - the http.server API
        owner: TestServer = self.server.owner  # type: ignore[attr-defined]
        owner.hits[self.path] += 1
        parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")  # query ignored
        try:
            self._route(owner, parts)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: that is what the byte cap and timeouts do

    def _route(self, owner: "TestServer", parts: list[str]):
        head = parts[0]
        if head == "img" and len(parts) == 2 and parts[1] in owner.images:
            self._send(200, owner.images[parts[1]], {"Content-Type": "image/jpeg"})
        elif head == "status":
            self._send(int(parts[1]), b"status body")
        elif head == "flaky":
            if owner.hits[self.path] <= int(parts[2]):
                self._send(500, b"try again")
            else:
                self._send(200, owner.images["flaky"])
        elif head == "slow":
            time.sleep(SLOW_SECONDS)
            self._send(200, owner.images["good"])
        elif head == "drip":
            self._send(200, b"", length=1000)
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif head == "big":
            mode, size = parts[1], int(parts[2])
            length = {"cl": size, "nocl": None, "under": 1000, "over": size * 10}[mode]
            self._send(200, b"", length=length)
            chunk = b"\xab" * 65536
            sent = 0
            while sent < size:
                piece = chunk[:min(len(chunk), size - sent)]
                self.wfile.write(piece)
                sent += len(piece)
        elif head == "redirect":
            n = int(parts[1])
            target = f"/redirect/{n - 1}" if n > 1 else "/img/good"
            self._send(302, b"", {"Location": target})
        elif head == "to":
            self._send(302, b"", {"Location": f"{parts[1]}://127.0.0.1/x"})
        elif head == "relative":
            self._send(302, b"", {"Location": "../img/good"})
        else:
            self._send(404, b"not found")


class TestServer:
    """`with TestServer(images) as server: server.url("/img/good")`."""

    __test__ = False  # not a pytest test class

    def __init__(self, images: dict[str, bytes], tls: tuple[str, str] | None = None):
        """tls: (certificate, key) PEM files to serve https instead of http."""
        self.images = dict(images)
        self.hits: collections.Counter = collections.Counter()
        self.scheme = "https" if tls else "http"
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True  # a sleeping /slow handler never blocks shutdown
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> "TestServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
