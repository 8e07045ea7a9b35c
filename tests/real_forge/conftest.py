"""The real Forge, opt-in: a volume provisioned by ``forge-volume install`` from a lab, and a worker on it.

Skipped unless ``FORGE_LAB`` names a lab built by ``../shared/forge-lab/build.sh`` (Forge's source at
a pinned commit, its launcher's repositories, ``env.sh`` with the launcher's offline overrides and a
random-weight SD 1.5 checkpoint). Needs the package registry (torch and Forge's requirements go into
a fresh venv on the volume), about 10 GB of disk (``FORGE_LAB_VOLUME`` picks the folder; default a
pytest temporary folder) and 10-20 minutes on 2 cores. Nothing here needs a GPU: the boot proof adds
``--always-cpu`` on a machine without one, and the worker gets it through ``FORGE_ARGS``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import snapshot
from tests.helpers.http_server import FileServer
from tests.worker.conftest import WorkerProc, start_worker, worker_env

# The environment pytest started with: the suite-wide fixtures point pip at a local wheelhouse.
ORIGINAL_ENV = dict(os.environ)
LAB = os.environ.get("FORGE_LAB", "")
CHECKPOINT = "random-sd15.safetensors"
CLI = str(Path(sys.executable).with_name("forge-volume"))
INSTALL_TIMEOUT = 3600.0
BOOT_TIMEOUT = "900"

SKIP = pytest.mark.skipif(not LAB, reason="set FORGE_LAB to a lab built by ../shared/forge-lab/build.sh")


def lab_env(lab: Path) -> dict[str, str]:
    """The launcher overrides of the lab's env.sh (``export NAME=value ...`` lines)."""
    env: dict[str, str] = {}
    for line in (lab / "env.sh").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            env.update(word.split("=", 1) for word in words[1:] if "=" in word)
    return env


def spec_text(lab: Path, model_url: str) -> str:
    """A spec for the lab: its Forge, the lab venv's interpreter, the lab's torch pins and launcher overrides."""
    env = lab_env(lab)
    torch = shlex.split(env.pop("TORCH_COMMAND"))[2:]  # "pip install torch===2.13.0 torchvision==0.28.0"
    home = next(line.split("=", 1)[1].strip() for line in (lab / "venv" / "pyvenv.cfg").read_text().splitlines()
                if line.startswith("executable"))
    env_text = ", ".join(f'{k} = "{v}"' for k, v in sorted(env.items()))
    return (f'[forge]\nrepo = "{lab / "forge-src"}"\nref = "main"\npython = "{home}"\n'
            f"torch = [{', '.join(repr(t).replace(chr(39), chr(34)) for t in torch)}]\n"
            f'torch_index_url = ""\nargs = []\nenv = {{ {env_text} }}\n\n'
            f'[[models]]\nkind = "checkpoint"\nsource = "{model_url}"\n')


@dataclass
class Installed:
    volume: Path
    first: subprocess.CompletedProcess[str]
    first_seconds: float
    second: subprocess.CompletedProcess[str]
    second_seconds: float


def forge_volume(volume: Path, *args: str, timeout: float = INSTALL_TIMEOUT) -> tuple[subprocess.CompletedProcess[str],
                                                                                      float]:
    started = time.monotonic()
    env = {**ORIGINAL_ENV, "FORGE_BOOT_TIMEOUT": BOOT_TIMEOUT}
    result = subprocess.run([CLI, "--volume", str(volume), *args], env=env, text=True, capture_output=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


@pytest.fixture(scope="session")
def lab() -> Path:
    path = Path(LAB)
    if not (path / "env.sh").is_file() or not (path / "models" / "Stable-diffusion" / CHECKPOINT).is_file():
        pytest.fail(f"FORGE_LAB={LAB} is not a built lab (no env.sh or no {CHECKPOINT}); run build.sh")
    return path


@pytest.fixture(scope="session")
def installed(lab: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """An empty volume, then `forge-volume install` twice, as a user would run it on a pod."""
    base = Path(os.environ["FORGE_LAB_VOLUME"]) if os.environ.get("FORGE_LAB_VOLUME") else \
        tmp_path_factory.mktemp("real-forge")
    volume = base / "volume"
    shutil.rmtree(volume, ignore_errors=True)
    volume.mkdir(parents=True)
    with FileServer() as server:
        server.add(f"/{CHECKPOINT}", file=lab / "models" / "Stable-diffusion" / CHECKPOINT)
        (volume / "forge-volume.toml").write_text(spec_text(lab, server.url(f"/{CHECKPOINT}")))
        first, first_seconds = forge_volume(volume, "install")
    assert first.returncode == 0, first.stdout + first.stderr
    second, second_seconds = forge_volume(volume, "install")
    print(f"\n[real-forge] install from an empty volume: {first_seconds:.1f} s; second install: {second_seconds:.2f} s")
    yield Installed(volume, first, first_seconds, second, second_seconds)
    if not os.environ.get("FORGE_LAB_VOLUME"):
        shutil.rmtree(volume, ignore_errors=True)  # about 10 GB


@dataclass
class Served:
    worker: WorkerProc
    before: dict[str, tuple[int, int]]
    started: float


@pytest.fixture(scope="session")
def served(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A worker on RunPod's local API, booting the real Forge from the volume (CPU: FORGE_ARGS=--always-cpu)."""
    before = snapshot(installed.volume)
    scratch = tmp_path_factory.mktemp("real-worker")
    env = worker_env(installed.volume, scratch / "scratch", FORGE_BOOT_TIMEOUT=BOOT_TIMEOUT,
                     FORGE_ARGS="--always-cpu", FORGE_PROGRESS_INTERVAL="1")
    started = time.monotonic()
    worker = start_worker(env, scratch / "logs")
    try:
        yield Served(worker, before, started)
    finally:
        worker.stop()
        print(f"\n[real-forge] worker log: {worker.log_path}")
