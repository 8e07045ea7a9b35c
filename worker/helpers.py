"""The worker's own /v1/* jobs: model downloads, Hugging Face sync, refresh-models and volume status.

They reuse the provisioning library (no second implementation), run its blocking calls in a
thread so the job loop stays free, and never wait for Forge. Tokens come from the endpoint's
environment; a token in the payload is used for that job only and scrubbed from anything returned.
"""

from __future__ import annotations

import asyncio
import difflib
import sys
import threading
import traceback
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision.errors import ForgeVolumeError
from provision.fetch.cancel import cancelling
from provision.fetch.netguard import AddressGuard
from provision.fetch.sources import UrlSource, parse_source
from provision.fetch.tokens import clean_token
from provision.progress import QUIET
from volume_layout import LayoutError, VolumeLayout
from worker.config import Settings
from worker.normalise import HelperCall, InputError
from worker.scrub import scrub, secret_forms

TOKEN_KEYS = ("hf_token", "civitai_token", "token")
# Every key each helper accepts: anything else fails the job before it changes anything (a typo such
# as "dryrun" or "sha265" must not silently turn a dry run into a prune, or skip a checksum).
KEYS: dict[str, tuple[str, ...]] = {
    "/v1/download": ("source", "source_url", "kind", "name", "sha256", "download_path", "overwrite",
                     "hf_token", "civitai_token", "token"),
    "/v1/sync": ("repo_id", "revision", "kind", "sync_path", "overwrite", "hf_token", "token"),
    "/v1/refresh-models": ("prune", "dry_run"),
    "/v1/volume": (),
}


def check_keys(endpoint: str, payload: dict[str, Any]) -> None:
    """Refuse a key the helper does not know, naming the closest one it does."""
    known = KEYS[endpoint]
    for key in payload:
        if key in known:
            continue
        shown = repr(key) if len(key) <= 60 else repr(key[:60]) + "..."
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        guess = f"; did you mean {close[0]!r}?" if close else ""
        accepted = ", ".join(known) if known else "none"
        raise InputError(f"unknown key {shown} in the payload{guess} (accepted: {accepted})")


def _text(payload: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = payload.get(key)
    if value is None or value == "":
        if required:
            raise InputError(f"{key!r} is required in the payload")
        return None
    if not isinstance(value, str):
        raise InputError(f"{key!r} must be a string, not {type(value).__name__}")
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None and key not in TOKEN_KEYS:  # the value is not echoed: a URL may hold credentials
        raise InputError(f"{key!r} holds a control character (U+{ord(bad):04X}); names, paths and sources "
                         "must be plain text")
    return value


def _flag(payload: dict[str, Any], key: str) -> bool:
    value = payload.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"{key!r} must be true or false, not {value!r}")
    return value


def _tokens(payload: dict[str, Any], settings: Settings) -> dict[str, str]:
    tokens = {"hf": clean_token(_text(payload, "hf_token"), "hf_token") or settings.hf_token,
              "civitai": clean_token(_text(payload, "civitai_token"), "civitai_token") or settings.civitai_token}
    generic = clean_token(_text(payload, "token"), "token")
    if generic:  # the original worker's single token field: whichever service the source needs
        tokens = {"hf": generic, "civitai": generic}
    return {k: v for k, v in tokens.items() if v}


def _download(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.models import ModelRequest, fetch_model

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
    # endpoint's settings name. A malformed source is refused before anything else.
    url = isinstance(parse_source(source), UrlSource)
    guard = AddressGuard.for_url(source, settings.download_allow_networks) if url else None
    request = ModelRequest(source, kind=kind, name=_text(payload, "name"), dest=dest, sha256=_text(payload, "sha256"),
                           tokens=_tokens(payload, settings), guard=guard, overwrite=_flag(payload, "overwrite"))
    result = fetch_model(layout, request, QUIET)
    # The original worker's answer, beside ours: its clients read these three.
    return {**result, "msg": "Download successful", "source_url": result["source"],
            "download_path": str(layout.absolute(result["path"]))}


def _sync(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.models import RepoRequest, sync_hf_repo

    repo_id = _text(payload, "repo_id", required=True)
    sync_path = _text(payload, "sync_path")
    # The original form names the models root: each top folder of the repo goes to the kind folder it names.
    by_kind_folder = sync_path is not None and layout.names_models_root(sync_path)
    dest = layout.models_relative(sync_path) if sync_path and not by_kind_folder else None
    request = RepoRequest(str(repo_id), revision=_text(payload, "revision"), kind=_text(payload, "kind"), dest=dest,
                          by_kind_folder=by_kind_folder, token=_tokens(payload, settings).get("hf"),
                          overwrite=_flag(payload, "overwrite"))
    result = sync_hf_repo(layout, request, QUIET)
    fetched = result.pop("fetched")
    # The original worker's answer, beside ours: the files this job wrote, where they are on this worker.
    return {**result, "synced_count": len(fetched), "synced_files": [str(layout.absolute(p)) for p in fetched]}


def _refresh(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.models import refresh_models

    report = refresh_models(layout, layout.lock, prune=_flag(payload, "prune"), dry_run=_flag(payload, "dry_run"),
                            progress=QUIET, spec_path=layout.spec)
    return {**report.as_dict(), "summary": report.summary()}


def _status(layout: VolumeLayout, payload: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from provision.commands.status import volume_status

    return volume_status(layout, surface="job")


HELPERS = {"/v1/download": _download, "/v1/sync": _sync, "/v1/refresh-models": _refresh, "/v1/volume": _status}


CANCEL_GRACE = 5.0  # seconds a cancelled helper's thread gets to stop and free its locks


async def _in_thread(work: Callable[..., dict[str, Any]], *args: Any) -> Any:
    """Run a helper in a thread with a cancel event: when RunPod cancels the job (or it times out), the
    event stops its downloads and lock waits, and the job ends once the thread let go of its locks."""
    cancel = threading.Event()
    with cancelling(cancel):  # the task, and the thread it starts, copy this context
        thread = asyncio.ensure_future(asyncio.to_thread(work, *args))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        cancel.set()
        thread.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: never logged
        await asyncio.wait({thread}, timeout=CANCEL_GRACE)
        raise


async def run_helper(call: HelperCall, volume_root: Path, settings: Settings) -> dict[str, Any]:
    """Run one helper job; its result, or ``{"error": ...}`` for a caller mistake or a library failure."""
    secrets = secret_forms([s for s in (*(call.payload.get(k) for k in TOKEN_KEYS), settings.hf_token,
                                        settings.civitai_token) if isinstance(s, str)])
    if not volume_root.is_dir():
        return {"error": f"no volume at {volume_root} (attach the network volume to the endpoint, in its datacenter)"}
    layout = VolumeLayout(volume_root)
    try:
        check_keys(call.endpoint, call.payload)
        result = await _in_thread(HELPERS[call.endpoint], layout, call.payload, settings)
    except (InputError, LayoutError) as exc:
        return {"error": scrub(f"{call.endpoint}: {exc}", secrets)}
    except ForgeVolumeError as exc:
        return {"error": scrub(f"{call.endpoint} failed: {exc.one_line('job')}", secrets)}
    except ImportError as exc:
        return {"error": f"{call.endpoint} is not available in this build of the worker ({exc})"}
    except Exception as exc:  # the helpers' boundary: secrets are scrubbed from the log line and the answer
        sys.stdout.write(scrub(traceback.format_exc(), secrets))
        return {"error": scrub(f"{call.endpoint} failed unexpectedly ({type(exc).__name__}: {exc})", secrets)}
    return scrub(result, secrets)
