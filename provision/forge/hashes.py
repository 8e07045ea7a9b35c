"""Forge's sha256 cache, seeded from the volume's record so a cold worker does not hash its checkpoints.

Forge hashes a checkpoint (all of it, seconds per GB from a network volume) the first time it loads
it, unless its cache already knows the file: ``modules/hashes.py`` keeps, under the title
``checkpoint/<name>`` (``name``: the path below ``models/Stable-diffusion``, as
``sd_models.CheckpointInfo`` makes it), the sha256 and the file's mtime, and trusts the entry while
``os.path.getmtime`` of the file is not newer. That cache lives in Forge's ``--data-dir``, the
worker's per-process scratch, so every cold worker starts without it.

Forge converts a ``cache.json`` in its data dir into its cache (``modules/cache.py``) when the cache
folder does not exist yet: ``{"hashes": {"checkpoint/<name>": {"mtime": <float>, "sha256": <hex>}}}``.
``seed_hash_cache`` writes that file from ``state.json``, which records each installed model's
sha256, size and mtime (float seconds, ``st_mtime``, exactly what ``getmtime`` returns). Only a file
whose size and mtime still match its record is seeded (one ``stat`` each, no byte read); one that
changed since is left to Forge, which hashes it. Titles in ``sd-models`` then carry the hash from the
start, as they would after Forge's own first load (no ``--no-hashing``).

LoRAs are not seeded: Forge keys a ``.safetensors`` LoRA by kohya's hash of the file's body
(``hashes-addnet``), not by the file's sha256 the lock knows. Embeddings are small and named from
their content.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from provision.errors import ForgeVolumeError
from provision.records.model_records import records, trusted
from volume_layout import VolumeLayout

CACHE_FILE = "cache.json"  # Forge's SD_WEBUI_CACHE_FILE default, in its data dir
CACHE_DIR = "cache"  # Forge's SD_WEBUI_CACHE_DIR default: once it exists, cache.json is no longer read
SECTION = "hashes"
CHECKPOINT_PREFIX = "checkpoint/"


def checkpoint_title(layout: VolumeLayout, rel: str) -> str | None:
    """Forge's cache title of the model at ``rel`` (as state.json records it), or None if not a checkpoint."""
    folder, path = layout.kind_dir("checkpoint"), layout.absolute(rel)
    return CHECKPOINT_PREFIX + path.relative_to(folder).as_posix() if path.is_relative_to(folder) else None


def seed_hash_cache(layout: VolumeLayout, data_dir: Path) -> int:
    """Write Forge's ``cache.json`` in ``data_dir`` with the sha256 of every recorded checkpoint whose file
    is unchanged; the number of entries written. Nothing is written when Forge's cache folder already
    exists (Forge would ignore the file) or the volume's record cannot be read (Forge then hashes, as
    without a seed); an existing ``cache.json`` keeps its other entries."""
    if (data_dir / CACHE_DIR).exists():
        return 0
    try:
        found = records(layout)
    except ForgeVolumeError:
        return 0
    seeded: dict[str, dict[str, Any]] = {}
    for rel, record in found.items():
        title = checkpoint_title(layout, rel)
        # Same size and mtime as recorded: the recorded sha256 is this file's (a stat, no byte read).
        if title is not None and trusted(layout.absolute(rel), record):
            seeded[title] = {"mtime": float(record["mtime"]), "sha256": str(record["sha256"]).lower()}
    if not seeded:
        return 0
    target = data_dir / CACHE_FILE
    data: Any = {}
    if target.exists():
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return 0  # not ours to repair: Forge moves a broken one aside and starts empty
        if not isinstance(data, dict) or not isinstance(data.get(SECTION, {}), dict):
            return 0
    data[SECTION] = {**data.get(SECTION, {}), **seeded}
    tmp = target.with_name(f".{CACHE_FILE}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:  # a full scratch disk: Forge hashes, as without a seed; the boot goes on
        tmp.unlink(missing_ok=True)
        return 0
    return len(seeded)
