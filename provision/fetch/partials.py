"""A download's files beside its target: unique temporaries, the kept partial, and who may take them over.

Bytes go to a unique temporary sibling ``.<name>.<host tag><random>.part`` whose writer holds its flock.
An interrupted download keeps its bytes under the stable name ``.<name>.partial``. The next attempt
*claims* that partial by renaming it to its own unique name (an atomic step only one process can win),
so even where file locks silently fail (network volumes) two processes never append to one file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import socket
import time
from pathlib import Path

ORPHAN_AGE = 300.0  # seconds without a write after which a temporary file's writer is presumed dead


def sibling(target: Path, suffix: str) -> Path:
    """A hidden sibling ``.<name><suffix>``, shortened when the name would pass 255 bytes."""
    name = f".{target.name}{suffix}"
    if len(name.encode()) > 255:
        name = f".{hashlib.sha1(target.name.encode()).hexdigest()[:20]}{suffix}"
    return target.with_name(name)


def partial_path(target: Path) -> Path:
    return sibling(target, ".partial")


def is_download_temp(name: str) -> bool:
    """Whether a file name is one of this module's temporary or resumable files."""
    return name.startswith(".") and (name.endswith(".part") or name.endswith(".partial"))

def host_tag() -> str:
    """Four hex digits naming this machine, the start of every temporary's random part: a temporary with
    another machine's tag may be written by a process our file locks cannot see."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def _lock_if_free(path: str) -> tuple[int, bool] | None:
    """An open descriptor on ``path`` holding an exclusive flock, and whether the filesystem supports
    flock at all; None when a live writer holds it (or it is gone). Writers hold this lock for their
    whole download, and the kernel drops it when they die."""
    try:
        fd = os.open(path, os.O_RDWR)
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # no flock on this filesystem: liveness unknown
        return fd, False
    return fd, True


def _is_temporary_of(name: str, prefix: str) -> bool:
    """Whether ``name`` is a temporary ``<prefix><8 hex digits>.part`` (and not another target's, such as
    ``.x.bin.v2.<hex>.part`` for ``x.bin``)."""
    middle = name[len(prefix):-len(".part")]
    return (name.startswith(prefix) and name.endswith(".part") and len(middle) == 8
            and all(c in "0123456789abcdef" for c in middle))


def sweep_leftovers(target: Path) -> list[Path]:
    """Remove ``target``'s kept partial and its dead writers' temporaries (a live writer holds its flock:
    left alone); called once ``target`` holds a good file, so no stale partial outlives it. Returns
    what was removed."""
    prefix = sibling(target, ".").name
    mine = prefix + host_tag()
    cutoff = time.time() - ORPHAN_AGE
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name != partial_path(target).name and not _is_temporary_of(entry.name, prefix):
            continue
        got = _lock_if_free(entry.path)
        if got is None:
            continue
        fd, lockable = got
        try:
            # Like claim: a temporary of another machine may have a live writer our flock cannot see.
            dead = entry.name == partial_path(target).name or (lockable and entry.name.startswith(mine))
            if dead or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed


def claim(target: Path) -> tuple[Path, int]:
    """Our unique temporary file, taking over a kept partial (or a dead process's temporary) if there is
    one, and a descriptor holding its flock (close it when done).

    The rename is atomic, so only one process can take over a given file. A temporary of this machine
    whose flock is free belonged to a process that died (SIGKILL, a crash): it is resumed at once. One
    from another machine is resumed once untouched for ORPHAN_AGE (a live download writes at least once
    per read timeout), since flocks may not reach across machines on a network volume.
    """
    mine = host_tag()
    tmp = sibling(target, f".{mine}{secrets.token_hex(2)}.part")
    prefix = sibling(target, ".").name
    cutoff = time.time() - ORPHAN_AGE
    orphans = []
    for entry in os.scandir(target.parent):
        if _is_temporary_of(entry.name, prefix) and entry.name != tmp.name:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            old = st.st_mtime < cutoff
            if old or entry.name[len(prefix):-len(".part")].startswith(mine):
                orphans.append((st.st_size, entry.path, old))
    candidates = [(str(partial_path(target)), True)] + [(path, old) for _, path, old in sorted(orphans, reverse=True)]
    for candidate, idle in candidates:
        got = _lock_if_free(candidate)
        if got is None:
            continue
        fd, lockable = got
        if not (idle or lockable):  # young, and without flock nothing tells whether its writer lives
            os.close(fd)
            continue
        try:
            os.replace(candidate, tmp)
            return tmp, fd
        except FileNotFoundError:
            os.close(fd)
            continue
    return _fresh(target)


def _fresh(target: Path) -> tuple[Path, int]:
    """A new empty temporary of ``target``, already locked. It is made under a name no sweep or claim
    looks at (``.new``), locked, then linked to its ``.part`` name: made under that name, a writer
    finishing the same target could find it unlocked between the open and the flock, take it for a dead
    writer's and delete it under its live writer (the FileNotFoundError of a concurrent writer)."""
    mine = host_tag()
    while True:
        token = secrets.token_hex(2)
        hidden, tmp = sibling(target, f".{mine}{token}.new"), sibling(target, f".{mine}{token}.part")
        try:
            fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)  # O_EXCL: never shared
        except FileExistsError:
            continue
        with contextlib.suppress(OSError):  # a filesystem without flock: the ORPHAN_AGE rule still protects
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            try:
                os.link(hidden, tmp)  # fails when the name is taken (a rename would replace it)
            except FileExistsError:
                os.close(fd)
                continue
            except OSError:  # a filesystem without hard links: a rename (the name is random; checked first)
                if os.path.lexists(tmp):
                    os.close(fd)
                    continue
                os.replace(hidden, tmp)
            return tmp, fd
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(hidden)
