"""Forge's settings that decide where it writes files and which addresses it fetches from.

Forge's API sets any setting (``POST /sdapi/v1/options``, a generation's ``override_settings``),
including the ones Forge marks ``restrict_api`` (its ``set_config`` does not skip them) and the
folders it saves into (``outdir_*``, ``*_filename_pattern``), which Forge locks away only when
started with ``--hide-ui-dir-config``. The worker starts Forge with that switch, fixes
``SAFE_SETTINGS`` in every start's settings file, drops the locked ones from the volume's seed
(a pod's Forge saved ``outputs/...`` relative to its checkout: on a worker that is the volume), and
refuses jobs that name them (``worker.job_rules``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HIDE_DIRS_SWITCH = "--hide-ui-dir-config"
# By name: Forge's restrict_api settings, and restricted ones the forms below do not catch.
LOCKED_SETTINGS = frozenset({
    "api_enable_requests", "api_forbid_local_requests", "api_useragent",  # URL images and how they are fetched
    "temp_dir", "clean_temp_dir_at_start",  # a folder Forge writes to, and empties at start
    "profiling_enable", "profiling_filename",  # a trace written to the path the setting names
    "restore_config_state_file",  # a file Forge reads its extensions' state from
})
# By form: a folder or file Forge writes to or reads from (outdir_samples, samples_filename_pattern,
# control_net_detectedmap_dir, control_net_models_path...).
LOCKED_PREFIXES = ("outdir_",)
LOCKED_SUFFIXES = ("_filename_pattern", "_dir", "_path", "_file")
# Images by URL off: Forge would fetch them checking only the first host, following any redirect.
SAFE_SETTINGS: dict[str, Any] = {"api_enable_requests": False, "api_forbid_local_requests": True}


def locked_setting(name: str) -> bool:
    return name in LOCKED_SETTINGS or name.startswith(LOCKED_PREFIXES) or name.endswith(LOCKED_SUFFIXES)


def fence_settings_file(config: Path) -> list[str]:
    """Rewrite Forge's settings file (seeded from the volume, or absent) without the locked settings and
    with SAFE_SETTINGS; returns the names dropped. An unreadable seed is replaced by SAFE_SETTINGS alone."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    dropped = sorted(k for k in data if locked_setting(str(k)) and k not in SAFE_SETTINGS)
    kept = {k: v for k, v in data.items() if not locked_setting(str(k))}
    config.write_text(json.dumps({**kept, **SAFE_SETTINGS}, indent=4), encoding="utf-8")
    return dropped
