"""Carry out a lay-out ``Plan`` under the mirror: folders, files from files.bin (digests checked), links.

Every folder, file and link is made by name in a folder this process made, through that folder's file
descriptor (``mkdirat``, ``openat`` with ``O_CREAT|O_EXCL|O_NOFOLLOW``, ``symlinkat``): no link is
ever followed on the way, whatever the index says, so nothing is written outside the mirror. Each
chunk of files.bin is read once, in pieces, hashed, unpacked (a zstd frame, its window bounded) and written
to its files as it is read: a chunk whose digest differs, or that unpacks to other than the bytes its files
were recorded with, fails the lay-out (the worker then boots from the volume and removes the copy).

files.bin is read around the page cache (``O_DIRECT``) where the volume allows it: its bytes are wanted
once, in the copy, not a second time in memory, and a network file system then fetches a whole piece
per round trip (FUSE: 1 MiB) instead of its readahead's 128 KiB.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import resource
from collections.abc import Iterator
from typing import IO, cast

import zstandard

from provision.boot.boot_set import WINDOW
from provision.boot.plan import Chunk, Plan

PIECE = 1 << 20
ALIGN = 4096  # O_DIRECT reads start and end on this (a disk's logical block; page-sized buffers)
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


def open_direct(path: str, like_fd: int) -> int | None:
    """A descriptor reading ``path`` around the page cache, when it is the file ``like_fd`` has open and its
    file system reads it so; else None (read through the page cache then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_DIRECT)
    except (OSError, AttributeError):
        return None
    try:
        mine, theirs = os.fstat(fd), os.fstat(like_fd)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            with mmap.mmap(-1, ALIGN) as probe:
                os.preadv(fd, [probe], 0)
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def carry_out(plan: Plan, fds: dict[str, int], archive_fd: int, threads: int, cfg: str | None,
              direct: bool = False) -> int:
    """Write the files and make the links (many at once); the bytes written. Raises OSError (Corrupt).
    ``direct``: ``archive_fd`` was opened ``O_DIRECT`` (``open_direct``): its reads are aligned."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        unpacked = [pool.submit(_unpack, chunk, fds, archive_fd, direct) for chunk in plan.chunks]
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


class _Pieces:
    """files.bin's bytes from ``position`` on, a piece at a time (aligned reads for an ``O_DIRECT`` descriptor)."""

    def __init__(self, fd: int, length: int, direct: bool) -> None:
        self.fd, self.direct = fd, direct
        # page-aligned, as O_DIRECT wants; unmapped with the last view of it, when the chunk is done
        self.buffer = memoryview(mmap.mmap(-1, PIECE) if direct else bytearray(min(PIECE, max(length, 1))))

    def read(self, position: int, end: int) -> memoryview:
        """The bytes from ``position`` (at most up to ``end``); empty at the end of the file."""
        if not self.direct:
            return self.buffer[:os.preadv(self.fd, [self.buffer[:min(len(self.buffer), end - position)]], position)]
        base = position - position % ALIGN
        want = min(PIECE, -(-(end - base) // ALIGN) * ALIGN)
        got = os.preadv(self.fd, [self.buffer[:want]], base)
        skip = position - base
        return self.buffer[skip:skip + max(0, min(got - skip, end - position))]


def _unpack(chunk: Chunk, fds: dict[str, int], archive_fd: int, direct: bool = False) -> int:
    """One chunk: read in pieces, each piece hashed, unpacked (a zstd frame) and written to the files it holds; the
    bytes written. The files get at most the bytes the chunk's files were recorded with, whatever files.bin holds."""
    stored = _Stored(_Pieces(archive_fd, chunk.length, direct), chunk)
    damaged = Corrupt(f"files.bin does not match its digest (bytes {chunk.offset}-{chunk.offset + chunk.length})")
    try:
        _write_files(chunk, fds, stored.pieces() if chunk.raw is None else _inflate(stored, chunk))
    except (Corrupt, zstandard.ZstdError) as exc:
        # A damaged byte usually stops the frame first: the digest says which it is, a damaged files.bin or one
        # whose index lies about it.
        stored.drain()
        if stored.sha.hexdigest() != chunk.digest:
            raise damaged from None
        raise exc if isinstance(exc, Corrupt) else Corrupt(f"files.bin's chunk at {chunk.offset} does not unpack "
                                                           f"({exc})") from None
    stored.drain()  # what the frame did not need is hashed too: it must match as recorded
    if stored.sha.hexdigest() != chunk.digest:
        raise damaged
    return chunk.unpacked


class _Stored:
    """A chunk's bytes in files.bin, piece by piece, each hashed as it is read (``read`` is the file object a zstd
    reader takes)."""

    def __init__(self, pieces: _Pieces, chunk: Chunk) -> None:
        self._pieces, self._chunk = pieces, chunk
        self.position, self.end = chunk.offset, chunk.offset + chunk.length
        self.sha = hashlib.sha256()

    def _next(self) -> memoryview:
        if self.position >= self.end:
            return memoryview(b"")
        piece = self._pieces.read(self.position, self.end)
        if not piece:
            raise Corrupt(f"files.bin ends at {self.position}, inside its chunk at {self._chunk.offset}")
        self.sha.update(piece)
        self.position += len(piece)
        return piece

    def pieces(self) -> Iterator[memoryview]:
        while piece := self._next():
            yield piece

    def read(self, size: int = -1) -> bytes:
        return bytes(self._next())  # a copy: the buffer is read into again for the next piece

    def drain(self) -> None:
        for _ in self.pieces():
            pass


def _inflate(stored: _Stored, chunk: Chunk) -> Iterator[memoryview]:
    """The bytes of a chunk's zstd frame, a piece at a time; Corrupt when it holds fewer or more than recorded."""
    source = cast(IO[bytes], stored)  # a zstd reader asks only ``read`` of it
    reader = zstandard.ZstdDecompressor(max_window_size=WINDOW).stream_reader(source, read_size=PIECE)
    left = chunk.unpacked
    while left:
        data = reader.read(min(PIECE, left))
        if not data:
            raise Corrupt(f"files.bin's chunk at {chunk.offset} unpacks to {chunk.unpacked - left} bytes, "
                          f"not {chunk.unpacked}")
        left -= len(data)
        yield memoryview(data)
    if reader.read(1):
        raise Corrupt(f"files.bin's chunk at {chunk.offset} unpacks to more than {chunk.unpacked} bytes")


def _write_files(chunk: Chunk, fds: dict[str, int], pieces: Iterator[memoryview]) -> None:
    """Write the chunk's files from its unpacked bytes, which begin at ``chunk.start``."""
    files = iter(chunk.files)
    current = next(files, None)
    fd = -1
    position = chunk.start
    try:
        while True:
            # Files that end where the bytes so far end (the empty ones too) are complete.
            while current is not None and current.offset + current.size <= position:
                if fd < 0:
                    fd = os.open(current.name, _NEW, current.mode, dir_fd=fds[current.folder])
                os.utime(fd, ns=(current.mtime, current.mtime))  # Python checks a .pyc against its source's mtime
                os.close(fd)
                fd = -1
                current = next(files, None)
            piece = next(pieces, None)
            if piece is None:
                if current is not None:
                    raise Corrupt(f"files.bin's chunk at {chunk.offset} ends inside {current.name}")
                break
            start = position
            position += len(piece)
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
