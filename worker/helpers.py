"""The worker's own /v1/* jobs: model downloads, Hugging Face sync, refresh-models and volume status.

They reuse the provisioning library (no second implementation), run its blocking calls in a
thread so the job loop stays free, and never wait for Forge. Tokens come from the endpoint's
environment; a token in the payload is used for that job only and scrubbed from anything returned.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from pathlib import Path
from typing import Any

from provision.errors import ForgeVolumeError
from provision.netguard import AddressGuard
from provision.progress import QUIET
from volume_layout import LayoutError, VolumeLayout
from worker.config import Settings
from worker.normalise import HelperCall, InputError

TOKEN_KEYS = ("hf_token", "civitai_token", "token")


def _text(payload: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = payload.get(key)
    if value is None or value == "":
        if required:
            raise InputError(f"{key!r} is required in the payload")
        return None
    if not isinstance(value, str):
        raise InputError(f"{key!r} must be a string, not {type(value).__name__}")
    return value


def _flag(payload: dict[str, Any], key: str) -> bool:
    value = payload.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{key!r} must be true or false, not {value!r}")
    return value


def _tokens(payload: dict[str, Any], settings: Settings) -> dict[str, str]:
    tokens = {"hf": _text(payload, "hf_token") or settings.hf_token,
              "civitai": _text(payload, "civitai_token") or settings.civitai_token}
    generic = _text(payload, "token")
    if generic:  # the original worker's single token field: whichever service the source needs
        tokens = {"hf": generic, "civitai": generic}
    return {k: v for k, v in tokens.items() if v}


def _download(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.models import fetch_model

    source = _text(payload, "source") or _text(payload, "source_url")
    if not source:
        raise InputError("'source' (or the original 'source_url') is required: hf://..., https://... or civitai://ID")
    download_path = _text(payload, "download_path")  # the original form; the library keeps it inside models/
    kind = _text(payload, "kind")
    if not kind and not download_path:
        raise InputError("'kind' is required (or a 'download_path' inside the volume's models folder)")
    dest = layout.models_relative(download_path) if download_path else None
    # A URL from a job (and its redirects) may not reach this machine or its network (Forge's API,
    # the metadata service) unless the endpoint opted in; hf:// and civitai:// go to the hosts the
    # endpoint's settings name.
    url = source.lower().startswith(("http://", "https://"))
    guard = AddressGuard.for_url(source, settings.download_allow_networks) if url else None
    return fetch_model(layout, kind=kind, source=source, name=_text(payload, "name"),
                       sha256=_text(payload, "sha256"), dest=dest, progress=QUIET, tokens=_tokens(payload, settings),
                       guard=guard)


def _sync(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.models import sync_hf_repo

    repo_id = _text(payload, "repo_id", required=True)
    sync_path = _text(payload, "sync_path")
    dest = layout.models_relative(sync_path) if sync_path else None
    return sync_hf_repo(layout, repo_id=str(repo_id), revision=_text(payload, "revision"), kind=_text(payload, "kind"),
                        dest=dest, progress=QUIET, token=_tokens(payload, settings).get("hf"))


def _refresh(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.models import refresh_models

    report = refresh_models(layout, layout.lock, prune=_flag(payload, "prune"), dry_run=_flag(payload, "dry_run"),
                            progress=QUIET)
    return {**report.as_dict(), "summary": report.summary()}


def _status(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.status import volume_status

    return volume_status(layout)


HELPERS = {"/v1/download": _download, "/v1/sync": _sync, "/v1/refresh-models": _refresh, "/v1/volume": _status}


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` with every secret replaced, wherever a string holds one."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    return value


async def run_helper(call: HelperCall, volume_root: Path, settings: Settings) -> dict[str, Any]:
    """Run one helper job; its result, or ``{"error": ...}`` for a caller mistake or a library failure."""
    secrets = [s for s in (*(call.payload.get(k) for k in TOKEN_KEYS), settings.hf_token, settings.civitai_token)
               if isinstance(s, str) and len(s) >= 4]
    if not volume_root.is_dir():
        return {"error": f"no volume at {volume_root} (attach the network volume to the endpoint, in its datacenter)"}
    layout = VolumeLayout(volume_root)
    try:
        result = await asyncio.to_thread(HELPERS[call.endpoint], layout, call.payload, settings)
    except (InputError, LayoutError) as exc:
        return {"error": scrub(f"{call.endpoint}: {exc}", secrets)}
    except ForgeVolumeError as exc:
        return {"error": scrub(f"{call.endpoint} failed: {exc.one_line()}", secrets)}
    except ImportError as exc:
        return {"error": f"{call.endpoint} is not available in this build of the worker ({exc})"}
    except Exception as exc:  # the helpers' boundary: secrets are scrubbed from the log line and the answer
        sys.stdout.write(scrub(traceback.format_exc(), secrets))
        return {"error": scrub(f"{call.endpoint} failed unexpectedly ({type(exc).__name__}: {exc})", secrets)}
    return scrub(result, secrets)
