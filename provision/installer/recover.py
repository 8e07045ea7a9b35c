"""Rebuilding a lost record: a corrupt ``state.json`` or lock, set aside and made again from the volume.

``install`` calls this under the volume's writer lock. The record is rebuilt by asking each install
step's own "already done" check (git checkouts against the lock, the venv by its packages, files in
place), so a step whose work is on the volume is recorded as done and nothing is redone; model
files are not trusted here but re-checked by the models step, by size then sha256, and adopted
without a download when they match.
"""

from __future__ import annotations

import time
from pathlib import Path

from provision.installer import gitops, pyenv
from provision.installer.steps import STEPS, Ctx, step_keys
from provision.progress import Progress
from provision.records.lockfile import Lock
from provision.records.state import State, empty_state, now, state_lock, write_state
from volume_layout import VolumeLayout


def set_aside(path: Path) -> Path:
    """Move an unreadable file out of the way, kept for inspection: ``<name>.corrupt-<time>``."""
    kept = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    path.replace(kept)
    return kept


def _python(layout: VolumeLayout, lock: Lock) -> dict[str, str] | None:
    want = lock.forge.python
    python = Path(want) if "/" in want else pyenv.find_standalone(want, layout.python_dir)
    if python is None or not python.exists():
        return None
    return {"version": pyenv.interpreter_version(python), "path": str(python)}


def rebuild_state(layout: VolumeLayout, lock: Lock, lock_path: Path, progress: Progress) -> list[str]:
    """Write a new state.json describing what is on the volume; returns the steps found done."""
    state: State = empty_state(layout)
    state["python"] = _python(layout, lock)
    if pyenv.venv_ready(layout.venv_python):
        state["mount_point"] = str(layout.root)
    if gitops.head_commit(layout.forge_dir) == lock.forge.commit:
        state["forge"] = {"repo": gitops.redact_url(lock.forge.repo), "commit": lock.forge.commit}
    state["extensions"] = [{"name": e.name, "repo": gitops.redact_url(e.repo), "commit": e.commit}
                           for e in lock.extensions
                           if gitops.head_commit(layout.extension_dir(e.name)) == e.commit]
    keys = step_keys(lock)
    ctx = Ctx(layout=layout, lock=lock, lock_path=lock_path, progress=progress, state=state)
    found: list[str] = []
    for step in STEPS:
        # Models are never taken on trust: the models step hashes what is there and adopts what matches.
        if step.name == "models" or any(dep not in found for dep in step.deps) or not step.done(ctx):
            continue
        state["steps"][step.name] = {"key": keys[step.name], "finished_at": now(), "rebuilt": True}
        found.append(step.name)
    with state_lock(layout):
        write_state(layout, state)
    return found
