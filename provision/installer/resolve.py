"""Resolving a spec into a lock: every git ref to a commit, every model to a pinned revision and checksum.

Like ``uv lock``, locking again re-resolves only what the spec changed since the lock was written:
an entry whose spec text is unchanged keeps its commit, revision, sha256 and size (a checksum
measured at a first download included), so a lock with nothing changed needs no network. A branch
or tag moves to its new commit only when asked (``upgrade``: everything, or named entries).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from provision.errors import LockError, SpecError
from provision.fetch.sources import shown_source
from provision.installer.gitops import is_full_sha, redact_url, resolve_ref
from provision.progress import Progress
from provision.records.lockfile import (
    Lock,
    LockedExtension,
    LockedFirstUse,
    LockedForge,
    LockedModel,
    forge_differences,
    model_unchanged,
    pair_models,
    read_lock,
    write_lock,
)
from provision.records.spec import ExtensionSpec, ModelSpec, Spec

UPGRADE_ALL = "*"  # in ``upgrade``: every entry


@dataclass(frozen=True)
class Change:
    """One entry of the lock that locking changed: ``forge``, ``extension NAME`` or ``model PATH``."""

    what: str
    verb: str  # added | removed | moved | pinned | changed
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what}: {self.verb}" + (f" {self.detail}" if self.detail else "")


@dataclass
class Relocked:
    lock: Lock = field(init=False)
    changes: list[Change] = field(default_factory=list)
    resolved: int = 0  # entries resolved over the network
    warnings: list[str] = field(default_factory=list)


def _short(commit: str) -> str:
    return commit[:12]


def known_names(spec: Spec, previous: Lock | None) -> list[str]:
    """What ``--upgrade NAME`` and ``remove NAME`` accept: forge, extension names, model names and kind/name."""
    names = ["forge", *(e.name for e in spec.extensions)]
    if spec.forge.features or (previous and previous.first_use):
        names.append("features")  # --upgrade features: resolve the features' files again
    models = [(m.kind, m.name) for m in (previous.models if previous else [])]
    models += [(m.kind, m.name) for m in spec.models if m.name]
    for kind, name in dict.fromkeys(models):
        names.append(f"{kind}/{name}")
    return list(dict.fromkeys(names))


def model_matches_name(kind: str, name: str | None, wanted: str) -> bool:
    """Whether ``wanted`` names this model: its file name, or KIND/NAME."""
    return name is not None and wanted in (name, f"{kind}/{name}")


def unknown_name(spec: Spec, previous: Lock | None, wanted: Iterable[str]) -> str | None:
    """The first of ``wanted`` that names no entry of the spec or the lock (UPGRADE_ALL is fine)."""
    known = known_names(spec, previous)
    bare = {k.split("/", 1)[1] for k in known if "/" in k}
    return next((n for n in wanted if n != UPGRADE_ALL and n not in known and n not in bare), None)


def _asked(upgrade: Collection[str], *names: str | None) -> bool:
    return UPGRADE_ALL in upgrade or any(n in upgrade for n in names if n)


def _forge(spec: Spec, previous: Lock | None, upgrade: Collection[str], progress: Progress,
           out: Relocked) -> LockedForge:
    f = spec.forge
    settings: dict[str, Any] = {"python": f.python, "torch": list(f.torch), "torch_index_url": f.torch_index_url,
                                "args": list(f.args), "env": dict(f.env)}
    old = previous.forge if previous else None
    same_ref = old is not None and (old.repo, old.ref) == (f.repo, f.ref)
    if old is not None and same_ref and (not _asked(upgrade, "forge") or is_full_sha(f.ref)):
        commit = old.commit
    else:
        progress.info(f"resolving Forge {f.ref} in {redact_url(f.repo)}")
        commit = resolve_ref(f.repo, f.ref)
        out.resolved += 1
    if old is None:
        out.changes.append(Change("forge", "added", f"{f.ref} at {_short(commit)}"))
    elif not same_ref or commit != old.commit:
        was = f"{old.ref} {_short(old.commit)}" + (f" in {redact_url(old.repo)}" if old.repo != f.repo else "")
        out.changes.append(Change("forge", "moved", f"{was} → {f.ref} {_short(commit)}"))
    if previous is not None:
        for key, new, was in forge_differences(spec, previous):
            if key not in ("repo", "ref"):
                out.changes.append(Change(f"forge.{key}", "changed", f"{was!r} → {new!r}"))
    return LockedForge(repo=f.repo, ref=f.ref, commit=commit, features=list(f.features),
                       features_mirror=f.features_mirror, **settings)


def _extension(ext: ExtensionSpec, old: LockedExtension | None, upgrade: Collection[str], progress: Progress,
               out: Relocked) -> LockedExtension:
    same_ref = old is not None and (old.repo, old.ref) == (ext.repo, ext.ref)
    if old is not None and same_ref and (not _asked(upgrade, ext.name) or is_full_sha(ext.ref)):
        commit = old.commit
    else:
        progress.info(f"resolving extension {ext.name} {ext.ref} in {redact_url(ext.repo)}")
        commit = resolve_ref(ext.repo, ext.ref)
        out.resolved += 1
    what = f"extension {ext.name}"
    if old is None:
        out.changes.append(Change(what, "added", f"{ext.ref} at {_short(commit)}"))
    elif not same_ref or commit != old.commit:
        out.changes.append(Change(what, "moved", f"{old.ref} {_short(old.commit)} → {ext.ref} {_short(commit)}"))
    elif (list(ext.pip), ext.files) != (old.pip, old.files):
        out.changes.append(Change(what, "changed", "pip or files"))
    return LockedExtension(name=ext.name, repo=ext.repo, ref=ext.ref, commit=commit, pip=list(ext.pip),
                           files=dict(ext.files))


def _model_change(old: LockedModel, new: LockedModel) -> Change | None:
    """How a re-resolved model entry differs from its previous one (None: not at all)."""
    parts = []
    if old.source != new.source:
        parts.append(f"source {shown_source(old.source)} → {shown_source(new.source)}")
    if old.path != new.path:
        parts.append(f"path {old.path} → {new.path}")
    if old.revision != new.revision:
        parts.append(f"revision {_short(old.revision or '-')} → {_short(new.revision or '-')}")
    if old.sha256 != new.sha256 and old.sha256 is not None:
        parts.append(f"sha256 {_short(old.sha256)}… → {_short(new.sha256) + '…' if new.sha256 else 'unknown'}")
    if old.size != new.size:
        parts.append(f"size {old.size} → {new.size}")
    verb = "moved" if old.revision != new.revision or old.source != new.source else "changed"
    if old.sha256 is None and new.sha256 is not None:
        parts.append(f"sha256 {_short(new.sha256)}… ({new.pinned_by})")
        verb = "pinned" if not parts[:-1] else verb
    return Change(f"model {new.path}", verb, ", ".join(parts)) if parts else None


def _kept_pin(old: LockedModel, new: LockedModel) -> LockedModel:
    """A model upgraded with all the others keeps a sha256 measured at its first download while nothing
    says its file changed (same source, path, revision and size): a plain URL has no version to move to.
    Named on its own (``--upgrade NAME``), it is measured again at its next download."""
    if new.sha256 is None and old.sha256 is not None and \
            (old.source, old.path, old.revision, old.size) == (new.source, new.path, new.revision, new.size):
        return replace(new, sha256=old.sha256, pinned_by=old.pinned_by)
    return new


def _models(spec: Spec, previous: Lock | None, upgrade: Collection[str], progress: Progress,
            out: Relocked) -> list[LockedModel]:
    pairs, removed = pair_models(spec.models, previous.models if previous else [])
    todo: list[tuple[int, ModelSpec, LockedModel | None]] = []
    result: list[LockedModel | None] = []
    for i, (model, old) in enumerate(pairs):
        asked = old is not None and _asked(upgrade, old.name, f"{old.kind}/{old.name}")
        if old is not None and model_unchanged(model, old) and not asked:
            result.append(old)
        else:
            result.append(None)
            todo.append((i, model, old))
    if todo:
        from provision.models import resolve_models  # pulls in huggingface_hub: only when a model needs it

        resolved = resolve_models([m for _, m, _ in todo], progress)
        out.resolved += len(todo)
        for (i, _, old), new in zip(todo, resolved.models, strict=True):
            if old is None:
                pin = f"sha256 {_short(new.sha256)}… ({new.pinned_by})" if new.sha256 else "sha256 at first download"
                rev = f"revision {_short(new.revision)}, " if new.revision else ""
                out.changes.append(Change(f"model {new.path}", "added", f"from {shown_source(new.source)}: {rev}{pin}"))
            else:
                named = old.name in upgrade or f"{old.kind}/{old.name}" in upgrade
                new = new if named else _kept_pin(old, new)
                change = _model_change(old, new)
                if change is not None:
                    out.changes.append(change)
            result[i] = new
        out.warnings += resolved.warnings
    out.changes += [Change(f"model {m.path}", "removed") for m in removed]
    return [m for m in result if m is not None]


def check_distinct_paths(models: Sequence[LockedModel]) -> None:
    """Refuse two entries that map to one file: compared case-insensitively, as the volume may be
    served to tools (or filesystems) that fold case."""
    seen: dict[str, LockedModel] = {}
    for model in models:
        other = seen.setdefault(model.path.lower(), model)
        if other is not model:
            raise SpecError(f"models {other.kind} {shown_source(other.source)} and {model.kind} "
                            f"{shown_source(model.source)} both go to {model.path}"
                            + (f" (as {other.path})" if other.path != model.path else ""),
                            "give one of them another `name = \"...\"` in the spec")


def relock(spec: Spec, previous: Lock | None, progress: Progress, upgrade: Collection[str] = ()) -> Relocked:
    """Lock ``spec``, keeping from ``previous`` every entry the spec did not change (no network for those).

    ``upgrade``: names of entries to resolve again even if unchanged (``forge``, an extension, a model
    name or kind/name), or UPGRADE_ALL.
    """
    out = Relocked()
    forge = _forge(spec, previous, upgrade, progress, out)
    locked_ext = {e.name: e for e in previous.extensions} if previous else {}
    extensions = [_extension(ext, locked_ext.pop(ext.name, None), upgrade, progress, out) for ext in spec.extensions]
    out.changes += [Change(f"extension {name}", "removed") for name in locked_ext]
    models = _models(spec, previous, upgrade, progress, out)
    first_use = _first_use(spec, previous, upgrade, progress, out)
    check_distinct_paths([*models, *first_use])
    out.lock = Lock(forge=forge, extensions=extensions, models=models, first_use=first_use)
    return out


def _first_use(spec: Spec, previous: Lock | None, upgrade: Collection[str], progress: Progress,
               out: Relocked) -> list[LockedFirstUse]:
    """The files the spec's features fetch (``provision.forge.first_use``), pinned like URL models."""
    old = previous.first_use if previous else []
    if not spec.forge.features and not old:
        return []
    from provision.models.first_use import resolve_first_use  # pulls in requests: only with features

    files, resolved = resolve_first_use(spec.forge.features, spec.forge.features_mirror, old, progress,
                                        again=_asked(upgrade, "features"))
    out.resolved += resolved
    before = {f.path: f for f in old}
    for new in files:
        was = before.pop(new.path, None)
        if was is None:
            out.changes.append(Change(f"file {new.path}", "added", f"for feature {new.feature!r} from "
                                      f"{shown_source(new.source)}"))
        elif (change := _model_change(was, new)) is not None:
            out.changes.append(Change(f"file {new.path}", change.verb, change.detail))
    out.changes += [Change(f"file {f.path}", "removed", f"(feature {f.feature!r})") for f in before.values()]
    return files


def lock_spec(spec: Spec, progress: Progress) -> Lock:
    """Resolve all of ``spec`` (network: git ls-remote, and the model hosts when there are models)."""
    result = relock(spec, None, progress)
    for warning in result.warnings:
        progress.info(warning)
    return result.lock


class UnknownEntryError(SpecError):
    """``--upgrade NAME`` (or ``remove NAME``) names no entry of the spec or the lock."""


@dataclass
class LockUpdate:
    """What ``forge-volume lock`` did: the changes, entry by entry, and whether the file was written."""

    path: Path
    lock: Lock
    changes: list[Change]
    warnings: list[str]
    written: bool
    resolved: int

    def lines(self) -> list[str]:
        out = [str(c) for c in self.changes]
        counts = (f"Forge {_short(self.lock.forge.commit)}, {len(self.lock.extensions)} extension(s), "
                  f"{len(self.lock.models)} model(s)")
        if self.lock.first_use:
            counts += f", {len(self.lock.first_use)} file(s) for {len(self.lock.forge.features)} feature(s)"
        if self.written:
            return [*out, f"wrote {self.path}: {counts}"]
        again = f"; resolved {self.resolved} entr{'y' if self.resolved == 1 else 'ies'} again: all current" \
            if self.resolved else ""
        return [f"no changes: {self.path} matches the spec ({counts}){again}"]


def update_lock(spec: Spec, lock_path: Path, progress: Progress, upgrade: Collection[str] = ()) -> LockUpdate:
    """Lock ``spec`` into ``lock_path``, re-resolving only what changed (and what ``upgrade`` names).

    The file is rewritten only when its content changes. An unreadable old lock is resolved afresh.
    """
    previous: Lock | None = None
    warnings: list[str] = []
    if lock_path.exists():
        try:
            previous = read_lock(lock_path)
        except LockError as exc:
            warnings.append(f"warning: {exc.message}; resolving every entry again")
    bad = unknown_name(spec, previous, upgrade)
    if bad is not None:
        raise UnknownEntryError(f"{bad!r} is not an entry of the spec or the lock; known: "
                                f"{', '.join(known_names(spec, previous))}",
                                "name `forge`, an extension, or a model by its file name (or KIND/NAME)")
    result = relock(spec, previous, progress, upgrade)
    changed = result.lock != previous
    if changed:
        write_lock(lock_path, result.lock)
        if not result.changes:
            result.changes.append(Change("lock", "rewritten", "to follow the spec's order and format"))
    return LockUpdate(lock_path, result.lock, result.changes, warnings + result.warnings, changed, result.resolved)
