"""The lay-out child of a worker's fast boot: the volume's code trees laid out on local disk from the
boot set, then prefetching.

Run by the worker as a child process (``python -m provision.boot.layout_child <volume> <mirror>``, started
by ``provision.boot.layout_driver.lay_out``), so its threads and buffers never weigh on the worker's own
memory or event loop. It:

1. checks the boot set against state.json (the boot step's key);
2. makes every recorded folder under ``<mirror>``, writes the recorded files from one ranged read
   of ``files.bin`` (many reads in flight), and makes every other entry a link to the volume (or,
   for a link, to where it leads), so each path of the code trees resolves under ``<mirror>``;
3. prints one JSON line: ``{"ok": true, ...}`` (start Forge from ``<mirror>``) or ``{"ok": false,
   "reason": ...}`` (boot from the volume as before: nothing is lost, only time);
4. then, while Forge imports: stats every recorded folder on the volume (many in flight) and prints
   ``{"changed": null}`` or what changed (the worker lets Forge's first answer through only after
   that line, and restarts Forge from the volume on a change); and reads into the page cache the
   pages of the large libraries Forge touched at install, then the checkpoint its first txt2img
   loads, ahead of Forge needing them.

Nothing is written to the volume. ``FORGE_FAST_BOOT=0`` on the worker skips all of it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision.boot.boot_set import Index, changed, changed_since_recorded, read_index
from provision.errors import ForgeVolumeError
from provision.records.state import read_state
from volume_layout import VolumeLayout

THREADS = 16
CHUNK = 16 << 20  # files.bin is unpacked in groups of files this large, many in flight
PIECE = 1 << 20
PREFETCH_CHUNK = 4 << 20
PREFETCH_THREADS = 8
# Reads of the checkpoint in flight: one per core, 2 to 8. Each costs CPU in the volume's client; on 2 cores,
# 8 slowed Forge's imports by seconds, and 2 still read the lab's 2.1 GB (at 1 ms) before Forge answered.
CHECKPOINT_THREADS = min(8, max(2, os.cpu_count() or 2))
LINK_BATCH = 2000


class BootSetUnusable(Exception):
    """The boot set does not describe the volume any more (or was never recorded): boot from the volume."""


def _volume_target(layout: VolumeLayout, index: Index, mirror: Path, folder: str, target: str) -> str:
    """Where a link of the volume (in ``folder``, relative to the root) must lead from the mirror."""
    trees = [layout.relative(t) for t in layout.code_trees]
    if os.path.isabs(target):
        for root in dict.fromkeys((index.root, str(layout.root))):
            if target == root or target.startswith(f"{root}/"):
                rel = os.path.relpath(target, root)
                inside = any(rel == t or rel.startswith(f"{t}/") for t in trees)
                return str((mirror if inside else layout.root) / rel)
        return target
    rel = os.path.normpath(os.path.join(folder, target))
    if not rel.startswith("..") and any(rel == t or rel.startswith(f"{t}/") for t in trees):
        return target  # relative and inside the trees: the mirror has the same shape
    return os.path.normpath(os.path.join(str(layout.root), folder, target))


def _pyvenv_cfg(layout: VolumeLayout, index: Index, mirror: Path) -> str | None:
    """The venv's pyvenv.cfg with ``home`` led into the mirror, or None when it needs no change."""
    try:
        text = (layout.venv / "pyvenv.cfg").read_text(encoding="utf-8")
    except OSError:
        return None
    lines = text.splitlines(keepends=True)
    out = []
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            home = value.strip()
            moved = _volume_target(layout, index, mirror, layout.relative(layout.venv), home)
            if moved != home:
                line = f"home = {moved}\n"
        out.append(line)
    new = "".join(out)
    return new if new != text else None


def _unpack(archive_fd: int, mirror: Path, group: list[tuple[str, int, int, int, int]]) -> int:
    """Write one contiguous group of recorded files from files.bin; the bytes written.

    The kernel copies (sendfile from files.bin into each file): no buffer in this process, whatever the size.
    """
    written = 0
    here = str(mirror)
    for rel, offset, size, mtime, mode in group:
        path = f"{here}/{rel}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode or 0o644)
        try:
            done = 0
            while done < size:
                try:
                    sent = os.sendfile(fd, archive_fd, offset + done, size - done)
                except OSError:  # a file system that cannot splice: through a small buffer instead
                    piece = os.pread(archive_fd, min(PIECE, size - done), offset + done)
                    sent = os.write(fd, piece) if piece else 0
                if not sent:
                    raise OSError(f"files.bin ends inside {rel}")
                done += sent
        finally:
            os.close(fd)
        # Python checks a module's .pyc against its source's mtime: keep the volume's.
        os.utime(path, ns=(mtime, mtime))
        written += size
    return written


def _groups(files: list[tuple[str, int, int, int, int]]) -> list[list[tuple[str, int, int, int, int]]]:
    groups: list[list[tuple[str, int, int, int, int]]] = []
    current: list[tuple[str, int, int, int, int]] = []
    size = 0
    for item in files:
        if current and size + item[2] > CHUNK:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += item[2]
    if current:
        groups.append(current)
    return groups


def build(layout: VolumeLayout, mirror: Path, threads: int = THREADS, index: Index | None = None) -> dict[str, Any]:
    """Lay out the mirror (from ``index`` when the caller read it); raise BootSetUnusable when the boot set
    cannot be used. Returns what was done. The stat of every recorded folder (``changed``) is not part of it:
    ``main`` runs it while Forge starts, and the worker restarts Forge from the volume if it finds a change."""
    started = time.monotonic()
    index = index or read_index(layout)
    if index is None:
        raise BootSetUnusable("no boot set recorded (run `forge-volume install` to record one)")
    try:
        state = read_state(layout) or {}
    except ForgeVolumeError as exc:
        raise BootSetUnusable(exc.one_line()) from None
    key = ((state.get("steps") or {}).get("boot") or {}).get("key")
    if key != index.key:
        raise BootSetUnusable("the boot set was recorded for another install (run `forge-volume install`)")
    copied = {rel for rel, *_ in index.files}
    mirror.mkdir(parents=True, exist_ok=True)
    archive = os.open(layout.boot_set_archive, os.O_RDONLY)
    try:
        if os.fstat(archive).st_size != index.archive_size:
            raise BootSetUnusable(changed_since_recorded(f"{layout.relative(layout.boot_set_archive)} changed size"))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for rel in sorted(index.dirs):  # parents sort before their children
                os.mkdir(mirror / rel)
            unpacked = [pool.submit(_unpack, archive, mirror, group) for group in _groups(index.files)]
            cfg = _pyvenv_cfg(layout, index, mirror)  # rewritten below: not a link
            local = copied | ({layout.relative(layout.venv / "pyvenv.cfg")} if cfg is not None else set())
            links = _links(layout, index, mirror, local)
            linked = [pool.submit(_make_links, links[i:i + LINK_BATCH]) for i in range(0, len(links), LINK_BATCH)]
            if cfg is not None:
                (mirror / layout.relative(layout.venv / "pyvenv.cfg")).write_text(cfg, encoding="utf-8")
            for future in linked:
                future.result()
            written = sum(f.result() for f in unpacked)
    finally:
        os.close(archive)
    return {"ok": True, "seconds": round(time.monotonic() - started, 3), "files": len(index.files),
            "bytes": written, "folders": len(index.dirs), "links": len(links)}


def _links(layout: VolumeLayout, index: Index, mirror: Path, local: set[str]) -> list[tuple[str, str]]:
    """(target, link) for every entry of the mirrored folders that is neither a mirrored folder nor a local file.

    Plain strings, not Paths: a boot set has ~20,000 of them, and this is on the boot's critical path."""
    links: list[tuple[str, str]] = []
    here, root = str(mirror), str(layout.root)
    for tree in layout.code_trees:
        rel = layout.relative(tree)
        if rel not in index.dirs and os.path.lexists(tree):
            links.append((str(tree), f"{here}/{rel}"))
    for folder, (_, entries) in index.dirs.items():
        for name, kind, target in entries:
            rel = f"{folder}/{name}"
            if (kind == "d" and rel in index.dirs) or (kind == "f" and rel in local):
                continue
            link = _volume_target(layout, index, mirror, folder, target) if kind == "l" else f"{root}/{rel}"
            links.append((link, f"{here}/{rel}"))
    return links


def _make_links(links: list[tuple[str, str]]) -> None:
    for target, link in links:
        os.symlink(target, link)


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


def prefetch_plan(index: Index) -> list[tuple[str, int, int]]:
    """(file, offset, length) pieces: the large libraries' touched ranges first, then the checkpoint."""
    plan: list[tuple[str, int, int]] = []
    for rel, _size, _, spans in index.ranges:
        for offset, length in spans:
            for piece in range(offset, offset + length, PREFETCH_CHUNK):
                plan.append((rel, piece, min(PREFETCH_CHUNK, offset + length - piece)))
    return plan


def prefetch(layout: VolumeLayout, index: Index, threads: int = PREFETCH_THREADS,
             checkpoint_threads: int = CHECKPOINT_THREADS) -> int:
    """Read the libraries' touched ranges, then the checkpoint, into the page cache; the bytes read.

    The libraries come first and with many reads in flight: torch maps them in its first seconds. The
    checkpoint is needed only once Forge answers, so fewer reads in flight leave the volume's client
    (and the CPU) to Forge's own imports meanwhile."""
    got = _read_plan(layout, prefetch_plan(index), threads)
    if index.checkpoint:
        try:
            size = layout.absolute(index.checkpoint).stat().st_size
        except OSError:
            size = 0
        plan = [(index.checkpoint, p, min(PREFETCH_CHUNK, size - p)) for p in range(0, size, PREFETCH_CHUNK)]
        got += _read_plan(layout, plan, checkpoint_threads)
    return got


def _read_plan(layout: VolumeLayout, plan: list[tuple[str, int, int]], threads: int) -> int:
    fds: dict[str, int] = {}
    for rel in dict.fromkeys(rel for rel, _, _ in plan):
        with contextlib.suppress(OSError):
            fds[rel] = os.open(layout.absolute(rel), os.O_RDONLY)
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(lambda piece: _safe(_read_range, fds.get(piece[0]), piece[1], piece[2]), plan))
    finally:
        for fd in fds.values():
            os.close(fd)


def _safe(read: Callable[[int, int, int], int], fd: int | None, offset: int, length: int) -> int:
    if fd is None:
        return 0
    try:
        return read(fd, offset, length)
    except OSError:
        return 0


# main's thread and the check's thread both print: one line at a time, never interleaved.
_stdout_lock = threading.Lock()


def _print_line(result: dict[str, Any]) -> None:
    with _stdout_lock, contextlib.suppress(BrokenPipeError):  # the worker stopped listening (it is going away)
        print(json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    layout, mirror = VolumeLayout(Path(argv[0])), Path(argv[1])
    index = read_index(layout)
    try:
        result = build(layout, mirror, index=index)
    except BootSetUnusable as exc:
        result = {"ok": False, "reason": str(exc)}
    except OSError as exc:
        result = {"ok": False, "reason": f"the boot set could not be laid out ({exc})"}
    _print_line(result)
    if index is None:
        return 0
    # Forge starts now. Beside its imports: the check of every recorded folder (the worker restarts Forge
    # from the volume if one changed), and the prefetch of the library pages torch maps in its first
    # seconds, then the checkpoint. Also after a failure: a boot from the volume needs the same pages.
    check = None
    if result.get("ok"):
        check = threading.Thread(target=lambda: _print_line({"changed": changed(layout, index, THREADS, files=False)}),
                                 name="check")
        check.start()
    started = time.monotonic()
    got = prefetch(layout, index)
    _print_line({"prefetched": got, "seconds": round(time.monotonic() - started, 3)})
    if check is not None:
        check.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
