"""The lay-out child of a worker's fast boot: the volume's code trees laid out on local disk from the
boot set, then prefetching.

Run by the worker as a child process (``python -m provision.boot.layout_child <volume> <mirror>``, started
by ``provision.boot.layout_driver.lay_out``), so its threads and buffers never weigh on the worker's own
memory or event loop. It:

1. checks the boot set against state.json (the boot step's key);
2. checks the index as hostile input (``provision.boot.plan``: it must describe a tree that can be made
   under ``<mirror>`` without leaving it), makes every recorded folder under ``<mirror>``, writes the
   recorded files from one read of ``files.bin`` (many reads in flight, each chunk checked against its
   sha256 as it is written), and makes every other entry a link to the volume (or, for a link, to
   where it leads), so each path of the code trees resolves under ``<mirror>``; all of it through
   folder descriptors, never following a link (``provision.boot.unpack``);
3. prints one JSON line: ``{"ok": true, ...}`` (start Forge from ``<mirror>``) or ``{"ok": false,
   "reason": ...}`` (boot from the volume as before: nothing is lost, only time);
4. then, while Forge imports, at a lower priority than Forge (``BACKGROUND_NICE``): stats every
   recorded folder on the volume (many in flight) and prints ``{"changed": null}`` or what changed
   (the worker lets Forge's first answer through only after that line, and restarts Forge from the
   volume on a change); and reads into the page cache the pages of the large libraries Forge touched
   at install, then the checkpoint its first txt2img loads, ahead of Forge needing them (their files
   opened first, many at once, before the check's lookups can queue ahead of them).

Nothing is written to the volume. ``FORGE_FAST_BOOT=0`` on the worker skips all of it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.boot.boot_set import BootSetError, Index, changed, changed_since_recorded, load_index
from provision.boot.plan import Plan, Refused, plan, volume_target
from provision.boot.unpack import Corrupt, carry_out, folders, open_direct
from provision.errors import ForgeVolumeError
from provision.progress import human_bytes
from provision.records.state import read_state
from volume_layout import VolumeLayout

# The lay-out's chunks in flight (each read, unpacked and written by one thread). It is bound by the CPU: on 2
# cores, through scripts/netvol.py, 16 at once took 1.22x the time of 4 at 1 ms per call and 1.19x at 5 ms, 8 took
# 1.12x and 1.07x, 2 took 1.14x and 1.36x (scripts/bench_layout.py, same-round medians of 5).
LAYOUT_THREADS = 4
CHECK_THREADS = 16  # the check's stats in flight: each waits on the volume, not the CPU
PREFETCH_CHUNK = 4 << 20
PREFETCH_THREADS = 8
OPEN_THREADS = 8  # the prefetch's files opened at once (a few lookups and an open each)
# Reads of the checkpoint in flight: one per core, 2 to 8. Each costs CPU in the volume's client; on 2 cores,
# 8 slowed Forge's imports by seconds, and 2 still read the lab's 2.1 GB (at 1 ms) before Forge answered.
CHECKPOINT_THREADS = min(8, max(2, os.cpu_count() or 2))
# The check and the prefetch after the lay-out run this much nicer than Forge, whose start is one thread and
# bound by the CPU: on 2 cores they took up to half its core in its first seconds. At a lower priority they
# use what Forge leaves (a whole core on 2; on a larger worker they are never short of one).
BACKGROUND_NICE = 10
CFG_LIMIT = 64 << 10  # a pyvenv.cfg is a few lines
SHORT_LINK = 127  # tmpfs keeps a link target this short in its inode; a longer one takes a page
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC  # never blocks on a FIFO on the volume


class BootSetUnusable(Exception):
    """The boot set does not describe the volume any more, was never recorded, or cannot be used: boot from the
    volume."""


def _pyvenv_cfg(layout: VolumeLayout, index: Index, mirror: Path) -> str | None:
    """The venv's pyvenv.cfg with ``home`` led into the mirror, or None when it needs no change."""
    fd = _open_regular(layout.venv / "pyvenv.cfg")
    if fd is None:
        return None
    try:
        text = os.pread(fd, CFG_LIMIT, 0).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    lines = text.splitlines(keepends=True)
    out = []
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            home = value.strip()
            moved = volume_target(layout, index, mirror, layout.relative(layout.venv), home)
            if moved != home:
                line = f"home = {moved}\n"
        out.append(line)
    new = "".join(out)
    return new if new != text else None


def build(layout: VolumeLayout, mirror: Path, threads: int = LAYOUT_THREADS,
          index: Index | None = None) -> dict[str, Any]:
    """Lay out the mirror (from ``index`` when the caller read it); raise BootSetUnusable when the boot set cannot
    be used. Returns what was done. The stat of every recorded folder (``changed``) is not part of it: ``main`` runs
    it while Forge starts, and the worker restarts Forge from the volume if it finds a change."""
    started = time.monotonic()
    fix = "(run `forge-volume install` to record it again)"
    try:
        index = index or load_index(layout)
    except BootSetError as exc:
        raise BootSetUnusable(str(exc)) from None
    try:
        state = read_state(layout) or {}
    except ForgeVolumeError as exc:
        raise BootSetUnusable(exc.one_line()) from None
    key = ((state.get("steps") or {}).get("boot") or {}).get("key")
    if key != index.key:
        raise BootSetUnusable("the boot set was recorded for another install (run `forge-volume install`)")
    cfg = _pyvenv_cfg(layout, index, mirror)
    try:
        todo = plan(layout, index, mirror, cfg=cfg is not None)
    except Refused as exc:
        raise BootSetUnusable(f"the boot set breaks a rule of the lay-out: {exc} {fix}") from None
    mirror.mkdir(parents=True, exist_ok=True)
    mirror_fd = os.open(mirror, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_room(mirror, mirror_fd, todo)
        archive = _open_regular(layout.boot_set_archive)
        if archive is None or os.fstat(archive).st_size != todo.size:
            if archive is not None:
                os.close(archive)
            raise BootSetUnusable(changed_since_recorded(f"{layout.relative(layout.boot_set_archive)} changed size"))
        direct = open_direct(str(layout.boot_set_archive), archive)
        try:
            with folders(todo, mirror_fd) as fds:
                written = carry_out(todo, fds, archive if direct is None else direct, threads, cfg, direct is not None)
        except Corrupt as exc:
            raise BootSetUnusable(f"the boot set is damaged: {exc} {fix}") from None
        finally:
            os.close(archive)
            if direct is not None:
                os.close(direct)
    finally:
        os.close(mirror_fd)
    return {"ok": True, "seconds": round(time.monotonic() - started, 3), "files": todo.files,
            "bytes": written, "folders": len(todo.folders), "links": len(todo.links)}


def _check_room(mirror: Path, mirror_fd: int, todo: Plan) -> None:
    """Refuse a lay-out that would not fit: what it really writes (whole blocks per file and folder, a block per
    long link target), not the size files.bin claims."""
    room = os.fstatvfs(mirror_fd)
    block = room.f_frsize or 4096
    need = sum(-(-f.size // block) * block for chunk in todo.chunks for f in chunk.files)
    need += block * (len(todo.folders) + sum(len(target) > SHORT_LINK for _, _, target in todo.links))
    entries = todo.files + len(todo.folders) + len(todo.links)
    if room.f_bavail * room.f_frsize < need or (room.f_files and room.f_favail < entries):
        raise BootSetUnusable(f"{mirror} has room for {human_bytes(room.f_bavail * room.f_frsize)} and {room.f_favail} "
                    f"entries; the boot set needs {human_bytes(need)} and {entries} (set FORGE_SCRATCH to a larger "
                    "local disk)")


def _open_regular(path: Path) -> int | None:
    """A descriptor of ``path`` when it is a regular file (never blocks on a FIFO, never opens a device)."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _read_range(fd: int, offset: int, length: int) -> int:
    """Read a range of an open file into the page cache (sent to /dev/null by the kernel: no copy here)."""
    with open(os.devnull, "wb") as sink:
        done = 0
        while done < length:
            sent = os.sendfile(sink.fileno(), fd, offset + done, length - done)
            if not sent:
                break
            done += sent
        return done


Spans = list[tuple[int, int | None]]  # (offset, length; None: to the end)
Piece = tuple[int, int, int]  # an open file's descriptor, an offset, a length


def _spans(spans: Spans, size: int) -> list[tuple[int, int]]:
    """(start, end) of ``spans`` (offset, length; None: to the end) clamped to a file of ``size`` bytes, merged."""
    clamped = sorted((max(o, 0), size if n is None else min(o + n, size)) for o, n in spans if n is None or n > 0)
    merged: list[tuple[int, int]] = []
    for start, end in clamped:
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass
class Opened:
    """The prefetch's files, open, and the pieces (fd, offset, length) to read of them: the libraries' touched
    ranges, then the checkpoint (``open_prefetch``)."""

    fds: list[int] = field(default_factory=list)
    libraries: list[Piece] = field(default_factory=list)
    checkpoint: list[Piece] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def open_prefetch(layout: VolumeLayout, index: Index) -> Opened:
    """Open the files ``prefetch`` reads, in the order it reads them: the libraries Forge maps first (their ranges
    merged per file), then the checkpoint. Every span is clamped to the file it names; a file that cannot be
    opened is left out."""
    libraries: dict[str, tuple[int, Spans]] = {}
    for rel, size, _, spans in index.ranges:
        known, listed = libraries.get(rel, (size, []))
        libraries[rel] = (min(known, size), listed + list(spans))
    opened = Opened()
    try:
        opened.libraries = _open_pieces(layout, [(rel, size, spans) for rel, (size, spans) in libraries.items()],
                                        opened.fds)
        if index.checkpoint:
            opened.checkpoint = _open_pieces(layout, [(index.checkpoint, None, [(0, None)])], opened.fds)
    except BaseException:
        opened.close()
        raise
    return opened


def prefetch(layout: VolumeLayout, index: Index, threads: int = PREFETCH_THREADS,
             checkpoint_threads: int = CHECKPOINT_THREADS,
             libraries_done: Callable[[int], None] | None = None, opened: Opened | None = None) -> int:
    """Read the libraries' touched ranges, then the checkpoint, into the page cache (from ``opened`` when the
    caller opened them already); the bytes read (``libraries_done`` is told the libraries' share when they are in).

    The libraries come first and with many reads in flight: torch maps them in its first seconds. The
    checkpoint is needed only once Forge answers, so fewer reads in flight leave the volume's client
    (and the CPU) to Forge's own imports meanwhile."""
    opened = opened or open_prefetch(layout, index)
    try:
        got = _read_pieces(opened.libraries, threads)
        if libraries_done is not None:
            libraries_done(got)
        return got + _read_pieces(opened.checkpoint, checkpoint_threads)
    finally:
        opened.close()


def _open_pieces(layout: VolumeLayout, files: list[tuple[str, int | None, Spans]],
                 fds: list[int]) -> list[Piece]:
    """Open the files (many at once; their descriptors added to ``fds``) and cut their spans into (fd, offset,
    length) pieces, in the order of ``files``."""
    def one(rel: str, recorded: int | None, spans: Spans) -> tuple[int | None, list[Piece]]:
        fd = _open_regular(layout.absolute(rel))
        if fd is None:
            return None, []
        with contextlib.suppress(OSError):  # the kernel's readahead doubled: half the round trips
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        try:
            size = os.fstat(fd).st_size
        except OSError:
            return fd, []
        size = size if recorded is None else min(size, recorded)
        return fd, [(fd, p, min(PREFETCH_CHUNK, end - p)) for start, end in _spans(spans, size)
                    for p in range(start, end, PREFETCH_CHUNK)]

    pieces: list[Piece] = []
    with concurrent.futures.ThreadPoolExecutor(OPEN_THREADS) as pool:
        for fd, mine in pool.map(lambda file: one(*file), files):
            if fd is not None:
                fds.append(fd)
            pieces += mine
    return pieces


def _read_pieces(pieces: list[Piece], threads: int) -> int:
    if not pieces:
        return 0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda piece: _safe(_read_range, *piece), pieces))


def _safe(read: Callable[[int, int, int], int], fd: int, offset: int, length: int) -> int:
    try:
        return read(fd, offset, length)
    except OSError:
        return 0


_stdout_lock = threading.Lock()


def _print_line(result: dict[str, Any]) -> None:
    with _stdout_lock, contextlib.suppress(BrokenPipeError):  # the worker stopped listening (it is going away)
        print(json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    layout, mirror = VolumeLayout(Path(argv[0])), Path(argv[1])
    index: Index | None = None
    try:
        index = load_index(layout)
        result = build(layout, mirror, index=index)
    except BootSetError as exc:
        result = {"ok": False, "reason": str(exc)}
    except BootSetUnusable as exc:
        result = {"ok": False, "reason": str(exc)}
    except OSError as exc:
        result = {"ok": False, "reason": f"the boot set could not be laid out ({exc})"}
    _print_line(result)
    if index is None:
        return 0
    with contextlib.suppress(OSError):  # this thread, and the threads it starts from here on
        os.nice(BACKGROUND_NICE)
    # The prefetch's files first, many at once, before the check's thousands of lookups queue ahead of them:
    # Forge maps the first of those libraries within a second. The prefetch's seconds count from here.
    started = time.monotonic()
    opened = open_prefetch(layout, index)  # a file that cannot be opened is left out, not an error
    # Forge starts now. Beside its imports: the check of every recorded folder (the worker restarts Forge
    # from the volume if one changed), and the prefetch of the library pages torch maps in its first
    # seconds, then the checkpoint. Also after a failure: a boot from the volume needs the same pages.
    check = None
    if result.get("ok"):
        def check_volume() -> None:
            began = time.monotonic()
            found = changed(layout, index, CHECK_THREADS, files=False)
            _print_line({"changed": found, "folders": len(index.dirs), "seconds": round(time.monotonic() - began, 3)})

        check = threading.Thread(target=check_volume, name="check")
        check.start()
    libraries = [0, 0.0]

    def libraries_done(got: int) -> None:
        libraries[:] = [got, time.monotonic() - started]

    got = prefetch(layout, index, libraries_done=libraries_done, opened=opened)
    seconds = time.monotonic() - started
    # The two shares apart: on a slow volume a large checkpoint's read is the cold start's longest part.
    _print_line({"prefetched": got, "seconds": round(seconds, 3), "libraries": libraries[0],
                 "libraries_seconds": round(libraries[1], 3)})
    if check is not None:
        check.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
