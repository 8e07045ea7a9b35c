"""Stopping downloads from outside: a cancel (RunPod's cancel, a job's timeout, Ctrl-C) and the stall rule.

The worker runs a helper job's blocking work in a thread that asyncio's cancellation never
reaches, so it hands the work a ``threading.Event`` through ``cancelling``: a context variable,
which ``asyncio.to_thread`` and ``provision.models.pool.parallel`` carry into their threads. Every
download, lock wait and retry pause checks it.

A ``Watchdog`` per download looks at it a few times a second, together with the bytes received: on
a cancel, or when less than ``STALL_BYTES`` arrived within ``FORGE_DOWNLOAD_STALL_TIMEOUT`` seconds
(default 60; a server trickling a byte a second never trips a per-read timeout), it cuts the
download's sockets, so even a read blocked in the kernel returns at once. A connection still being
made is in those sockets too (``provision.fetch.netguard``): a cancel ends a pending connect at once
instead of after ``FORGE_DOWNLOAD_CONNECT_TIMEOUT`` (default 15 s).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar

from provision.errors import DownloadCancelled, DownloadError, ForgeVolumeError
from provision.fetch.netguard import Sockets

STALL_ENV = "FORGE_DOWNLOAD_STALL_TIMEOUT"
STALL_DEFAULT = 60.0
CONNECT_ENV = "FORGE_DOWNLOAD_CONNECT_TIMEOUT"
CONNECT_DEFAULT = 15.0
STALL_BYTES = 64 << 10  # less than this within the stall timeout counts as nothing (about 1 KiB/s)
TICK = 0.2  # seconds between two looks of the watchdog

_CANCEL: ContextVar[threading.Event | None] = ContextVar("forge_volume_cancel", default=None)


def current_cancel() -> threading.Event | None:
    """The cancel event of the job or command this thread works for, if it has one."""
    return _CANCEL.get()


@contextlib.contextmanager
def cancelling(event: threading.Event) -> Iterator[threading.Event]:
    """Make ``event`` the cancel event of everything run from here (threads started through
    ``asyncio.to_thread`` or ``parallel`` included)."""
    token = _CANCEL.set(event)
    try:
        yield event
    finally:
        _CANCEL.reset(token)


def _seconds(env: Mapping[str, str] | None, name: str, default: float, advice: str) -> float:
    """A positive number of seconds from ``name`` (read at each call, so the worker's and the CLI's
    environment both count), ``default`` when unset; anything else is an error naming it."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ForgeVolumeError(f"{name}={raw!r} is not a positive number of seconds",
                               f"set {name} to {advice}, or unset it ({default:g})")
    return value


def stall_timeout(env: Mapping[str, str] | None = None) -> float:
    """``FORGE_DOWNLOAD_STALL_TIMEOUT``: seconds a download may receive (almost) nothing."""
    return _seconds(env, STALL_ENV, STALL_DEFAULT, "the seconds a download may receive nothing")


def connect_timeout(env: Mapping[str, str] | None = None) -> float:
    """``FORGE_DOWNLOAD_CONNECT_TIMEOUT``: seconds a download's TCP connect (and TLS handshake) may take."""
    return _seconds(env, CONNECT_ENV, CONNECT_DEFAULT, "the seconds a download may wait for a server to answer")


def wait_or_cancel(seconds: float, cancel: threading.Event | None, what: str) -> None:
    """Sleep ``seconds``, or raise DownloadCancelled as soon as ``cancel`` is set."""
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise DownloadCancelled(f"{what}: cancelled")


class Watchdog:
    """Watches one download's byte count and its cancel event; cuts its sockets on a cancel or a stall."""

    def __init__(self, received: Callable[[], int], sockets: Sockets, cancel: threading.Event | None,
                 stall: float) -> None:
        self.received, self.sockets, self.cancel, self.stall = received, sockets, cancel, stall
        self.reason: str | None = None  # "cancelled" or "stalled", once it cut the sockets
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        mark, since = self.received(), time.monotonic()
        while not self._done.wait(TICK):
            if self.cancel is not None and self.cancel.is_set():
                self.reason = "cancelled"
            else:
                now, got = time.monotonic(), self.received()
                if got - mark >= STALL_BYTES:
                    mark, since = got, now
                elif now - since >= self.stall:
                    self.reason = "stalled"
            if self.reason is not None:
                self.sockets.cut()
                return

    def check(self, what: str, written: int) -> None:
        """Raise the stop's error if the watchdog stopped the download (call after any failure of a request)."""
        if self.reason == "cancelled" or (self.cancel is not None and self.cancel.is_set()):
            kept = " (kept to resume)" if written else ""
            raise DownloadCancelled(f"{what}: cancelled after {written:,} bytes{kept}")
        if self.reason == "stalled":
            raise DownloadError(f"{what}: stalled: less than {STALL_BYTES >> 10} KiB arrived in {self.stall:g} s "
                                f"({written:,} bytes so far, kept to resume)",
                                f"the server stopped sending; re-run to resume, or raise {STALL_ENV} for a very "
                                "slow link")
