"""``.forge-volume/state.json``: what is installed on the volume, and when each step finished.

Writers take the volume's ``state`` file lock around read-modify-write, so the installer and
download helpers on several workers never lose each other's records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from filelock import FileLock, Timeout

from provision.errors import CorruptStateError, StateError, VolumeBusyError
from provision.records.atomic import write_atomic
from provision.records.reading import read_regular
from volume_layout import LAYOUT_VERSION, VolumeLayout

State = dict[str, Any]
STATE_LOCK_TIMEOUT = 120.0
STATE_LIMIT = 64 << 20  # a volume with ten thousand models records about 5 MB


def empty_state(layout: VolumeLayout) -> State:
    return {
        "layout_version": LAYOUT_VERSION,
        "mount_point": str(layout.root),
        "python": None,
        "forge": None,
        "extensions": [],
        "models": [],
        "steps": {},
    }


def read_state(layout: VolumeLayout) -> State | None:
    """The volume's state, or None when it was never provisioned."""
    try:
        raw = read_regular(layout.state, STATE_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {layout.state}: {exc.strerror or exc}") from None
    try:
        state = json.loads(raw.decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CorruptStateError(f"{layout.state} is corrupt ({exc})") from None
    version = state.get("layout_version")
    if version != LAYOUT_VERSION:
        raise StateError(
            f"{layout.state} has layout version {version!r}; this forge-volume reads version {LAYOUT_VERSION}",
            "use the forge-volume release that provisioned this volume, or re-provision it with this one",
        )
    return state


def write_state(layout: VolumeLayout, state: State) -> None:
    write_atomic(layout.state, json.dumps(state, indent=2, sort_keys=True) + "\n")


@contextmanager
def state_lock(layout: VolumeLayout, timeout: float = STATE_LOCK_TIMEOUT) -> Iterator[None]:
    layout.locks_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(str(layout.lock_file("state")), timeout=timeout)
        lock.acquire()
    except Timeout:
        raise VolumeBusyError(
            f"{layout.state} stayed locked by another process for {timeout:g} s",
            f"check for a hung forge-volume process on the volume; if there is none, remove {lock.lock_file}",
        ) from None
    try:
        yield
    finally:
        lock.release()


def update_state(layout: VolumeLayout, change: Callable[[State], None]) -> State:
    """Read, change and write state.json under the state lock; returns the new state."""
    with state_lock(layout):
        state = read_state(layout) or empty_state(layout)
        change(state)
        write_state(layout, state)
        return state


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record_model(state: State, entry: dict[str, Any]) -> None:
    """Insert or replace one model record (keyed by its path on the volume)."""
    models = [m for m in state.setdefault("models", []) if m.get("path") != entry["path"]]
    models.append(entry)
    models.sort(key=lambda m: m["path"])
    state["models"] = models
