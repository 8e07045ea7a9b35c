#!/usr/bin/env python3
"""netvol: a simulated network volume, a read-only FUSE pass-through with a network's round trips.

    netvol.py mount SRC MNT [--meta-ms 1] [--read-ms 1] [--bw-mbps 400] [--bw-shared] [--stats FILE] [--timeout 1]
    netvol.py dump MNT FILE        # write the counters so far (the mount keeps serving)

A network volume (RunPod's, NFS, any distributed file system) turns every lookup, stat, open and
directory read into a round trip, and that is what a cold Forge pays for: tens of thousands of them
one after another. ``mount`` serves SRC at MNT and sleeps ``--meta-ms`` in every metadata call
(lookup/getattr, open, opendir, readdir, readlink, statfs) and ``--read-ms`` plus size over
``--bw-mbps`` (MB/s of 1e6 bytes; 0 = unlimited) in every read; with ``--bw-shared``, the reads in flight
share that bandwidth (a volume's link: 8 reads at once take 8 times as long), else each read has all of
it (reads in flight together may exceed it: the issue's figures were measured so). Calls are served on many threads
(``--max-threads``), so parallel calls overlap as requests in flight do on a network client (but
lookups of names in one directory arrive one at a time: see ``NetVolOps.init_with_config``). The
kernel caches as such a client does: attributes, entries and missing names for ``--timeout`` s
(1 s), file pages for as long as the mount lives; the pages of SRC it read are dropped from the page
cache again: a client's machine holds one copy of a file, not its server's too.
libfuse's high-level API turns a kernel LOOKUP into getattr, so the getattr count is the lookups plus
the stats that missed the attribute cache.

Every call is counted by kind, path and process (a thread is resolved to its process): per path the
metadata calls (a lookup of a missing name counts as ``missing``), per file the opens, reads and
bytes, per process the same totals and its command line. The counters are written as JSON to
``--stats`` when the mount goes away (``fusermount3 -u MNT``, or SIGTERM/SIGINT to this process),
and on demand by ``dump`` through a control socket. ``summarize`` (used by
``scripts/bench_coldstart.py``) turns them into totals and the top sources of metadata calls.

Needs Debian's ``fuse3 libfuse3-3`` and ``pip install mfusepy`` (imported only by ``mount``; the
rest of this module is plain Python and is tested without FUSE). Root, or a user allowed to mount.
"""

from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

META_KINDS = ("getattr", "open", "opendir", "readdir", "readlink", "statfs")
STAT_KEYS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize", "st_rdev")
STATVFS_KEYS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize",
                "f_namemax")
SITE_PACKAGES = "site-packages"
FUSE_CAP_PARALLEL_DIROPS = 1 << 18  # libfuse3's fuse_common.h


# -- the latency model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    """Seconds one call costs: a fixed round trip per metadata call; per read a round trip plus transfer."""

    meta_ms: float = 0.0
    read_ms: float = 0.0
    bw_mbps: float = 0.0  # MB/s (1e6 bytes); 0 = unlimited
    shared: bool = False  # the bandwidth is the volume's, shared by the reads in flight (``Link``); else per read

    def __post_init__(self) -> None:
        for name in ("meta_ms", "read_ms", "bw_mbps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")

    @classmethod
    def parse(cls, text: str) -> Latency:
        """``META_MS,READ_MS,BW_MBPS[,shared]``, e.g. ``1,1,400`` or ``5,2,200,shared`` (``Link``); ``0,0,0`` is
        FUSE without delays."""
        parts = [p.strip() for p in text.split(",")]
        shared = parts[3:] == ["shared"]
        wrong = f"{text!r} is not META_MS,READ_MS,BW_MBPS[,shared] (three numbers, e.g. 1,1,400)"
        if len(parts) != 3 + shared:
            raise ValueError(wrong)
        parts = parts[:3]
        try:
            meta, read, bw = (float(p) for p in parts)
        except ValueError:
            raise ValueError(wrong) from None
        return cls(meta, read, bw, shared)

    @property
    def label(self) -> str:
        return f"{self.meta_ms:g},{self.read_ms:g},{self.bw_mbps:g}" + (",shared" if self.shared else "")

    def meta_delay(self) -> float:
        return self.meta_ms / 1000.0

    def read_delay(self, nbytes: int) -> float:
        transfer = nbytes / (self.bw_mbps * 1e6) if self.bw_mbps else 0.0
        return self.read_ms / 1000.0 + transfer


class Link:
    """A volume's bandwidth shared by every read in flight: each read's bytes wait for those before them."""

    def __init__(self, mbps: float) -> None:
        self._seconds_per_byte = 1 / (mbps * 1e6)
        self._free = -math.inf  # when the bytes of the reads so far are through
        self._mu = threading.Lock()

    def through(self, began: float, nbytes: int) -> float:
        """When a read asked at ``began`` (clock seconds) has its ``nbytes`` through."""
        with self._mu:
            self._free = max(self._free, began) + nbytes * self._seconds_per_byte
            return self._free


# -- the counters ----------------------------------------------------------------------------------
class Counters:
    """Per-call counts by kind, path and process; thread-safe; ``snapshot`` is plain JSON."""

    def __init__(self, latency: Latency, clock: Callable[[], float] = time.monotonic) -> None:
        self.latency = latency
        self._clock = clock
        self._mu = threading.Lock()
        self.started = clock()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paths: dict[str, collections.Counter[str]] = {}  # path -> kind -> calls (metadata only)
        self.files: dict[str, dict[str, Any]] = {}  # path -> first_open (s after mount), opens, reads, bytes, size, pid
        self.procs: dict[int, dict[str, Any]] = {}  # pid -> meta, opens, reads, bytes, cmd
        self.read_sizes: collections.Counter[int] = collections.Counter()

    def _proc(self, pid: int, cmd: Callable[[int], str]) -> dict[str, Any]:
        record = self.procs.get(pid)
        if record is None:
            record = self.procs[pid] = {"meta": 0, "opens": 0, "reads": 0, "bytes": 0, "cmd": cmd(pid)}
        return record

    def meta(self, kind: str, path: str, pid: int, cmd: Callable[[int], str], missing: bool = False) -> None:
        with self._mu:
            self.ops[kind] += 1
            per_path = self.paths.get(path)
            if per_path is None:
                per_path = self.paths[path] = collections.Counter()
            per_path[kind] += 1
            if missing:
                self.ops["missing"] += 1
                per_path["missing"] += 1
            self._proc(pid, cmd)["meta"] += 1

    def opened(self, path: str, size: int, pid: int, cmd: Callable[[int], str]) -> None:
        with self._mu:
            record = self.files.get(path)
            if record is None:
                record = self.files[path] = {"first_open": round(self._clock() - self.started, 6), "opens": 0,
                                             "reads": 0, "bytes": 0, "size": size, "pid": pid}
            record["opens"] += 1
            self._proc(pid, cmd)["opens"] += 1

    def read(self, path: str | None, asked: int, got: int, pid: int, cmd: Callable[[int], str]) -> None:
        with self._mu:
            self.ops["read"] += 1
            self.ops["read_bytes"] += got
            self.read_sizes[asked] += 1
            proc = self._proc(pid, cmd)
            proc["reads"] += 1
            proc["bytes"] += got
            record = self.files.get(path) if path is not None else None
            if record is not None:
                record["reads"] += 1
                record["bytes"] += got

    def snapshot(self) -> dict[str, Any]:
        with self._mu:
            return {
                "latency": {"meta_ms": self.latency.meta_ms, "read_ms": self.latency.read_ms,
                            "bw_mbps": self.latency.bw_mbps},
                "seconds": round(self._clock() - self.started, 6),
                "ops": dict(self.ops),
                "read_sizes": {str(k): v for k, v in sorted(self.read_sizes.items())},
                "procs": {str(pid): dict(rec) for pid, rec in self.procs.items()},
                "paths": {path: dict(kinds) for path, kinds in self.paths.items()},
                "files": {path: dict(rec) for path, rec in self.files.items()},
            }


def source_of(path: str, depth: int = 2) -> str:
    """Where a metadata call comes from, coarsely: a package under site-packages, else the first folders.

    ``/venv/lib/python3.11/site-packages/torch/nn/x.py`` -> ``/venv/lib/python3.11/site-packages/torch``;
    ``/stable-diffusion-webui-forge/modules/x.py`` -> ``/stable-diffusion-webui-forge/modules``.
    """
    parts = [p for p in path.split("/") if p]
    if SITE_PACKAGES in parts:
        cut = parts.index(SITE_PACKAGES) + 2
        return "/" + "/".join(parts[:cut])
    return "/" + "/".join(parts[:depth])


def _top(counter: Mapping[str, int], n: int) -> list[list[Any]]:
    return [[key, count] for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def summarize(snapshot: Mapping[str, Any], top: int = 10) -> dict[str, Any]:
    """Totals of a snapshot (metadata calls by kind, opens, files, reads, bytes) and the top sources of metadata calls:
    by source (``source_of``), by folder, by single path, and the paths looked up most that do not exist."""
    ops: Mapping[str, int] = snapshot.get("ops", {})
    paths: Mapping[str, Mapping[str, int]] = snapshot.get("paths", {})
    files: Mapping[str, Mapping[str, Any]] = snapshot.get("files", {})
    by_source: collections.Counter[str] = collections.Counter()
    by_dir: collections.Counter[str] = collections.Counter()
    by_path: collections.Counter[str] = collections.Counter()
    missing: collections.Counter[str] = collections.Counter()
    for path, kinds in paths.items():
        calls = sum(n for kind, n in kinds.items() if kind in META_KINDS)
        by_source[source_of(path)] += calls
        by_dir[path.rsplit("/", 1)[0] or "/"] += calls
        by_path[path] += calls
        if kinds.get("missing"):
            missing[path] += kinds["missing"]
    return {
        "meta": sum(ops.get(kind, 0) for kind in META_KINDS),
        "meta_by_kind": {kind: ops.get(kind, 0) for kind in META_KINDS},
        "missing": ops.get("missing", 0),
        "opens": ops.get("open", 0),
        "files_opened": len(files),
        "reads": ops.get("read", 0),
        "bytes": ops.get("read_bytes", 0),
        "top_sources": _top(by_source, top),
        "top_dirs": _top(by_dir, top),
        "top_paths": _top(by_path, top),
        "top_missing": _top(missing, top),
    }


def subtract(total: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, int]:
    """The scalar totals of ``summarize(total)`` minus those of ``summarize(before)``: what came after."""
    out = {key: int(total[key]) - int(before.get(key, 0)) for key in ("meta", "missing", "opens", "reads", "bytes")}
    out["files_opened"] = int(total["files_opened"]) - int(before.get("files_opened", 0))
    return out


# -- processes -------------------------------------------------------------------------------------
class Processes:
    """A FUSE request carries the calling thread's id; the counters want its process and command line."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._root = proc_root
        self._tgid: dict[int, int] = {}

    def tgid(self, tid: int) -> int:
        known = self._tgid.get(tid)
        if known is not None:
            return known
        tgid = tid
        try:
            for line in (self._root / str(tid) / "status").read_text().splitlines():
                if line.startswith("Tgid:"):
                    tgid = int(line.split()[1])
                    break
        except (OSError, ValueError):
            pass  # gone already: count it under the thread id
        self._tgid[tid] = tgid
        return tgid

    def cmd(self, pid: int) -> str:
        try:
            raw = (self._root / str(pid) / "cmdline").read_bytes()[:400]
        except OSError:
            return ""
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()


# -- the file system -------------------------------------------------------------------------------
FOLIO = 2 << 20  # the largest page-cache folio of a disk file system (a PMD); fadvise drops only whole folios
DROP_LAG = 64 << 20  # how far behind a read its source's pages are dropped


def _read(fd: int, size: int, offset: int) -> bytes:
    """``pread``, then the source's pages behind it dropped from the page cache: a network client's machine holds
    one copy of a file, not its server's too. (O_DIRECT would keep them out, but cost the daemon three times the
    CPU; dropping the read range itself leaves every page a larger folio around it still holds.)"""
    data = os.pread(fd, size, offset)
    end = offset // FOLIO * FOLIO
    start = max(0, end - DROP_LAG)
    if end > start:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    return data


class NetVolOps:
    """The pass-through's operations, in mfusepy's calling convention (paths relative to the mount, ``/``-led).

    A plain class, not a subclass of ``mfusepy.Operations``: mfusepy registers only the callbacks an
    object has, so everything not here (writes, xattrs, access) goes back to the kernel as ENOSYS or
    EROFS without a round trip. ``context`` gives the caller's thread id (mfusepy's
    ``fuse_get_context()[2]`` under FUSE); ``sleep`` is where the latency goes.
    """

    use_ns = True  # mfusepy: times in nanoseconds

    def __init__(self, src: Path, latency: Latency, counters: Counters, context: Callable[[], int] = os.getpid,
                 sleep: Callable[[float], None] = time.sleep, processes: Processes | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.src = str(src.resolve())
        self._clock = clock
        self.latency = latency
        self.counters = counters
        self._context = context
        self._sleep = sleep
        self._procs = processes or Processes()
        self._link = Link(latency.bw_mbps) if latency.shared and latency.bw_mbps else None

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Ask for parallel directory operations (libfuse3 asks by default; said here because it matters).

        Measured on Linux 6.18 with libfuse 3.14 all the same: lookups of names in one directory still
        reach this file system one at a time, while lookups in different directories, opens and reads
        overlap (``tests/coldstart/test_netvol_mount.py``)."""
        if conn is not None and conn.capable & FUSE_CAP_PARALLEL_DIROPS:
            conn.want |= FUSE_CAP_PARALLEL_DIROPS

    def _pid(self) -> int:
        return self._procs.tgid(self._context())

    def _meta(self, kind: str, path: str, missing: bool = False) -> None:
        self.counters.meta(kind, path, self._pid(), self._procs.cmd, missing)
        delay = self.latency.meta_delay()
        if delay:
            self._sleep(delay)

    def _real(self, path: str) -> str:
        return self.src + path if path != "/" else self.src

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        try:
            st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        except FileNotFoundError:
            self._meta("getattr", path, missing=True)
            raise
        self._meta("getattr", path)
        attrs: dict[str, Any] = {key: getattr(st, key) for key in STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readlink(self, path: str) -> str:
        self._meta("readlink", path)
        return os.readlink(self._real(path))

    def statfs(self, path: str) -> dict[str, int]:
        self._meta("statfs", path)
        sv = os.statvfs(self._real(path))
        return {key: getattr(sv, key) for key in STATVFS_KEYS}

    def opendir(self, path: str) -> int:
        self._meta("opendir", path)
        if not os.path.isdir(self._real(path)):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        self._meta("readdir", path)
        return [".", "..", *os.listdir(self._real(path))]

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        self._meta("open", path)
        fd = os.open(self._real(path), os.O_RDONLY)
        self.counters.opened(path, os.fstat(fd).st_size, self._pid(), self._procs.cmd)
        return fd

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        began = self._clock()
        data = _read(fh, size, offset)
        spent = self._clock() - began  # the source's own time (a disk read after a cache drop) is part of the call's
        self.counters.read(path, size, len(data), self._pid(), self._procs.cmd)
        if self._link is None:
            delay = self.latency.read_delay(len(data)) - spent
        else:  # the round trip, after this read's turn on the volume's link
            delay = self._link.through(began, len(data)) + self.latency.read_ms / 1000.0 - self._clock()
        if delay > 0:
            self._sleep(delay)
        return data

    def release(self, path: str | None, fh: int) -> int:
        os.posix_fadvise(fh, 0, 0, os.POSIX_FADV_DONTNEED)  # what the reads left behind them
        os.close(fh)
        return 0


# -- the control socket ----------------------------------------------------------------------------
def control_path(mnt: Path) -> Path:
    """The control socket of the mount at ``mnt`` (one per mount point)."""
    digest = hashlib.sha1(str(mnt.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"netvol-{digest}.sock"


def write_json(path: Path, obj: Any) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def serve_control(counters: Counters, sock_path: Path) -> socket.socket:
    """Answer ``dump FILE`` (write the counters, answer ``ok``) on a Unix socket, on a daemon thread."""
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed at unmount
            with conn:
                try:
                    words = conn.recv(8192).decode().split(maxsplit=1)
                    if len(words) == 2 and words[0] == "dump":
                        write_json(Path(words[1]), counters.snapshot())
                        conn.sendall(b"ok\n")
                    else:
                        conn.sendall(b"error: expected 'dump FILE'\n")
                except Exception as exc:  # one bad request must not stop the control loop
                    conn.sendall(f"error: {exc}\n".encode())

    threading.Thread(target=loop, name="netvol-control", daemon=True).start()
    return server


def dump(mnt: Path, out: Path, timeout: float = 30.0) -> None:
    """Ask the mount at ``mnt`` to write its counters to ``out`` now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(control_path(mnt)))
        except OSError as exc:
            raise RuntimeError(f"no netvol mount answers at {mnt} ({control_path(mnt)}: {exc})") from None
        conn.sendall(f"dump {out.resolve()}".encode())
        answer = conn.recv(4096).decode().strip()
    if answer != "ok":
        raise RuntimeError(f"netvol at {mnt} could not dump to {out}: {answer}")


# -- the command line ------------------------------------------------------------------------------
def parse_args(argv: Iterable[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="netvol.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="serve SRC at MNT until unmounted (foreground)")
    m.add_argument("src", type=Path)
    m.add_argument("mnt", type=Path)
    m.add_argument("--meta-ms", type=float, default=0.0, help="delay per metadata call, ms")
    m.add_argument("--read-ms", type=float, default=0.0, help="fixed delay per read call, ms")
    m.add_argument("--bw-mbps", type=float, default=0.0, help="bandwidth per read call, MB/s (0 = unlimited)")
    m.add_argument("--bw-shared", action="store_true", help="the bandwidth is shared by the reads in flight")
    m.add_argument("--timeout", type=float, default=1.0, help="attribute/entry/negative cache timeout, s")
    m.add_argument("--max-threads", type=int, default=64, help="threads serving calls (requests in flight)")
    m.add_argument("--stats", type=Path, help="write the counters here at unmount")
    d = sub.add_parser("dump", help="write a running mount's counters to FILE")
    d.add_argument("mnt", type=Path)
    d.add_argument("file", type=Path)
    args = ap.parse_args(list(argv))
    if args.command == "mount":
        try:
            args.latency = Latency(args.meta_ms, args.read_ms, args.bw_mbps, args.bw_shared)
        except ValueError as exc:
            ap.error(str(exc))
        if not args.src.is_dir():
            ap.error(f"{args.src} is not a directory")
        if not args.mnt.is_dir():
            ap.error(f"mount point {args.mnt} is not a directory")
        if args.timeout < 0 or args.max_threads < 1:
            ap.error("--timeout must be >= 0 and --max-threads >= 1")
    return args


def mount(args: argparse.Namespace) -> None:
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse2 if both are installed
    try:
        import mfusepy
    except (ImportError, OSError) as exc:
        raise SystemExit(f"netvol: cannot load mfusepy on libfuse3 ({exc}); run: apt-get install -y fuse3 "
                         f"libfuse3-3 && {sys.executable} -m pip install mfusepy") from None
    counters = Counters(args.latency)
    ops = NetVolOps(args.src, args.latency, counters, context=lambda: mfusepy.fuse_get_context()[2])
    control = serve_control(counters, control_path(args.mnt))
    try:
        mfusepy.FUSE(ops, str(args.mnt), foreground=True, ro=True, fsname=f"netvol:{args.src}", subtype="netvol",
                     kernel_cache=True, entry_timeout=args.timeout, attr_timeout=args.timeout,
                     negative_timeout=args.timeout, max_threads=args.max_threads,
                     max_idle_threads=args.max_threads)
    finally:
        control.close()
        control_path(args.mnt).unlink(missing_ok=True)
        if args.stats:
            write_json(args.stats, counters.snapshot())


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "dump":
        try:
            dump(args.mnt, args.file)
        except RuntimeError as exc:
            print(f"netvol: {exc}", file=sys.stderr)
            return 1
        return 0
    mount(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
