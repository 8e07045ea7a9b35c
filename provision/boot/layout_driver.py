"""The worker's side of a fast boot: whether and where to lay out the boot set, and the lay-out child run.

``start_lay_out`` starts ``python -m provision.boot.layout_child <volume> <mirror>`` and ``LayOut.wait`` waits
(with a deadline) for its first line; the child then checks the volume behind the mirror and prefetches while Forge
starts, and ``VolumeCheck`` carries the check's answer to the worker. Kept apart from the child so the
worker's own process never loads the lay-out's code.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision.boot import owner
from provision.boot.boot_set import changed_since_recorded
from provision.progress import human_bytes
from volume_layout import VolumeLayout

# A stat answered faster than this came from local disk or memory, not over a network: a lay-out costs a
# second there and gains nothing, so FORGE_FAST_BOOT=auto (the default) skips it.
LOCAL_STAT = 100e-6
SHM = Path("/dev/shm")
SHM_MARGIN = 512 << 20
MIRROR_PREFIX = "forge-mirror-"


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
            return owner.make(MIRROR_PREFIX, shm)  # named for this worker: a later start removes it if it dies
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
        return None if self._problem is None else changed_since_recorded(self._problem)


def _printable(text: str) -> str:
    """Text the child took from the volume (a crafted name may hold newlines or terminal escapes), on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def lay_out(layout: VolumeLayout, mirror: Path, timeout: float, say: Callable[[str], None],
            started_child: Callable[[subprocess.Popen[str]], None] | None = None) -> VolumeCheck | None:
    """``start_lay_out`` and wait for it: the child's check of the volume when Forge may start from ``mirror``,
    else None."""
    started = start_lay_out(layout, mirror, say, started_child)
    return None if started is None else started.wait(timeout)


def start_lay_out(layout: VolumeLayout, mirror: Path, say: Callable[[str], None],
                  started_child: Callable[[subprocess.Popen[str]], None] | None = None) -> LayOut | None:
    """Start the child that lays out the mirror; None (said why) when it cannot start.

    The child dies with the thread that calls this (its parent-death signal): call it from one that lives as long
    as the worker. It checks the volume and prefetches in the background after the lay-out; ``started_child`` is
    given it, to stop it sooner.
    """
    from provision.forge.process import dying_with_parent

    started = time.monotonic()
    try:
        argv = [sys.executable, "-m", "provision.boot.layout_child", str(layout.root), str(mirror)]
        proc = subprocess.Popen(dying_with_parent(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        say(f"fast boot off: cannot start its helper ({exc})")
        return None
    if started_child is not None:
        started_child(proc)  # the worker stops it before it removes the copy
    return LayOut(proc, started, say)


class LayOut:
    """A lay-out child running (``start_lay_out``): its lines read as they come, ``wait`` for the lay-out."""

    def __init__(self, proc: subprocess.Popen[str], started: float, say: Callable[[str], None]) -> None:
        self.proc, self.started, self.say = proc, started, say
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: collections.deque[str] = collections.deque(maxlen=5)
        threading.Thread(target=self._read_out, name="boot-mirror-out", daemon=True).start()
        threading.Thread(target=self._read_err, name="boot-mirror-err", daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(_printable(line.rstrip()))

    def wait(self, timeout: float) -> VolumeCheck | None:
        """The child's check of the volume behind the mirror (still running) when Forge may start from the mirror;
        None when the lay-out failed or did not end within ``timeout`` of the child's start (said why: the worker
        then boots from the volume)."""
        proc, errors, say = self.proc, self.errors, self.say
        try:
            first = self.lines.get(timeout=max(self.started + timeout - time.monotonic(), 0.1))
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
            say(f"fast boot off: {_printable(str(result.get('reason')))}; booting from the volume")
            return None
        say(f"fast boot: {result.get('files')} files ({human_bytes(int(result.get('bytes') or 0))}) of the boot set "
            f"laid out on local disk in {time.monotonic() - self.started:.2f} s; prefetching in the background")
        check = VolumeCheck()
        threading.Thread(target=self._follow, args=(check,), name="boot-mirror-follow", daemon=True).start()
        return check

    def _follow(self, check: VolumeCheck) -> None:
        while (line := self.lines.get()) is not None:
            try:
                said = json.loads(line)
            except ValueError:
                continue
            if isinstance(said, dict) and "changed" in said:
                if said["changed"] is None and isinstance(said.get("seconds"), (int, float)):
                    # Forge's first answer waits for this: on a slow volume, part of the cold start.
                    self.say(f"fast boot: the volume checked ({said.get('folders')} folders unchanged) in "
                             f"{float(said['seconds']):.2f} s")
                check.answer(None if said["changed"] is None else _printable(str(said["changed"])))
            elif isinstance(said, dict) and "prefetched" in said:
                self.say(_prefetched(said))
        self.proc.wait()
        ended = " | ".join(self.errors) or self.proc.returncode
        check.answer(f"its helper ended before it checked the volume ({ended})")


def _prefetched(said: dict[str, Any]) -> str:
    """The prefetch's log line: the libraries' pages, then the checkpoint, each with its seconds."""
    try:
        total, seconds = int(said["prefetched"]), float(said["seconds"])
        libraries, libraries_seconds = int(said.get("libraries", 0)), float(said.get("libraries_seconds", 0))
    except (KeyError, TypeError, ValueError):
        return "fast boot: prefetched (the helper's report is unreadable)"
    return (f"fast boot: prefetched {human_bytes(total)} in {seconds:.2f} s: the libraries' pages "
            f"({human_bytes(libraries)}) in {libraries_seconds:.2f} s, then the checkpoint "
            f"({human_bytes(total - libraries)}) in {seconds - libraries_seconds:.2f} s")
