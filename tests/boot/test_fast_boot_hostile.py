"""The fast boot end to end when the volume is read-only, its boot set damaged, or the worker stopped or killed.

Real workers on RunPod's local API boot the Forge stand-in from a volume installed by the real installer.
A read-only volume is a read-only bind mount in the worker's own mount namespace (``unshare``: root).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.boot.test_fast_boot import TXT2IMG, boot, forge_of, with_checkpoint
from tests.conftest import snapshot
from tests.faults.platform import FakePlatform, start_fleet_worker
from tests.helpers import boot_sets
from tests.helpers.procs import stop_group
from tests.helpers.read_only import available, read_only
from tests.provision.conftest import cli
from tests.worker.conftest import WorkerProc, start_worker, worker_env
from tests.worker.test_forge_env import children
from volume_layout import VolumeLayout

pytestmark = pytest.mark.slow
needs_root = pytest.mark.skipif(not available(), reason="a read-only bind mount needs root and unshare")


def copy_of(worker: WorkerProc) -> Path:
    """The copy Forge was first started from: the worker's first 'starting Forge:' line names its interpreter."""
    first = next(line for line in worker.log().splitlines() if line.startswith("[worker] starting Forge: "))
    return Path(first.split()[3]).parents[2]


def served(worker: WorkerProc) -> None:
    out = worker.runsync(TXT2IMG)
    assert out["status"] == "COMPLETED", out


def forge_pid(worker: WorkerProc) -> int:
    [pid] = [pid for pid in children(worker.proc.pid) if b"launch.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return pid


def gone(pid: int, deadline: float = 30.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@needs_root
def test_a_read_only_volume_boots_forge_from_the_copy(installed_volume: Path, tmp_path: Path) -> None:
    with_checkpoint(installed_volume)
    worker = start_worker(worker_env(installed_volume, tmp_path / "scratch"), tmp_path / "logs",
                          wrap=read_only(installed_volume))
    try:
        served(worker)
        argv0, _ = forge_of(worker)
        assert argv0.startswith(str(copy_of(worker))) and not argv0.startswith(str(installed_volume)), argv0
        assert "fast boot off" not in worker.log()
    finally:
        worker.stop()


def venv_behind_a_link(volume: Path) -> None:
    """The venv moved to venv-real with a link in its place, its Python on the volume (a link to this one's
    prefix) as its home; ``forge-volume install`` then records the boot set of that shape."""
    (volume / "python").symlink_to(sys.base_prefix, target_is_directory=True)
    cfg = volume / "venv" / "pyvenv.cfg"
    lines = [f"home = {volume / 'python' / 'bin'}" if line.startswith("home") else line
             for line in cfg.read_text().splitlines()]
    cfg.write_text("\n".join(lines) + "\n")
    (volume / "venv").rename(volume / "venv-real")
    (volume / "venv").symlink_to("venv-real", target_is_directory=True)
    installed = cli("install")
    assert installed.exit_code == 0, installed.output
    assert "ran boot;" in installed.stdout


@needs_root
def test_a_venv_that_is_a_link_is_never_written_through(installed_volume: Path, tmp_path: Path) -> None:
    venv_behind_a_link(installed_volume)
    with_checkpoint(installed_volume)
    before = snapshot(installed_volume)

    writable = boot(installed_volume, tmp_path, "writable")
    assert snapshot(installed_volume) == before  # the venv's pyvenv.cfg above all
    assert "fast boot off" not in writable.log and "[worker] fast boot: " in writable.log

    worker = start_worker(worker_env(installed_volume, tmp_path / "scratch-ro"), tmp_path / "logs-ro",
                          wrap=read_only(installed_volume))
    try:
        served(worker)
        assert "fast boot off" not in worker.log() and "[worker] fast boot: " in worker.log()
        assert forge_of(worker)[0] == str(copy_of(worker) / "venv" / "bin" / "python")
    finally:
        worker.stop()


@needs_root
def test_a_crafted_boot_set_on_a_read_only_volume_boots_from_the_volume_and_writes_nowhere(
        installed_volume: Path, tmp_path: Path) -> None:
    layout = VolumeLayout(installed_volume)
    outside = tmp_path / "outside"
    outside.mkdir()
    data = boot_sets.load(layout)
    forge = "stable-diffusion-webui-forge"
    boot_sets.list_entry(data, forge, "evil", "l", str(outside))
    boot_sets.add_file(layout, data, f"{forge}/evil/pwned.py", b"print('pwned')\n", listed=False)
    boot_sets.save(layout, data)
    with_checkpoint(installed_volume)
    worker = start_worker(worker_env(installed_volume, tmp_path / "scratch"), tmp_path / "logs",
                          wrap=read_only(installed_volume))
    try:
        served(worker)
        assert forge_of(worker)[0] == str(installed_volume / "venv" / "bin" / "python")
        [line] = [line for line in worker.log().splitlines() if "fast boot off" in line]
        assert f"the boot set breaks a rule of the lay-out: {forge}/evil/pwned.py is not a file" in line, line
        assert os.listdir(outside) == []
    finally:
        worker.stop()


def test_a_restart_from_the_volume_uses_nothing_of_the_copy(installed_volume: Path, tmp_path: Path) -> None:
    site = next((installed_volume / "venv" / "lib").glob("python3*/site-packages"))
    (site / "added_by_hand.py").write_text("VALUE = 1\n")
    with_checkpoint(installed_volume)
    worker = start_worker(worker_env(installed_volume, tmp_path / "scratch"), tmp_path / "logs")
    try:
        served(worker)
        assert "restarting Forge from the volume" in worker.log()
        copy = copy_of(worker)
        pid = forge_pid(worker)
        assert not copy.exists()  # removed: nothing can be read from it
        [scratch] = (tmp_path / "scratch").iterdir()
        assert os.readlink(scratch / "forge" / "data" / "extensions") == str(installed_volume / "extensions")
        for name in ("cmdline", "environ", "maps"):
            assert str(copy).encode() not in Path(f"/proc/{pid}/{name}").read_bytes(), name
        assert os.readlink(f"/proc/{pid}/cwd") == str(installed_volume / "stable-diffusion-webui-forge")
    finally:
        worker.stop()


def test_a_damaged_files_bin_boots_from_the_volume_verify_names_it_install_records_it_again(
        installed_volume: Path, tmp_path: Path) -> None:
    archive = VolumeLayout(installed_volume).boot_set_archive
    size = archive.stat().st_size
    with open(archive, "r+b") as damaged:
        damaged.seek(size // 2)
        byte = damaged.read(1)
        damaged.seek(size // 2)
        damaged.write(bytes([byte[0] ^ 0x55]))

    off = boot(installed_volume, tmp_path, "damaged")

    assert off.argv0 == str(installed_volume / "venv" / "bin" / "python")
    [line] = [line for line in off.log.splitlines() if "fast boot off" in line]
    assert "the boot set is damaged: files.bin does not match its digest (bytes " in line
    assert "(run `forge-volume install` to record it again); booting from the volume" in line
    verify = cli("verify")
    assert verify.exit_code == 1
    assert "boot set: .forge-volume/boot-set/files.bin does not match its digest" in verify.output
    again = cli("install")
    assert again.exit_code == 0 and "ran boot;" in again.stdout, again.output
    assert cli("verify").exit_code == 0
    assert not boot(installed_volume, tmp_path, "again").argv0.startswith(str(installed_volume))


@pytest.mark.parametrize("loop", ["local API", "job loop"])
def test_sigterm_removes_the_copy_and_the_scratch_before_the_worker_exits(installed_volume: Path, tmp_path: Path,
                                                                          loop: str) -> None:
    with_checkpoint(installed_volume)
    env = worker_env(installed_volume, tmp_path / "scratch")
    with FakePlatform() as platform:
        if loop == "local API":
            worker = start_worker(env, tmp_path / "logs")
            served(worker)
            proc, log = worker.proc, worker.log
        else:  # RunPod's production job loop, against a loopback job platform
            fleet = start_fleet_worker(platform, "w", env, tmp_path / "logs")
            record = fleet.run(TXT2IMG)
            assert record.result is not None and "error" not in record.result, record.result
            proc, log = fleet.proc, fleet.log
        try:
            first = next(line for line in log().splitlines() if line.startswith("[worker] starting Forge: "))
            copy = Path(first.split()[3]).parents[2]
            [forge] = [pid for pid in children(proc.pid) if b"launch.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert copy.is_dir() and len(list((tmp_path / "scratch").iterdir())) == 1

            proc.send_signal(signal.SIGTERM)  # how RunPod and the local API stop a worker
            proc.wait(60)

            assert not copy.exists()
            assert list((tmp_path / "scratch").iterdir()) == []
            assert gone(forge, 5)
        finally:
            stop_group(proc)


def test_a_starting_worker_removes_what_killed_workers_left_and_never_a_live_ones(installed_volume: Path,
                                                                                 tmp_path: Path) -> None:
    with_checkpoint(installed_volume)
    root = tmp_path / "scratch"
    env = worker_env(installed_volume, root)
    workers = []
    try:
        killed = start_worker(env, tmp_path / "logs-killed")
        workers.append(killed)
        served(killed)
        killed_copy, killed_forge = copy_of(killed), forge_pid(killed)
        [killed_scratch] = root.iterdir()
        live = start_worker(worker_env(installed_volume, root), tmp_path / "logs-live")
        workers.append(live)
        served(live)
        assert killed_copy.is_dir() and killed_scratch.is_dir()  # its owner was alive

        killed.proc.kill()
        killed.proc.wait(30)
        assert gone(killed_forge)  # Forge dies with its worker
        assert killed_copy.is_dir() and killed_scratch.is_dir()  # a SIGKILL leaves them

        later = start_worker(worker_env(installed_volume, root), tmp_path / "logs-later")
        workers.append(later)
        served(later)

        assert not killed_copy.exists() and not killed_scratch.exists()
        assert copy_of(live).is_dir() and len(list(root.iterdir())) == 2  # the live worker's and the new one's
        served(live)
    finally:
        for worker in workers:
            worker.stop()
