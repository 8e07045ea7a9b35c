"""Which addresses a download that a job named may connect to, checked on the connection itself.

A worker's download helper fetches URLs its callers choose. Without a fence, such a URL (or any
redirect it leads to) could read Forge's own API on loopback, the cloud's metadata service
(169.254.169.254) or anything else on the worker's private network. ``AddressGuard`` refuses every
loopback, private, link-local, unspecified, multicast, reserved or otherwise non-public address.

The check runs inside the HTTP connection (``guarded_session``): the host name is resolved once,
every address it resolves to is checked, and the socket connects to one of those very addresses,
while TLS and the Host header keep the name. A name that answers differently a second time (DNS
rebinding) therefore gains nothing. Nothing is sent before the check: a refusal costs no traffic.

An endpoint whose models really live on its private network opts in with
``FORGE_DOWNLOAD_ALLOW_NETWORKS`` (worker setting, a comma-separated list of CIDR networks); even
then, only the host and port the job named may be on such a network, not a redirect's target.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.poolmanager import PoolManager
from urllib3.util.connection import allowed_gai_family

from provision.errors import DownloadError

ALLOW_ENV = "FORGE_DOWNLOAD_ALLOW_NETWORKS"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(DownloadError):
    """A download would connect to an address a job may not reach."""

    hint = (f"download from a public URL; an endpoint whose model server is on its private network can allow "
            f"that network with the worker variable {ALLOW_ENV} (e.g. 10.0.0.0/8)")


def _effective(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 form embeds (``::ffff:127.0.0.1``, NAT64, 6to4): judged as that address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def refused_rule(address: str) -> str | None:
    """Why ``address`` is not a public address ("loopback", "private"...), or None when it is public."""
    ip = _effective(ipaddress.ip_address(address.split("%", 1)[0]))
    for rule, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                      ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if hit:
            return rule
    return None if ip.is_global else "non-public"


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, fd00::/8"`` as networks; ValueError naming the entry that is not one."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not a network (write it like 10.0.0.0/8 or 192.168.1.20)") from None
    return tuple(networks)


def _origin(url: str) -> tuple[str, int]:
    """(host, port) of a URL; a malformed one (refused later, by the source parser) matches no connection."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "", 0
    return (parts.hostname or "").lower(), port or (443 if parts.scheme.lower() == "https" else 80)


@dataclass(frozen=True)
class AddressGuard:
    """The fence for one job-named URL: public addresses only, plus the opted-in networks for that URL's own host."""

    origin: tuple[str, int]  # (host, port) of the URL the job named
    allowed: tuple[Network, ...] = ()

    @classmethod
    def for_url(cls, url: str, allowed: Sequence[Network] = ()) -> AddressGuard:
        return cls(_origin(url), tuple(allowed))

    def check(self, host: str, port: int, address: str) -> None:
        """Raise AddressRefused unless a connection to ``host:port`` at ``address`` is allowed."""
        rule = refused_rule(address)
        if rule is None:
            return
        ip = _effective(ipaddress.ip_address(address.split("%", 1)[0]))
        opted_in = any(ip.version == net.version and ip in net for net in self.allowed)
        named = (host.lower().rstrip("."), port) == self.origin
        if opted_in and named:
            return
        shown = host if host == address else f"{host} ({address})"
        if opted_in:
            raise AddressRefused(f"{shown} port {port} is on a private network {ALLOW_ENV} allows, but only "
                                 "the host and port the job named may be")
        raise AddressRefused(f"{shown} is a {rule} address, which a download a job names may not reach")

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, each checked (one refused address refuses the name)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in found:
            self.check(host, port, address)
        return found


class Sockets:
    """The sockets a download's session opened or is opening, so another thread can cut them (a cancel, a
    stall): a read blocked on one returns at once instead of waiting out its timeout, and so does a
    connect still pending (``connect``). Once cut, every later connection is cut as it starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._open = [s for s in self._open if s.fileno() != -1]
            self._open.append(sock)
            if self._cut:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._open = [s for s in self._open if s is not sock]

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in self._open:
                with contextlib.suppress(OSError):
                    # On a socket still connecting (SYN sent), Linux aborts the connect: it fails at once.
                    # socket.socket's own shutdown, also for a TLS socket: SSLSocket.shutdown would drop
                    # its TLS state under the thread reading it.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def connect(self, sock: socket.socket, address: Any, timeout: float | None) -> None:
        """``sock.connect(address)`` within ``timeout`` seconds (None: no limit), ended by ``cut``.

        The connect starts non-blocking and the socket is recorded only then, so a cut at any moment
        reaches it: before, ``add`` shuts it; after, ``cut`` does. The wait is also sliced, checking
        the flag, so the end never hangs on how a kernel treats a shut connecting socket. Leaves the
        socket in timeout mode with ``timeout``, as ``socket.create_connection`` does."""
        sock.setblocking(False)
        err = sock.connect_ex(address)
        self.add(sock)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            poller = select.poll()
            poller.register(sock, select.POLLOUT | select.POLLERR | select.POLLHUP)
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._cut:
                    raise ConnectionAbortedError(errno.ECONNABORTED, "connect cut (the download was stopped)")
                left = _SLICE if end is None else min(_SLICE, end - time.monotonic())
                if left <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                if poller.poll(left * 1000):
                    break
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if self._cut:
            raise ConnectionAbortedError(errno.ECONNABORTED, "connect cut (the download was stopped)")
        if err:
            raise OSError(err, os.strerror(err))
        sock.settimeout(timeout)


_SLICE = 0.25  # seconds between two looks at the cut flag while a connect is pending


class _Watched:
    """Mixed into urllib3's connections: with a guard, resolve once, check, connect to the checked address;
    every socket is recorded in ``sockets`` from the moment it starts connecting."""

    _dns_host: str
    port: int
    host: str
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: list[tuple[int, int, int | bytes]] | None

    def __init__(self, *args: Any, guard: AddressGuard | None = None, sockets: Sockets | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._sockets = sockets if sockets is not None else Sockets()

    def _new_conn(self) -> socket.socket:
        """urllib3's ``_new_conn`` (same errors), connecting through ``Sockets.connect``."""
        try:
            sock = self._connect(self._dns_host) if self._guard is None else self._guarded_conn()
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc  # type: ignore[arg-type]
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def _guarded_conn(self) -> socket.socket:
        assert self._guard is not None
        addresses = self._guard.resolve(self._dns_host, self.port)
        failure: OSError | None = None
        for address in addresses:  # the socket goes to a checked address; TLS and Host keep self.host
            try:
                return self._connect(address)
            except (ConnectionAbortedError, TimeoutError):
                raise  # stopped, or the connect timeout spent: not worth another address
            except OSError as exc:
                failure = exc
        assert failure is not None  # getaddrinfo never answers an empty list
        raise failure

    def _connect(self, host: str) -> socket.socket:
        """``urllib3.util.connection.create_connection`` with a connect that ``Sockets.cut`` ends."""
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else socket.getdefaulttimeout()
        failure: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(host.strip("[]"), self.port, allowed_gai_family(),
                                                                  socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                if self.source_address:
                    sock.bind(self.source_address)
                self._sockets.connect(sock, address, timeout)
                return sock
            except ConnectionAbortedError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                failure = exc
        raise failure if failure is not None else OSError("getaddrinfo returns an empty list")


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    """TLS takes over the plain socket's descriptor (urllib3 wraps it, and the plain socket object is
    detached: shutting it does nothing). So a duplicate of the descriptor stands for the connection in
    ``sockets`` from the connect until the TLS socket is made (a cut during the handshake shuts the
    connection through it), then the TLS socket does."""

    _handshake: socket.socket | None = None

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._handshake = sock.dup()
        self._sockets.add(self._handshake)
        return sock

    def connect(self) -> None:
        try:
            super().connect()
            if self.sock is not None:
                self._sockets.add(self.sock)  # before the duplicate goes: no moment when a cut misses it
        finally:
            if self._handshake is not None:
                self._sockets.discard(self._handshake)
                self._handshake.close()
                self._handshake = None


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedPoolManager(PoolManager):
    def __init__(self, conn_kw: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_kw = conn_kw
        self.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def _new_pool(self, scheme: str, host: str, port: int,
                  request_context: dict[str, Any] | None = None) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.conn_kw.update(self.conn_kw)
        return pool


class _WatchedAdapter(HTTPAdapter):
    def __init__(self, conn_kw: dict[str, Any]) -> None:
        self._conn_kw = conn_kw
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        self._pool_connections, self._pool_maxsize, self._pool_block = connections, maxsize, block
        self.poolmanager = _WatchedPoolManager(self._conn_kw, num_pools=connections, maxsize=maxsize, block=block,
                                               **pool_kwargs)


def ca_bundle(env: Mapping[str, str]) -> str | bool:
    """The CA bundle requests takes from the environment (REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE), or True
    for its default."""
    return env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or True


def watch_session(session: requests.Session, guard: AddressGuard | None, sockets: Sockets) -> None:
    """Record every socket ``session`` opens in ``sockets`` and, with a guard, make each connection pass it.

    A guarded session ignores proxies from the environment: the guard judges the address the bytes
    come from, which a proxy would hide. It still trusts the CA bundle the environment names, as
    requests would (a private CA, a TLS-inspecting egress): trust_env=False alone would drop it."""
    if guard is not None:
        session.trust_env = False
        session.verify = ca_bundle(os.environ)
    adapter = _WatchedAdapter({"guard": guard, "sockets": sockets})
    session.mount("http://", adapter)
    session.mount("https://", adapter)
