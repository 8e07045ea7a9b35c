"""Carry out a lay-out ``Plan`` under the mirror: folders, files from files.bin (digests checked), links.

Every folder, file and link is made by name in a folder this process made, through that folder's file
descriptor (``mkdirat``, ``openat`` with ``O_CREAT|O_EXCL|O_NOFOLLOW``, ``symlinkat``): no link is
ever followed on the way, whatever the index says, so nothing is written outside the mirror. Each
chunk of files.bin is read once, in pieces, hashed and written to its files as it is read: a chunk
whose digest differs fails the lay-out (the worker then boots from the volume and removes the copy).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import resource
from collections.abc import Iterator

from provision.boot.plan import Chunk, Plan

PIECE = 1 << 20
LINK_BATCH = 2000
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Corrupt(OSError):
    """files.bin does not hold what the index's digests say."""


@contextlib.contextmanager
def folders(plan: Plan, mirror_fd: int) -> Iterator[dict[str, int]]:
    """Make the plan's folders under the mirror; a descriptor of each (and of the mirror, as ""), closed after."""
    need = len(plan.folders) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise OSError(f"{len(plan.folders)} folders need more open files than this process may have ({hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else hard, hard))
    fds = {"": mirror_fd}
    try:
        for rel in plan.folders:
            parent, _, name = rel.rpartition("/")
            os.mkdir(name, 0o755, dir_fd=fds[parent])
            fds[rel] = os.open(name, _DIR, dir_fd=fds[parent])
        yield fds
    finally:
        for rel, fd in fds.items():
            if rel:
                os.close(fd)


def carry_out(plan: Plan, fds: dict[str, int], archive_fd: int, threads: int, cfg: str | None) -> int:
    """Write the files and make the links (many at once); the bytes written. Raises OSError (Corrupt)."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        unpacked = [pool.submit(_unpack, chunk, fds, archive_fd) for chunk in plan.chunks]
        linked = [pool.submit(_make_links, plan.links[i:i + LINK_BATCH], fds)
                  for i in range(0, len(plan.links), LINK_BATCH)]
        try:
            written = sum(future.result() for future in unpacked)
            for made in linked:
                made.result()
        finally:  # a failure: what has not started yet never starts
            for future in unpacked:
                future.cancel()
            for made in linked:
                made.cancel()
    if cfg is not None and plan.cfg_folder is not None:
        _replace(fds[plan.cfg_folder], "pyvenv.cfg", cfg.encode())
    return written


def _unpack(chunk: Chunk, fds: dict[str, int], archive_fd: int) -> int:
    """One chunk: read in pieces, each piece hashed and written to the files it holds; the bytes written."""
    sha = hashlib.sha256()
    buffer = memoryview(bytearray(min(PIECE, max(chunk.length, 1))))
    files = iter(chunk.files)
    current = next(files, None)
    fd = -1
    position = chunk.offset
    end = chunk.offset + chunk.length
    try:
        while True:
            # Files that end where the bytes read so far end (the empty ones too) are complete.
            while current is not None and current.offset + current.size <= position:
                if fd < 0:
                    fd = os.open(current.name, _NEW, current.mode, dir_fd=fds[current.folder])
                os.utime(fd, ns=(current.mtime, current.mtime))  # Python checks a .pyc against its source's mtime
                os.close(fd)
                fd = -1
                current = next(files, None)
            if position >= end:
                break
            got = os.preadv(archive_fd, [buffer[:min(len(buffer), end - position)]], position)
            if not got:
                raise Corrupt(f"files.bin ends at {position}, inside its chunk at {chunk.offset}")
            piece = buffer[:got]
            sha.update(piece)
            start = position
            position += got
            while current is not None and current.offset < position:
                if fd < 0:
                    fd = os.open(current.name, _NEW, current.mode, dir_fd=fds[current.folder])
                lo, hi = max(start, current.offset), min(position, current.offset + current.size)
                view = piece[lo - start:hi - start]
                while view:
                    view = view[os.write(fd, view):]
                if current.offset + current.size > position:
                    break  # continues in the next piece
                os.utime(fd, ns=(current.mtime, current.mtime))
                os.close(fd)
                fd = -1
                current = next(files, None)
    finally:
        if fd >= 0:
            os.close(fd)
    if sha.hexdigest() != chunk.digest:
        raise Corrupt(f"files.bin does not match its digest (bytes {chunk.offset}-{end})")
    return chunk.length


def _make_links(links: list[tuple[str, str, str]], fds: dict[str, int]) -> None:
    for folder, name, target in links:
        os.symlink(target, name, dir_fd=fds[folder])


def _replace(folder_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in a folder of the mirror, replacing what is there by a rename (never written through)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, _NEW, 0o644, dir_fd=folder_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
