"""Install's last step: start Forge from the volume exactly as a worker will, and see its API answer.

The boot uses the worker's own builder (``provision.forge.launch.forge_command``: API only, 127.0.0.1, the
spec's args and env, the same environment rules), plus ``--always-cpu`` on a pod without a GPU. It
is also Forge's first start on this volume: Forge creates its own folders and bookkeeping files
under ``models/`` (``Codeformer``, ``GFPGAN``, ``diffusers/version.txt``...) and ``config_states/``
in the checkout when they are missing. Made here, once, they are already there when a worker boots,
so workers write nothing to the shared volume. What appeared under ``models/`` is recorded in
state.json (``boot.forge_files``): ``verify`` and ``refresh-models --prune`` leave those files alone
(``provision.forge.files``).

Forge runs under ``tracer.py``, and when the volume has a checkpoint a 64x64 one-step txt2img
follows the boot: what Forge read for both becomes the volume's boot set (``provision.boot.boot_set``),
from which workers boot from local disk. A warm-up that fails is noted, not fatal: the boot is proved.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from provision.boot import boot_set
from provision.boot.tracer import RECORD_ENV
from provision.errors import CommandError
from provision.forge.launch import Launch, find_tcmalloc, forge_command, has_gpu, prepare_scratch
from provision.forge.process import BOOTING, READY, ForgeProcess
from provision.records.state import State, now, update_state
from volume_layout import VolumeLayout

DEFAULT_TIMEOUT = 900.0  # a cold start from a network volume: imports of torch and Forge, extensions' scripts
TAIL = 15
# The cheapest generation Forge does: it loads the checkpoint and runs every stage of a first txt2img once.
WARM_UP = {"prompt": "forge-volume boot proof", "width": 64, "height": 64, "steps": 1, "batch_size": 1,
           "save_images": False, "send_images": False}


class BootProofError(CommandError):
    """Forge did not boot from the freshly installed volume."""

    hint = ("the lines after the cause are the end of Forge's log; fix what it names (a package, an extension, "
            "the spec's args or env) and run `forge-volume install` again")


def boot_timeout(env: Mapping[str, str]) -> float:
    raw = env.get("FORGE_BOOT_TIMEOUT", "").strip()
    try:
        return float(raw) if raw and float(raw) > 0 else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` (folders and files, links not followed), relative to ``root``'s parent."""
    out: set[str] = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(folder, name), root.parent))
    return out


def launch_for_install(spec_args: list[str] | tuple[str, ...], spec_env: Mapping[str, str], port: int) -> Launch:
    """The worker's launch, on a free loopback port, on the CPU when this machine has no GPU."""
    return Launch(spec_args=tuple(spec_args), spec_env=dict(spec_env), port=port, always_cpu=not has_gpu(),
                  tcmalloc=find_tcmalloc())


def _warm_up_checkpoint(layout: VolumeLayout, checkpoints: Sequence[str]) -> str | None:
    """The checkpoint the warm-up loads: the lock's first that is on the volume (its name in the kind's folder).
    Never another file of the folder (one the lock no longer lists sorts first as often as not)."""
    folder = layout.kind_dir("checkpoint")
    for rel in checkpoints:
        path = layout.absolute(rel)
        if path.suffix in boot_set.CHECKPOINT_SUFFIXES and path.is_file() and path.is_relative_to(folder):
            return path.relative_to(folder).as_posix()
    return None


def _warm_up(port: int, timeout: float, checkpoint: str) -> str | None:
    """A tiny txt2img with ``checkpoint``, so the boot set holds what a first generation reads; why it failed,
    or None."""
    body = json.dumps({**WARM_UP, "override_settings": {"sd_model_checkpoint": checkpoint},
                       "override_settings_restore_afterwards": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        return None if answer.status == 200 else f"HTTP {answer.status}"
    except (OSError, http.client.HTTPException) as exc:
        return str(exc) or type(exc).__name__
    finally:
        conn.close()


def _traced_dump(record: Path, timeout: float) -> dict[str, Any] | None:
    """Ask the tracer in Forge's process for what it saw; None when it does not answer in time."""
    record.with_name(record.name + ".request").touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.exists():
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
        time.sleep(0.05)
    return None


def prove_boot(layout: VolumeLayout, spec_args: list[str] | tuple[str, ...], spec_env: Mapping[str, str], *,
               timeout: float, key: str = "", checkpoints: Sequence[str] = ()) -> dict[str, Any]:
    """Boot Forge from the volume, wait for its API, run a warm-up txt2img when there is a checkpoint, stop it,
    and record the boot set (``provision.boot.boot_set``) for ``key``; the record for state.json, or BootProofError."""
    before = _tree(layout.models_dir)
    scratch_root = Path(tempfile.mkdtemp(prefix="forge-volume-boot-"))  # local disk, never the volume
    port = _free_port()
    record = scratch_root / "trace.json"
    trace: dict[str, Any] | None = None
    checkpoint = _warm_up_checkpoint(layout, checkpoints)  # checkpoints: the lock's, relative to the volume
    warm_up: str | None = None if checkpoint else "no checkpoint of the lock on the volume"
    boot_set.evict_large_libraries(layout)
    started = time.monotonic()
    try:
        scratch = prepare_scratch(layout, scratch_root / "forge")
        command = forge_command(layout, scratch, os.environ, launch_for_install(spec_args, spec_env, port))
        command.argv.insert(1, str(boot_set.TRACER))
        command.env[RECORD_ENV] = str(record)
        forge = ForgeProcess(command, port=port, boot_timeout=timeout, out=lambda line: None)
        forge.start()
        try:
            # The process's watcher enforces the deadline (and stops Forge); the margin only guards against it.
            deadline = started + timeout + 30.0
            while forge.phase == BOOTING and time.monotonic() < deadline:
                time.sleep(0.1)
            ok = forge.phase == READY
            failure = "" if ok else forge.failure()
            if ok:
                if checkpoint:
                    warm_up = _warm_up(port, max(deadline - time.monotonic(), 30.0), checkpoint)
                trace = _traced_dump(record, 30.0)
            tail = forge.tail(TAIL)
        finally:
            forge.stop()
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    seconds = round(time.monotonic() - started, 1)
    if not ok:
        log = " | ".join(line for line in tail if line.strip())
        message = f"Forge did not boot from the volume (install's boot proof, {' '.join(command.argv[3:])}): " \
                  f"{failure}" + (f" || Forge's log: {log}" if log else "")
        _record_failure(layout, failure)
        raise BootProofError(message)
    made = sorted(_tree(layout.models_dir) - before)
    out: dict[str, Any] = {"ok": True, "seconds": seconds, "argv": command.argv[3:], "forge_files": made, "at": now()}
    if warm_up:
        out["warm_up"] = warm_up
    out["boot_set"] = _record_boot_set(layout, trace, key, checkpoints)
    return out


def _record_boot_set(layout: VolumeLayout, trace: dict[str, Any] | None, key: str,
                     checkpoints: Sequence[str]) -> str:
    """Write the boot set from the tracer's record; one line saying what was recorded (or why nothing was)."""
    if trace is None:
        layout.boot_set_index.unlink(missing_ok=True)
        return "not recorded: Forge's tracer did not answer (workers boot from the volume)"
    index, files = boot_set.build_index(layout, trace, key, set(checkpoints))
    boot_set.write(layout, index, files)
    return boot_set.summary(index)


def _record_failure(layout: VolumeLayout, failure: str) -> None:
    def change(state: State) -> None:
        state["boot"] = {"ok": False, "error": failure[:500], "at": now()}

    update_state(layout, change)


def boot_problem(state: Mapping[str, Any]) -> str | None:
    """Why this volume's preparation is incomplete (one line: install's boot proof failed or is missing), or None."""
    boot = state.get("boot") or {}
    if boot.get("ok") is False:
        error = " ".join(str(boot.get("error") or "no cause recorded").split())
        return f"this volume's preparation is incomplete: install's boot proof failed at {boot.get('at')} ({error})"
    if not boot.get("ok") or "boot" not in (state.get("steps") or {}):
        return ("this volume's preparation is incomplete: install has not proved that Forge boots from it "
                "(no boot proof in state.json; an install older than this worker, or one that did not finish)")
    return None
