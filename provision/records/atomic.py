"""Atomic writes of the volume's small records (state.json, the lock, the boot set's index, the spec):
a reader sees the old content or the new, never a mix. A module of its own so that recording state or
a boot set does not load the lock's and the spec's parsers."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique, not just the pid: pods and workers of one image share pids, and locks may not hold across them.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
