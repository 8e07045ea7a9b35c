"""``forge-volume verify``: the volume against its lock, one line per problem.

It fails only for what the lock pins. Model files the lock does not list (fetched by the worker's
``/v1/download`` and ``/v1/sync`` helper jobs, or copied by hand) are extras: listed, not failures.

Fast mode trusts a model file whose size and mtime match its state.json record (so a volume of
tens of GB verifies in well under a second) and hashes only files it has no valid record for;
``deep`` re-hashes every model file. It writes nothing, except that ``deep`` drops the state.json
records it proved wrong (a file changed with its size and mtime intact): refresh-models trusts
records, and would otherwise never repair the file verify told the user to repair with it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ForgeVolumeError
from provision.fetch.sources import VOLUME_SOURCE, shown_source
from provision.installer.preflight import blocked_paths
from provision.models import files as mf
from provision.progress import Progress
from provision.records.lockfile import LockedFirstUse, read_lock


def verify_volume(layout: mf.VolumeLayout, lock_path: Path, *, deep: bool, progress: Progress) -> list[str]:
    lock = read_lock(lock_path)
    from provision.commands.install import installation_problems  # python, venv, Forge, extensions: the installer's

    problems = installation_problems(layout, lock)
    recs = mf.records(layout)
    to_hash = sum(m.size or 0 for m in lock.files) if deep else None
    bar = progress.bar(to_hash, "hashing models") if deep else None
    false_records: set[str] = set()
    try:
        for model in lock.files:
            c = mf.check(layout, model, recs, hash_files=True, deep=deep,
                         on_bytes=bar.update if bar is not None else None)
            if c.status == "missing":
                what = f"feature {model.feature!r}" if isinstance(model, LockedFirstUse) else model.kind
                origin = "no source: cannot be downloaded again" if model.source == VOLUME_SOURCE else \
                    f"from {shown_source(model.source)}"
                problems.append(f"missing: {model.path} ({what} {origin})")
            elif c.status == "wrong-size":
                problems.append(f"wrong size: {model.path} is {c.size:,} bytes, the lock says {model.size:,}")
            elif c.status == "wrong-hash":
                if deep and mf.trusted(c.path, recs.get(model.path)):
                    false_records.add(model.path)
                problems.append(f"wrong hash: {model.path} has sha256 {c.sha256}, the lock says {model.sha256}")
            elif model.sha256 is None:
                problems.append(f"not pinned: {model.path} has no sha256 in the lock yet "
                                "(`forge-volume refresh-models` pins it)")
    finally:
        if bar is not None:
            bar.close()
    if false_records:
        with contextlib.suppress(OSError):  # a read-only volume: the problems are reported all the same
            mf.forget_records(layout, false_records)
    return problems


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    extras: list[mf.VolumeFile] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def extra_lines(self) -> list[str]:
        return [f"extra: {f.path} ({f.size:,} bytes" + (f", from {f.source}" if f.source else "")
                + "): not in the lock; kept (`forge-volume refresh-models --prune` removes it)" for f in self.extras]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "extras": [f.as_dict() for f in self.extras]}


def verify_report(layout: mf.VolumeLayout, lock_path: Path, spec_path: Path, *, deep: bool,
                  progress: Progress) -> VerifyReport:
    """``verify``: paths of the wrong type, everything the lock pins, and the extra model files."""
    report = VerifyReport(problems=blocked_paths(layout, spec_path))
    try:
        report.problems += verify_volume(layout, lock_path, deep=deep, progress=progress)
        report.extras = [f for f in mf.inventory(layout, read_lock(lock_path).files) if f.status == "extra"]
    except (ForgeVolumeError, NotADirectoryError) as exc:
        if not report.problems:
            raise
        # A blocked path (say .forge-volume is a file) stops the rest: report what is known, with its cause.
        report.problems.append(exc.one_line() if isinstance(exc, ForgeVolumeError) else str(exc))
    return report
