"""Hashing the adopted models, with a cache so an interrupted or repeated adopt does not hash a file twice.

The cache (``.forge-volume/adopt/hashes.json``) maps a file's path to its size, mtime (ns) and sha256; an
entry counts only while the file's size and mtime are unchanged (as state.json's records do). It is
written at most twice a second while hashing and once at the end, so a kill loses at most the files
hashed in that half second. Files are read by a few threads: a network volume answers reads in
parallel, and sha256 releases the GIL.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from provision.adopt.survey import FoundModel
from provision.errors import AdoptError
from provision.models.files import sha256_file
from provision.progress import Progress
from provision.records.atomic import write_atomic
from volume_layout import VolumeLayout

THREADS = 2
SAVE_EVERY = 0.5  # seconds


class HashCache:
    def __init__(self, layout: VolumeLayout) -> None:
        self.path = layout.adopt_dir / "hashes.json"
        self._lock = threading.Lock()
        self._saved = time.monotonic()
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        except (OSError, ValueError):
            pass  # no cache, or a broken one: hash again

    def get(self, model: FoundModel) -> str | None:
        entry = self.entries.get(model.src) or {}
        if entry.get("size") == model.size and entry.get("mtime_ns") == model.mtime_ns:
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) and len(sha) == 64 else None
        return None

    def put(self, model: FoundModel, sha256: str) -> None:
        with self._lock:
            self.entries[model.src] = {"size": model.size, "mtime_ns": model.mtime_ns, "sha256": sha256}
            if time.monotonic() - self._saved >= SAVE_EVERY:
                self._save()

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        self._saved = time.monotonic()


def hash_models(layout: VolumeLayout, models: Sequence[FoundModel], progress: Progress) -> dict[str, str]:
    """src -> sha256 for every model; AdoptError naming each file that cannot be read (nothing moved yet)."""
    cache = HashCache(layout)
    out: dict[str, str] = {}
    todo = []
    for model in models:
        sha = cache.get(model)
        if sha is None:
            todo.append(model)
        else:
            out[model.src] = sha
    if not todo:
        return out
    total = sum(m.size for m in todo)
    progress.info(f"hashing {len(todo)} model file(s), {total / 2**30:.1f} GiB"
                  + (f" ({len(models) - len(todo)} known from the hash cache)" if len(todo) < len(models) else ""))
    bar = progress.bar(total, "hashing models")
    failed: list[tuple[str, str]] = []
    stop = threading.Event()

    def count(n: int) -> None:
        if stop.is_set():  # Ctrl-C: the threads drop the file they are reading instead of finishing it
            raise InterruptedError("stopped")
        bar.update(n)

    def one(model: FoundModel) -> None:
        if stop.is_set():
            return
        path = layout.root / model.src
        try:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != (model.size, model.mtime_ns):
                raise OSError(f"it changed while adopt read it ({st.st_size:,} bytes now)")
            sha = sha256_file(path, count)
        except InterruptedError:
            return
        except OSError as exc:
            failed.append((model.src, exc.strerror or str(exc)))
            return
        out[model.src] = sha
        cache.put(model, sha)

    pool = ThreadPoolExecutor(max_workers=min(THREADS, os.cpu_count() or 1))
    try:
        list(pool.map(one, todo))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        cache.save()
    if failed:
        first, why = sorted(failed)[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise AdoptError(f"cannot read the model file {first}: {why}{more}",
                         "fix its permissions or move the broken file out of the models folder, then run "
                         "`forge-volume adopt` again (nothing was moved; hashed files are remembered)")
    return out
