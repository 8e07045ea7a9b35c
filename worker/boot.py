"""Boot: settings, volume check, mount-point link, scratch, and Forge started in the background.

``build_worker`` never raises: whatever is wrong with the volume or the settings becomes the
worker's ``boot_error``, every job then fails at once with it, and the worker does not crash-loop.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from provision.boot.layout_driver import LOCAL_STAT, VolumeCheck, lay_out, mirror_place, stat_latency
from provision.errors import ForgeVolumeError
from provision.forge.launch import ForgeCommand, Launch, find_tcmalloc, forge_command, link_extensions, prepare_scratch
from provision.forge.process import Confirm, ForgeProcess
from volume_layout import VolumeLayout, worker_volume
from worker.config import ConfigError, Settings, load_settings
from worker.handler import Worker
from worker.proxy import Proxy
from worker.volume import check_volume, link_mount_point

MIRROR_TIMEOUT = 120.0  # at most this long (and a quarter of the boot deadline) to lay out the boot set


def say(message: str) -> None:
    sys.stdout.write(f"[worker] {message}\n")
    sys.stdout.flush()


def build_worker(env: Mapping[str, str]) -> Worker:
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        settings = Settings(volume=worker_volume(env).absolute())
        say(f"error: {exc.one_line()}")
        return Worker(settings, settings.volume, Path(tempfile.gettempdir()), boot_error=exc)
    settings.scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="forge-worker-", dir=settings.scratch_root))
    atexit.register(shutil.rmtree, scratch, True)
    worker = Worker(settings, settings.volume, scratch)
    try:
        volume = check_volume(settings.volume)
        link = link_mount_point(volume)
    except ForgeVolumeError as exc:
        say(f"error: {exc.one_line()}")
        worker.boot_error = exc
        return worker
    if link:
        say(f"linked {link} -> {volume.layout.root} (the volume was provisioned at {link})")
    forge_scratch = prepare_scratch(volume.layout, scratch / "forge")
    launch = Launch(spec_args=tuple(volume.forge_args), spec_env=volume.forge_env,
                    extra_args=tuple(settings.forge_args), port=settings.forge_port, tcmalloc=find_tcmalloc(),
                    passthrough=settings.env_passthrough)
    command = forge_command(volume.layout, forge_scratch, env, launch)
    mirror_wait = min(MIRROR_TIMEOUT, settings.boot_timeout / 4)
    checks: list[VolumeCheck] = []  # the fast boot's check of the volume behind its copy

    def prepare() -> ForgeCommand:
        chosen = command
        fast = settings.fast_boot == "on"
        if settings.fast_boot == "auto":
            latency = stat_latency(volume.layout)
            fast = latency >= LOCAL_STAT
            if not fast:
                say(f"fast boot: not needed, the volume answers like a local disk (a stat in {latency * 1e6:.0f} µs)")
        if fast:
            mirror = mirror_place(volume.layout, scratch)
            if mirror.parent != scratch:
                atexit.register(shutil.rmtree, mirror, True)
            check = lay_out(volume.layout, mirror, mirror_wait, say)
            if check is not None:
                checks.append(check)
                code = VolumeLayout(mirror)
                if volume.layout.extensions_dir.is_dir():
                    link_extensions(forge_scratch, code.extensions_dir)
                chosen = forge_command(volume.layout, forge_scratch, env, launch, code=code)
        say(f"starting Forge: {' '.join(chosen.argv)}")
        return chosen

    def replacement() -> ForgeCommand | None:
        """If the volume behind the mirror changed, Forge is started again from the volume."""
        problem = checks[0].problem(mirror_wait) if checks else None
        if problem is None:
            return None
        say(f"fast boot off: {problem}; restarting Forge from the volume: {' '.join(command.argv)}")
        return command

    confirm = Confirm(done=lambda: not checks or checks[0].done(), replacement=replacement)
    forge = ForgeProcess(command, port=settings.forge_port, boot_timeout=settings.boot_timeout, prepare=prepare,
                         confirm=confirm)
    forge.start()
    atexit.register(forge.stop)
    worker.forge = forge
    worker.proxy = Proxy(settings.forge_url, settings.request_timeout)
    return worker
