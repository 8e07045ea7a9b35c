"""Make the volume's models match the lock: check, fetch, repair, pin, plan, refresh and prune.

Every download goes through ``provision.fetch.download`` under a per-target file lock, and is recorded
in state.json (path, kind, source, sha256, size, mtime) so later runs trust it without reading it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from filelock import Timeout

from provision.errors import ChecksumError, ForgeVolumeError, NoSourceError
from provision.fetch.download import Download, Downloaded, Http, download
from provision.fetch.hub import Tokens, remote_for
from provision.fetch.partials import sweep_leftovers
from provision.fetch.sources import VOLUME_SOURCE, parse_source, shown_source
from provision.models import files as mf
from provision.models.pool import (
    POOL,
    Bars,
    LazyBar,
    hold_target,
    human,
    parallel,
    raise_failures,
    require_volume,
)
from provision.progress import Progress
from provision.records.lockfile import Lock, LockedModel, check_matches, read_lock, write_lock
from provision.records.spec import load_spec
from provision.records.volume_lock import hold_volume
from volume_layout import VolumeLayout

STALE_TEMP = 3600.0  # a temporary file untouched this long, with its target lock free, is abandoned


@dataclass
class ModelsReport:
    """What a sync or refresh did (or, in a dry run, would do), in files and bytes."""

    dry_run: bool = False
    fetched: list[tuple[str, int]] = field(default_factory=list)
    repaired: list[tuple[str, int]] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    pinned: list[tuple[str, str]] = field(default_factory=list)  # (path, sha256) trusted on first use
    pruned: list[tuple[str, int]] = field(default_factory=list)
    unchanged: int = 0
    transferred: int = 0  # bytes received over the network
    seconds: float = 0.0

    def summary(self) -> str:
        dry = self.dry_run
        verbs = {"fetched": "would fetch" if dry else "fetched", "repaired": "would repair" if dry else "repaired",
                 "pruned": "would prune" if dry else "pruned"}
        parts = [f"{verbs[k]} {len(getattr(self, k))} file(s) ({human(sum(s for _, s in getattr(self, k)))})"
                 for k in ("fetched", "repaired", "pruned") if getattr(self, k) or k != "pruned"]
        if self.adopted:
            parts.append(f"adopted {len(self.adopted)} already present")
        head = "models: " + ", ".join(parts) + f"; {self.unchanged} already correct"
        if not dry:
            head += f"; {human(self.transferred)} transferred in {self.seconds:.1f} s"
        lines = [head]
        for key in ("fetched", "repaired", "pruned"):
            lines += [f"  {verbs[key]} {path} ({human(size)})" for path, size in getattr(self, key)]
        lines += [f"  pinned {path} at sha256 {sha} (trust on first use: measured at its first download, "
                  "now written into the lock)" for path, sha in self.pinned]
        if dry:
            lines.append("dry run: nothing was changed")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("fetched", "repaired", "pruned"):
            data[key] = [{"path": p, "bytes": s} for p, s in getattr(self, key)]
        data["pinned"] = [{"path": p, "sha256": s} for p, s in self.pinned]
        data["summary"] = self.summary()
        return data


# --- making the volume match the lock ----------------------------------------------------------------

def _fetch_locked(layout: VolumeLayout, model: LockedModel, bars: Bars, tokens: Tokens | None
                  ) -> tuple[LockedModel, Downloaded | None]:
    """Fetch one locked model under its target lock; None when another process got it there first."""
    path = mf.locked_target(layout, model)
    with hold_target(layout, path, model.path):
        # Another process may have fetched it while we waited: it would have recorded it, so a
        # trusted record suffices (the file was hashed already, before the lock).
        again = mf.check(layout, model, mf.records(layout), hash_files=False)
        if again.status == "ok":
            return _pin(model, again.sha256, again.size), None
        if model.source == VOLUME_SOURCE:
            raise NoSourceError(f"{model.path} is {_said(again.status)}, and it has no source (kept from the volume "
                                f"by adopt, sha256 {model.sha256}): it cannot be downloaded again")
        remote = remote_for(parse_source(model.source), revision=model.revision, tokens=tokens)
        bar, on_bytes = bars.file(model.size, model.name)
        try:
            got = download(Download(remote.url, path, sha256=model.sha256, size=model.size, what=model.path,
                                    http=Http(credential=remote.credential)), on_bytes)
        except ChecksumError as exc:  # locking again keeps the pin: only an upgrade takes the new file
            upgrade = f"forge-volume lock --upgrade {model.name}"
            raise ChecksumError(exc.message, "the file changed upstream or the download was corrupted; "
                                f"if the change is intended, take it with `{upgrade}`",
                                job_hint="the file changed upstream or the download was corrupted; if the change "
                                f"is intended, lock it again on a pod with this volume (the CLI's lock --upgrade "
                                f"{model.name}), then send the job again"
                                ) from None
        finally:
            bar.close()
        mf.save_records(layout, [mf.make_record(layout, path, kind=model.kind, source=model.source,
                                                sha256=got.sha256, revision=model.revision)])
        return _pin(model, got.sha256, got.size), got


def _said(status: str) -> str:
    return {"missing": "missing", "wrong-size": "of another size than the lock says",
            "wrong-hash": "changed (another sha256)"}.get(status, status)


def _pin(model: LockedModel, sha: str | None, size: int | None) -> LockedModel:
    if model.sha256 is not None or sha is None:
        return model
    return replace(model, sha256=sha, size=size if size is not None else model.size, pinned_by="first-download")


def _check_all(layout: VolumeLayout, lock: Lock, progress: Progress) -> list[mf.Check]:
    recs = mf.records(layout)
    hashing = LazyBar(progress, "checking unrecorded files")
    try:
        return [mf.check(layout, m, recs, hash_files=True, on_bytes=hashing.update) for m in lock.files]
    finally:
        hashing.close()


def _fetch_all(layout: VolumeLayout, todo: list[mf.Check], progress: Progress, tokens: Tokens | None
               ) -> list[tuple[LockedModel, Downloaded | None] | ForgeVolumeError]:
    total = sum(c.model.size or 0 for c in todo) if all(c.model.size for c in todo) else None
    progress.info(f"fetching {len(todo)} model file(s)" + (f" ({human(total)})" if total else ""))
    bars = Bars(progress, total)
    try:
        return parallel(todo, lambda c: _fetch_locked(layout, c.model, bars, tokens), POOL, bars.cancelled)
    finally:
        bars.close()


def _sync(layout: VolumeLayout, lock: Lock, lock_path: Path, progress: Progress, *, dry_run: bool,
          tokens: Tokens | None) -> ModelsReport:
    started = time.monotonic()
    checks = _check_all(layout, lock, progress)
    todo = [c for c in checks if c.status != "ok"]
    ok = [c for c in checks if c.status == "ok"]
    report = ModelsReport(dry_run=dry_run, unchanged=len(ok))
    if dry_run:
        for c in todo:
            (report.fetched if c.status == "missing" else report.repaired).append((c.model.path, c.model.size or 0))
        return report
    adopted = [c for c in ok if c.adopt and c.sha256]
    mf.save_records(layout, [mf.make_record(layout, c.path, kind=c.model.kind, source=c.model.source,
                                            sha256=str(c.sha256), revision=c.model.revision) for c in adopted])
    report.adopted = [c.model.path for c in adopted]
    for c in ok:  # a good file needs no partial: a stale one (a killed run's, say) goes
        sweep_leftovers(c.path)
    pins = [_pin(c.model, c.sha256, c.size) for c in ok if c.model.sha256 is None and c.sha256]
    failures: list[tuple[str, ForgeVolumeError]] = []
    for c, result in zip(todo, _fetch_all(layout, todo, progress, tokens) if todo else [], strict=True):
        if isinstance(result, ForgeVolumeError):
            failures.append((c.model.path, result))
            continue
        model, got = result
        if model is not c.model:
            pins.append(model)
        if got is None:  # another process put it there while we waited for its lock
            report.unchanged += 1
            continue
        report.transferred += got.transferred
        (report.fetched if c.status == "missing" else report.repaired).append((c.model.path, got.size))
    if pins:  # written even when another model failed: these hashes were measured and verified
        new_lock = lock
        for model in pins:
            new_lock = new_lock.with_model(model)
        write_lock(lock_path, new_lock)
        report.pinned = [(m.path, str(m.sha256)) for m in pins]
    report.seconds = time.monotonic() - started
    raise_failures(failures)
    return report


def sync_models(layout: VolumeLayout, lock: Lock, lock_path: Path, progress: Progress,
                tokens: Tokens | None = None, *, summary: bool = True) -> ModelsReport:
    """Make every locked model present and verified (the caller holds the volume's writer lock). ``summary``:
    print what was done on the progress output (off when the caller prints the report itself)."""
    report = _sync(layout, lock, lock_path, progress, dry_run=False, tokens=tokens)
    if summary and (report.fetched or report.repaired or report.pinned or report.adopted):
        progress.info(report.summary())
    return report


def refresh_models(layout: VolumeLayout, lock_path: Path, *, prune: bool, dry_run: bool, progress: Progress,
                   tokens: Tokens | None = None, spec_path: Path | None = None) -> ModelsReport:
    """Fetch what is missing, repair what fails its checksum, optionally prune files the lock does not list.

    With ``spec_path`` (when that file exists), refuses with StaleLockError, naming each entry, when the
    spec was edited after locking: the lock would not hold a model just added, nor prune spare one removed.
    """
    require_volume(layout)
    lock = read_lock(lock_path)
    if spec_path is not None and spec_path.exists():
        check_matches(load_spec(spec_path), lock, lock_path)
    if dry_run:  # writes nothing, so it need not wait for (or block) a writer
        report = _sync(layout, lock, lock_path, progress, dry_run=True, tokens=tokens)
        if prune:
            report.pruned = _prune(layout, lock, dry_run=True)
        return report
    with hold_volume(layout, "refresh-models"):
        report = _sync(layout, lock, lock_path, progress, dry_run=False, tokens=tokens)
        if prune:
            report.pruned = _prune(layout, lock, dry_run=False)
    return report


def _prune(layout: VolumeLayout, lock: Lock, *, dry_run: bool) -> list[tuple[str, int]]:
    """Delete model files under models/ that the lock does not list, and abandoned download temporaries.

    A temporary file is left alone while its target's lock is held (a download in progress, here or
    on another pod) or while it was touched within the last hour (where locks do not hold across
    machines); a resumable partial of a model the lock lists is kept for the next fetch.
    """
    listed = {m.path for m in lock.files}
    pruned: list[tuple[str, int]] = []
    for path in mf.model_files(layout):
        rel = layout.relative(path)
        if rel not in listed:
            pruned.append((rel, path.lstat().st_size))
            if not dry_run:
                path.unlink()
    now = time.time()
    for temp in mf.temp_files(layout):
        target = mf.temp_target(temp)
        if target is not None and temp.name.endswith(".partial") and layout.relative(target) in listed:
            continue
        try:
            st = temp.lstat()
        except FileNotFoundError:
            continue  # its download just finished or claimed it
        if now - st.st_mtime < STALE_TEMP or (target is not None and _busy(layout, target)):
            continue
        pruned.append((layout.relative(temp), st.st_size))
        if not dry_run:
            temp.unlink(missing_ok=True)
    if not dry_run:
        mf.forget_records(layout, {p for p, _ in pruned})
    return pruned


def prune_preview(layout: VolumeLayout, lock: Lock) -> list[tuple[str, int]]:
    """What ``refresh-models --prune`` would remove now (path, bytes); removes nothing."""
    return _prune(layout, lock, dry_run=True)


def _busy(layout: VolumeLayout, target: Path) -> bool:
    lock = mf.target_lock(layout, target, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def plan_models(layout: VolumeLayout, lock: Lock) -> list[str]:
    """What install would fetch or repair; offline and fast (no file is read)."""
    recs = mf.records(layout)
    lines = []
    for model in lock.files:
        c = mf.check(layout, model, recs, hash_files=False)
        size = f" ({human(model.size)})" if model.size else ""
        if c.status != "ok" and model.source == VOLUME_SOURCE:
            lines.append(f"cannot repair {model.path}{size}: it is {_said(c.status)} and has no source")
        elif c.status == "missing":
            lines.append(f"fetch {model.path}{size} from {shown_source(model.source)}")
        elif c.status in ("wrong-size", "wrong-hash"):
            lines.append(f"repair {model.path}{size}: {c.status.replace('-', ' ')}")
        elif c.status == "unchecked":
            lines.append(f"check {model.path}: not recorded on the volume; it will be hashed and re-fetched "
                         "if it differs from the lock")
        elif model.sha256 is None:
            lines.append(f"pin {model.path}: its sha256 will be written into the lock")
    return lines


