"""Model files on the volume: hashing, state.json records, and whether a file can be trusted unread.

A file whose size and mtime equal its state.json record is trusted without reading it (like
huggingface_hub's per-file metadata, stale once the mtime moves); any other file is hashed once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from provision.errors import DownloadCancelled, LockError, PathError, StateError
from provision.fetch.cancel import current_cancel
from provision.fetch.partials import is_download_temp
from provision.fetch.sources import shown_source
from provision.forge.files import RULE_FILES, forge_own_files
from provision.forge.first_use import is_hf_cache_ref
from provision.records.lockfile import FIRST_USE_KIND, LockedModel
from provision.records.model_records import Record, records, trusted
from provision.records.state import now, read_state, record_model, update_state
from volume_layout import MODEL_KIND_DIRS, LayoutError, VolumeLayout

READ = 8 << 20
TARGET_LOCK_WAIT = 4 * 3600.0  # another process may be fetching a big checkpoint over a slow link

def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's sha256; a cancel (``provision.fetch.cancel``) stops it between two 8 MiB reads."""
    digest = hashlib.sha256()
    cancel = current_cancel()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(READ)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"{path.name}: cancelled while checking its sha256")
            digest.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content (how the hub names files it keeps in git, not LFS)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(READ):
            digest.update(chunk)
    return digest.hexdigest()


def make_record(layout: VolumeLayout, path: Path, *, kind: str | None, source: str, sha256: str,
                revision: str | None = None) -> Record:
    st = path.stat()
    entry: Record = {"path": layout.relative(path), "kind": kind, "source": shown_source(source), "sha256": sha256,
                     "size": st.st_size, "mtime": st.st_mtime, "recorded": now()}
    if revision:
        entry["revision"] = revision
    return entry


def save_records(layout: VolumeLayout, entries: list[Record]) -> None:
    if not entries:
        return

    def change(state: dict[str, Any]) -> None:
        for entry in entries:
            record_model(state, entry)

    update_state(layout, change)


def forget_records(layout: VolumeLayout, paths: set[str]) -> None:
    if not paths:
        return

    def change(state: dict[str, Any]) -> None:
        state["models"] = [m for m in state.get("models") or [] if m.get("path") not in paths]

    update_state(layout, change)


def target_lock(layout: VolumeLayout, path: Path, timeout: float = TARGET_LOCK_WAIT) -> FileLock:
    """The per-target lock: one process at a time fetches a given file (others wait, then find it done)."""
    layout.locks_dir.mkdir(parents=True, exist_ok=True)
    key = "model-" + layout.relative(path)
    if len(key.encode()) > 200:  # keep the lock file's name within the filesystem's 255 bytes
        key = "model-" + hashlib.sha1(key.encode()).hexdigest()
    return FileLock(str(layout.lock_file(key)), timeout=timeout)


def locked_target(layout: VolumeLayout, model: LockedModel) -> Path:
    """Where a locked model lives; the lock's recorded path must be the one its kind and name give
    (a first-use file's: a plain path under models/ ending in its name)."""
    if model.kind == FIRST_USE_KIND:
        try:
            path = layout.under_models(model.path)
        except LayoutError as exc:
            raise LockError(f"lock entry {model.path!r}: {exc}") from None
        if path.name != model.name:
            raise LockError(f"lock entry {model.path!r} is named {model.name!r}: the path must end in its name")
        return fenced(layout, path)
    try:
        path = layout.model_path(model.kind, model.name)
    except LayoutError as exc:
        raise LockError(f"lock entry {model.kind}/{model.name}: {exc}") from None
    if layout.relative(path) != model.path:
        raise LockError(f"lock entry {model.kind}/{model.name} says path {model.path!r}, "
                        f"but its kind and name put it at {layout.relative(path)!r}")
    fenced(layout, path)
    return path


def fenced(layout: VolumeLayout, path: Path) -> Path:
    """The one fence (``VolumeLayout.inside_models``) for a model path forge-volume itself chose (from
    the lock): a kind folder that is a link out of models/ would have it write or delete elsewhere."""
    try:
        layout.inside_models(path)
    except LayoutError as exc:
        folder = layout.relative(path.parent)
        raise PathError(str(exc),
                        f"make {folder} a real folder on the volume (move the link aside), then run this again",
                        job_hint=f"make {folder} a real folder on the volume (on a pod with this volume), "
                                 "then send the job again") from None
    return path


def destination(layout: VolumeLayout, dest: str | Path, name: str | None) -> Path:
    """A caller-given destination, which must stay under models/: a file path, or a folder (one that
    exists, ends in '/', or is a kind's folder such as models/Lora) to put ``name`` in."""
    try:
        path = layout.inside_models(dest)
        kind_folders = {layout.kind_dir(k).resolve() for k in MODEL_KIND_DIRS}
        if str(dest).endswith("/") or path.is_dir() or path in kind_folders:
            if not name:
                raise PathError(f"{str(dest)!r} is a folder and no file name was given")
            path = layout.inside_models(path / name)
    except LayoutError as exc:
        raise PathError(str(exc)) from None
    return path


def model_files(layout: VolumeLayout) -> Iterator[Path]:
    """Every model file under models/ (regular files and links, not followed; hidden files skipped).

    Files Forge made itself (``forge_files``) are not models: they are neither extras nor pruned."""
    try:
        own = forge_own_files(read_state(layout))
    except StateError:
        own = RULE_FILES
    for folder, dirs, files in os.walk(layout.models_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            rel = layout.relative(path)
            if not name.startswith(".") and rel not in own and not is_hf_cache_ref(rel):
                yield path


def temp_files(layout: VolumeLayout) -> Iterator[Path]:
    """Temporary and resumable files of downloads (finished, abandoned or in progress)."""
    for folder, dirs, files in os.walk(layout.models_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if is_download_temp(name):
                yield Path(folder) / name


def partials(layout: VolumeLayout) -> list[tuple[str, int]]:
    """Every download temporary or kept partial under models/ with its size in bytes (volume-relative
    paths, sorted): what `status` and `verify` report as strays."""
    found = []
    for temp in temp_files(layout):
        try:
            found.append((layout.relative(temp), temp.lstat().st_size))
        except FileNotFoundError:
            continue  # its download just finished or claimed it
    return sorted(found)


def temp_target(temp: Path) -> Path | None:
    """The final path a temporary file belongs to (``.x.safetensors.1a2b3c4d.part`` -> ``x.safetensors``)."""
    name = temp.name[1:]
    if name.endswith(".partial"):
        return temp.with_name(name[: -len(".partial")])
    stem, _, random = name[: -len(".part")].rpartition(".")
    return temp.with_name(stem) if stem and len(random) == 8 else None


@dataclass(frozen=True)
class Check:
    """What a locked model's file looks like on the volume."""

    model: LockedModel
    path: Path
    status: str  # ok | missing | wrong-size | wrong-hash | unchecked
    sha256: str | None = None  # the file's hash, when known
    size: int | None = None
    adopt: bool = False  # hashed now and good: record it


def check(layout: VolumeLayout, model: LockedModel, recs: dict[str, Record], *, hash_files: bool,
          deep: bool = False, on_bytes: Callable[[int], None] | None = None) -> Check:
    """Compare one locked model with its file; reads the file only when it is not trusted (or ``deep``)."""
    path = locked_target(layout, model)
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):  # a file where its kind's folder should be: missing too
        return Check(model, path, "missing")
    if model.size is not None and size != model.size:
        return Check(model, path, "wrong-size", size=size)
    record = recs.get(model.path)
    if trusted(path, record) and not deep:
        sha = str(record["sha256"]) if record else None
        ok = model.sha256 is None or sha == model.sha256
        return Check(model, path, "ok" if ok else "wrong-hash", sha256=sha, size=size)
    if not hash_files:
        return Check(model, path, "unchecked", size=size)
    sha = sha256_file(path, on_bytes)
    if model.sha256 is not None and sha != model.sha256:
        return Check(model, path, "wrong-hash", sha256=sha, size=size)
    return Check(model, path, "ok", sha256=sha, size=size, adopt=not trusted(path, record))


@dataclass(frozen=True)
class VolumeFile:
    """One model file under models/, as ``status --files`` and ``verify`` describe it."""

    path: str  # relative to the volume's root
    kind: str | None
    size: int
    source: str | None  # where it came from: the lock's source, else its state.json record's
    status: str  # pinned (in the lock with a sha256) | listed (in the lock, no sha256 yet) | extra (not in the lock)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "bytes": self.size, "source": self.source,
                "status": self.status}


def inventory(layout: VolumeLayout, models: list[LockedModel] | None) -> list[VolumeFile]:
    """Every model file under models/ with its kind, size, source and standing against the lock's
    ``models`` (all files are extras when there is no lock)."""
    locked = {m.path: m for m in models or []}
    recs = records(layout)
    found = []
    for file in sorted(model_files(layout)):
        rel = layout.relative(file)
        try:
            size = file.lstat().st_size
        except FileNotFoundError:
            continue  # removed while we looked
        model = locked.get(rel)
        record = recs.get(rel) or {}
        if model is not None:
            found.append(VolumeFile(rel, model.kind, size, shown_source(model.source),
                                    "pinned" if model.sha256 else "listed"))
        else:
            source = record.get("source")
            found.append(VolumeFile(rel, record.get("kind") or layout.kind_of(file), size,
                                    str(source) if source else None, "extra"))
    return found
