"""A guarded HTTP(S) GET for untrusted URL lists.

Each hop of a redirect chain is checked on its own: http/https only, the host resolved and every
address checked against private, loopback, link-local, multicast, reserved and unspecified ranges
(unless allowed), and the connection made to the very address that was checked, so a DNS answer
that changes between check and connect (rebinding) cannot reach an internal host. Bodies are
streamed and cut at a byte cap whatever Content-Length says; each attempt has a deadline; connection
errors, timeouts and 5xx responses are retried with exponential backoff, 4xx are not. Proxy
environment variables are deliberately ignored.
"""
from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from typing import Optional

from etl.records import Rejected

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
USER_AGENT = "bigticket-etl/0.1 (+https://github.com/)"


class _Retryable(Exception):
    """A failure worth another attempt (connection error, timeout, 5xx)."""


def address_problem(ip: ipaddress._BaseAddress) -> Optional[str]:
    """Why connecting to `ip` is refused by default, or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    # Most specific first: is_private also covers loopback, link-local and more.
    for attr in ("is_unspecified", "is_loopback", "is_link_local", "is_multicast", "is_reserved",
                 "is_private"):
        if getattr(ip, attr):
            return f"{ip} is {attr[3:].replace('_', '-')}"
    return None


@dataclasses.dataclass(frozen=True)
class Downloader:
    timeout: float = 20.0          # seconds, per attempt (connect + all reads)
    retries: int = 3
    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    allow_private: bool = False
    backoff: float = 0.5           # first retry delay; doubles each retry
    cafile: Optional[str] = None   # extra CA bundle for https (default: the system's)

    def fetch(self, url: str) -> bytes:
        """The body of `url`; Rejected('download_error' | 'too_large', detail) on failure."""
        for _hop in range(self.max_redirects + 1):
            status, location, body = self._with_retries(url)
            if status not in REDIRECTS:
                return body
            if not location:
                raise Rejected("download_error", f"HTTP {status} without Location")
            url = urllib.parse.urljoin(url, location)
        raise Rejected("download_error", f"too many redirects (more than {self.max_redirects})")

    def _with_retries(self, url: str):
        for attempt in range(self.retries + 1):
            try:
                return self._attempt(url)
            except _Retryable as err:
                if attempt == self.retries:
                    suffix = f" after {self.retries} retries" if self.retries else ""
                    raise Rejected("download_error", f"{err}{suffix}") from None
                delay = self.backoff * (2 ** attempt)
                log.debug("retrying %s in %.2fs: %s", url, delay, err)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _resolve(self, host: str, port: int) -> str:
        """A checked address of `host` to connect to."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise Rejected("download_error", f"cannot resolve {host!r}: {err.strerror}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise Rejected("download_error", f"no address for {host!r}")
        if not self.allow_private:
            for ip in addresses:  # any internal answer refuses the host: no picking around it
                problem = address_problem(ip)
                if problem:
                    raise Rejected("download_error",
                                   f"refused address for {host!r}: {problem} "
                                   "(allow_private_addresses is off)")
        return str(addresses[0])

    def _attempt(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise Rejected("download_error",
                           f"scheme {parts.scheme!r} not allowed (http/https only)")
        if not parts.hostname:
            raise Rejected("download_error", "URL has no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise Rejected("download_error", "invalid port") from None
        address = self._resolve(parts.hostname, port)
        deadline = time.monotonic() + self.timeout
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.cafile)
            conn = http.client.HTTPSConnection(parts.hostname, port, timeout=self.timeout,
                                               context=context)
        else:
            conn = http.client.HTTPConnection(parts.hostname, port, timeout=self.timeout)
        # Connect to the checked address; Host header, SNI and certificate check keep the name.
        conn._create_connection = (lambda addr, timeout, source=None:
                                   socket.create_connection((address, addr[1]), timeout, source))
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": "image/*",
                                               "Connection": "close"})
            sock = conn.sock  # kept: http.client drops conn.sock once a closing response arrives
            sock.settimeout(max(0.001, deadline - time.monotonic()))  # one deadline per attempt
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                return resp.status, resp.getheader("Location"), b""
            if 500 <= resp.status < 600:
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status != 200:
                raise Rejected("download_error", f"HTTP {resp.status}")
            return resp.status, None, self._read_body(resp, sock, deadline)
        except (socket.timeout, TimeoutError):
            raise _Retryable(f"timeout after {self.timeout}s") from None
        except ssl.SSLError as err:
            raise Rejected("download_error", f"TLS error: {err.reason or err}") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Retryable(f"connection error: {type(err).__name__}: {err}") from None
        finally:
            conn.close()

    def _read_body(self, resp: http.client.HTTPResponse, sock: socket.socket,
                   deadline: float) -> bytes:
        declared = resp.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise Rejected("too_large", f"Content-Length {int(declared)} > max_image_bytes "
                           f"{self.max_bytes}")
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            if resp.isclosed():  # the whole declared body has been read
                break
            sock.settimeout(remaining)  # a slow drip cannot outlive the attempt's deadline
            # http.client never reads past a declared Content-Length (so a header that
            # understates the body cannot make us read more), and without one we stop at the
            # first byte past the cap: at most max_bytes + 1 bytes are ever read.
            # read1: whatever one receive returns, so the deadline is checked between receives
            # (read(n) would block until n bytes arrived, however slowly).
            chunk = resp.read1(min(CHUNK, self.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_bytes:
                raise Rejected("too_large", f"body exceeds max_image_bytes {self.max_bytes}")
        if declared and declared.strip().isdigit() and total < int(declared):
            # The connection ended early (read1 does not raise IncompleteRead as read does).
            raise _Retryable(f"incomplete body: {total} of {int(declared)} declared bytes")
        return b"".join(chunks)
