"""Shared fixtures: every test gets its own volume, git repositories and offline pip.

Nothing here touches the network: git repositories are local paths, pip installs only from a
folder of wheels made by the fixture (PIP_NO_INDEX), and servers bind to loopback.

Installing a volume builds a venv (seconds), so one volume is installed per session
(``provisioned_world``) and ``installed_volume`` hands each test its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.forge_world import (
    DATA,
    FIXTURES,
    World,
    build_world,
    extension_files,
    make_forge_repo,
    make_helper_repos,
    make_wheelhouse,
    offline_pip_env,
    spec_text,
)
from tests.helpers.gitrepo import Repo
from tests.helpers.http_server import FileServer

__all__ = ["DATA", "FIXTURES", "extension_files", "spec_text"]

# A suite started in the background (`cmd &` in a script, nohup, some CI runners) inherits SIGINT
# ignored, and every process it starts would too: the tests that press Ctrl-C on a CLI, a worker or
# a script would see nothing happen. A handled signal is reset to the default in a child at exec, so
# handling it here gives each child SIGINT as a terminal delivers it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Variables from the developer's shell that would leak into a test's behaviour.
_SCRUB = ("FORGE_VOLUME", "FORGE_PORT", "FORGE_ARGS", "FORGE_BOOT_TIMEOUT", "HF_TOKEN", "CIVITAI_TOKEN",
          "HF_ENDPOINT", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
          "RUNPOD_ENDPOINT_ID", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "COMMANDLINE_ARGS",
          "VIRTUAL_ENV", "PYTHONPATH")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local wheels for everything the fixture Forge and extensions pip-install."""
    return make_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheelhouse: Path) -> None:
    for name in _SCRUB:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORGE_VOLUME", str(tmp_path / "volume"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name, value in offline_pip_env(wheelhouse).items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A plain file server on loopback (``server.add(path, data, ...)``); a test module that needs routes from
    the start overrides it, taking this one as its argument."""
    with FileServer() as srv:
        yield srv


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "volume"
    path.mkdir()
    return path


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[[str], Repo]:
    def make(name: str) -> Repo:
        return Repo(tmp_path / "repos" / name)

    return make


@pytest.fixture
def forge_repo(tmp_path: Path) -> Repo:
    """A git repository that looks like Forge: launch.py (the stand-in), requirements, extensions-builtin."""
    return make_forge_repo(tmp_path / "repos" / "stable-diffusion-webui-forge")


@pytest.fixture
def helper_repos(tmp_path: Path) -> dict[str, str]:
    """Forge's helper repositories (huggingface_guess, BLIP, assets) as local repos, named the way
    Forge's launcher reads them from the environment."""
    return make_helper_repos(tmp_path / "repos")


@pytest.fixture
def ext_repo(make_repo: Callable[[str], Repo]) -> Callable[[str], Repo]:
    def make(name: str) -> Repo:
        repo = make_repo(name)
        repo.commit("extension", extension_files(name))
        return repo

    return make


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    """The environment a subprocess of the CLI should see (the isolated one)."""
    yield dict(os.environ)


@pytest.fixture(scope="session")
def provisioned_world(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> World:
    """Repositories (Forge, helpers, extensions ext-one and ext-two) and ONE volume installed from them
    with the real installer, at ``world.root / "volume"``. Read-only for tests: copy it first."""
    from provision.commands.install import install
    from provision.progress import QUIET
    from volume_layout import VolumeLayout

    world = build_world(tmp_path_factory.mktemp("world"))
    volume = world.root / "volume"
    volume.mkdir()
    (volume / "forge-volume.toml").write_text(world.spec(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        for name in _SCRUB:
            mp.delenv(name, raising=False)
        for name, value in offline_pip_env(wheelhouse).items():
            mp.setenv(name, value)
        report = install(VolumeLayout(volume), volume / "forge-volume.toml", progress=QUIET, wait=False)
    (world.root / "install-summary.txt").write_text(report.summary(), encoding="utf-8")
    return world


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime (links not followed): equal snapshots mean nothing
    was written there."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def copy_volume(source: Path, target: Path) -> Path:
    """Copy an installed volume, keeping symlinks, and record the copy's path as its mount point.

    Test volumes are built on an interpreter outside the volume, so a copied venv works where it
    lands; recording the new mount point keeps the worker from linking the old path back.
    """
    site = str(source / "venv" / "lib") + os.sep

    def copy(src: str, dst: str) -> object:
        # The venv's packages are the bulk of the files; only pip writes there, and pip (like
        # compileall and Python's bytecode cache) replaces files rather than rewriting them, so
        # sharing them by hard link keeps the template intact while making copies cheap.
        if src.startswith(site):
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass  # another filesystem: copy instead
        return shutil.copy2(src, dst)

    shutil.copytree(source, target, symlinks=True, copy_function=copy)
    from volume_layout import VolumeLayout

    state_path = VolumeLayout(target).state
    state = json.loads(state_path.read_text(encoding="utf-8"))
    state["mount_point"] = str(target)
    state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


@pytest.fixture
def installed_volume(provisioned_world: World, tmp_path: Path) -> Path:
    """This test's own copy of the installed volume, at tmp_path/volume (= $FORGE_VOLUME).

    Holds the fixture Forge checkout (launch.py serves with the worker's flags), extensions
    ext-one and ext-two, a venv, config seed and state.json; no models.
    """
    return copy_volume(provisioned_world.root / "volume", tmp_path / "volume")
