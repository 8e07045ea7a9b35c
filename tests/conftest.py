"""Shared fixtures: every test gets its own volume, git repositories and offline pip.

Nothing here touches the network: git repositories are local paths, pip installs only from a
folder of wheels made by the fixture (PIP_NO_INDEX), and servers bind to loopback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.gitrepo import Repo
from tests.helpers.wheels import make_wheel

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parent / "data"

# Variables from the developer's shell that would leak into a test's behaviour.
_SCRUB = ("FORGE_VOLUME", "FORGE_PORT", "FORGE_ARGS", "FORGE_BOOT_TIMEOUT", "HF_TOKEN", "CIVITAI_TOKEN",
          "HF_ENDPOINT", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
          "RUNPOD_ENDPOINT_ID", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local wheels for everything the fixture Forge and extensions pip-install."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    for name in ("forge-req-dep", "ext-dep", "ext-extra", "fake-torch"):
        make_wheel(folder, name)
    make_wheel(folder, "forge-req-dep", "2.0")
    return folder


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheelhouse: Path) -> None:
    for name in _SCRUB:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORGE_VOLUME", str(tmp_path / "volume"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


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
def forge_repo(make_repo: Callable[[str], Repo]) -> Repo:
    """A git repository that looks like Forge: launch.py (the stand-in), requirements, extensions-builtin."""
    repo = make_repo("stable-diffusion-webui-forge")
    repo.copy_tree(FIXTURES / "forge_repo")
    responses = DATA / "forge" / "responses"
    repo.write({f"responses/{p.name}": p.read_text() for p in responses.glob("*.json")})
    repo.commit("forge")
    repo.tag("v1.0")
    return repo


@pytest.fixture
def helper_repos(make_repo: Callable[[str], Repo]) -> dict[str, str]:
    """Forge's helper repositories (huggingface_guess, BLIP, assets) as local repos, named the way
    Forge's launcher reads them from the environment."""
    env: dict[str, str] = {}
    for var, name in (("HUGGINGFACE_GUESS_REPO", "huggingface_guess"), ("BLIP_REPO", "BLIP"),
                      ("ASSETS_REPO", "stable-diffusion-webui-assets")):
        repo = make_repo(name)
        repo.commit("init", {"README.md": name})
        env[var] = repo.url
    return env


def extension_files(name: str, pip_package: str = "ext-dep") -> dict[str, str | bytes]:
    """An extension whose install.py pip-installs a package with the launcher's helpers, as real ones do."""
    installer = (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        f"subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', {pip_package!r}], check=True)\n"
        "Path(__file__).with_name('install-ran.txt').write_text('ok')\n"
    )
    return {"install.py": installer, "scripts/ext.py": f"NAME = {name!r}\n", ".gitignore": "install-ran.txt\n"}


@pytest.fixture
def ext_repo(make_repo: Callable[[str], Repo]) -> Callable[[str], Repo]:
    def make(name: str) -> Repo:
        repo = make_repo(name)
        repo.commit("extension", extension_files(name))
        return repo

    return make


def spec_text(forge: Repo, helper_env: dict[str, str], *, extensions: list[tuple[str, str]] | None = None,
              ref: str = "main", extra: str = "") -> str:
    """A spec that provisions from local repositories with this interpreter and no torch."""
    env = ", ".join(f'{k} = "{v}"' for k, v in sorted(helper_env.items()))
    text = (
        "[forge]\n"
        f'repo = "{forge.url}"\n'
        f'ref = "{ref}"\n'
        f'python = "{sys.executable if not hasattr(sys, "_base_executable") else sys._base_executable}"\n'
        "torch = []\n"
        'args = ["--always-cpu"]\n'
        f"env = {{ {env} }}\n"
    )
    for name, url in extensions or []:
        text += f'\n[[extensions]]\nname = "{name}"\nrepo = "{url}"\nref = "main"\npip = ["ext-extra"]\n'
    return text + extra


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    """The environment a subprocess of the CLI should see (the isolated one)."""
    yield dict(os.environ)
