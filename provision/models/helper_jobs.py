"""The worker's model helpers: fetch one model by source, mirror a Hugging Face repo into models/.

Both are atomic and verified like every download, hold the per-target lock, record what they
wrote in state.json, and refuse any destination outside the volume's models folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from provision.download import download
from provision.errors import ChecksumError, ForgeVolumeError, PathError, SourceError
from provision.hub import Tokens, hf_credential, hf_file_url, list_hf_repo, remote_for
from provision.models import files as mf
from provision.models.pool import POOL, Bars, hold_target, parallel, raise_failures, require_volume
from provision.netguard import AddressGuard
from provision.progress import Progress
from provision.sources import parse_source, shown_source
from volume_layout import LayoutError, VolumeLayout, check_file_name

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_sha(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise SourceError(f"sha256 {value[:80]!r} is not 64 hexadecimal digits", "pass the file's sha256, or none")
    return value


def fetch_model(layout: VolumeLayout, *, source: str, kind: str | None = None, name: str | None = None,
                sha256: str | None = None, dest: str | Path | None = None, progress: Progress,
                tokens: Tokens | None = None, guard: AddressGuard | None = None) -> dict[str, Any]:
    """Download one model into ``models/<Kind>/<name>`` (or ``dest``, which must stay under models/).

    Atomic and verified (against ``sha256``, else the host's checksum when it has one), recorded in
    state.json. A file already there with the right content is not fetched again. ``guard`` fences
    every connection the download opens (the worker passes one for URLs a job sent).
    """
    require_volume(layout)
    expected = _check_sha(sha256)
    parsed = parse_source(source)
    shown = shown_source(source)  # what state.json, messages and the job's result may hold
    remote = remote_for(parsed, tokens=tokens)
    if expected and remote.sha256 and expected != remote.sha256:
        raise ChecksumError(f"{shown}: the request pins sha256 {expected} but the host says {remote.sha256}")
    expected = expected or remote.sha256
    file_name = name or remote.name or parsed.default_name
    try:
        if file_name is not None:
            check_file_name(file_name)
        if dest:
            path = mf.destination(layout, dest, file_name)
            kind = kind or layout.kind_of(path)
        elif kind is None:
            raise PathError("a model kind or a destination path is required")
        elif file_name is None:
            raise PathError(f"cannot tell a file name for {shown}; pass one")
        else:
            path = layout.model_path(kind, file_name)
    except LayoutError as exc:
        raise PathError(str(exc)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
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
        bars = Bars(progress, None)
        bar, on_bytes = bars.file(remote.size, path.name)
        try:
            got = download(remote.url, path, sha256=expected, size=remote.size, credential=remote.credential,
                           on_bytes=on_bytes, what=rel, guard=guard)
        finally:
            bar.close()
        mf.save_records(layout, [mf.make_record(layout, path, kind=kind, source=str(parsed), sha256=got.sha256,
                                                revision=remote.revision)])
    return {"path": rel, "kind": kind, "source": shown, "sha256": got.sha256, "size": got.size,
            "downloaded": True, "bytes": got.transferred}


def sync_hf_repo(layout: VolumeLayout, *, repo_id: str, revision: str | None = None, kind: str | None = None,
                 dest: str | Path | None = None, progress: Progress, token: str | None = None) -> dict[str, Any]:
    """Mirror a Hugging Face repo's files (folders kept) into a models folder, skipping files already right."""
    require_volume(layout)
    try:
        if dest:
            base = layout.inside_models(dest)
        elif kind:
            base = layout.kind_dir(kind)
        else:
            raise PathError("a model kind or a sync path under models/ is required")
    except LayoutError as exc:
        raise PathError(str(exc)) from None
    tokens = {"HF_TOKEN": token} if token else None
    commit, entries = list_hf_repo(repo_id, revision, tokens)
    jobs: list[tuple[Path, Any]] = []
    for entry in entries:
        try:
            for part in entry.path.split("/"):
                check_file_name(part)
            target = layout.inside_models(base / entry.path)
        except LayoutError as exc:
            raise PathError(f"hf://{repo_id}: file {entry.path!r} cannot be placed: {exc}") from None
        jobs.append((target, entry))
    file_kind = kind or layout.kind_of(base)
    recs = mf.records(layout)
    total = sum(e.size or 0 for _, e in jobs)
    bars = Bars(progress, total)

    def one(job: tuple[Path, Any]) -> tuple[bool, int]:
        target, entry = job
        source = f"hf://{repo_id}/{entry.path}@{commit}"
        with hold_target(layout, target, layout.relative(target)):
            if _hf_file_current(layout, target, entry, recs.get(layout.relative(target)), file_kind, source):
                if bars.total is not None:
                    bars.total.update(entry.size or 0)
                return False, 0
            bar, on_bytes = bars.file(entry.size, entry.path)
            try:
                got = download(hf_file_url(repo_id, entry.path, commit), target, sha256=entry.sha256,
                               size=entry.size, credential=hf_credential(tokens),
                               on_bytes=on_bytes, what=layout.relative(target))
            finally:
                bar.close()
            mf.save_records(layout, [mf.make_record(layout, target, kind=file_kind, source=source,
                                                    sha256=got.sha256, revision=commit)])
            return True, got.transferred

    try:
        results = parallel(jobs, one, POOL, bars.cancelled)
    finally:
        bars.close()
    raise_failures([(layout.relative(t), r) for (t, _), r in zip(jobs, results, strict=True)
                     if isinstance(r, ForgeVolumeError)])
    done = [r for r in results if isinstance(r, tuple)]
    return {"repo_id": repo_id, "revision": commit, "path": layout.relative(base), "files": len(jobs),
            "downloaded": sum(1 for fetched, _ in done if fetched),
            "skipped": sum(1 for fetched, _ in done if not fetched), "bytes": sum(n for _, n in done)}


def _hf_file_current(layout: VolumeLayout, target: Path, entry: Any, record: mf.Record | None,
                     kind: str | None, source: str) -> bool:
    """Whether a mirrored file already holds the hub's content (recorded, else hashed once and adopted)."""
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
    mf.save_records(layout, [mf.make_record(layout, target, kind=kind, source=source, sha256=sha)])
    return True
