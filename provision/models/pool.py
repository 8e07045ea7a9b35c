"""Plumbing shared by the model commands: a bounded pool, progress bars, per-target locks, failures."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from provision.errors import DownloadCancelled, DownloadError, ForgeVolumeError, VolumeError
from provision.fetch.cancel import cancelling, current_cancel
from provision.models import files as mf
from provision.progress import Progress, human_bytes
from volume_layout import VolumeLayout

POOL = 4  # parallel downloads: enough to fill a pod's link, few enough to be kind to the hosts
T = TypeVar("T")
R = TypeVar("R")


human = human_bytes  # the model commands' name for it
def parallel(items: Sequence[T], work: Callable[[T], R], workers: int,
              cancel: threading.Event | None = None) -> list[R | ForgeVolumeError]:
    """Run ``work`` on every item in a bounded pool; a ForgeVolumeError is returned in its slot, not raised.

    On an interrupt ``cancel`` is set before the pool is shut down, so the workers stop at their
    next chunk instead of finishing their downloads first. Each item runs in a copy of the caller's
    context with ``cancel`` as its cancel event (``provision.fetch.cancel``): a download blocked on a silent
    server is cut too, and the items still queued when it is set start nothing.
    """
    context = contextvars.copy_context()

    def run(item: T) -> R | ForgeVolumeError:
        try:
            if cancel is None:
                return work(item)
            if cancel.is_set():  # the items still queued start nothing (no connection, no lock, no hashing)
                raise DownloadCancelled("cancelled before it started")
            with cancelling(cancel):
                return work(item)
        except ForgeVolumeError as exc:
            return exc

    def guarded(item: T) -> R | ForgeVolumeError:
        return context.copy().run(run, item)

    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        try:
            return list(pool.map(guarded, items))
        except BaseException:
            if cancel is not None:
                cancel.set()
            raise


def raise_failures(failures: list[tuple[str, ForgeVolumeError]]) -> None:
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        detail = "; ".join(exc.message if exc.message.startswith(what) else f"{what}: {exc.message}"
                           for what, exc in failures)
        first = failures[0][1]
        raise DownloadError(f"{len(failures)} models failed: {detail}", first.hint, job_hint=first.advice("job"))


class LazyBar:
    """A bar that appears only if something reports progress (hashing is rare once files are recorded)."""

    def __init__(self, progress: Progress, desc: str) -> None:
        self.progress, self.desc = progress, desc
        self.bar: Any = None

    def update(self, n: int) -> None:
        if self.bar is None:
            self.bar = self.progress.bar(None, self.desc)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Bars:
    """A bar per file plus a total; a cancel flag (the job's, when it has one) stops every download at its
    next chunk."""

    def __init__(self, progress: Progress, total: int | None, desc: str = "total") -> None:
        self.progress = progress
        self.total = progress.bar(total, desc, leave=True) if total is not None else None
        self.cancelled = current_cancel() or threading.Event()

    def file(self, size: int | None, name: str) -> tuple[Any, Callable[[int], None]]:
        bar = self.progress.bar(size, name)

        def on_bytes(n: int) -> None:
            if self.cancelled.is_set():
                raise DownloadCancelled(f"{name}: cancelled")
            bar.update(n)
            if self.total is not None:
                self.total.update(n)

        return bar, on_bytes

    def close(self) -> None:
        if self.total is not None:
            self.total.close()


LOCK_POLL = 0.5  # seconds between two looks at the cancel event while waiting for a target's lock


def hold_target(layout: VolumeLayout, path: Path, what: str) -> FileLock:
    """Take the per-target lock, waiting up to TARGET_LOCK_WAIT; a cancel (``provision.fetch.cancel``) ends the wait."""
    lock = mf.target_lock(layout, path)
    cancel = current_cancel()
    deadline = time.monotonic() + mf.TARGET_LOCK_WAIT
    while True:
        try:
            lock.acquire(timeout=mf.TARGET_LOCK_WAIT if cancel is None else LOCK_POLL)
            return lock
        except Timeout:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"{what}: cancelled while another process was fetching it") from None
            if time.monotonic() >= deadline:
                raise DownloadError(f"{what}: another process has been fetching it for "
                                    f"{mf.TARGET_LOCK_WAIT / 3600:.0f} h",
                                    "check the other pod or worker; remove its lock file under "
                                    ".forge-volume/locks if it is gone") from None


def require_volume(layout: VolumeLayout) -> None:
    if not layout.root.is_dir():
        raise VolumeError(f"the volume {layout.root} does not exist")
