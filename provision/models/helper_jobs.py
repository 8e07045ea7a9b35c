"""The worker's model helpers: fetch one model by source, mirror a Hugging Face repo into models/.

Both are atomic and verified like every download, hold the per-target lock, record what they
wrote in state.json, and refuse any destination outside the volume's models folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from provision.errors import ChecksumError, ForgeVolumeError, PathError, ReplaceError, SourceError
from provision.fetch.download import Download, Http, download
from provision.fetch.hub import Tokens, hf_credential, hf_file_url, list_hf_repo, remote_for
from provision.fetch.netguard import AddressGuard
from provision.fetch.sources import check_repo_id, parse_source, shown_source
from provision.models import files as mf
from provision.models.overwrite import OverwriteGuard
from provision.models.pool import POOL, Bars, hold_target, parallel, raise_failures, require_volume
from provision.progress import Progress
from volume_layout import MODEL_KIND_DIRS, LayoutError, VolumeLayout, check_file_name

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


def _check_sha(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise SourceError(f"sha256 {value[:80]!r} is not 64 hexadecimal digits", "pass the file's sha256, or none")
    return value


def _placed(what: str, check: Callable[..., T], *args: Any) -> T:
    """Run a layout check; its refusal becomes a PathError (a caller's mistake, said in one line)."""
    try:
        return check(*args)
    except LayoutError as exc:
        raise PathError(f"{what}{exc}" if what else str(exc)) from None


def _make_parent(layout: VolumeLayout, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way (a race with the fence's check), or a read-only volume
        raise PathError(f"cannot create the folder {layout.relative(path.parent)}: {exc.strerror}") from None


@dataclass(frozen=True)
class ModelRequest:
    """One model a helper job asks for: its ``source``; where it goes (``kind``'s folder, or ``dest``, a file or
    folder that must stay under models/; ``name``: the file's name); the ``sha256`` it must have; the
    ``tokens`` and address ``guard`` its requests use (the worker passes a guard for URLs a job sent); and
    whether it may replace another model (``overwrite``, see ``models.overwrite``)."""

    source: str
    kind: str | None = None
    name: str | None = None
    dest: str | Path | None = None
    sha256: str | None = None
    tokens: Tokens | None = None
    guard: AddressGuard | None = None
    overwrite: bool = False


def fetch_model(layout: VolumeLayout, request: ModelRequest, progress: Progress) -> dict[str, Any]:
    """Download one model into ``models/<Kind>/<name>`` (or its ``dest``, which must stay under models/).

    Atomic and verified (against the request's sha256, else the host's checksum when it has one),
    recorded in state.json. A file already there with the right content is not fetched again; one with
    other content is replaced only with ``overwrite``. Every path goes through the one fence,
    ``VolumeLayout.inside_models``, before any request.
    """
    source, kind, name, dest = request.source, request.kind, request.name, request.dest
    tokens, guard, overwrite = request.tokens, request.guard, request.overwrite
    require_volume(layout)
    expected = _check_sha(request.sha256)
    parsed = parse_source(source)
    shown = shown_source(source)  # what state.json, messages and the job's result may hold
    if name is not None:
        _placed("", check_file_name, name)
    if dest:
        _placed("", layout.inside_models, dest)
    elif kind is None:
        raise PathError("a model kind or a destination path is required")
    else:
        _placed("", layout.inside_models, _placed("", layout.kind_dir, kind) / "x")
    remote = remote_for(parsed, tokens=tokens)
    if expected and remote.sha256 and expected != remote.sha256:
        raise ChecksumError(f"{shown}: the request pins sha256 {expected} but the host says {remote.sha256}")
    expected = expected or remote.sha256
    file_name = name or remote.name or parsed.default_name
    if file_name is not None:
        _placed(f"{shown}: ", check_file_name, str(file_name))
    if dest:
        path = _placed("", mf.destination, layout, dest, file_name)
        kind = kind or layout.kind_of(path)
    elif file_name is None:
        raise PathError(f"cannot tell a file name for {shown}; pass one")
    else:
        path = layout.model_path(str(kind), file_name)
        _placed("", layout.inside_models, path)  # the kind folder may be a link out of models/
    _make_parent(layout, path)
    rel = layout.relative(path)
    with hold_target(layout, path, rel):
        record = mf.records(layout).get(rel)
        have = None
        if mf.trusted(path, record) and record:
            same_source = record.get("source") == shown
            have = record["sha256"] if (expected is None and same_source) or record["sha256"] == expected else None
        elif expected and path.is_file() and (remote.size is None or path.stat().st_size == remote.size):
            have = expected if mf.sha256_file(path) == expected else None
            if have:
                mf.save_records(layout, [mf.make_record(layout, path, kind=kind, source=str(parsed), sha256=have,
                                                        revision=remote.revision)])
        if have:
            return {"path": rel, "kind": kind, "source": shown, "sha256": have, "size": path.stat().st_size,
                    "downloaded": False, "bytes": 0}
        keeper = OverwriteGuard.load(layout, overwrite=overwrite)
        pinned = keeper.check(path, rel, str(parsed), expected)
        bars = Bars(progress, None)
        bar, on_bytes = bars.file(remote.size, path.name)
        try:
            got = download(Download(remote.url, path, sha256=expected or pinned, size=remote.size, what=rel,
                                    http=Http(credential=remote.credential, guard=guard)), on_bytes)
        except ChecksumError:
            if pinned and not expected:
                raise keeper.pinned_mismatch(rel, str(parsed)) from None
            raise
        finally:
            bar.close()
        mf.save_records(layout, [mf.make_record(layout, path, kind=kind, source=str(parsed), sha256=got.sha256,
                                                revision=remote.revision)])
    return {"path": rel, "kind": kind, "source": shown, "sha256": got.sha256, "size": got.size,
            "downloaded": True, "bytes": got.transferred}


def _kind_folder(repo_id: str, path: str) -> str:
    """For a sync into the models root: the kind folder a repo file's top folder names (any case)."""
    top = path.split("/", 1)[0]
    folders = {folder.lower(): folder for folder in MODEL_KIND_DIRS.values()}
    if top.lower() not in folders:
        raise PathError(f"hf://{repo_id}: folder {top!r} is not a model kind folder (known: "
                        f"{', '.join(MODEL_KIND_DIRS.values())})",
                        'sync into one kind instead, with "kind" or a "sync_path" such as models/Lora')
    return folders[top.lower()]


@dataclass(frozen=True)
class RepoRequest:
    """A Hugging Face repo a helper job asks to mirror: ``repo_id`` at ``revision`` (default: its main branch);
    where it goes (``kind``'s folder, ``dest`` under models/, or with ``by_kind_folder`` each top folder of
    the repo into the kind folder it names); the hub ``token``; and whether it may replace another model."""

    repo_id: str
    revision: str | None = None
    kind: str | None = None
    dest: str | Path | None = None
    by_kind_folder: bool = False
    token: str | None = None
    overwrite: bool = False


def sync_hf_repo(layout: VolumeLayout, request: RepoRequest, progress: Progress) -> dict[str, Any]:
    """Mirror a Hugging Face repo's files (folders kept) into a models folder, skipping files already right.

    With ``by_kind_folder`` (the original worker's form: the models root as the destination) only files
    inside the repo's folders are mirrored, each top folder into the kind folder it names
    (``Lora/x`` -> ``models/Lora/x``); files at the repo's root are skipped, and a folder that is not a
    kind folder fails the whole sync before anything is written. A file that would replace another
    model is refused the same way (see ``models.overwrite``), unless ``overwrite``.
    """
    repo_id, revision, kind, dest = request.repo_id, request.revision, request.kind, request.dest
    by_kind_folder, token, overwrite = request.by_kind_folder, request.token, request.overwrite
    require_volume(layout)
    check_repo_id(repo_id)
    if by_kind_folder:
        base = layout.models_dir
    elif dest:
        base = _placed("", layout.inside_models, dest)
    elif kind:
        base = _placed("", layout.kind_dir, kind)
        _placed("", layout.inside_models, base / "x")  # the kind folder may be a link out of models/
    else:
        raise PathError("a model kind or a sync path under models/ is required")
    tokens = {"HF_TOKEN": token} if token else None
    commit, entries = list_hf_repo(repo_id, revision, tokens)
    if by_kind_folder:
        entries = [e for e in entries if "/" in e.path]
    jobs: list[tuple[Path, Any]] = []
    for entry in entries:
        where = entry.path if not by_kind_folder else "/".join(
            (_kind_folder(repo_id, entry.path), entry.path.split("/", 1)[1]))
        for part in entry.path.split("/"):
            _placed(f"hf://{repo_id}: file {entry.path!r} cannot be placed: ", check_file_name, part)
        target = _placed(f"hf://{repo_id}: file {entry.path!r} cannot be placed: ",
                         layout.inside_models, base / where)
        jobs.append((target, entry))
    recs = mf.records(layout)
    keeper = OverwriteGuard.load(layout, overwrite=overwrite,
                       hint='send "overwrite": true to replace it, or sync into a sub-folder of its own '
                            '(e.g. "sync_path": "Lora/<name>")')

    def source_of(entry: Any) -> str:
        return f"hf://{repo_id}/{entry.path}@{commit}"

    # Refuse before anything is written: every file that would replace another model, named at once.
    conflicts = []
    for target, entry in jobs:
        rel = layout.relative(target)
        if not _hf_file_current(layout, target, entry, recs.get(rel), None, source_of(entry), record_it=False):
            try:
                keeper.check(target, rel, source_of(entry), entry.sha256)
            except ReplaceError as exc:
                conflicts.append(exc)
    if conflicts:
        raise ReplaceError("; ".join(c.message for c in conflicts), conflicts[0].hint)
    total = sum(e.size or 0 for _, e in jobs)
    bars = Bars(progress, total)

    def one(job: tuple[Path, Any]) -> tuple[bool, int]:
        target, entry = job
        rel = layout.relative(target)
        file_kind = kind if kind and not by_kind_folder else layout.kind_of(target)
        with hold_target(layout, target, rel):
            record = mf.records(layout).get(rel)
            if _hf_file_current(layout, target, entry, record, file_kind, source_of(entry)):
                if bars.total is not None:
                    bars.total.update(entry.size or 0)
                return False, 0
            pinned = OverwriteGuard(keeper.pins, {rel: record} if record else {}, overwrite, keeper.hint).check(
                target, rel, source_of(entry), entry.sha256)
            _make_parent(layout, target)
            bar, on_bytes = bars.file(entry.size, entry.path)
            try:
                got = download(Download(hf_file_url(repo_id, entry.path, commit), target,
                                        sha256=entry.sha256 or pinned, size=entry.size, what=rel,
                                        http=Http(credential=hf_credential(tokens))), on_bytes)
            except ChecksumError:
                if pinned and not entry.sha256:
                    raise keeper.pinned_mismatch(rel, source_of(entry)) from None
                raise
            finally:
                bar.close()
            mf.save_records(layout, [mf.make_record(layout, target, kind=file_kind, source=source_of(entry),
                                                    sha256=got.sha256, revision=commit)])
            return True, got.transferred

    try:
        results = parallel(jobs, one, POOL, bars.cancelled)
    finally:
        bars.close()
    raise_failures([(layout.relative(t), r) for (t, _), r in zip(jobs, results, strict=True)
                     if isinstance(r, ForgeVolumeError)])
    fetched = [layout.relative(t) for (t, _), r in zip(jobs, results, strict=True) if isinstance(r, tuple) and r[0]]
    done = [r for r in results if isinstance(r, tuple)]
    return {"repo_id": repo_id, "revision": commit, "path": layout.relative(base), "files": len(jobs),
            "downloaded": len(fetched), "skipped": sum(1 for fetched, _ in done if not fetched),
            "bytes": sum(n for _, n in done), "fetched": fetched}


def _hf_file_current(layout: VolumeLayout, target: Path, entry: Any, record: mf.Record | None,
                     kind: str | None, source: str, *, record_it: bool = True) -> bool:
    """Whether a mirrored file already holds the hub's content (recorded, else hashed once and adopted,
    unless ``record_it`` is false: a look before the sync starts writing)."""
    if not target.is_file() or (entry.size is not None and target.stat().st_size != entry.size):
        return False
    if entry.sha256:
        if mf.trusted(target, record) and record:
            return bool(record["sha256"] == entry.sha256)
        sha = mf.sha256_file(target)
        if sha != entry.sha256:
            return False
    else:  # a file kept in git: the hub gives its git blob id, not a sha256
        if entry.blob_id and mf.git_blob_sha1(target) != entry.blob_id:
            return False
        sha = mf.sha256_file(target)
    if record_it:
        mf.save_records(layout, [mf.make_record(layout, target, kind=kind, source=source, sha256=sha)])
    return True
