"""requests sessions whose connections pass the address guard and can be cut: urllib3's connections with
``provision.fetch.netguard``'s check and ``Sockets`` wired in.

Kept apart from the guard's rules so that reading them (a worker's settings) never loads requests.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.poolmanager import PoolManager
from urllib3.util.connection import allowed_gai_family

from provision.fetch.netguard import AddressGuard, Sockets
from provision.fetch.trust import ca_bundle


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


def watch_session(session: requests.Session, guard: AddressGuard | None, sockets: Sockets) -> None:
    """Record every socket ``session`` opens in ``sockets`` and, with a guard, make each connection pass it.

    A guarded session ignores proxies from the environment: the guard judges the address the bytes
    come from, which a proxy would hide. It still trusts the CA bundle the environment names
    (``provision.fetch.trust``): trust_env=False alone would drop it."""
    if guard is not None:
        session.trust_env = False
        session.verify = ca_bundle()
    adapter = _WatchedAdapter({"guard": guard, "sockets": sockets})
    session.mount("http://", adapter)
    session.mount("https://", adapter)
