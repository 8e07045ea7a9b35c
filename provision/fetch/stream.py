"""The byte stream of one download: socket -> file -> sha256, as three pipelined stages.

The reading thread only reads from the socket; a writer thread writes each buffer and hands it to
a hasher thread, which returns it to a ring of reusable buffers. Writes that block (page-cache
throttling, a network volume) then do not stall the socket, and since file writes and hashlib
release the GIL the stages run in parallel. sha256 is therefore computed while the bytes arrive,
with no second read of the file (except the kept part of a resumed download).
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests

from provision.errors import DiskFullError, DownloadCancelled

# Measured on loopback: large enough to amortise Python's per-chunk cost, small enough to stay in
# the CPU's cache across the three stages (socket copy, write, sha256); 1 MiB costs ~40% more CPU.
CHUNK = 256 << 10
FILL_SLICE = 0.25  # seconds: a buffer filling slowly is handed on (and counted) at least this often
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

OnBytes = Callable[[int], None]


class Pipeline:
    """The writer and hasher threads and their ring of buffers (reused: no allocation per chunk)."""

    RING = 32  # 8 MiB in flight

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.error: OSError | None = None
        self._hash = hashlib.sha256()
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.RING):
            self._free.put(bytearray(CHUNK))
        self._to_write: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._to_hash: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._write, name="write", daemon=True),
                         threading.Thread(target=self._digest, name="sha256", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _write(self) -> None:
        while (item := self._to_write.get()) is not None:
            buf, n = item
            if self.error is None:
                try:
                    write_all(self.fh, memoryview(buf)[:n])
                except OSError as exc:
                    self.error = exc  # reported by the reading thread; later buffers are dropped
            self._to_hash.put(item)
            self._to_write.task_done()
        self._to_hash.put(None)
        self._to_write.task_done()

    def _digest(self) -> None:
        while (item := self._to_hash.get()) is not None:
            buf, n = item
            if n:
                self._hash.update(memoryview(buf)[:n])
            self._free.put(buf)

    def buffer(self) -> bytearray:
        """A buffer to fill; blocks while the writer or the hasher is a whole ring behind."""
        return self._free.get()

    def give_back(self, buf: bytearray) -> None:
        self._free.put(buf)

    def write(self, buf: bytearray, n: int) -> None:
        self._to_write.put((buf, n))

    def hash_only(self, buf: bytearray, n: int) -> None:
        """Bytes already on disk (a resumed partial): hashed, not written. Only before any write."""
        self._to_hash.put((buf, n))

    def drain(self) -> None:
        """Wait until every queued buffer is written, so the file's length is what was read."""
        self._to_write.join()

    def finish(self) -> str:
        if self._threads[0].is_alive():
            self._to_write.put(None)
            for thread in self._threads:
                thread.join()
        return self._hash.hexdigest()


def hash_existing(fh: BinaryIO, pipe: Pipeline, length: int, cancel: threading.Event | None = None) -> None:
    """Hash the kept part of a resumed download; ``cancel`` stops it between two chunks."""
    fh.seek(0)
    remaining = length
    while remaining > 0:
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled("cancelled while checking the kept part of a download")
        buf = pipe.buffer()
        n = fh.readinto(memoryview(buf)[:min(CHUNK, remaining)])  # type: ignore[attr-defined]
        if not n:
            pipe.give_back(buf)
            break
        pipe.hash_only(buf, n)
        remaining -= n
    fh.seek(length)
    fh.truncate()


def reader(resp: requests.Response) -> Callable[[bytearray], int]:
    """Fill a buffer from the socket's HTTP response (urllib3's, when it exposes it; else raw.read).

    Not ``readinto``: that returns only once the whole buffer is full, so a slow server's bytes would
    sit uncounted (the stall rule would see none) and the cancel check between two buffers would wait.
    ``read1`` returns what one socket read got (a TLS record at most, over https); the buffer is handed
    on once full or after FILL_SLICE seconds, whichever comes first."""
    inner = getattr(resp.raw, "_fp", None)
    if inner is not None and callable(getattr(inner, "read1", None)):
        read1 = inner.read1

        def fill(buf: bytearray) -> int:
            view, got, size = memoryview(buf), 0, len(buf)
            end = time.monotonic() + FILL_SLICE
            while got < size:
                data = read1(size - got)
                if not data:
                    break
                view[got:got + len(data)] = data
                got += len(data)
                if time.monotonic() >= end:
                    break
            return got

        return fill
    raw = resp.raw

    def copy_into(buf: bytearray) -> int:
        data = raw.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    return copy_into


def write_all(fh: BinaryIO, view: memoryview) -> None:
    while view:
        view = view[fh.write(view) or 0:]


class Sink:
    """One download's open temporary file, its pipeline and byte counts, across retries."""

    def __init__(self, fh: BinaryIO, folder: Path, offset: int, on_bytes: OnBytes | None,
                 cancel: threading.Event | None = None) -> None:
        self.fh = fh
        self.cancel = cancel
        self.folder = folder
        self.pipe = Pipeline(fh)
        self.written = 0
        self.resumed_from = offset
        self.origin: Any = None  # provision.fetch.resume.Origin of the bytes (set by the download)
        self.transferred = 0
        self.on_bytes = on_bytes
        if offset:
            try:
                hash_existing(fh, self.pipe, offset, cancel)
            except BaseException:
                self.pipe.finish()  # its threads end here: the caller never gets this Sink
                raise
            self.written = offset
            self._report(offset)

    def _report(self, n: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(n)

    def restart(self) -> None:
        """Start over with an empty file and a fresh hash (the server ignored Range, or a stale partial)."""
        self.pipe.finish()
        self.fh.seek(0)
        self.fh.truncate()
        self.pipe = Pipeline(self.fh)
        self._report(-self.written)
        self.written = 0
        self.resumed_from = 0

    def _room(self, reserve: int, what: str) -> int:
        """Bytes that may still be written before the volume's free space would fall under ``reserve``."""
        in_flight = self.written - self.fh.tell()  # read but not written yet
        room = shutil.disk_usage(self.folder).free - reserve - in_flight
        if room <= CHUNK:
            raise DiskFullError(f"{what}: stopped after receiving {self.written:,} bytes of a file whose size the "
                                f"server did not say, to keep {reserve:,} bytes free on the volume")
        return room

    def digest(self) -> str:
        digest = self.pipe.finish()
        self._check_write(self.pipe.error, "")
        return digest

    def _check_write(self, error: OSError | None, what: str) -> None:
        if error is None:
            return
        if error.errno in DISK_FULL:
            raise DiskFullError(f"{what}: the volume filled up after {self.fh.tell():,} bytes "
                                f"({os.strerror(error.errno or 0)})".lstrip(": "))
        raise error

    def pump(self, resp: requests.Response, what: str, reserve: int | None = None) -> None:
        """Read the body into the pipeline; on return or error every byte read is on disk.

        With ``reserve`` (a body of unknown length) it stops, with DiskFullError, before the volume's
        free space falls under ``reserve`` bytes; free space is looked up again each time half of the
        room left at the last look has been written."""
        readinto = reader(resp)
        pipe = self.pipe
        cancel = self.cancel
        next_look = self.written if reserve is not None else None
        try:
            while pipe.error is None:
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(f"{what}: cancelled after {self.written:,} bytes"
                                            + (" (kept to resume)" if self.written else ""))
                if next_look is not None and self.written >= next_look:
                    next_look = self.written + self._room(reserve or 0, what) // 2
                buf = pipe.buffer()
                try:
                    n = readinto(buf)
                except BaseException:
                    pipe.give_back(buf)
                    raise
                if not n:
                    pipe.give_back(buf)
                    return
                pipe.write(buf, n)
                self.written += n
                self.transferred += n
                self._report(n)
        finally:
            pipe.drain()
            self._check_write(pipe.error, what)
