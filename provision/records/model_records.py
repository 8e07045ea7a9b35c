"""The volume's record of each installed model in state.json (path, sha256, size, mtime), and whether a
file is still the one recorded: read by the models' commands and by the worker's boot (Forge's hash
cache is seeded from it), so it sits with the records, below both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.records.state import read_state
from volume_layout import VolumeLayout

Record = dict[str, Any]


def records(layout: VolumeLayout) -> dict[str, Record]:
    state = read_state(layout) or {}
    return {r["path"]: r for r in state.get("models") or [] if isinstance(r, dict) and "path" in r}


def trusted(path: Path, record: Record | None) -> bool:
    """The file is exactly as recorded (same size and mtime), so its recorded sha256 still holds."""
    if not record or not record.get("sha256"):
        return False
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return st.st_size == record.get("size") and st.st_mtime == record.get("mtime")
