"""A loopback address whose TCP connects never complete, without the internet, a firewall or root.

Linux drops a SYN sent to a listening socket whose accept queue is full (``tcp_abort_on_overflow`` is
0 by default): the client retransmits it until its own connect timeout, as it would towards a
firewalled or unroutable host. A socket that listens and never accepts, its queue filled by
connections held here, is such a place. ``connects_pending`` sees a client waiting on it (its socket
in SYN-SENT, from /proc/net/tcp of this network namespace), so a test waits for that, not a sleep.
"""

from __future__ import annotations

import socket
from pathlib import Path

PROBE = 0.3  # seconds a probe connect may take before the queue counts as full
MAX_FILL = 256
SYN_SENT, ESTABLISHED = "02", "01"  # the state column of /proc/net/tcp


def fill_backlog(host: str, port: int) -> list[socket.socket]:
    """Connect to a listening socket that does not accept until a connect no longer completes; the
    connections that did are returned (keep them open: closing one frees a place in the queue)."""
    held: list[socket.socket] = []
    for _ in range(MAX_FILL):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(PROBE)
        try:
            probe.connect((host, port))
        except TimeoutError:
            probe.close()
            return held
        held.append(probe)
    for sock in held:
        sock.close()
    raise AssertionError(f"{host}:{port} accepted {MAX_FILL} connections: its accept queue never filled")


def connects_pending(port: int) -> int:
    """How many IPv4 sockets of this network namespace are waiting for a connect to ``port`` (SYN-SENT)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == SYN_SENT and int(remote.rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


class BlackHole:
    """``with BlackHole("127.0.0.2") as hole: hole.url("/m.safetensors")``: every connect to it hangs."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._held: list[socket.socket] = []
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def pending(self) -> int:
        return connects_pending(self.port)

    def __enter__(self) -> BlackHole:
        self._listener.bind((self.host, 0))
        self._listener.listen(0)
        self.port = int(self._listener.getsockname()[1])
        self._held = fill_backlog(self.host, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in (*self._held, self._listener):
            sock.close()



def bytes_unread(port: int) -> int:
    """Bytes a loopback server on ``port`` wrote that its clients have not read yet: sent and not yet
    acknowledged (the server's sockets' tx_queue in /proc/net/tcp), plus received by a client's kernel
    and not yet read by the client (its socket's rx_queue). A server's write returns long before the
    client reads (on a loaded machine, much later): only at 0 are the bytes it counted in the client's hands."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
        if state != ESTABLISHED:
            continue
        tx, rx = (int(q, 16) for q in queues.split(":"))
        if int(local.rsplit(":", 1)[1], 16) == port:
            total += tx
        elif int(remote.rsplit(":", 1)[1], 16) == port:
            total += rx
    return total
