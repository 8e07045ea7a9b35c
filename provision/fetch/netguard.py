"""Which addresses a download that a job named may connect to, checked on the connection itself.

A worker's download helper fetches URLs its callers choose. Without a fence, such a URL (or any
redirect it leads to) could read Forge's own API on loopback, the cloud's metadata service
(169.254.169.254) or anything else on the worker's private network. ``AddressGuard`` refuses every
loopback, private, link-local, unspecified, multicast, reserved or otherwise non-public address.

The check runs inside the HTTP connection (``provision.fetch.session``): the host name is resolved once,
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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
