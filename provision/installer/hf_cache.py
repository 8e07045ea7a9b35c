"""The Hugging Face cache's bookkeeping beside the first-use files install puts in it (``models/diffusers``).

transformers finds a file of a repository offline through ``models--<repo>/refs/main`` (the snapshot's
revision), and transformers and diffusers each write a version marker into the cache at import when it
is missing. Install writes them all (``provision.forge.first_use.hf_cache_files``), so the worker, whose
Forge has ``HF_HUB_CACHE`` on the volume, only reads. Made by the ``links`` step, checked by ``verify``.
"""

from __future__ import annotations

from pathlib import Path

from provision.errors import VolumeError
from provision.forge.first_use import hf_cache_files
from provision.records.atomic import write_atomic
from provision.records.lockfile import Lock
from volume_layout import VolumeLayout


def wanted(layout: VolumeLayout, lock: Lock) -> dict[Path, str]:
    """Each file the lock's first-use files need beside them in the cache -> its text."""
    return {layout.root / rel: text for rel, text in hf_cache_files(f.path for f in lock.first_use).items()}


def _reads(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else None
    except (OSError, UnicodeDecodeError):
        return None


def problems(layout: VolumeLayout, lock: Lock) -> list[str]:
    """One line per file that is missing or says something else."""
    return [f"hf cache: {layout.relative(path)} is missing or is not {text!r} (`forge-volume install` writes it)"
            for path, text in wanted(layout, lock).items() if _reads(path) != text]


def make(layout: VolumeLayout, lock: Lock) -> list[Path]:
    """Write each wanted file that is missing or wrong; returns those written."""
    changed = []
    for path, text in wanted(layout, lock).items():
        if _reads(path) == text:
            continue
        try:
            write_atomic(path, text)
        except OSError as exc:
            raise VolumeError(f"cannot write {path}: {exc}",
                              "check that the volume is writable, then re-run `forge-volume install`") from None
        changed.append(path)
    return changed
