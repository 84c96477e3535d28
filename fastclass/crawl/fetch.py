"""Every network read fastclass makes, for result pages and images alike, goes through one `Fetcher`:

- a guarded connection: every address a host name resolves to is checked when the connection is made
  (redirects too), and loopback, private, link-local and other non-public targets are refused unless
  `allow_private` (or the host is one the user named, an `--engine-url`); the connect polls the stop
  event, so Ctrl-C never waits for a connect timeout;
- retries with urllib3's `Retry` (connection errors and 429/502/503/504, the server's Retry-After up to
  60 s, else exponential backoff with jitter), whose waits end at once when the crawl stops;
- a bounded read: at most `max_bytes` of decoded body (gzip and deflate are decompressed a bounded
  piece at a time, so a small bomb page cannot allocate gigabytes), each read waits at most `timeout`
  seconds and never past the whole fetch's deadline, and `abort()` shuts every open socket so that
  reads in other threads end within moments.
"""
from __future__ import annotations

import errno
import ipaddress
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from fastclass.errors import first_line

PERMANENT_HTTP = {400, 401, 403, 404, 405, 406, 410, 414, 415, 451}
RETRY_HTTP = {429, 502, 503, 504}
MAX_RETRY_WAIT = 60.0
READ_SIZE = 64 * 1024


class Stopped(Exception):
    """The fetch ended because the crawl is stopping (Ctrl-C, --max reached)."""


class FetchFailed(Exception):
    """One URL could not be fetched; the message is the reason recorded for it."""

    def __init__(self, reason: str, permanent: bool = True, rejected: bool = False, status: int | None = None,
                 content_type: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        """False when a later run may succeed (a timeout, a connection reset, a 503)."""
        self.rejected = rejected
        """True when the server answered with something that is not what was asked for (too big, text)."""
        self.status = status
        self.content_type = content_type


class RefusedTarget(urllib3.exceptions.NewConnectionError):
    """A host that resolves only to addresses fastclass may not fetch from (loopback, private, ...)."""

    def __init__(self, conn, message: str) -> None:
        super().__init__(conn, message)
        self.reason = message


@dataclass
class Fetched:
    url: str
    """The final URL, after redirects."""
    status: int
    headers: Mapping[str, str]
    body: bytes


def http_url(url: str) -> bool:
    """Whether a string from the web is a well-formed http(s) URL with a host (malformed ones, such as
    `http://[::1/x`, make urlsplit raise)."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def address_kind(ip: str) -> str | None:
    """Why an address is not a public one ('loopback', 'private', ...), or None for a public address."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return "unparsable"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if addr.is_global else "non-public"


@dataclass
class Guard:
    """What a Fetcher's connections may reach, and the stop switch they all watch."""

    allow_private: bool = False
    trusted: set[tuple[str, int]] = field(default_factory=set)
    """(host, port) pairs the user named (an --engine-url): reachable even when private."""
    stop: threading.Event = field(default_factory=threading.Event)
    sockets: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    def connect(self, conn: HTTPConnection) -> socket.socket:
        host, port, timeout = conn._dns_host, conn.port, conn.timeout
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(conn.host, conn, exc) from exc
        allowed, refused = [], None
        for info in infos:
            kind = None if self.allow_private or (conn.host, port) in self.trusted else address_kind(info[4][0])
            if kind is None:
                allowed.append(info)
            else:
                refused = refused or f"{conn.host} is a {kind} address ({info[4][0]})"
        if not allowed:
            raise RefusedTarget(conn, f"refused: {refused}; pass --allow-private to fetch from it")
        last: OSError | None = None
        for family, kind, proto, _, address in allowed:
            try:
                return self._connect_one(family, kind, proto, address, timeout, conn.socket_options)
            except OSError as exc:
                last = exc
        if isinstance(last, TimeoutError):
            raise urllib3.exceptions.ConnectTimeoutError(conn, f"connection to {conn.host} timed out") from last
        raise urllib3.exceptions.NewConnectionError(conn, f"connection failed: {last}") from last

    def _connect_one(self, family: int, kind: int, proto: int, address: tuple, timeout: float | None,
                     options) -> socket.socket:
        sock = socket.socket(family, kind, proto)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            sock.setblocking(False)
            self.sockets.add(sock)
            code = sock.connect_ex(address)
            deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
            while code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
                if self.stop.is_set():
                    raise Stopped()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("connect timed out")
                if select.select([], [sock], [], min(0.2, left))[1]:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    break
            if code:
                raise OSError(code, errno.errorcode.get(code, str(code)))
            sock.settimeout(timeout)
            return sock
        except BaseException:
            sock.close()
            raise

    def abort(self) -> None:
        """Stop: connects and retry waits end, and every open socket is shut so blocked reads return."""
        self.stop.set()
        for sock in list(self.sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _guarded_pool_classes(guard: Guard) -> dict[str, type]:
    def new_conn(self) -> socket.socket:
        return guard.connect(self)

    http_conn = type("GuardedHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn})
    https_conn = type("GuardedHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn})
    return {"http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})}


def _stoppable_retry(stop: threading.Event) -> type[urllib3.Retry]:
    class StoppableRetry(urllib3.Retry):
        """urllib3's Retry, whose waits end when the crawl stops."""

        def sleep(self, response=None) -> None:
            wait = None
            if response is not None and self.respect_retry_after_header:
                try:
                    wait = self.get_retry_after(response)
                except urllib3.exceptions.InvalidHeader:
                    wait = None
            if not wait:
                wait = self.get_backoff_time()
            if wait > 0 and stop.wait(min(wait, MAX_RETRY_WAIT)):
                raise Stopped()

    return StoppableRetry


class RewritingSession(requests.Session):
    """A requests session that sends public engine URLs to their configured replacements, with a timeout."""

    def __init__(self, rewrites: dict[str, str], timeout: tuple[float, float], user_agent: str) -> None:
        super().__init__()
        self.rewrites = {public.rstrip("/"): local.rstrip("/") for public, local in rewrites.items()}
        self.default_timeout = timeout
        self.headers["User-Agent"] = user_agent

    def rewrite(self, url: str) -> str:
        for public, local in self.rewrites.items():
            if url == public or url.startswith(public + "/") or url.startswith(public + "?"):
                return local + url[len(public):]
        return url

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, self.rewrite(url), *args, **kwargs)


class GuardedAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose connections go through a Guard (for requests an icrawler parser makes)."""

    def __init__(self, guard: Guard, **kwargs) -> None:
        self.guard = guard
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _guarded_pool_classes(self.guard)


class Fetcher:
    """One crawl's HTTP client: guarded connections, retries, bounded reads (see the module's doc)."""

    def __init__(self, timeout: float = 10.0, connect_timeout: float = 5.0, max_redirects: int = 5,
                 retries: int = 3, allow_private: bool = False, trusted: set[tuple[str, int]] | None = None,
                 user_agent: str = "fastclass", per_host: int = 4) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_redirects = max_redirects
        self.guard = Guard(allow_private, set(trusted or ()))
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=max(per_host, 1), block=False,
                                        headers={"User-Agent": user_agent})
        self.pool.pool_classes_by_scheme = _guarded_pool_classes(self.guard)
        self.retry = _stoppable_retry(self.guard.stop)(
            total=None, connect=retries, read=0, status=retries, other=0, redirect=max_redirects,
            status_forcelist=RETRY_HTTP, backoff_factor=0.5, backoff_jitter=0.25, backoff_max=MAX_RETRY_WAIT,
            retry_after_max=MAX_RETRY_WAIT, raise_on_redirect=True, raise_on_status=False)

    @property
    def stop(self) -> threading.Event:
        return self.guard.stop

    def abort(self) -> None:
        self.guard.abort()

    def get(self, url: str, max_bytes: int, refuse_types: tuple[str, ...] = (),
            deadline: float | None = None) -> Fetched:
        """GET url and read its body within the limits; raises FetchFailed with the reason, or Stopped.

        deadline: seconds the whole fetch may take (default three times the read timeout)."""
        if not http_url(url):
            raise FetchFailed("bad URL (not a well-formed http(s) URL)")
        if self.stop.is_set():
            raise Stopped()
        ends = time.monotonic() + (deadline if deadline is not None else 3 * self.timeout)
        try:
            response = self.pool.request("GET", url, preload_content=False, retries=self.retry,
                                         timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.timeout))
        except urllib3.exceptions.MaxRetryError as exc:
            raise _failure(exc.reason or exc, self.max_redirects) from None
        except (urllib3.exceptions.LocationValueError, ValueError) as exc:
            raise FetchFailed(f"bad URL ({first_line(exc)})") from None
        except urllib3.exceptions.HTTPError as exc:
            raise _failure(exc, self.max_redirects) from None
        try:
            code = response.status
            ctype = response.headers.get("Content-Type", "")[:200] or None
            if code >= 400:
                raise FetchFailed(f"HTTP {code}", permanent=code in PERMANENT_HTTP, status=code, content_type=ctype)
            if ctype and refuse_types and ctype.lower().startswith(refuse_types):
                raise FetchFailed(f"not an image (served {ctype.split(';')[0]})", rejected=True, status=code,
                                  content_type=ctype)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise FetchFailed(f"larger than the byte cap ({max_bytes} bytes)", rejected=True, status=code,
                                  content_type=ctype)
            body = self._read(response, max_bytes, ends, code, ctype)
            return Fetched(_final_url(url, response), code, response.headers, body)
        except urllib3.exceptions.HTTPError as exc:
            if self.stop.is_set():
                raise Stopped() from None
            raise _failure(exc, self.max_redirects) from None
        except OSError as exc:
            if self.stop.is_set():
                raise Stopped() from None
            raise FetchFailed(f"connection failed ({first_line(exc)})", permanent=False) from None
        finally:
            response.release_conn()

    def _read(self, response: urllib3.BaseHTTPResponse, cap: int, ends: float, code: int,
              ctype: str | None) -> bytes:
        """The decoded body, read a piece at a time; never more than cap bytes, never past `ends`."""
        chunks, size = [], 0
        while True:
            if self.stop.is_set():
                response.close()
                raise Stopped()
            left = ends - time.monotonic()
            if left <= 0:
                response.close()
                raise FetchFailed("download too slow (over the time limit)", permanent=False, status=code,
                                  content_type=ctype)
            if left < self.timeout:
                # Near the deadline a read may wait only for what is left of it. The connection is asked for
                # each time: once the body is read to its end, urllib3 hands it back to the pool, where
                # another thread may already be using (or closing) it.
                connection = getattr(response, "connection", None)
                sock = getattr(connection, "sock", None) if connection is not None else None
                if sock is not None:
                    try:
                        sock.settimeout(left)
                    except OSError:
                        pass
            try:
                chunk = response.read1(READ_SIZE)
            except urllib3.exceptions.ReadTimeoutError:
                if time.monotonic() >= ends:
                    continue
                raise
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                response.close()
                raise FetchFailed(f"larger than the byte cap ({cap} bytes)", rejected=True, status=code,
                                  content_type=ctype)
            chunks.append(chunk)

    def requests_session(self, rewrites: Mapping[str, str] | None = None) -> requests.Session:
        """A requests session with the same guard and timeouts, for icrawler parsers that fetch on their own."""
        session = RewritingSession(dict(rewrites or {}), (self.connect_timeout, self.timeout),
                                   self.pool.headers.get("User-Agent", "fastclass"))
        session.max_redirects = self.max_redirects
        adapter = GuardedAdapter(self.guard, pool_connections=16, pool_maxsize=16)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


def _final_url(url: str, response: urllib3.BaseHTTPResponse) -> str:
    """The absolute URL a response came from, after its redirects (urllib3 keeps only the path)."""
    for step in getattr(response.retries, "history", ()) or ():
        if step.redirect_location:
            url = urljoin(url, step.redirect_location)
    return url


def _failure(exc: BaseException, max_redirects: int) -> FetchFailed:
    if isinstance(exc, RefusedTarget):
        # Not permanent: a later run with --allow-private fetches it.
        return FetchFailed(exc.reason, permanent=False)
    if isinstance(exc, urllib3.exceptions.ResponseError):
        return FetchFailed(f"too many redirects (more than {max_redirects})")
    if isinstance(exc, urllib3.exceptions.LocationValueError):
        return FetchFailed(f"bad URL ({first_line(exc)})")
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return FetchFailed("timed out", permanent=False)
    if isinstance(exc, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProtocolError,
                        urllib3.exceptions.NameResolutionError)):
        return FetchFailed("connection failed", permanent=False)
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return FetchFailed(f"bad content encoding ({first_line(exc)[:100]})", rejected=True)
    return FetchFailed(f"{type(exc).__name__}: {first_line(exc)[:150]}", permanent=False)


