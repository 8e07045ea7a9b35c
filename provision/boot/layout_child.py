"""A worker's fast boot: the volume's code trees laid out on local disk from the boot set, then prefetching.

Run by the worker as a child process (``python -m provision.boot.mirror <volume> <mirror>``), so its
threads and buffers never weigh on the worker's own memory or event loop. It:

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

import collections
import concurrent.futures
import contextlib
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision.boot.boot_set import Index, changed, read_index
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
# A stat answered faster than this came from local disk or memory, not over a network: a lay-out costs a
# second there and gains nothing, so FORGE_FAST_BOOT=auto (the default) skips it.
LOCAL_STAT = 100e-6
LINK_BATCH = 2000
SHM = Path("/dev/shm")
SHM_MARGIN = 512 << 20


class Stale(Exception):
    """The boot set does not describe the volume any more (or was never recorded)."""


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


def stale(problem: str) -> str:
    """The one line for a volume that no longer matches its boot set, with the fix."""
    return f"the volume changed since the boot set was recorded: {problem} (run `forge-volume install`)"


def build(layout: VolumeLayout, mirror: Path, threads: int = THREADS, index: Index | None = None) -> dict[str, Any]:
    """Lay out the mirror (from ``index`` when the caller read it); raise Stale when the boot set cannot be used.
    Returns what was done. The stat of every recorded folder (``changed``) is not part of it: ``main`` runs
    it while Forge starts, and the worker restarts Forge from the volume if it finds a change."""
    started = time.monotonic()
    index = index or read_index(layout)
    if index is None:
        raise Stale("no boot set recorded (run `forge-volume install` to record one)")
    try:
        state = read_state(layout) or {}
    except ForgeVolumeError as exc:
        raise Stale(exc.one_line()) from None
    key = ((state.get("steps") or {}).get("boot") or {}).get("key")
    if key != index.key:
        raise Stale("the boot set was recorded for another install (run `forge-volume install`)")
    copied = {rel for rel, *_ in index.files}
    mirror.mkdir(parents=True, exist_ok=True)
    archive = os.open(layout.boot_set_archive, os.O_RDONLY)
    try:
        if os.fstat(archive).st_size != index.archive_size:
            raise Stale(stale(f"{layout.relative(layout.boot_set_archive)} changed size"))
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


def stat_latency(layout: VolumeLayout) -> float:
    """The median time the volume takes to stat a path of its code trees that the worker has not looked at yet."""
    probes = [layout.venv / "lib", layout.venv / "pyvenv.cfg", layout.venv / "include", layout.forge_dir / "modules",
              layout.forge_dir / "webui.py", layout.forge_dir / "requirements_versions.txt", layout.extensions_dir,
              layout.boot_set_archive, layout.forge_dir / "modules" / "paths_internal.py"]
    times = []
    for path in probes:
        started = time.perf_counter()
        with contextlib.suppress(OSError):
            os.stat(path)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def mirror_place(layout: VolumeLayout, scratch: Path, shm: Path = SHM) -> Path:
    """Where to lay the boot set out: a memory file system (``/dev/shm``) when it has ample room for it
    (local-disk metadata costs add up over ~20,000 entries), else the worker's scratch on local disk."""
    try:
        need = layout.boot_set_archive.stat().st_size * 2 + SHM_MARGIN
        room = os.statvfs(shm)
        if room.f_bavail * room.f_frsize >= need and _is_tmpfs(shm):
            return Path(tempfile.mkdtemp(prefix="forge-mirror-", dir=shm))
    except OSError:
        pass
    return scratch / "mirror"


def _is_tmpfs(path: Path) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            return any(line.split()[1:3] == [str(path), "tmpfs"] for line in mounts)
    except OSError:
        return False


class VolumeCheck:
    """The lay-out child's check of the volume behind the mirror, which it runs while Forge starts."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._problem: str | None = None

    def answer(self, problem: str | None) -> None:
        if not self._done.is_set():
            self._problem = problem
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def problem(self, seconds: float) -> str | None:
        """None when the volume is as recorded, else what changed; waits at most ``seconds`` for the answer."""
        if not self._done.wait(max(seconds, 0.0)):
            return f"the volume was not checked within {seconds:g} s"
        return None if self._problem is None else stale(self._problem)


def lay_out(layout: VolumeLayout, mirror: Path, timeout: float, say: Callable[[str], None]) -> VolumeCheck | None:
    """Run the child that lays out the mirror; when Forge may start from ``mirror``, the child's check of
    the volume behind it (still running); None when the lay-out failed.

    Waits at most ``timeout`` for the lay-out; the child then checks the volume and prefetches in the
    background, and dies with the worker. Any failure is one line in the log and a boot from the volume.
    """
    from provision.forge.process import dying_with_parent

    started = time.monotonic()
    try:
        argv = [sys.executable, "-m", "provision.boot.mirror", str(layout.root), str(mirror)]
        proc = subprocess.Popen(dying_with_parent(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        say(f"fast boot off: cannot start its helper ({exc})")
        return None
    lines: queue.Queue[str | None] = queue.Queue()
    errors: collections.deque[str] = collections.deque(maxlen=5)

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            errors.append(line.rstrip())

    threading.Thread(target=read_out, name="boot-mirror-out", daemon=True).start()
    threading.Thread(target=read_err, name="boot-mirror-err", daemon=True).start()
    try:
        first = lines.get(timeout=max(timeout, 0.1))
    except queue.Empty:
        proc.kill()
        say(f"fast boot off: the boot set was not laid out within {timeout:g} s; booting from the volume")
        return None
    try:
        result = json.loads(first) if first else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        proc.wait(10)
        say(f"fast boot off: its helper failed ({' | '.join(errors) or f'exit code {proc.returncode}'}); "
            "booting from the volume")
        return None
    if not result.get("ok"):
        say(f"fast boot off: {result.get('reason')}; booting from the volume")
        return None
    say(f"fast boot: {result.get('files')} files ({int(result.get('bytes') or 0) / 1e6:.0f} MB) of the boot set "
        f"laid out on local disk in {time.monotonic() - started:.2f} s; prefetching in the background")

    check = VolumeCheck()

    def follow() -> None:
        while (line := lines.get()) is not None:
            try:
                said = json.loads(line)
            except ValueError:
                continue
            if isinstance(said, dict) and "changed" in said:
                check.answer(None if said["changed"] is None else str(said["changed"]))
            elif isinstance(said, dict) and "prefetched" in said:
                say(f"fast boot: prefetched {int(said['prefetched']) / 1e6:.0f} MB in {said.get('seconds')} s")
        proc.wait()
        check.answer(f"its helper ended before it checked the volume ({' | '.join(errors) or proc.returncode})")

    threading.Thread(target=follow, name="boot-mirror-follow", daemon=True).start()
    return check


_said = threading.Lock()


def _say(result: dict[str, Any]) -> None:
    with _said, contextlib.suppress(BrokenPipeError):  # the worker stopped listening (it is going away)
        print(json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    layout, mirror = VolumeLayout(Path(argv[0])), Path(argv[1])
    index = read_index(layout)
    try:
        result = build(layout, mirror, index=index)
    except Stale as exc:
        result = {"ok": False, "reason": str(exc)}
    except OSError as exc:
        result = {"ok": False, "reason": f"the boot set could not be laid out ({exc})"}
    _say(result)
    if index is None:
        return 0
    # Forge starts now. Beside its imports: the check of every recorded folder (the worker restarts Forge
    # from the volume if one changed), and the prefetch of the library pages torch maps in its first
    # seconds, then the checkpoint. Also after a failure: a boot from the volume needs the same pages.
    check = None
    if result.get("ok"):
        check = threading.Thread(target=lambda: _say({"changed": changed(layout, index, THREADS, files=False)}),
                                 name="check")
        check.start()
    started = time.monotonic()
    got = prefetch(layout, index)
    _say({"prefetched": got, "seconds": round(time.monotonic() - started, 3)})
    if check is not None:
        check.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
