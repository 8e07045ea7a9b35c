"""``forge-volume add`` and ``remove``: one model into (or out of) the spec, the lock and the volume.

``add`` checks its input before the spec is touched, locks only the new entry (every other pin is
kept, and only the new model's host is asked), then writes the spec (comments and layout kept) and
the lock, and fetches what the lock now holds and the volume lacks: the models step of install,
nothing else (Forge, the venv and the extensions are not looked at). ``remove`` takes an entry out of
the spec and the lock; its file stays on the volume unless ``delete`` is asked.
Both hold the volume's writer lock, so they never interleave with an install or a refresh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomlkit

from provision.commands.install import keep_copies, record_models_step
from provision.errors import ForgeVolumeError, LockError, SpecError
from provision.fetch.partials import is_download_temp, partial_path
from provision.fetch.sources import parse_source, shown_source
from provision.installer.resolve import Change, UnknownEntryError, model_matches_name, relock
from provision.models import files as mf
from provision.models.pool import human, require_volume
from provision.models.refresh import ModelsReport, sync_models
from provision.progress import Progress
from provision.records.atomic import write_atomic
from provision.records.lockfile import (
    Lock,
    LockedModel,
    check_matches,
    lock_path_for,
    pair_models,
    read_lock,
    write_lock,
)
from provision.records.spec import ModelSpec, Spec, parse_spec
from provision.records.spec_edit import with_model, without_model
from provision.records.volume_lock import hold_volume
from volume_layout import MODEL_KIND_DIRS, LayoutError, VolumeLayout, check_file_name, known_kinds

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass
class Added:
    change: Change | str  # str: the model was already in the spec and the lock (an interrupted add, resumed)
    spec_path: Path
    lock_path: Path
    warnings: list[str]
    report: ModelsReport | None  # None with install=False

    def lines(self) -> list[str]:
        out = [str(self.change)] + ([] if isinstance(self.change, str) else
                                    [f"wrote {self.spec_path} and {self.lock_path}"])
        if self.report is None:
            return [*out, "not fetched: run `forge-volume refresh-models` to put it on the volume"]
        r = self.report  # the full summary went to the progress output
        done = [f"fetched {p} ({human(n)})" for p, n in r.fetched + r.repaired] + \
            [f"found {p} already on the volume" for p in r.adopted] + \
            [f"pinned {p} at sha256 {s} (measured at its first download)" for p, s in r.pinned]
        return [*out, *done, f"models: {len(r.fetched) + len(r.repaired)} fetched, {human(r.transferred)} "
                f"transferred, {r.unchanged} already correct"]


@dataclass
class Removed:
    model: LockedModel
    spec_path: Path
    lock_path: Path
    deleted: bool
    present: bool

    def lines(self) -> list[str]:
        out = [f"model {self.model.path}: removed from {self.spec_path} and {self.lock_path}"]
        if self.deleted:
            out.append(f"deleted {self.model.path}")
        elif self.present:
            out.append(f"the file stays on the volume ({self.model.path}); `remove --delete` also deletes it, "
                       "`refresh-models --prune` deletes every file the lock does not list")
        return out


def _locked_spec(spec_path: Path) -> tuple[str, Spec, Lock]:
    """The spec's text, the spec, and its lock, which must describe it (else an add would lock other edits)."""
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {spec_path} does not exist",
                        "write one with `forge-volume init --preset sdxl`, or pass --spec FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {spec_path}: {exc}") from None
    spec = parse_spec(text, spec_path)
    lock_path = lock_path_for(spec_path)
    if not lock_path.exists():
        raise LockError(f"there is no lock at {lock_path} yet",
                        "run `forge-volume lock` or `forge-volume install` first: add and remove edit a locked spec")
    lock = read_lock(lock_path)
    check_matches(spec, lock, lock_path)
    return text, spec, lock


def _entry(kind: str, source: str, name: str | None, sha256: str | None) -> dict[str, Any]:
    """The new [[models]] table, each value checked (a bad one fails before anything is written)."""
    if kind not in MODEL_KIND_DIRS:
        raise SpecError(f"unknown model kind {kind!r}; known kinds: {known_kinds()}", "give one of the known kinds")
    parse_source(source)  # SourceError names the accepted forms
    entry: dict[str, Any] = {"kind": kind, "source": source}
    if name is not None:
        try:
            check_file_name(name)
        except LayoutError as exc:
            raise SpecError(f"--name {name[:80]!r} is not usable as a file name: {exc}",
                            "give a plain file name such as my-lora.safetensors") from None
        if is_download_temp(name) or name.startswith("."):
            raise SpecError(f"--name {name!r} is a hidden name (the downloader's temporary files look like that)",
                            "give a plain file name such as my-lora.safetensors")
        entry["name"] = name
    if sha256 is not None:
        if not _SHA256.match(sha256.strip()):
            raise SpecError(f"--sha256 {sha256[:80]!r} is not 64 hexadecimal digits",
                            "give the file's sha256, or leave it out: the host's or the first download's is pinned")
        entry["sha256"] = sha256.strip().lower()
    return entry


def add_model(layout: VolumeLayout, spec_path: Path, *, kind: str, source: str, name: str | None = None,
              sha256: str | None = None, progress: Progress, install: bool = True) -> Added:
    """Add one model to the spec and the lock (resolving only it) and, with ``install``, fetch it."""
    entry = _entry(kind, source, name, sha256)
    require_volume(layout)
    lock_path = lock_path_for(spec_path)
    with hold_volume(layout, "add"):
        text, spec, lock = _locked_spec(spec_path)
        model = parse_spec(tomlkit.dumps({"models": [entry]}), spec_path).models[0]  # read as the spec would
        same = next((m for m in spec.models if m.key == model.key), None)
        added: Change | str
        if same is not None and _same_entry(same, model):
            # The same add again (after a Ctrl-C, a lost connection): the entry is in; finish the fetch.
            new_lock, warnings = lock, []
            pairs, _ = pair_models(spec.models, lock.models)
            paired = pairs[spec.models.index(same)][1]
            if paired is None:  # check_matches holds the lock to the spec: every entry has its locked model
                raise LockError(f"the lock has no entry for the spec's {kind} model {same.name!r}")
            locked = paired
            added = f"model {locked.path}: already in the spec and the lock; fetching it"
        elif same is not None:
            what = f"{model.name!r} (from {shown_source(str(same.source))})" if model.name else \
                f"from {shown_source(source)}"
            raise SpecError(f"the spec already has the {kind} model {what}",
                            "give it another --name, or `forge-volume remove` the old one")
        else:
            new_text = with_model(spec_path, text, entry)
            new_spec = parse_spec(new_text, spec_path)
            result = relock(new_spec, lock, progress)  # only the new entry is resolved: the rest matches the lock
            added = next(c for c in result.changes if c.verb == "added")
            write_atomic(spec_path, new_text)
            write_lock(lock_path, result.lock)
            new_lock, warnings = result.lock, result.warnings
            locked = new_lock.models[-1]
        report = None
        if install:
            try:
                # Its summary is this command's output (Added.lines): not printed twice.
                report = sync_models(layout, new_lock, lock_path, progress, summary=False)
            except ForgeVolumeError as exc:
                exc.hint = (f"{exc.hint}; {locked.path} is in the spec and the lock now: `forge-volume "
                            f"refresh-models` fetches it, `forge-volume remove {locked.name}` takes it out")
                raise
            record_models_step(layout, read_lock(lock_path), done_before=None)
            keep_copies(layout, spec_path, lock_path)
    return Added(added, spec_path, lock_path, warnings, report)


def _same_entry(old: ModelSpec, new: ModelSpec) -> bool:
    """Whether ``new`` is what an earlier ``add`` put in: same kind, name and source (and no other sha256)."""
    return (old.kind, old.name, str(old.source)) == (new.kind, new.name, str(new.source)) and \
        new.sha256 in (None, old.sha256)


def _find(spec: Spec, lock: Lock, wanted: str) -> tuple[int, LockedModel]:
    pairs, _ = pair_models(spec.models, lock.models)
    found = [(i, locked) for i, (_, locked) in enumerate(pairs)
             if locked is not None and model_matches_name(locked.kind, locked.name, wanted)]
    if not found:
        known = ", ".join(f"{m.kind}/{m.name}" for m in lock.models) or "none"
        raise UnknownEntryError(f"{wanted!r} is not a model of the spec; models: {known}",
                                "name a model by its file name, or KIND/NAME")
    if len(found) > 1:
        raise UnknownEntryError(f"{wanted!r} names {len(found)} models: "
                                f"{', '.join(f'{m.kind}/{m.name}' for _, m in found)}", "name it as KIND/NAME")
    return found[0]


def remove_model(layout: VolumeLayout, spec_path: Path, wanted: str, *, delete: bool) -> Removed:
    """Take one model out of the spec and the lock; with ``delete`` also delete its file and partial."""
    lock_path = lock_path_for(spec_path)
    require_volume(layout)
    with hold_volume(layout, "remove"):
        text, spec, lock = _locked_spec(spec_path)
        index, locked = _find(spec, lock, wanted)
        target = mf.locked_target(layout, locked)  # fenced before anything changes
        new_text = without_model(spec_path, text, index)
        parse_spec(new_text, spec_path)
        new_lock = replace(lock, models=[m for m in lock.models if m is not locked])
        write_atomic(spec_path, new_text)
        write_lock(lock_path, new_lock)
        record_models_step(layout, new_lock, done_before=lock)
        present = target.exists()
        if delete:
            target.unlink(missing_ok=True)
            partial_path(target).unlink(missing_ok=True)
            mf.forget_records(layout, {locked.path})
        keep_copies(layout, spec_path, lock_path)
    return Removed(locked, spec_path, lock_path, delete and present, present)
