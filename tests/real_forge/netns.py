"""A worker in a network namespace of its own that has only loopback, and a client that reaches it.

``start_offline_worker`` runs ``unshare -n`` (root: a new network namespace with no interface but ``lo``,
which ``ip link set lo up`` brings up) and execs the worker in it, so the worker and the Forge it starts
have no route anywhere: nothing they try can leave the machine. The test's client reaches the worker's
RunPod API through a socket made in that namespace (``setns`` in a short-lived thread: a namespace is a
per-thread attribute, and a socket stays in the namespace it was made in).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers.procs import stop_group
from tests.worker.conftest import WorkerProc, free_port

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def connect_in(pid: int, port: int, timeout: float) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` inside the network namespace of process ``pid``."""
    box: dict[str, Any] = {}

    def enter() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the worker's network namespace: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["sock"] = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    sock: socket.socket = box["sock"]
    return sock


class _Connection(http.client.HTTPConnection):
    def __init__(self, pid: int, port: int, timeout: float) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self._pid = pid

    def connect(self) -> None:
        self.sock = connect_in(self._pid, self.port, self.timeout or 60)


class OfflineWorker(WorkerProc):
    """The worker in its namespace: the same calls as ``WorkerProc``, over a socket made inside it."""

    traced: bool = False  # self.proc is strace, and the worker its child

    def stop(self) -> None:
        """The worker's own graceful shutdown (SIGINT to the worker, not to strace), then nothing left."""
        if self.traced and self.proc.poll() is None:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    os.kill(int(pid), signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        stop_group(self.proc)

    def post(self, path: str, body: Any, timeout: float = 60) -> dict[str, Any]:
        conn = _Connection(self.proc.pid, self.port, timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return {"http_status": resp.status, "body": data.decode(errors="replace")}
        out: dict[str, Any] = json.loads(data)
        return out

    def wait_api(self, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                connect_in(self.proc.pid, self.port, 0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"worker API did not start within {deadline} s:\n{self.log()[-3000:]}")


def outbound_syscalls(strace_log: Path) -> list[str]:
    """The strace lines of connects and datagrams to anything but loopback, a Unix socket or netlink."""
    out = []
    for line in strace_log.read_text(errors="replace").splitlines():
        if not any(f" {call}(" in line for call in ("connect", "sendto", "sendmsg", "sendmmsg")):
            continue
        if "sa_family=AF_INET" not in line:  # AF_UNIX, AF_NETLINK, or no address (a connected socket)
            continue
        if 'inet_addr("127.' in line or 'inet_pton(AF_INET6, "::1"' in line:
            continue
        out.append(line)
    return out


def interfaces_of(pid: int) -> list[str]:
    """The network interfaces the namespace of ``pid`` has (``/proc/PID/net/dev``)."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


# Every connect and datagram of the worker's process tree at the system-call level (C code included, which an
# audit hook never sees), and each execve to tell Forge's process apart; seccomp-bpf stops only on these.
STRACE = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,sendmsg,sendmmsg,execve",
          "-e", "signal=none", "-s", "200"]


def start_offline_worker(env: dict[str, str], log_dir: Path, python: str = sys.executable,
                         strace_log: Path | None = None) -> OfflineWorker:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{port}.log"
    traced = [*STRACE, "-o", str(strace_log)] if strace_log else []
    argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
            *traced, python, "-m", "worker", "--rp_serve_api", "--rp_api_port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=log_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker = OfflineWorker(proc, port, log_path, env)
    worker.traced = strace_log is not None
    try:
        worker.wait_api(60)
    except BaseException:
        worker.stop()
        raise
    return worker
