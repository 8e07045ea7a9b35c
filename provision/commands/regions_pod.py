"""What a `regions apply` pod runs (``forge-volume regions pod-run``): install the volume mounted at
/workspace from the spec and lock in its environment, print one result line, then wait to be terminated.

The spec and the lock come gzip+base64 in FORGE_VOLUME_SPEC_GZ and FORGE_VOLUME_LOCK_GZ (RunPod has no
exec, and no file reaches a pod but through its volume or image); FORGE_VOLUME_MODE says `install` or
`models` (a models-only refresh: no Forge or venv work). Progress lines go to stdout, which is the
pod's log that `regions apply` follows. The last line is ``forge-volume-result RUN_ID {json}``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from provision import __version__
from provision.errors import ForgeVolumeError, LockError
from provision.progress import Progress
from provision.regions.pods import RESULT_MARKER
from volume_layout import VolumeLayout


def _unpack(env: Mapping[str, str], name: str) -> str:
    try:
        return gzip.decompress(base64.b64decode(env[name], validate=True)).decode("utf-8")
    except KeyError:
        raise LockError(f"{name} is not set: this command runs on a pod that `forge-volume regions apply` "
                        "started") from None
    except (ValueError, OSError, EOFError) as exc:
        raise LockError(f"{name} is not gzip+base64 text ({exc})") from None


def _models_only(layout: VolumeLayout, spec_path: Path, progress: Progress) -> dict[str, Any]:
    """The lock's models made present and verified, nothing else (Forge, venv, extensions untouched)."""
    from provision.commands.install import keep_copies, record_models_step, require_volume
    from provision.models.refresh import sync_models
    from provision.records.lockfile import check_matches, lock_path_for, read_lock
    from provision.records.spec import load_spec
    from provision.records.volume_lock import hold_volume

    require_volume(layout)
    lock_path = lock_path_for(spec_path)
    lock = read_lock(lock_path)
    check_matches(load_spec(spec_path), lock, lock_path)
    with hold_volume(layout, "regions models refresh"):
        report = sync_models(layout, lock, lock_path, progress)
        record_models_step(layout, read_lock(lock_path), done_before=None)
        keep_copies(layout, spec_path, lock_path)
    return {"ran": ["models"], "summary": report.summary()}


def _install(layout: VolumeLayout, spec_path: Path, progress: Progress) -> dict[str, Any]:
    from provision.commands.install import install

    report = install(layout, spec_path, progress=progress, wait=False)
    lines = report.summary().splitlines()
    # "installed in 41.2 s: ran python, venv, ..." or "nothing to do: ...", not the notes around it.
    summary = next((x for x in lines if x.startswith(("installed in", "nothing to do"))), lines[-1])
    return {"ran": report.ran, "summary": summary.strip()}


def volume_state(layout: VolumeLayout) -> dict[str, Any]:
    """A few facts of state.json for the caller's record (the whole file stays on the volume)."""
    from provision.records.state import read_state

    state = read_state(layout) or {}
    models = state.get("models") or []
    return {"forge_commit": (state.get("forge") or {}).get("commit"),
            "extensions": {e.get("name"): e.get("commit") for e in state.get("extensions") or []},
            "models": len(models), "model_bytes": sum(int(m.get("size") or 0) for m in models),
            "steps": sorted(state.get("steps") or {})}


def run(env: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    run_id = env.get("FORGE_VOLUME_RUN", "")
    result: dict[str, Any] = {"ok": False, "forge_volume": __version__, "mode": env.get("FORGE_VOLUME_MODE")}
    try:
        wanted = env.get("FORGE_VOLUME_EXPECT_VERSION")
        if wanted != __version__:
            raise ForgeVolumeError(f"this pod's image has forge-volume {__version__}; the caller has {wanted}",
                                   "build and push the pod image from the same forge-volume version "
                                   "([runpod.pod] image)")
        spec_text, lock_text = _unpack(env, "FORGE_VOLUME_SPEC_GZ"), _unpack(env, "FORGE_VOLUME_LOCK_GZ")
        layout = VolumeLayout(Path(env.get("FORGE_VOLUME", "/workspace")))
        progress = Progress(stream=sys.stdout, bars=False)
        # The spec and lock sit on the container disk; install keeps its copies on the volume.
        with tempfile.TemporaryDirectory(prefix="forge-volume-run-") as work:
            spec_path = Path(work) / "forge-volume.toml"
            spec_path.write_text(spec_text, encoding="utf-8")
            spec_path.with_suffix(".lock").write_text(lock_text, encoding="utf-8")
            did = (_models_only if result["mode"] == "models" else _install)(layout, spec_path, progress)
        result.update(did, ok=True, state=volume_state(layout),
                      lock_digest=hashlib.sha256(layout.lock.read_bytes()).hexdigest())
    except ForgeVolumeError as exc:
        result["error"] = exc.one_line()
    except Exception as exc:  # the caller gets one line whatever happened; the pod's log has the rest
        result["error"] = f"unexpected {type(exc).__name__}: {exc}"
    return result, f"{RESULT_MARKER} {run_id} {json.dumps(result, sort_keys=True)}"


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        return max(0.0, float(env.get(name, "") or default))
    except ValueError:
        return default


def terminate_self(env: Mapping[str, str]) -> None:
    """End this pod through RunPod's API with the pod's own key (RunPod gives every pod RUNPOD_POD_ID and a
    RUNPOD_API_KEY scoped to it): a pod whose caller is gone must not go on billing, and a container that
    merely exits is restarted by RunPod (and would install again)."""
    from provision.regions.api import ApiSettings, RunPodApi

    pod_id, key = env.get("RUNPOD_POD_ID", "").strip(), env.get("RUNPOD_API_KEY", "").strip()
    if not pod_id or not key:
        print("no RUNPOD_POD_ID or RUNPOD_API_KEY in this pod: it cannot end itself", flush=True)
        return
    print(f"the caller did not terminate pod {pod_id}; terminating it", flush=True)
    api = RunPodApi(key, ApiSettings.from_env())
    try:
        api.terminate_pod(pod_id)
    except ForgeVolumeError as exc:
        print(f"could not terminate pod {pod_id}: {exc.message}", flush=True)
    finally:
        api.close()


def main(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    # The caller enforces [runpod.pod] timeout; this deadline holds even when the caller is gone.
    deadline = _seconds(env, "FORGE_VOLUME_DEADLINE", 0.0)
    outcome: list[tuple[dict[str, Any], str]] = []
    worker = threading.Thread(target=lambda: outcome.append(run(env)), daemon=True)
    worker.start()
    worker.join(deadline or None)
    if outcome:
        result, line = outcome[0]
    else:
        result = {"ok": False, "forge_volume": __version__, "mode": env.get("FORGE_VOLUME_MODE"),
                  "error": f"the pod's work did not finish within {deadline:.0f} s ([runpod.pod] timeout)"}
        line = f"{RESULT_MARKER} {env.get('FORGE_VOLUME_RUN', '')} {json.dumps(result, sort_keys=True)}"
    print(line, flush=True)
    # The caller terminates the pod as soon as it reads that line; if it does not within
    # FORGE_VOLUME_LINGER seconds (it crashed, its machine went away), the pod ends itself.
    time.sleep(_seconds(env, "FORGE_VOLUME_LINGER", 600.0))
    terminate_self(env)
    code = 0 if result["ok"] else 1
    sys.stdout.flush()
    os._exit(code)  # a worker thread stuck past the deadline must not keep the process alive
