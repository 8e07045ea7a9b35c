"""Install's boot proof, seen from both halves: install fails with Forge's cause, a worker refuses a volume
whose preparation is incomplete, Forge's own first-start files are no strays, and a worker's boot writes
nothing to a volume the boot proof prepared."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from provision.errors import StateError
from tests.conftest import snapshot
from tests.helpers.forge_world import World
from tests.provision.conftest import cli, state_of
from tests.worker.conftest import CHECKPOINT, module_volume, run_once, start_worker, worker_env
from volume_layout import VolumeLayout
from worker.volume import check_volume

pytestmark = pytest.mark.slow
SAMPLERS = {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}}
TXT2IMG = {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {"prompt": "a", "steps": 2}}


def test_install_fails_with_forges_cause_and_a_worker_then_refuses_the_volume_in_one_line(
        provisioned_world: World, installed_volume: Path, tmp_path: Path) -> None:
    # Forge's preparation passes, but Forge dies at boot (the stand-in's CUDA crash): only a boot shows it.
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(provisioned_world.spec().replace("env = { ", 'env = { FORGE_STANDIN_MODE = "crash_at_boot", '))
    assert cli("lock").exit_code == 0

    failed = cli("install")

    assert failed.exit_code == 1, failed.output
    [error] = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert "Forge did not boot from the volume (install's boot proof, --nowebui --api" in error
    assert "Forge exited with code 1 while booting" in error
    assert "Forge's log: " in error and "CUDA error: no kernel image is available" in error  # the log's tail
    state = state_of(installed_volume)
    assert state["boot"]["ok"] is False and "CUDA error" in state["boot"]["error"]
    verify = cli("verify")
    assert verify.exit_code == 1 and "boot: Forge did not boot from the volume at the last install" in verify.output

    worker = start_worker(worker_env(installed_volume, tmp_path / "scratch"), tmp_path / "logs")
    try:
        out = worker.runsync(SAMPLERS)
    finally:
        worker.stop()
    assert out["status"] == "FAILED", out
    message = str(out["error"])
    assert "\\n" not in message and "\n" not in message
    assert "this volume's preparation is incomplete: install's boot proof failed at " in message
    assert "CUDA error: no kernel image is available" in message
    assert "run `forge-volume install` on a pod with this volume attached, then restart the workers" in message
    assert "starting Forge" not in worker.log()  # refused before Forge was started

    # Fixed spec: install runs the boot proof again and the volume is ready.
    spec.write_text(provisioned_world.spec())
    assert cli("lock").exit_code == 0
    fixed = cli("install")
    assert fixed.exit_code == 0, fixed.output
    assert state_of(installed_volume)["boot"]["ok"] is True
    assert cli("verify").exit_code == 0


def test_a_volume_without_a_boot_proof_is_refused_with_the_fix(installed_volume: Path) -> None:
    state = state_of(installed_volume)
    del state["boot"], state["steps"]["boot"]  # as an install by an older forge-volume left it
    VolumeLayout(installed_volume).state.write_text(json.dumps(state))
    with pytest.raises(StateError) as info:
        check_volume(installed_volume)
    assert info.value.one_line() == (
        "this volume's preparation is incomplete: install has not proved that Forge boots from it (no boot proof "
        "in state.json; an install older than this worker, or one that did not finish) (run `forge-volume install` "
        "on a pod with this volume attached, then restart the workers)")
    assert cli("install").exit_code == 0  # the fix: only the boot proof runs
    check_volume(installed_volume)


def test_forges_own_files_are_neither_extras_nor_pruned(installed_volume: Path) -> None:
    own = [installed_volume / "models" / "diffusers" / name for name in ("version.txt", "version_diffusers_cache.txt")]
    assert all(path.is_file() for path in own)  # made by Forge's first start, in the boot proof
    stray = installed_volume / "models" / "Lora" / "stray.safetensors"
    stray.write_bytes(b"not in the lock")

    verify = cli("verify")
    assert verify.exit_code == 0, verify.output
    assert "models/Lora/stray.safetensors" in verify.output and "diffusers" not in verify.output
    pruned = cli("refresh-models", "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert not stray.exists() and all(path.is_file() for path in own)
    assert "diffusers" not in pruned.output


def test_forges_first_start_files_removed_later_are_made_again_by_install(installed_volume: Path) -> None:
    codeformer = installed_volume / "models" / "Codeformer"
    codeformer.rmdir()
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert "ran boot;" in result.stdout and codeformer.is_dir()


def test_a_venv_lifted_over_forges_pins_makes_forge_exit_at_boot_as_the_real_one_does(
        provisioned_world: World, tmp_path: Path) -> None:
    volume = module_volume(provisioned_world, tmp_path)
    subprocess.run([volume / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "forge-req-dep==2.0"], check=True)
    out = run_once(worker_env(volume, tmp_path / "scratch"), tmp_path / "logs", SAMPLERS)
    assert out["status"] == "FAILED", out
    assert "Forge exited with code 1 while booting" in str(out["error"])
    assert "numpy.dtype size changed, may indicate binary incompatibility" in str(out["error"])


def test_a_workers_boot_and_inference_write_nothing_to_the_volume(provisioned_world: World, tmp_path: Path) -> None:
    volume = module_volume(provisioned_world, tmp_path)
    before = snapshot(volume)  # before the worker starts: Forge's boot is covered too
    worker = start_worker(worker_env(volume, tmp_path / "scratch"), tmp_path / "logs")
    try:
        out = worker.runsync(TXT2IMG)
        assert out["status"] == "COMPLETED", out
        options = {"api": {"method": "POST", "endpoint": "/sdapi/v1/options"},
                   "payload": {"sd_model_checkpoint": CHECKPOINT}}
        assert worker.runsync(options)["status"] == "COMPLETED"
    finally:
        worker.stop()
    assert snapshot(volume) == before
