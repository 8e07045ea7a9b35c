"""The image's Python part: install exactly what the Dockerfile installs into a fresh venv, run the worker.

Docker has no engine here, so the test reads the Dockerfile's ``pip install`` line, installs the
same requirement (this repository with the same extras) from the package index into a new venv,
and boots a worker from it against an installed test volume. It skips when the index is unreachable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.conftest import REPO, start_worker, worker_env

pytestmark = pytest.mark.slow

PIP_ENV_DROP = ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_NO_CACHE_DIR")


def dockerfile_requirement() -> tuple[str, list[str]]:
    """The Dockerfile's pip target (e.g. ``.[worker]``) and its system packages."""
    text = (REPO / "Dockerfile").read_text()
    pips = re.findall(r'pip install --no-cache-dir "?([^"\s]+)"?', text)
    assert len(pips) == 1, f"expected one pip install in the Dockerfile, found {pips}"
    apt = re.search(r"apt-get install -y --no-install-recommends ([^\\&\n]+)", text)
    return pips[0], (apt.group(1).split() if apt else [])


def test_the_dockerfile_installs_the_worker_extra_and_forges_runtime_libraries() -> None:
    target, apt = dockerfile_requirement()
    assert target == ".[worker]"
    assert {"libgl1", "libglib2.0-0", "libtcmalloc-minimal4", "fonts-dejavu-core"} <= set(apt)
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim(-[a-z]+)?$", text, re.M)  # slim, optionally Debian-pinned
    for needed in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
                   'CMD ["/opt/forge-volume/scripts/start.sh"]'):
        assert needed in text
    instructions = "\n".join(line for line in text.lower().splitlines() if not line.lstrip().startswith("#"))
    for absent in ("torch", "cuda", "stable-diffusion-webui-forge"):
        assert absent not in instructions


def test_a_fresh_install_of_the_image_requirement_runs_the_worker(tmp_path: Path, worker_volume: Path) -> None:
    target, _ = dockerfile_requirement()
    env = {k: v for k, v in os.environ.items() if k not in PIP_ENV_DROP}
    venv = tmp_path / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    probe = subprocess.run([*pip, "index", "versions", "runpod", "--timeout", "15"], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    if probe.returncode != 0:
        pytest.skip(f"the package index is not reachable: {probe.stderr.strip().splitlines()[-1:]}")
    requirement = target.replace(".", str(REPO), 1)
    result = subprocess.run([*pip, "install", "--timeout", "60", requirement], env=env, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    worker = start_worker(worker_env(worker_volume, tmp_path / "scratch"), tmp_path / "logs",
                          python=str(venv / "bin" / "python"))
    try:
        out = worker.runsync({"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}})
        assert out["status"] == "COMPLETED" and out["output"], out
        status = worker.runsync({"api": {"method": "GET", "endpoint": "/v1/volume"}})
        assert status["status"] == "COMPLETED", status
    finally:
        worker.stop()
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import worker; print(worker.__file__)"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True).stdout
    assert str(venv) in imported  # the worker ran from the fresh install, not from this checkout
