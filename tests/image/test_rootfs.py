"""Opt-in: the image's root file system, built from the Dockerfile by ``scripts/rootfs.py``, boots the worker.

Skipped unless ``FORGE_ROOTFS=1`` (needs root, debootstrap, Debian's archive and PyPI, and a few
minutes). Builds the root file system once, then: its size is at most 400 MB; its package database
is consistent and an image built FROM it installs a package; the worker started by the image's CMD
under chroot, with the stand-in's test volume at /runpod-volume, answers sd-models and txt2img
through RunPod's local API with tcmalloc loaded into Forge. With ``FORGE_LAB`` set (a lab built by
``../shared/forge-lab/build.sh``) and ``FORGE_LAB_VOLUME`` naming a volume provisioned from it with
``forge-volume install``, the same run boots the real Forge and checks a 64x64 txt2img.

    sudo FORGE_ROOTFS=1 [FORGE_LAB=/work/lab FORGE_LAB_VOLUME=/path/to/volume] \
        .venv/bin/python -m pytest -s tests/image/test_rootfs.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.forge_world import World
from tests.worker.conftest import module_volume

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "rootfs.py"
LIMIT_BYTES = 400_000_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("FORGE_ROOTFS") != "1", reason="opt-in: set FORGE_ROOTFS=1 (root, debootstrap)"),
]


def rootfs_script(*args: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, check=False)
    sys.stdout.write(result.stdout)  # the script's own report lines, for `pytest -s`
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.fail("the rootfs suite needs root and debootstrap (apt-get install debootstrap)")
    folder = tmp_path_factory.mktemp("rootfs")
    summary = folder / "build.json"
    rootfs_script("build", folder / "root", "--json", summary, timeout=3000)
    return folder / "root", json.loads(summary.read_text())


def run_worker(root: Path, volume: Path, out: Path, timeout: float) -> dict[str, Any]:
    rootfs_script("run", root, "--volume", volume, "--timeout", str(timeout), "--json", out, timeout=timeout * 3 + 300)
    return dict(json.loads(out.read_text()))


def test_the_root_file_system_is_at_most_400_mb(built: tuple[Path, dict[str, Any]]) -> None:
    _, summary = built
    assert summary["apparent_bytes"] <= LIMIT_BYTES, summary


def test_the_package_database_is_consistent_and_an_image_from_it_installs_packages(
        built: tuple[Path, dict[str, Any]]) -> None:
    root, _ = built
    result = rootfs_script("check-apt", root, timeout=900)
    assert "database consistent" in result.stdout
    forbidden = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package}\n"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.split()
    mesa = [p for p in forbidden if p.startswith(("libgl1-mesa-dri", "libllvm", "libglx-mesa", "libz3-", "libicu"))]
    assert not mesa, f"Mesa, LLVM or what only they need is in the image: {mesa}"
    assert "libgl1" in forbidden and "git" not in forbidden


def test_the_worker_in_the_image_serves_the_standin_volume(built: tuple[Path, dict[str, Any]],
                                                            provisioned_world: World, tmp_path: Path) -> None:
    root, _ = built
    volume = module_volume(provisioned_world, tmp_path)
    results = run_worker(root, volume, tmp_path / "run.json", timeout=120)
    assert "tiny-sd15.safetensors" in results["sd_models"]["models"][0]
    assert results["txt2img"]["images"] and results["tcmalloc"] is True


@pytest.mark.skipif(not (os.environ.get("FORGE_LAB") and os.environ.get("FORGE_LAB_VOLUME")),
                    reason="needs FORGE_LAB and FORGE_LAB_VOLUME (a volume provisioned from the lab)")
def test_the_worker_in_the_image_boots_the_real_forge(built: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = built
    results = run_worker(root, Path(os.environ["FORGE_LAB_VOLUME"]), tmp_path / "run.json", timeout=900)
    assert results["sd_models"]["models"]
    assert results["txt2img"]["images"] == [[64, 64]] and results["tcmalloc"] is True
