"""Checks before a command touches the volume: files where folders should be, and whether a folder
looks like a mounted volume.

A stray file named ``models`` or ``.forge-volume`` (a mistyped ``cp``, a half-finished ``mv``) would
otherwise surface deep inside a step as an ``OSError``; here it becomes one line naming the path
and the fix, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from provision.errors import VolumeError
from volume_layout import MODEL_KIND_DIRS, VolumeLayout

NOT_A_FOLDER_HINT = "move or delete that file, then re-run; forge-volume creates the folder itself"


def _folders(layout: VolumeLayout) -> list[Path]:
    """Every folder forge-volume creates or reads on the volume, parents before children."""
    return [layout.meta_dir, layout.locks_dir, layout.tmp_dir, layout.logs_dir, layout.models_dir,
            *(layout.kind_dir(kind) for kind in MODEL_KIND_DIRS), layout.config_dir, layout.extensions_dir]


def blocked_paths(layout: VolumeLayout, spec_path: Path) -> list[str]:
    """One line per path that exists as the wrong type: a file where a folder belongs, or a folder where
    the spec, the lock or state.json belongs. Reads nothing but ``stat``; empty when all is well."""
    problems: list[str] = []
    for folder in _folders(layout):
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            problems.append(f"{folder} is a file where a folder should be")
    for path, what in ((spec_path, "the spec"), (layout.state, "state.json")):
        if path.is_dir():
            problems.append(f"{path} is a folder where {what} file should be")
    if spec_path.parent != layout.root and spec_path.parent.exists() and not spec_path.parent.is_dir():
        problems.append(f"{spec_path.parent} is a file where the spec's folder should be")
    return problems


def require_usable(layout: VolumeLayout, spec_path: Path) -> None:
    """Raise a one-line VolumeError for the first blocked path (see ``blocked_paths``)."""
    problems = blocked_paths(layout, spec_path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VolumeError(problems[0] + more, NOT_A_FOLDER_HINT if "is a file" in problems[0] else
                          "move or delete that folder, then re-run")


def not_a_folder(exc: OSError) -> VolumeError:
    """An OS error from a file standing where a folder should be, as one line (the safety net behind
    ``require_usable`` for paths it does not list)."""
    path = exc.filename or "a path on the volume"
    return VolumeError(f"{path}: a file stands where a folder should be ({exc.strerror or exc})", NOT_A_FOLDER_HINT)


def mount_point_of(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would hold it, when it does not exist)."""
    current = path.absolute()
    while not current.exists():
        current = current.parent
    while not os.path.ismount(current):
        current = current.parent
    return current


def mount_note(path: Path) -> str:
    """Whether ``path`` looks like a mounted volume, in a few words for a message."""
    if path.exists() and os.path.ismount(path):
        return f"{path} is a mount point"
    return f"nothing is mounted at {path}; it is on the filesystem mounted at {mount_point_of(path)}"
