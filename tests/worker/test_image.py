"""The image: what the Dockerfile must hold for the worker and Forge to start, and its Python part run.

Docker has no engine here. The Dockerfile is read with the parser of ``scripts/rootfs.py`` (the
opt-in builder that carries it out, so the two cannot drift apart unnoticed): the system packages
and environment that the worker and Forge need at start must be there. The host has git and the
libraries, so a run here cannot show their absence; the checks name each need and its reason, and
GitPython is imported for real without a git executable in the environment Forge gets in the image.
The fresh-install test installs the Dockerfile's pip requirement from the package index into a new
venv and boots a worker from it against an installed test volume (skipped when the index is
unreachable). ``tests/image/test_rootfs.py`` (opt-in) builds and boots the whole root file system.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from provision.forge.launch import TCMALLOC, Launch, Scratch, forge_command
from tests.worker.conftest import REPO, start_worker, worker_env
from worker.config import load_settings
from worker.volume import check_volume

pytestmark = pytest.mark.slow

PIP_ENV_DROP = ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_NO_CACHE_DIR")
GITPYTHON = "GitPython==3.1.32"  # Forge's pin (requirements_versions.txt at dfdcbab6)
# What the worker and Forge load from the system at start, the Debian package that ships it, and why.
SYSTEM_NEEDS = {
    "libgl1": "libGL.so.1: cv2 (opencv-python, imported by Forge at start) links it",
    "libglib2.0-0": "libglib-2.0.so.0 and libgthread-2.0.so.0: cv2 links them",
    "libtcmalloc-minimal4": "libtcmalloc_minimal.so.4: the worker preloads it into Forge (provision.forge.launch)",
}


def rootfs_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rootfs", REPO / "scripts" / "rootfs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rootfs", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rootfs = rootfs_module()


def image_apt_packages() -> set[str]:
    """Every package an ``apt-get install`` in the Dockerfile's RUN steps names."""
    packages: set[str] = set()
    for step in rootfs.read_image(REPO / "Dockerfile").steps:
        if step.keyword == "RUN":
            for match in re.finditer(r"apt-get install ([^&;|]+)", step.args):
                packages |= {w for w in match.group(1).split() if not w.startswith("-")}
    return packages


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
    missing = {name: why for name, why in SYSTEM_NEEDS.items() if name not in image_apt_packages()}
    assert not missing, f"the Dockerfile does not install what the worker or Forge loads at start: {missing}"
    assert set(apt) <= image_apt_packages()  # the simple reading and the builder's agree
    assert "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4" in TCMALLOC  # where libtcmalloc-minimal4 puts it
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

    # Forge's GitPython imported in the environment Forge gets in the image, with no git on PATH (the image
    # has none; this host does). Without GIT_PYTHON_REFRESH the same import fails: the check can fail.
    result = subprocess.run([*pip, "install", "--timeout", "60", GITPYTHON], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    forge_env = forge_env_in_image(worker_volume, tmp_path / "forge-env")
    no_git = tmp_path / "path-without-git"
    no_git.mkdir()
    forge_env["PATH"] = str(no_git)
    imports = [str(venv / "bin" / "python"), "-c", "import git; print(git.__version__)"]
    ok = subprocess.run(imports, env=forge_env, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    forge_env.pop("GIT_PYTHON_REFRESH", None)
    bad = subprocess.run(imports, env=forge_env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "Bad git executable" in bad.stderr, bad.stderr[-2000:]


def test_the_rootfs_builder_carries_out_every_instruction_of_the_dockerfile(tmp_path: Path) -> None:
    """scripts/rootfs.py refuses an instruction it does not know, so the opt-in build is the Dockerfile's."""
    image = rootfs.read_image(REPO / "Dockerfile")
    assert rootfs.base_parts(image.base) == ("3.11", "bookworm")
    assert image.cmd == ["/opt/forge-volume/scripts/start.sh"] and image.workdir == "/srv"
    assert [s.keyword for s in image.steps].count("RUN") == 2
    assert os.access(REPO / "scripts" / "start.sh", os.X_OK)  # COPY keeps the mode; CMD execs it
    grown = tmp_path / "Dockerfile"
    grown.write_text((REPO / "Dockerfile").read_text() + "ADD https://example.invalid/x /x\n")
    with pytest.raises(rootfs.RootfsError, match="does not carry out ADD"):
        rootfs.read_image(grown)


def test_the_package_database_is_left_consistent() -> None:
    """No step forces dpkg past a dependency: that left apt unable to install anything in an image FROM ours.
    (The opt-in rootfs suite runs `apt-get check` and installs a package on top.)"""
    for step in rootfs.read_image(REPO / "Dockerfile").steps:
        assert "--force-" not in step.args, f"Dockerfile:{step.line} forces dpkg: {step.args[:200]}"


def test_the_dockerfile_parser_joins_lines_as_docker_does() -> None:
    text = ("FROM python:3.11-slim-bookworm\n# a comment\nENV A=1 \\\n    B=\"two words\" \\\n"
            "# inside a continuation\n    C=${A}x\nENV LEGACY some value\nRUN echo a \\\n  && echo b\n"
            'CMD ["/x"]\n')
    steps = rootfs.parse_dockerfile(text)
    assert [(s.keyword, s.line) for s in steps] == [("FROM", 1), ("ENV", 3), ("ENV", 7), ("RUN", 8), ("CMD", 10)]
    assert steps[3].args == "echo a   && echo b"
    env = rootfs.parse_env(steps[1].args, {})
    assert env == {"A": "1", "B": "two words", "C": "1x"}
    assert rootfs.parse_env(steps[2].args, {}) == {"LEGACY": "some value"}


def test_forge_gets_what_gitpython_needs_in_the_image(worker_volume: Path, tmp_path: Path) -> None:
    """The image has no git; Forge imports GitPython at start. Either the Dockerfile installs git or
    Forge's environment, as the worker builds it from the image's, has GIT_PYTHON_REFRESH=quiet."""
    env = forge_env_in_image(worker_volume, tmp_path)
    assert "git" in image_apt_packages() or env.get("GIT_PYTHON_REFRESH") == "quiet", \
        "Forge would exit at `import git` in the image: install git or set GIT_PYTHON_REFRESH=quiet"


def forge_env_in_image(volume: Path, tmp: Path) -> dict[str, str]:
    """Forge's environment as the worker makes it from the image's (the Dockerfile's ENV on its base's)."""
    image_env = dict(rootfs.read_image(REPO / "Dockerfile").env)
    settings = load_settings({**image_env, "FORGE_VOLUME": str(volume), "FORGE_SCRATCH": str(tmp)})
    state = check_volume(volume)
    launch = Launch(spec_args=tuple(state.forge_args), spec_env=state.forge_env, extra_args=tuple(settings.forge_args),
                    port=settings.forge_port, passthrough=settings.env_passthrough)
    return forge_command(state.layout, Scratch(tmp / "forge"), image_env, launch).env
