"""The boot set's index, checked as hostile input, turned into what the lay-out makes under the mirror.

The index is read from a shared volume that pods, helper jobs and people write: it may be corrupt or
crafted. ``plan`` accepts it only when it describes a tree that can be made under the mirror without
ever leaving it, and says why not otherwise (the worker then boots Forge from the volume):

- every recorded folder is a code tree (``venv``, ``python``, the checkout, ``extensions``) or a
  folder its recorded parent lists as a folder; every entry of a listing is one plain name (no ``/``,
  not ``.`` or ``..``), once, of a known kind;
- every copied file lies in a recorded folder that lists it as a file; the files tile what ``files.bin``
  unpacks to (offsets and sizes non-negative, one after another from 0, nothing shared, nothing past
  its end), and each lies whole in one digested chunk; a compressed chunk unpacks to exactly the
  bytes its files need, or the lay-out fails (``provision.boot.unpack``);
- modes are reduced to permission bits (no setuid, setgid or sticky bit reaches the mirror).

Links are made where the listing has a link (led into the mirror when they stay in the code trees),
and for every entry that is not copied (led to the volume): made by name in a folder the lay-out
created, they are never followed while the mirror is made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from provision.boot.boot_set import Index
from volume_layout import VolumeLayout

KINDS = frozenset("dflo")
CFG = "pyvenv.cfg"
_NAME = re.compile(r"(?!\.\.?\Z)[^/\x00]+\Z")


class Refused(ValueError):
    """The index breaks a rule of the lay-out: the fast boot is off for this start."""


@dataclass(frozen=True)
class File:
    folder: str  # a recorded folder, relative to the mirror
    name: str
    offset: int
    size: int
    mtime: int
    mode: int


@dataclass
class Chunk:
    offset: int  # where its bytes are in files.bin
    length: int  # how many
    digest: str  # their sha256
    start: int  # where its files' bytes begin in the unpacked bytes (``offset`` in a version 2 set)
    raw: int | None = None  # a zstd frame that unpacks to this many bytes; None: the files' bytes as they are
    files: list[File] = field(default_factory=list)  # their offsets count in the unpacked bytes

    @property
    def unpacked(self) -> int:
        return self.length if self.raw is None else self.raw


@dataclass
class Plan:
    folders: list[str]  # parents before their children
    chunks: list[Chunk]
    links: list[tuple[str, str, str]]  # (folder, name, target); folder "" is the mirror itself
    cfg_folder: str | None  # where the venv's pyvenv.cfg is written (moved home), when it may be

    @property
    def size(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    @property
    def files(self) -> int:
        return sum(len(chunk.files) for chunk in self.chunks)


def plan(layout: VolumeLayout, index: Index, mirror: Path, *, cfg: bool) -> Plan:
    """What to make under ``mirror`` for ``index``; ``cfg``: the venv's pyvenv.cfg is to be rewritten."""
    trees = {layout.relative(t) for t in layout.code_trees}
    listings: dict[str, dict[str, tuple[str, str]]] = {}
    for folder, (_, entries) in index.dirs.items():
        listing: dict[str, tuple[str, str]] = {}
        for name, kind, target in entries:
            if _NAME.match(name) is None:
                raise Refused(f"{folder} lists {name!r}, which is not a plain name")
            if name in listing:
                raise Refused(f"{folder} lists {name!r} twice")
            if kind not in KINDS or (kind == "l") != bool(target) or "\x00" in target:
                raise Refused(f"{folder}/{name} has kind {kind!r} and target {target!r}")
            listing[name] = (kind, target)
        listings[folder] = listing
    for folder in index.dirs:
        parent, _, name = folder.rpartition("/")
        if not parent and folder not in trees:
            raise Refused(f"{folder} is not one of the code trees")
        if parent and (parent not in listings or listings[parent].get(name, ("",))[0] != "d"):
            raise Refused(f"{folder} is not a folder its recorded parent lists")
    chunks = _chunks(index, listings)
    local = {f"{f.folder}/{f.name}" for chunk in chunks for f in chunk.files}
    cfg_folder = None
    venv = layout.relative(layout.venv)
    if cfg and listings.get(venv, {}).get(CFG, ("",))[0] == "f":
        cfg_folder = venv  # a folder the lay-out makes: never the volume's, even when venv is a link there
        local.add(f"{venv}/{CFG}")
    return Plan(sorted(index.dirs, key=lambda rel: rel.count("/")), chunks,
                _links(layout, index, mirror, listings, local, trees), cfg_folder)


def _chunks(index: Index, listings: dict[str, dict[str, tuple[str, str]]]) -> list[Chunk]:
    chunks, offset, unpacked = [], 0, 0
    for length, digest, raw in index.chunks:
        if length < 0 or (raw is not None and raw < 0):
            raise Refused(f"a chunk of files.bin has length {length} and unpacks to {raw}")
        chunks.append(Chunk(offset, length, digest, start=unpacked, raw=raw))
        offset += length
        unpacked += chunks[-1].unpacked
    seen: set[str] = set()
    at, which = 0, 0
    for rel, start, size, mtime, mode in sorted(index.files, key=lambda f: (f[1], f[2])):
        folder, _, name = rel.rpartition("/")
        if listings.get(folder, {}).get(name, ("",))[0] != "f":
            raise Refused(f"{rel} is not a file its recorded folder lists")
        if rel in seen:
            raise Refused(f"{rel} is recorded twice")
        seen.add(rel)
        if start != at or size < 0:
            raise Refused(f"{rel} has offset {start} and size {size} in files.bin; the files before it end at {at}")
        while which < len(chunks) and start + size > chunks[which].start + chunks[which].unpacked:
            which += 1
        if which == len(chunks) or start < chunks[which].start:
            raise Refused(f"{rel} (bytes {start}-{start + size}) is not inside one chunk of files.bin")
        # Permission bits only: a setuid, setgid or sticky bit never reaches the mirror.
        chunks[which].files.append(File(folder, name, start, size, mtime, (mode & 0o777) or 0o644))
        at = start + size
    if at != unpacked:
        raise Refused(f"files.bin unpacks to {unpacked} bytes by its chunks, its files {at}")
    return chunks


def _links(layout: VolumeLayout, index: Index, mirror: Path, listings: dict[str, dict[str, tuple[str, str]]],
           local: set[str], trees: set[str]) -> list[tuple[str, str, str]]:
    """(folder, name, target) for every entry of the mirrored folders that is neither a mirrored folder nor a
    local file, and for every code tree that is not mirrored. Plain strings: a boot set has ~20,000 of them."""
    links: list[tuple[str, str, str]] = []
    root = str(layout.root)
    for tree in sorted(trees):
        if tree not in index.dirs and os.path.lexists(layout.absolute(tree)):
            links.append(("", tree, f"{root}/{tree}"))
    for folder, listing in listings.items():
        for name, (kind, target) in listing.items():
            rel = f"{folder}/{name}"
            if (kind == "d" and rel in index.dirs) or (kind == "f" and rel in local):
                continue
            link = volume_target(layout, index, mirror, folder, target) if kind == "l" else f"{root}/{rel}"
            links.append((folder, name, link))
    return links


def volume_target(layout: VolumeLayout, index: Index, mirror: Path, folder: str, target: str) -> str:
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
