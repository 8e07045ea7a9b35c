"""Folders a worker makes in a shared place (``/dev/shm``, the scratch root), named for the process that owns them.

A worker removes its copy and scratch when it stops; one killed outright (SIGKILL, the machine's OOM
killer) cannot. Its folders' names say who made them: the boot (``/proc/sys/kernel/random/boot_id``),
the PID namespace, the pid and the pid's start time (``/proc/<pid>/stat``). A starting worker removes
those whose owner is gone: made before this boot, or in this PID namespace by a pid that no longer runs
or is now another process. A live worker's folder, and one from another PID namespace on this boot
(whose owner it cannot see), are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

_STAMP = re.compile(r"([0-9a-f]{8})\.(\d+)\.(\d+)\.(\d+)\.")


def _boot() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip().replace("-", "")[:8]
    except OSError:
        return "00000000"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _started(pid: int) -> int | None:
    """The pid's start time (clock ticks after boot), or None when no such process runs."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    try:
        return int(text[text.rindex(")") + 2:].split()[19])  # field 22; the name before ")" may hold spaces
    except (ValueError, IndexError):
        return None


def stamp() -> str:
    """This process's part of a folder name: boot, PID namespace, pid, start time."""
    pid = os.getpid()
    return f"{_boot()}.{_pid_namespace()}.{pid}.{_started(pid) or 0}."


def make(prefix: str, parent: Path) -> Path:
    """A new private folder ``<parent>/<prefix><stamp><random>`` that this process owns."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{stamp()}", dir=parent))


def abandoned(name: str, prefix: str) -> bool:
    """Whether ``name`` is a folder ``make(prefix, ...)`` made for a process that is gone."""
    if not name.startswith(prefix) or (match := _STAMP.match(name, len(prefix))) is None:
        return False
    boot, namespace, pid, started = match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))
    if boot != _boot():
        return True  # made before the machine (or container host) restarted: no process survives that
    if namespace != _pid_namespace():
        return False  # another PID namespace's process: it cannot be seen from here, so it may be alive
    return _started(pid) != started


def remove_abandoned(parent: Path, prefix: str) -> list[str]:
    """Remove the folders in ``parent`` that ``make(prefix, ...)`` made for processes now gone; their names."""
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not abandoned(name, prefix):
            continue
        path = parent / name
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            # Only folders this user made: never a link (rmtree refuses them too), never another user's.
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                shutil.rmtree(path)
                removed.append(name)
    return removed
