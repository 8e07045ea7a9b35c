"""What `regions apply` did, kept next to the spec: ``forge-volume.regions.json``.

RunPod cannot tell what a network volume holds without a pod, so apply records, per datacenter,
the volume's id and the lock a pod last applied there successfully (its digests, the forge-volume
version, when, the pod's own report of the volume's state), and the id of every run that may have
pods alive (written before its first pod is created, cleared once all of them are terminated), so
that a run after a crash terminates them. Keep it in version control beside the spec and the lock:
without it, apply checks every volume with a pod (an install with nothing to do).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from provision.errors import ForgeVolumeError
from provision.records.atomic import write_atomic

RECORD_VERSION = 1


class RecordError(ForgeVolumeError):
    hint = ("move the file aside and re-run `forge-volume regions apply`: it checks every volume with a pod "
            "and writes a new record")
    job_hint = "only `forge-volume regions` on a workstation keeps this record; no endpoint job reads it"


def record_path_for(spec_path: Path) -> Path:
    return spec_path.with_suffix(".regions.json")


def lock_digests(lock_text: str) -> tuple[str, str]:
    """(digest of the whole lock, digest of everything but its models): equal base digests mean a
    change of models only, which a models-only refresh applies."""
    whole = hashlib.sha256(lock_text.encode("utf-8")).hexdigest()
    data = json.loads(lock_text)
    data.pop("models", None)
    data.pop("generated_by", None)
    base = hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()
    return whole, base


@dataclass
class Applied:
    """What a pod applied to one datacenter's volume, as it reported it."""

    volume_id: str
    lock_digest: str
    base_digest: str
    forge_volume: str
    applied_at: str
    run_id: str
    mode: str  # install | models
    volume_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    path: Path
    applied: dict[str, Applied] = field(default_factory=dict)  # datacenter -> what was applied
    runs: dict[str, str] = field(default_factory=dict)  # run id -> when it started (pods may be alive)

    def save(self) -> None:
        data = {"record_version": RECORD_VERSION,
                "applied": {dc: vars(a) for dc, a in sorted(self.applied.items())},
                "runs": dict(sorted(self.runs.items()))}
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_record(path: Path) -> Record:
    if not path.exists():
        return Record(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("record_version") != RECORD_VERSION:
            raise RecordError(f"{path}: record version {data.get('record_version')!r} is not {RECORD_VERSION}")
        applied = {str(dc): Applied(**a) for dc, a in data.get("applied", {}).items()}
        runs = {str(k): str(v) for k, v in data.get("runs", {}).items()}
    except RecordError:
        raise
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise RecordError(f"{path}: not a forge-volume regions record ({type(exc).__name__}: {exc})") from None
    return Record(path, applied, runs)


@contextmanager
def hold_record(path: Path) -> Any:
    """One apply at a time per spec: two would start two pods on one volume."""
    lock = FileLock(str(path) + ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RecordError(f"another `forge-volume regions apply` is running for {path.parent} "
                          f"(it holds {lock.lock_file})",
                          "wait for it to finish; if none is running, delete that lock file") from None
    try:
        yield
    finally:
        lock.release()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
