"""The boot set: what Forge reads to boot, recorded once at install so every cold worker boots from local disk.

A cold worker boots Forge from a network volume where every lookup, stat, open and folder read
is a round trip: a boot makes about 40,000 of them, one after another. Install's boot proof runs
Forge under ``tracer.py`` and a warm-up txt2img, then records here (``.forge-volume/boot-set/``):

- ``files.bin``: the content of every file of the code trees (``VolumeLayout.code_trees``: the
  Python, the venv, the checkout, the extensions) that Forge opened, the small ones it only stat'ed,
  and the shared libraries it mapped that are smaller than ``BIG``, one after another, in chunks of
  whole files, each chunk one zstd frame (Python's sources and bytecode and the small libraries come
  to about a quarter: on a volume read at a few hundred MB/s, the lay-out reads a quarter as long);
- ``index.json``: where each of them is in ``files.bin`` with its size and mtime; every folder on
  the way to them (and every folder Forge listed) with its mtime and complete listing; for the
  large libraries, the byte ranges Forge touched (the pages mapped in its process, from the tracer;
  for a large file it only read, the pages the kernel cached for it, found with ``mincore`` after
  evicting them first); the checkpoint the warm-up loaded.

A worker (``provision.boot.layout_child``) lays these folders out on local disk with one sequential read
of ``files.bin``: every other entry becomes a link to the volume, so every path still resolves and
nothing can be missing, only slower. The index is valid for one boot-step key, and every file and
folder in it carries its mtime: anything changed since install (a ``pip install`` by hand on a
pod) makes the worker boot from the volume as before, and ``install`` records the set again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import re
import stat
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from provision.progress import human_bytes
from provision.records.atomic import write_atomic
from provision.records.reading import read_regular
from volume_layout import VolumeLayout

VERSION = 3  # 2: files.bin in digested chunks, index.json sealed; 3: each chunk a zstd frame
READS = frozenset({2, 3})  # a worker lays out a version 2 set as it is; install records it again
LEVEL = 6  # zstd's level for files.bin (the lab's 359 MiB: 97 MiB in about 3 s; level 3: 105 MiB in 1.2 s)
# A frame's window (the memory a decompressor needs) is at most this: level 19 on a chunk asks 8 MiB. A crafted
# frame asking more is refused rather than given the memory, in each of the lay-out's threads.
WINDOW = 1 << 23
BIG = 4 << 20  # mapped libraries this large are prefetched by the pages Forge touched, not copied whole
OPENED_LIMIT = 256 << 20  # a file Forge opened that is larger than this stays on the volume
STAT_THREADS = 32
CHUNK = 16 << 20  # files.bin is digested (and unpacked, many in flight) in chunks of whole files this large
PIECE = 1 << 20  # read this much at a time
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
TRACER = Path(__file__).with_name("tracer.py")

# --- the index ----------------------------------------------------------------------------------

# One entry of a mirrored folder: (name, kind, link target) with kind "d" (folder), "f" (file), "l" (link), "o" (other).
Entry = tuple[str, str, str]
# A piece of files.bin, its sha256 and the bytes it unpacks to: (length, hex digest, raw length), raw None in a
# version 2 set (the files' bytes as they are). The pieces follow one another from offset 0, and each holds
# whole files: the worker checks one piece while it unpacks the files in it, nothing read twice.
Chunk = tuple[int, str, int | None]
KEYS = frozenset({"version", "key", "root", "checkpoint", "dirs", "files", "ranges", "chunks"})
OPTIONAL_KEYS = frozenset({"trace"})
# What the tracer records, by revision (an index without "trace" is revision 1): 2 adds the folders Forge only
# probed, 3 the files the interpreter read before the tracer's hook (site-packages' .pth files, what site
# imported), 4 the small files Forge only stat'ed (its UI's scripts and styles, each extension's forge_app.py,
# checked for their mtimes even with --nowebui: each stat a round trip through a link to the volume). A worker
# uses an index of any revision; install records one older than this again.
TRACE = 4
STATED_LIMIT = 1 << 20  # a file Forge only stat'ed is copied when it is this small (its size and mtime are local)
SEAL = re.compile(rb',"seal":"([0-9a-f]{64})"\}\s*\Z')
INDEX_LIMIT = 256 << 20  # an index.json larger than this is not one install wrote


class BootSetError(ValueError):
    """The recorded boot set cannot be used as it is (missing, unreadable, malformed, or its digest differs).
    ``problem`` says what, ``str()`` adds the fix."""

    def __init__(self, problem: str, fix: str = "(run `forge-volume install` to record it again)") -> None:
        super().__init__(f"{problem} {fix}")
        self.problem = problem


@dataclass
class Index:
    key: str  # the boot step's key it was recorded for
    root: str  # the volume's root at install (absolute links into it are rewritten)
    dirs: dict[str, tuple[int, list[Entry]]] = field(default_factory=dict)  # rel -> (mtime_ns, entries)
    files: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # rel, offset, size, mtime_ns, mode
    ranges: list[tuple[str, int, int, list[tuple[int, int]]]] = field(default_factory=list)  # rel, size, mtime_ns
    checkpoint: str | None = None  # the checkpoint the warm-up loaded, relative to the volume
    chunks: list[Chunk] = field(default_factory=list)  # files.bin piece by piece, with each piece's sha256
    trace: int = TRACE  # the tracer's revision it was recorded with
    version: int = VERSION  # the index's format: 2 (files.bin as it is) or 3 (zstd frames)

    @property
    def archive_size(self) -> int:
        """files.bin's size."""
        return sum(length for length, _, _ in self.chunks)

    @property
    def files_size(self) -> int:
        """The bytes files.bin unpacks to."""
        return sum(length if raw is None else raw for length, _, raw in self.chunks)

    def to_json(self) -> dict[str, Any]:
        compressed = self.version >= 3
        if any((raw is not None) != compressed for _, _, raw in self.chunks):
            raise ValueError(f"a version {self.version} boot set index with chunks of the other version")
        return {"version": self.version, "key": self.key, "root": self.root, "checkpoint": self.checkpoint,
                "dirs": {rel: [mtime, [list(e) for e in entries]] for rel, (mtime, entries) in self.dirs.items()},
                "files": [list(f) for f in self.files],
                "ranges": [[rel, size, mtime, [list(r) for r in spans]] for rel, size, mtime, spans in self.ranges],
                "chunks": [list(c) if compressed else list(c[:2]) for c in self.chunks], "trace": self.trace}

    @classmethod
    def from_json(cls, data: Any) -> Index:
        """The index as recorded, every value of the type it must have (anything else: ValueError)."""
        if not isinstance(data, dict):
            raise ValueError("boot set index is not a JSON object")
        version = data.get("version")
        if version not in READS or isinstance(version, bool):
            raise ValueError(f"boot set index version {version!r}, this forge-volume reads "
                             f"{' and '.join(map(str, sorted(READS)))}")
        if extra := sorted(set(data) - KEYS - OPTIONAL_KEYS):
            raise ValueError(f"boot set index has unknown keys {extra}")
        if missing := sorted(KEYS - set(data)):
            raise ValueError(f"boot set index lacks {missing}")
        checkpoint = data["checkpoint"]
        dirs = _typed(data["dirs"], dict, "dirs")
        index = cls(
            key=_typed(data["key"], str, "key"), root=_typed(data["root"], str, "root"),
            checkpoint=None if checkpoint is None else _typed(checkpoint, str, "checkpoint"),
            dirs={rel: (_typed(mtime, int, rel), [(_typed(n, str, rel), _typed(k, str, rel), _typed(t, str, rel))
                                                 for n, k, t in _rows(entries, 3, rel)])
                  for rel, (mtime, entries) in ((r, _rows([v], 2, r)[0]) for r, v in dirs.items())},
            files=[(_typed(r, str, "files"), _typed(o, int, r), _typed(s, int, r), _typed(m, int, r),
                    _typed(mode, int, r)) for r, o, s, m, mode in _rows(data["files"], 5, "files")],
            ranges=[(_typed(r, str, "ranges"), _typed(s, int, r), _typed(m, int, r),
                     [(_typed(a, int, r), _typed(b, int, r)) for a, b in _rows(spans, 2, r)])
                    for r, s, m, spans in _rows(data["ranges"], 4, "ranges")],
            chunks=[(_typed(n, int, "chunks"), _digest(d), None) for n, d in _rows(data["chunks"], 2, "chunks")]
            if version == 2 else [(_typed(n, int, "chunks"), _digest(d), _typed(raw, int, "chunks"))
                                  for n, d, raw in _rows(data["chunks"], 3, "chunks")],
            trace=_typed(data.get("trace", 1), int, "trace"), version=version)
        rels = [*index.dirs, *(f[0] for f in index.files), *(r[0] for r in index.ranges),
                *(f"{d}/{e[0]}" for d, (_, entries) in index.dirs.items() for e in entries)]
        if index.checkpoint is not None:
            rels.append(index.checkpoint)
        if bad := next((r for r in rels if not _plain_relative(r)), None):
            raise ValueError(f"boot set index names {bad!r}, which is not a plain path inside the volume")
        return index


def _typed(value: Any, kind: type, where: str) -> Any:
    # bool is an int to isinstance; an index has no booleans
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"boot set index: {where!r} holds {type(value).__name__} where {kind.__name__} belongs")
    return value


def _rows(value: Any, width: int, where: str) -> list[list[Any]]:
    if not isinstance(value, list) or not all(isinstance(row, list) and len(row) == width for row in value):
        raise ValueError(f"boot set index: {where!r} is not a list of {width}-item lists")
    return value


def _digest(value: Any) -> str:
    if not isinstance(value, str) or re.fullmatch(r"[0-9a-f]{64}", value) is None:
        raise ValueError("boot set index: a chunk's digest is not a sha256 in lowercase hex")
    return value


# Parts of one or more characters, none of them NUL or '/', none '.' or '..', joined by single slashes.
_PLAIN = re.compile(r"(?!\.\.?(?:/|\Z))[^/\x00]+(?:/(?!\.\.?(?:/|\Z))[^/\x00]+)*\Z")


def _plain_relative(rel: object) -> bool:
    """A path the index may name: relative, inside the volume, no '..', '.', empty part or NUL."""
    return isinstance(rel, str) and _PLAIN.match(rel) is not None


def seal(data: dict[str, Any]) -> bytes:
    """index.json's bytes: the index, then the sha256 of everything before it, so that any byte changed
    since install (a disk error, an edit by hand) is seen without parsing the index twice."""
    body = json.dumps(data, separators=(",", ":")).encode()
    return body[:-1] + b',"seal":"' + hashlib.sha256(body).hexdigest().encode() + b'"}'


def load_index(layout: VolumeLayout) -> Index:
    """The recorded index, checked against its seal; BootSetError says why it cannot be used."""
    try:
        raw = read_regular(layout.boot_set_index, INDEX_LIMIT)
    except FileNotFoundError:
        raise BootSetError("no boot set recorded", "(run `forge-volume install` to record one)") from None
    except OSError as exc:
        raise BootSetError(f"the boot set's index cannot be read ({exc})") from None
    sealed = SEAL.search(raw)
    if sealed is None or hashlib.sha256(raw[:sealed.start()] + b"}").hexdigest() != sealed.group(1).decode():
        raise BootSetError(f"{layout.relative(layout.boot_set_index)} does not match its digest")
    try:
        data = json.loads(raw[:sealed.start()] + b"}")
    except ValueError as exc:
        raise BootSetError(f"the boot set's index is not valid ({exc})") from None
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        # Install ran a newer forge-volume than this worker's image: recording again here would undo it.
        raise BootSetError(f"the boot set was recorded by a newer forge-volume (index version {version}; this one "
                           f"reads {' and '.join(map(str, sorted(READS)))})",
                           "(update the worker's image to the forge-volume that ran `install`)")
    try:
        return Index.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise BootSetError(f"the boot set's index is not valid ({exc})") from None


def read_index(layout: VolumeLayout) -> Index | None:
    """The recorded index, or None when there is none (or it cannot be used: then it is as good as none)."""
    try:
        return load_index(layout)
    except BootSetError:
        return None


def archive_problem(layout: VolumeLayout, index: Index) -> str | None:
    """What is wrong with files.bin against the index's digests (one read of it), or None."""
    name = layout.relative(layout.boot_set_archive)
    try:
        fd = os.open(layout.boot_set_archive, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return f"{name} is missing"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_size != index.archive_size:
            return f"{name} changed size"
        offset = 0
        buffer = bytearray(PIECE)
        for length, digest, _ in index.chunks:
            sha = hashlib.sha256()
            end = offset + length
            while offset < end:
                got = os.preadv(fd, [memoryview(buffer)[:min(PIECE, end - offset)]], offset)
                if not got:
                    return f"{name} changed size"
                sha.update(memoryview(buffer)[:got])
                offset += got
            if sha.hexdigest() != digest:
                return f"{name} does not match its digest (bytes {end - length}-{end})"
    except OSError as exc:
        return f"{name} cannot be read ({exc})"
    finally:
        os.close(fd)
    return None


def spread_key(rel: str) -> int:
    """Where ``rel`` comes in ``changed``'s stats: a digest of its path, which scatters each folder's entries over
    the whole check. Some clients of a network volume serve the lookups of names in one folder one at a time (the
    FUSE client netvol measures with does); in the index's order, which lists a folder's entries together, the
    check's threads would queue on one folder after another (site-packages alone holds hundreds). Measured by
    ``scripts/bench_check.py``."""
    return zlib.crc32(rel.encode())


def changed(layout: VolumeLayout, index: Index, threads: int = STAT_THREADS, *, files: bool = True) -> str | None:
    """A file or folder of the boot set that differs on the volume from the index (one stat each, in parallel: a
    network volume answers them concurrently; in ``spread_key``'s order), or None when the set still describes
    the volume.

    ``files=False`` checks the folders only (a worker's boot: a fifth of the round trips). Whatever adds,
    removes or replaces a file changes its folder's mtime (pip, git, editors that save by renaming); only
    an edit in place does not, and ``install`` (which checks every file, and files.bin's digests) records
    the set again after one.
    """
    checks: list[tuple[str, int, int | None]] = [(rel, mtime, None) for rel, (mtime, _) in index.dirs.items()]
    if files:
        checks += [(rel, mtime, size) for rel, _, size, mtime, _ in index.files]
        checks += [(rel, mtime, size) for rel, size, mtime, _ in index.ranges]
    checks.append((layout.relative(layout.boot_set_archive), -1, index.archive_size))
    checks.sort(key=lambda item: spread_key(item[0]))

    def check(item: tuple[str, int, int | None]) -> str | None:
        rel, mtime, size = item
        try:
            st = os.stat(layout.absolute(rel), follow_symlinks=False)
        except OSError:
            return f"{rel} is missing"
        if size is not None and st.st_size != size:
            return f"{rel} changed size"
        if mtime != -1 and st.st_mtime_ns != mtime:
            return f"{rel} was modified"
        return None

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for problem in pool.map(check, checks):
            if problem:
                return problem
    # files.bin's bytes against their digests: a disk error keeps the size and the mtime.
    return archive_problem(layout, index) if files else None


# --- recording at install -----------------------------------------------------------------------

def _libraries_under(roots: Iterable[Path], minimum: int) -> Iterator[Path]:
    """Shared libraries (by name: ``*.so``, ``*.so.N``) of at least ``minimum`` bytes; only those are stat'ed."""
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                if not (name.endswith(".so") or ".so." in name):
                    continue
                path = Path(folder) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size >= minimum:
                    yield path


def evict_large_libraries(layout: VolumeLayout) -> int:
    """Drop the large shared libraries of the venv and the Python from the page cache (pip just wrote them:
    all cached), so that after the traced boot the cached pages are exactly those Forge touched. Best effort."""
    os.sync()
    count = 0
    for path in _libraries_under((layout.venv, layout.python_dir), BIG):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return count


_libc: Any = None


def _mincore_libc() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def resident_ranges(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of ``path`` that are in the page cache, as (offset, length), merged."""
    libc = _mincore_libc()
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if not size:
            return []
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            data = bytes(vec)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    spans: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate(data):
        if flag & 1 and start is None:
            start = i
        elif not flag & 1 and start is not None:
            spans.append((start * page, min(i * page, size) - start * page))
            start = None
    if start is not None:
        spans.append((start * page, size - start * page))
    return spans


def _in_trees(layout: VolumeLayout, path: str) -> str | None:
    """``path`` relative to the volume when it lies in a code tree, else None.

    Links in the path are kept where the path is already inside a tree (the mirror keeps them as links);
    a path from outside (the scratch's ``extensions`` link to the volume's) is followed into the tree.
    """
    for candidate in (os.path.normpath(path), os.path.realpath(path)):
        for tree in layout.code_trees:
            if candidate == str(tree) or candidate.startswith(f"{tree}/"):
                return layout.relative(Path(candidate))
    return None


def _listing(folder: Path) -> list[Entry]:
    entries: list[Entry] = []
    with os.scandir(folder) as scan:
        for entry in scan:
            if entry.is_symlink():
                entries.append((entry.name, "l", os.readlink(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                entries.append((entry.name, "d", ""))
            elif entry.is_file(follow_symlinks=False):
                entries.append((entry.name, "f", ""))
            else:
                entries.append((entry.name, "o", ""))
    return sorted(entries)


def build_index(layout: VolumeLayout, trace: dict[str, Any], key: str,
                checkpoints: Collection[str] | None = None) -> tuple[Index, list[Path]]:
    """The index for a traced boot, and the files to copy into the archive (in index order). Only a
    checkpoint in ``checkpoints`` (the lock's, relative to the volume; None: any) is recorded as the one
    to prefetch: a file the lock no longer lists is never chosen for a worker."""
    index = Index(key=key, root=str(layout.root))
    touched = {rel: spans for path, spans in (trace.get("touched") or {}).items()
               if (rel := _in_trees(layout, path)) is not None}
    copy: dict[str, None] = {}
    big: dict[str, None] = {}
    mapped = set(trace.get("mapped") or [])
    # Libraries keep the tracer's order (first mapped, first needed): the prefetch reads them in that order.
    for path in [*(trace.get("opened") or []), *(trace.get("mapped") or [])]:
        rel = _in_trees(layout, path)
        full = layout.absolute(rel) if rel else None
        if rel is None or full is None:
            if index.checkpoint is None and path.endswith(CHECKPOINT_SUFFIXES) and \
                    Path(path).is_relative_to(layout.models_dir) and Path(path).is_file():
                rel_path = layout.relative(Path(os.path.normpath(path)))
                if checkpoints is None or rel_path in checkpoints:
                    index.checkpoint = rel_path
            continue
        try:
            st = full.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if path in mapped and st.st_size >= BIG:
            big[rel] = None
        elif st.st_size <= OPENED_LIMIT:
            copy[rel] = None
        else:
            big[rel] = None
    for path in trace.get("stated") or []:
        rel = _in_trees(layout, path)
        if rel is None or rel in copy or rel in big:
            continue
        with contextlib.suppress(OSError):
            st = layout.absolute(rel).lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size <= STATED_LIMIT:
                copy[rel] = None
    for rel in big:
        copy.pop(rel, None)
    for rel in list(copy):
        # A module Python loaded from its .pyc has the .py as __file__; code that takes its realpath (to find
        # files beside it, to extend sys.path) must land in the mirror, so the source is copied too.
        source = _source_of(rel)
        if source and source not in copy and layout.absolute(source).is_file():
            copy[source] = None
    folders: set[str] = set()
    for rel in [*copy, *big]:
        parent = os.path.dirname(rel)
        while parent and parent not in folders:
            folders.add(parent)
            parent = os.path.dirname(parent)
    # The interpreter starts from the venv's bin/ (and finds pyvenv.cfg beside it) before any trace. A folder
    # Forge only probed (a stat of a name in it, found or not) is laid out too: on the mirror the answer is
    # local, where through a link each probe would be a round trip to the volume (800 of them before Forge
    # answered, with the lab's venv: cv2's stub folders, find_spec of optional packages).
    for path in [str(layout.venv_python), *(trace.get("listed") or []), *(trace.get("probed") or [])]:
        rel = _in_trees(layout, path)
        if rel is not None and path == str(layout.venv_python):
            rel = os.path.dirname(rel)
        if rel is not None and layout.absolute(rel).is_dir() and not layout.absolute(rel).is_symlink():
            while rel and rel not in folders:
                folders.add(rel)
                rel = os.path.dirname(rel)
    # A folder whose path runs through a link cannot be mirrored as a folder: the link is kept instead.
    folders = {f for f in folders if not any(layout.absolute(a).is_symlink() for a in _ancestors(f))}
    for rel in sorted(folders):
        full = layout.absolute(rel)
        index.dirs[rel] = (full.stat().st_mtime_ns, _listing(full))
    offset = 0
    files: list[Path] = []
    for rel in copy:
        if os.path.dirname(rel) not in index.dirs:
            continue
        full = layout.absolute(rel)
        st = full.lstat()
        index.files.append((rel, offset, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)))
        files.append(full)
        offset += st.st_size
    for rel in big:
        if os.path.dirname(rel) not in index.dirs:
            continue
        full = layout.absolute(rel)
        st = full.lstat()
        try:
            spans = [(int(o), int(n)) for o, n in touched[rel]] if rel in touched else resident_ranges(full)
        except (OSError, TypeError, ValueError):
            spans = []
        spans = [(o, min(n, st.st_size - o)) for o, n in spans if 0 <= o < st.st_size and n > 0]
        index.ranges.append((rel, st.st_size, st.st_mtime_ns, spans))
    return index, files


def _source_of(rel: str) -> str | None:
    """``pkg/mod.py`` for ``pkg/__pycache__/mod.cpython-311.pyc``, else None."""
    folder, name = os.path.split(rel)
    if os.path.basename(folder) != "__pycache__" or not name.endswith(".pyc"):
        return None
    return os.path.join(os.path.dirname(folder), name.split(".", 1)[0] + ".py")


def _ancestors(rel: str) -> Iterator[str]:
    while rel:
        yield rel
        rel = os.path.dirname(rel)


def write(layout: VolumeLayout, index: Index, files: list[Path]) -> None:
    """Write the archive, a zstd frame per chunk with its digest, then the sealed index (last: an interrupted write
    leaves no index, so no boot set)."""
    layout.boot_set_dir.mkdir(parents=True, exist_ok=True)
    layout.boot_set_index.unlink(missing_ok=True)
    tmp = layout.boot_set_archive.with_name(f".{layout.boot_set_archive.name}.{os.getpid()}.tmp")
    index.chunks, index.version = [], VERSION
    try:
        with open(tmp, "wb") as out:
            for group in _groups(index.files):
                members = [(index.files[i][0], index.files[i][2], files[i]) for i in group]
                index.chunks.append(_write_chunk(out, members))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, layout.boot_set_archive)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(layout.boot_set_index, seal(index.to_json()).decode())


def _groups(files: list[tuple[str, int, int, int, int]]) -> list[list[int]]:
    """The files of each chunk, by position: whole files, up to ``CHUNK`` bytes (a larger file alone)."""
    groups: list[list[int]] = []
    length = 0
    for i, (_, _, size, _, _) in enumerate(files):
        if not groups or (length and length + size > CHUNK):  # a chunk holds whole files: one reader checks each
            groups.append([])
            length = 0
        groups[-1].append(i)
        length += size
    return groups


def _write_chunk(out: Any, members: list[tuple[str, int, Path]]) -> Chunk:
    """One chunk's files, as one zstd frame, onto ``out``: (its length, its sha256, the files' bytes)."""
    raw = sum(size for _, size, _ in members)
    sha = hashlib.sha256()
    stored = 0
    compressor = zstandard.ZstdCompressor(level=LEVEL).compressobj(size=raw)

    def emit(data: bytes) -> None:
        nonlocal stored
        out.write(data)
        sha.update(data)
        stored += len(data)

    for rel, size, path in members:
        with open(path, "rb") as src:
            copied = 0
            while data := src.read(min(8 << 20, size - copied)):
                emit(compressor.compress(data))
                copied += len(data)
        if copied != size:
            raise OSError(f"{rel} changed while the boot set was written")
    emit(compressor.flush())
    return stored, sha.hexdigest(), raw


def summary(index: Index) -> str:
    prefetch = sum(length for _, _, _, spans in index.ranges for _, length in spans)
    return (f"boot set: {len(index.files)} files ({human_bytes(index.files_size)}, "
            f"{human_bytes(index.archive_size)} in files.bin) in {len(index.dirs)} folders, "
            f"{len(index.ranges)} large libraries ({human_bytes(prefetch)} to prefetch)"
            + (f", checkpoint {index.checkpoint}" if index.checkpoint else ""))


def changed_since_recorded(problem: str) -> str:
    """The one line for a volume that no longer matches its boot set (``problem``, as ``changed`` words it),
    with the fix."""
    return f"the volume changed since the boot set was recorded: {problem} (run `forge-volume install`)"
