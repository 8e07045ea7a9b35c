"""Models on the volume, from spec to verified file.

- ``resolve``: pin the spec's model sources into lock entries (revision, sha256, size).
- ``files``: model files on the volume, checked against the lock and their state.json records
  (``provision.records.model_records``: whether one can be trusted unread).
- ``pool``: the bounded pool of parallel fetches, their progress bars and per-target locks.
- ``refresh``: make the volume match the lock (fetch, repair, pin), plan it, refresh and prune.
- ``helper_jobs``: the worker's helper jobs: fetch one model by source, mirror a Hugging Face repo.
- ``overwrite``: what a helper job may replace (never a pinned or other-source model unless asked).

The public functions are importable from here. They are loaded on first use, because most of
them pull in requests and huggingface_hub, which the fast paths (a no-op install, ``verify``)
never need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provision.models.helper_jobs import ModelRequest, RepoRequest, fetch_model, sync_hf_repo
    from provision.models.refresh import ModelsReport, plan_models, refresh_models, sync_models
    from provision.models.resolve import resolve_models

_EXPORTS = {
    "fetch_model": "helper_jobs", "sync_hf_repo": "helper_jobs", "ModelRequest": "helper_jobs",
    "RepoRequest": "helper_jobs",
    "ModelsReport": "refresh", "plan_models": "refresh", "refresh_models": "refresh", "sync_models": "refresh",
    "resolve_models": "resolve",
}
__all__ = ["ModelRequest", "ModelsReport", "RepoRequest", "fetch_model", "plan_models", "refresh_models",
           "resolve_models", "sync_hf_repo", "sync_models"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
