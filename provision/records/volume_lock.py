"""The volume's writer lock: one install or refresh-models at a time per volume.

A second writer either waits (``wait=True``, saying whom it waits for) or is refused at once with a
clear message; they never interleave. The lock file lives under ``.forge-volume/locks/`` on the volume itself, so
it also holds between pods that mount the same volume (where the filesystem honours flock; where
it does not, per-file temporary names still keep the data safe).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from provision.errors import VolumeBusyError
from volume_layout import VolumeLayout

WAIT_TIMEOUT = 6 * 3600.0


@contextmanager
def hold_volume(
    layout: VolumeLayout, what: str, *, wait: bool = False, timeout: float = WAIT_TIMEOUT,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the volume's writer lock while ``what`` (e.g. "install") runs; ``on_wait`` hears whom a
    waiting writer waits for (a silent wait looks like a hang)."""
    layout.locks_dir.mkdir(parents=True, exist_ok=True)
    path = layout.lock_file("volume")
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path), timeout=0)
    try:
        try:
            lock.acquire()
        except Timeout:
            if not wait:
                raise
            if on_wait is not None:
                on_wait(f"waiting for {_holder(owner)} to finish (the volume {layout.root} is busy)")
            lock.acquire(timeout=timeout)
    except Timeout:
        raise VolumeBusyError(f"the volume {layout.root} is busy: {_holder(owner)} is running") from None
    try:
        owner.write_text(f"{what} (pid {os.getpid()} on {os.uname().nodename})\n", encoding="utf-8")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _holder(owner: Path) -> str:
    """Who holds the lock, as its owner file says (it may be gone, or not yet written)."""
    try:
        return owner.read_text(encoding="utf-8").strip() or "another forge-volume process"
    except OSError:
        return "another forge-volume process"
