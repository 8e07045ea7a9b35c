"""Boot: settings, volume check, mount-point link, scratch, and Forge started in the background.

``build_worker`` never raises: whatever is wrong with the volume or the settings becomes the
worker's ``boot_error``, every job then fails at once with it, and the worker does not crash-loop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from provision.boot import owner
from provision.boot.layout_driver import (
    LOCAL_STAT,
    MIRROR_PREFIX,
    SHM,
    LayOut,
    VolumeCheck,
    mirror_place,
    start_lay_out,
    stat_latency,
)
from provision.errors import ForgeVolumeError
from provision.forge.launch import ForgeCommand, Launch, find_tcmalloc, forge_command, link_extensions, prepare_scratch
from provision.forge.offline import Refusals
from provision.forge.process import Confirm, ForgeProcess
from volume_layout import VolumeLayout, worker_volume
from worker.config import ConfigError, Settings, load_settings
from worker.handler import Worker
from worker.proxy import Proxy
from worker.volume import check_volume, link_mount_point

MIRROR_TIMEOUT = 120.0  # at most this long (and a quarter of the boot deadline) to lay out the boot set
SCRATCH_PREFIX = "forge-worker-"
SWEEP_WAIT = 30.0  # at most this long for the removal of dead workers' copies before laying out a new one


def say(message: str) -> None:
    sys.stdout.write(f"[worker] {message}\n")
    sys.stdout.flush()


class Leftovers:
    """What this worker made on local disk (its scratch, its copy of the code trees) and the processes using it,
    removed when it stops: at exit and on SIGTERM, the way RunPod and the local API stop a worker. A worker
    killed outright leaves them; the next one to start removes them (``provision.boot.owner``)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.mirrors: list[Path] = []
        self.children: list[subprocess.Popen[str]] = []
        self.forge: ForgeProcess | None = None
        self._lock = threading.RLock()
        self._started = False

    @staticmethod
    def remove_mirror(mirror: Path) -> None:
        """A copy no longer used (its lay-out failed, or Forge restarted from the volume): its memory back now.
        The lay-out's helper is left to prefetch for the boot from the volume (it no longer writes the copy)."""
        shutil.rmtree(mirror, ignore_errors=True)

    def remove(self) -> None:
        with self._lock:  # at exit and from the signal handler (maybe during the other): once, in this order
            if self._started:
                return
            self._started = True
            if self.forge is not None:
                self.forge.stop()
            for child in self.children:
                _end(child)
            for mirror in self.mirrors:
                shutil.rmtree(mirror, ignore_errors=True)
            shutil.rmtree(self.scratch, ignore_errors=True)


def _end(child: subprocess.Popen[str]) -> None:
    """Stop the lay-out's helper (it may still be writing into the copy) and wait for it."""
    if child.poll() is None:
        child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(10)


def remove_on_sigterm(worker: Worker) -> None:
    """SIGTERM (how RunPod and its local API stop a worker) removes the worker's leftovers before it exits, then
    does what it did before: the SDK's handler when it installed one after this (it restores this one on its
    way out), else the default, which ends the process without running ``atexit``."""
    cleanup = worker.cleanup
    if cleanup is None:
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        cleanup()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def build_worker(env: Mapping[str, str]) -> Worker:
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        settings = Settings(volume=worker_volume(env).absolute())
        say(f"error: {exc.one_line()}")
        return Worker(settings, settings.volume, Path(tempfile.gettempdir()), boot_error=exc)
    settings.scratch_root.mkdir(parents=True, exist_ok=True)
    # Workers killed outright leave their scratch and copy; removed in the background (a live one's never).
    sweep = threading.Thread(target=_sweep, args=(settings.scratch_root,), name="leftovers", daemon=True)
    sweep.start()
    scratch = owner.make(SCRATCH_PREFIX, settings.scratch_root)
    leftovers = Leftovers(scratch)
    atexit.register(leftovers.remove)
    worker = Worker(settings, settings.volume, scratch, cleanup=leftovers.remove)
    try:
        volume = check_volume(settings.volume)
        link = link_mount_point(volume)
    except ForgeVolumeError as exc:
        say(f"error: {exc.one_line()}")
        worker.boot_error = exc
        return worker
    if link:
        say(f"linked {link} -> {volume.layout.root} (the volume was provisioned at {link})")
    mirror_wait = min(MIRROR_TIMEOUT, settings.boot_timeout / 4)
    # The lay-out first: Forge's scratch and command are made while it runs (0.1 s on a volume of 5 ms).
    copy = _start_copy(settings, volume.layout, scratch, sweep, leftovers)
    forge_scratch = prepare_scratch(volume.layout, scratch / "forge")
    launch = Launch(spec_args=tuple(volume.forge_args), spec_env=volume.forge_env,
                    extra_args=tuple(settings.forge_args), port=settings.forge_port, tcmalloc=find_tcmalloc(),
                    passthrough=settings.env_passthrough)
    command = forge_command(volume.layout, forge_scratch, env, launch)
    checks: list[VolumeCheck] = []  # the fast boot's check of the volume behind its copy
    used: list[Path] = []  # the copy Forge was started from

    def prepare() -> ForgeCommand:
        chosen = command
        if copy is not None:
            mirror, pending = copy
            check = pending.wait(mirror_wait)
            if check is None:
                leftovers.remove_mirror(mirror)
            else:
                checks.append(check)
                used.append(mirror)
                code = VolumeLayout(mirror)
                if volume.layout.extensions_dir.is_dir():
                    link_extensions(forge_scratch, code.extensions_dir)
                chosen = forge_command(volume.layout, forge_scratch, env, launch, code=code)
        say(f"starting Forge: {' '.join(chosen.argv)}")
        return chosen

    def replacement() -> ForgeCommand | None:
        """If the volume behind the mirror changed, Forge is started again from the volume, with nothing of the
        copy: its extensions link leads to the volume's again, and the copy is removed."""
        problem = checks[0].problem(mirror_wait) if checks else None
        if problem is None:
            return None
        say(f"fast boot off: {problem}; restarting Forge from the volume: {' '.join(command.argv)}")
        if volume.layout.extensions_dir.is_dir():
            link_extensions(forge_scratch, volume.layout.extensions_dir)
        for mirror in used:
            leftovers.remove_mirror(mirror)
        return command

    confirm = Confirm(done=lambda: not checks or checks[0].done(), replacement=replacement)
    forge = ForgeProcess(command, port=settings.forge_port, boot_timeout=settings.boot_timeout, prepare=prepare,
                         confirm=confirm)
    leftovers.forge = forge
    forge.start()
    worker.forge = forge
    worker.proxy = Proxy(settings.forge_url, settings.request_timeout)
    worker.refusals = Refusals(forge_scratch.offline / "refused.jsonl")
    return worker


def _start_copy(settings: Settings, layout: VolumeLayout, scratch: Path, sweep: threading.Thread,
                leftovers: Leftovers) -> tuple[Path, LayOut] | None:
    """The fast boot's lay-out started (where, and its child) when it is on, or ``auto`` finds the volume slower
    than a local disk; None to boot from the volume.

    Called from the thread that builds the worker (the main thread, which lives as long as the worker: the child
    dies with the thread that starts it). It may wait for the removal of dead workers' copies (at most
    ``SWEEP_WAIT``), which usually ended long before."""
    try:
        fast = settings.fast_boot == "on"
        if settings.fast_boot == "auto":
            latency = stat_latency(layout)
            fast = latency >= LOCAL_STAT
            if not fast:
                say(f"fast boot: not needed, the volume answers like a local disk (a stat in {latency * 1e6:.0f} µs)")
        if not fast:
            return None
        sweep.join(SWEEP_WAIT)  # a dead worker's copy may hold the room this one needs
        mirror = mirror_place(layout, scratch)
        leftovers.mirrors.append(mirror)
        started = start_lay_out(layout, mirror, say, leftovers.children.append)
    except Exception as exc:  # a failed speed-up must not keep Forge from starting
        say(f"fast boot off: it could not start ({exc!r}); booting from the volume")
        return None
    if started is None:
        leftovers.remove_mirror(mirror)
        return None
    return mirror, started


def _sweep(scratch_root: Path) -> None:
    for parent, prefix in ((scratch_root, SCRATCH_PREFIX), (SHM, MIRROR_PREFIX)):
        if removed := owner.remove_abandoned(parent, prefix):
            say(f"removed {len(removed)} folder(s) of stopped workers from {parent}: {', '.join(removed)}")
