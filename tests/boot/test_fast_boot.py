"""Fast boot, end to end: install records the boot set, a worker boots Forge from it laid out on local disk.

Real workers on RunPod's local API boot the Forge stand-in from a volume installed by the real installer;
the tests read where Forge's process runs from (``/proc/<pid>/cmdline`` and ``cwd``) and what the
worker's log says, and change the volume the ways users do (a package added by hand, the switch off).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from provision.boot import boot_set
from tests.conftest import snapshot
from tests.helpers import boot_sets
from tests.provision.conftest import cli
from tests.worker.conftest import CHECKPOINT, WorkerProc, start_worker, worker_env
from tests.worker.test_forge_env import children
from volume_layout import VolumeLayout
from worker.config import ConfigError, load_settings

pytestmark = pytest.mark.slow
SAMPLERS = {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}}
TXT2IMG = {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {"prompt": "a", "steps": 2}}


def forge_of(worker: WorkerProc) -> tuple[str, Path]:
    """Forge's interpreter (argv[0]) and working folder, read from /proc."""
    [pid] = [pid for pid in children(worker.proc.pid) if b"launch.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    return argv0, Path(os.readlink(f"/proc/{pid}/cwd"))


def with_checkpoint(volume: Path) -> None:
    checkpoint = volume / "models" / "Stable-diffusion" / CHECKPOINT
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"not really a checkpoint\n")


@dataclass
class Booted:
    out: dict[str, object]  # a txt2img job's answer through RunPod's local API
    argv0: str  # Forge's interpreter
    cwd: Path  # Forge's working folder
    log: str  # the worker's log


def boot(volume: Path, tmp_path: Path, name: str, **env: str) -> Booted:
    """Start a worker, run one txt2img, read where its Forge runs from, stop it."""
    with_checkpoint(volume)
    worker = start_worker(worker_env(volume, tmp_path / name, **env), tmp_path / f"logs-{name}")
    try:
        out = worker.runsync(TXT2IMG)
        assert out["status"] == "COMPLETED", out
        argv0, cwd = forge_of(worker)
        return Booted(out, argv0, cwd, worker.log())
    finally:
        worker.stop()


def test_install_records_the_boot_set_and_a_worker_boots_forge_from_it(installed_volume: Path, tmp_path: Path) -> None:
    layout = VolumeLayout(installed_volume)
    index = json.loads(layout.boot_set_index.read_text())
    copied = {rel for rel, *_ in index["files"]}
    assert "stable-diffusion-webui-forge/launch.py" in copied  # what the stand-in's boot opened
    assert any(rel.startswith("venv/lib/") for rel in copied)
    with_checkpoint(installed_volume)
    before = snapshot(installed_volume)

    fast = boot(installed_volume, tmp_path, "fast")

    assert not fast.argv0.startswith(str(installed_volume)) and fast.argv0.endswith("/venv/bin/python"), fast.argv0
    assert not str(fast.cwd).startswith(str(installed_volume)) and fast.cwd.name == "stable-diffusion-webui-forge"
    assert f"fast boot: {len(copied)} files" in fast.log
    # Forge's first answer waited for the check of every recorded folder, which says how long it took.
    assert f"fast boot: the volume checked ({len(index['dirs'])} folders unchanged) in " in fast.log
    assert snapshot(installed_volume) == before  # nothing written to the volume


def test_with_the_switch_off_forge_boots_from_the_volume(installed_volume: Path, tmp_path: Path) -> None:
    off = boot(installed_volume, tmp_path, "off", FORGE_FAST_BOOT="0")

    assert off.argv0 == str(installed_volume / "venv" / "bin" / "python")
    assert off.cwd == installed_volume / "stable-diffusion-webui-forge"
    assert "fast boot" not in off.log


def test_by_default_a_volume_that_answers_like_a_local_disk_is_booted_from_directly(
        installed_volume: Path, tmp_path: Path) -> None:
    auto = boot(installed_volume, tmp_path, "auto", FORGE_FAST_BOOT="auto")

    assert auto.argv0 == str(installed_volume / "venv" / "bin" / "python")
    assert "fast boot: not needed, the volume answers like a local disk (a stat in " in auto.log


def test_a_venv_changed_by_hand_boots_from_the_volume_until_install_records_the_set_again(
        installed_volume: Path, tmp_path: Path) -> None:
    site = next((installed_volume / "venv" / "lib").glob("python3*/site-packages"))
    (site / "added_by_hand.py").write_text("VALUE = 1\n")

    stale = boot(installed_volume, tmp_path, "stale")

    # Forge started from the copy while the volume behind it was checked; the check found the change before
    # Forge's first answer was let through, and Forge was started again, from the volume.
    assert stale.argv0 == str(installed_volume / "venv" / "bin" / "python")
    [line] = [line for line in stale.log.splitlines() if "fast boot off" in line]
    assert f"the volume changed since the boot set was recorded: {site.relative_to(installed_volume)} was modified" \
        in line and "run `forge-volume install`" in line and "restarting Forge from the volume" in line
    starts = [line for line in stale.log.splitlines() if line.startswith("[worker] starting Forge: ")]
    assert len(starts) == 1 and str(installed_volume) not in starts[0].split()[3], starts  # first from the copy
    assert stale.log.count("[worker] Forge ready after") == 1  # ready once: from the volume

    verify = cli("verify")
    assert verify.exit_code == 1
    assert f"boot set: {site.relative_to(installed_volume)} was modified; workers boot Forge straight from the volume" \
        in verify.output
    again = cli("install")  # the fix the line names: install sees the change and records the set again
    assert again.exit_code == 0, again.output
    assert "ran boot;" in again.stdout and "boot set: " in again.stdout
    assert cli("verify").exit_code == 0
    assert not boot(installed_volume, tmp_path, "again").argv0.startswith(str(installed_volume))


def test_a_volume_without_a_boot_set_boots_as_before_and_says_why(installed_volume: Path, tmp_path: Path) -> None:
    VolumeLayout(installed_volume).boot_set_index.unlink()
    assert "fast boot off: no boot set recorded (run `forge-volume install` to record one); booting from the volume" \
        in boot(installed_volume, tmp_path, "none").log


def test_a_bad_switch_value_is_a_one_line_boot_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"FORGE_VOLUME": str(tmp_path), "FORGE_FAST_BOOT": "maybe"})
    assert info.value.one_line() == ("FORGE_FAST_BOOT='maybe' is not auto, on or off (set FORGE_FAST_BOOT=auto (the "
                                     "default: when the volume answers over a network), 1 or 0)")
    assert load_settings({"FORGE_VOLUME": str(tmp_path)}).fast_boot == "auto"
    assert load_settings({"FORGE_VOLUME": str(tmp_path), "FORGE_FAST_BOOT": "On"}).fast_boot == "on"


def test_a_boot_set_an_older_tracer_recorded_still_boots_and_install_records_it_again(
        installed_volume: Path, tmp_path: Path) -> None:
    """A worker uses a boot set of any revision (a volume keeps booting fast after an upgrade); install
    records it again with what the tracer now sees (the folders Forge only probed, the files read at its start)."""
    layout = VolumeLayout(installed_volume)
    data = boot_sets.load(layout)
    assert data["trace"] == boot_set.TRACE
    del data["trace"]  # as forge-volume wrote it before revisions existed
    boot_sets.save(layout, data)

    old = boot(installed_volume, tmp_path, "old")
    assert not old.argv0.startswith(str(installed_volume)) and "fast boot off" not in old.log

    again = cli("install")
    assert again.exit_code == 0, again.output
    assert "ran boot;" in again.stdout
    assert boot_sets.load(layout)["trace"] == boot_set.TRACE
    assert "ran boot;" not in cli("install").stdout  # once recorded again, nothing to do


def test_a_boot_set_written_before_files_bin_was_compressed_still_boots_and_install_compresses_it(
        installed_volume: Path, tmp_path: Path) -> None:
    """A version 2 boot set (files.bin the files' bytes as they are) is laid out as it is; install records it
    again as version 3, a zstd frame per chunk."""
    layout = VolumeLayout(installed_volume)
    data = boot_sets.load(layout)
    boot_sets.as_version_2(layout, data)
    boot_sets.save(layout, data)
    raw = layout.boot_set_archive.stat().st_size

    old = boot(installed_volume, tmp_path, "old")
    assert not old.argv0.startswith(str(installed_volume)) and "fast boot off" not in old.log

    again = cli("install")
    assert again.exit_code == 0, again.output
    assert "ran boot;" in again.stdout
    data = boot_sets.load(layout)
    assert data["version"] == boot_set.VERSION == 3
    assert sum(unpacked for _, _, unpacked in data["chunks"]) == raw
    assert layout.boot_set_archive.stat().st_size < raw / 2  # Python's sources and bytecode
    assert "ran boot;" not in cli("install").stdout
    new = boot(installed_volume, tmp_path, "new")
    assert not new.argv0.startswith(str(installed_volume)) and "fast boot off" not in new.log
