"""``forge-volume verify``: the volume against its lock, one line per problem.

Fast mode trusts a model file whose size and mtime match its state.json record (so a volume of
tens of GB verifies in well under a second) and hashes only files it has no valid record for;
``deep`` re-hashes every model file. It writes nothing, except that ``deep`` drops the state.json
records it proved wrong (a file changed with its size and mtime intact): refresh-models trusts
records, and would otherwise never repair the file verify told the user to repair with it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from provision.lockfile import read_lock
from provision.models import files as mf
from provision.progress import Progress
from provision.sources import shown_source


def verify_volume(layout: mf.VolumeLayout, lock_path: Path, *, deep: bool, progress: Progress) -> list[str]:
    lock = read_lock(lock_path)
    from provision.install import installation_problems  # python, venv, Forge, extensions: the installer's

    problems = installation_problems(layout, lock)
    recs = mf.records(layout)
    to_hash = sum(m.size or 0 for m in lock.models) if deep else None
    bar = progress.bar(to_hash, "hashing models") if deep else None
    false_records: set[str] = set()
    try:
        for model in lock.models:
            c = mf.check(layout, model, recs, hash_files=True, deep=deep,
                         on_bytes=bar.update if bar is not None else None)
            if c.status == "missing":
                problems.append(f"missing: {model.path} ({model.kind} from {shown_source(model.source)})")
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
    listed = {m.path for m in lock.models}
    for path in sorted(mf.model_files(layout)):
        rel = layout.relative(path)
        if rel not in listed:
            problems.append(f"unlisted: {rel} ({path.lstat().st_size:,} bytes) is not in the lock "
                            "(`forge-volume refresh-models --prune` removes it)")
    return problems
