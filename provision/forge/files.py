"""Files Forge makes itself under ``models/``: not models, never reported as extras, never pruned.

Forge's first start creates bookkeeping files there (its libraries' cache version markers in
``models/diffusers/``, with ``HF_HUB_CACHE`` pointed at that folder). Install's boot proof records
every path that start created (state.json ``boot.forge_files``); the known ones are also known by
rule, so a volume whose boot proof has not run yet is not told to prune them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RULE_FILES = frozenset({"models/diffusers/version.txt", "models/diffusers/version_diffusers_cache.txt"})


def forge_own_files(state: Mapping[str, Any] | None) -> frozenset[str]:
    """Paths (relative to the volume) under models/ that Forge made itself."""
    boot = (state or {}).get("boot") or {}
    return RULE_FILES | {str(p) for p in boot.get("forge_files") or []}
