"""What a helper job may replace: never a model the volume's lock pins with other bytes, nor a file
that came from another source (recorded in state.json) or from nowhere forge-volume knows, unless
the job says ``"overwrite": true``. Two LoRA repositories that both ship
``pytorch_lora_weights.safetensors`` must not silently leave only the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provision.errors import ReplaceError
from provision.fetch.sources import shown_source
from provision.models import files as mf
from provision.records.lockfile import LockedModel, read_lock
from volume_layout import VolumeLayout


def source_key(source: str) -> str:
    """What makes two sources the same file: the shown source, without an hf:// revision (a newer
    commit of the same file in the same repository is an update, not another model)."""
    shown = shown_source(source)
    if shown.startswith("hf://"):
        body, at, revision = shown.rpartition("@")
        if at and "/" not in revision:
            return body
    return shown


@dataclass(frozen=True)
class OverwriteGuard:
    """The volume's pins and records at the start of a job, and whether the job may overwrite."""

    pins: dict[str, LockedModel]
    records: dict[str, mf.Record]
    overwrite: bool
    hint: str | None = None  # advice for a refusal, when the caller has a better one than ReplaceError's

    @classmethod
    def load(cls, layout: VolumeLayout, *, overwrite: bool, hint: str | None = None) -> OverwriteGuard:
        pins = {m.path: m for m in read_lock(layout.lock).files} if layout.lock.is_file() else {}
        return cls(pins, mf.records(layout), overwrite, hint)

    def check(self, path: Path, rel: str, source: str, expected: str | None) -> str | None:
        """Raise ReplaceError if writing ``source``'s bytes to ``path`` would replace what must be kept;
        else the sha256 the new bytes must have (the lock's pin), if any. ``expected`` is the sha256
        the job or the host announced, when known."""
        if self.overwrite:
            return None
        new = shown_source(source)
        pin = self.pins.get(rel)
        if pin is not None:
            pinned = shown_source(pin.source)
            if pin.sha256 and expected and expected != pin.sha256:
                raise self._refuse(f"{rel} is pinned by the volume's lock to {pinned} (sha256 {pin.sha256}); "
                                   f"{new} has other bytes (sha256 {expected})")
            if pin.sha256:
                return pin.sha256  # the download must produce exactly the pinned bytes
            if source_key(pin.source) != source_key(source):
                raise self._refuse(f"{rel} is pinned by the volume's lock to {pinned}; this job's source is {new}")
            return None
        if not (path.is_file() or path.is_symlink()):
            return None
        record = self.records.get(rel)
        if record is None:
            raise self._refuse(f"{rel} already exists and the volume has no record of its source; "
                               f"this job would replace it with {new}")
        if source_key(str(record.get("source"))) != source_key(source):
            raise self._refuse(f"{rel} already holds the model from {record.get('source')}; "
                               f"this job's source is {new}")
        return None

    def pinned_mismatch(self, rel: str, source: str) -> ReplaceError:
        """The refusal for a download whose bytes turned out not to be the ones the lock pins."""
        pin = self.pins[rel]
        return self._refuse(f"{rel} is pinned by the volume's lock to {shown_source(pin.source)} "
                            f"(sha256 {pin.sha256}); {shown_source(source)} served other bytes")

    def _refuse(self, message: str) -> ReplaceError:
        return ReplaceError(message, self.hint) if self.hint else ReplaceError(message)
