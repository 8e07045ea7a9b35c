"""The volume's writer lock: one install or refresh-models at a time per volume.

A second writer either waits (``wait=True``) or is refused at once with a clear message; they
never interleave. The lock file lives under ``.forge-volume/locks/`` on the volume itself, so
it also holds between pods that mount the same volume (where the filesystem honours flock; where
it does not, per-file temporary names still keep the data safe).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from provision.errors import VolumeBusyError
from volume_layout import VolumeLayout

WAIT_TIMEOUT = 6 * 3600.0


@contextmanager
def hold_volume(
    layout: VolumeLayout, what: str, *, wait: bool = False, timeout: float = WAIT_TIMEOUT
) -> Iterator[None]:
    """Hold the volume's writer lock while ``what`` (e.g. "install") runs."""
    layout.locks_dir.mkdir(parents=True, exist_ok=True)
    path = layout.lock_file("volume")
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path), timeout=timeout if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.exists() else "another forge-volume process"
        raise VolumeBusyError(f"the volume {layout.root} is busy: {holder} is running") from None
    try:
        owner.write_text(f"{what} (pid {os.getpid()} on {os.uname().nodename})\n", encoding="utf-8")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
