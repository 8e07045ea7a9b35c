"""A complete offline world to provision from: a Forge-like repo, its helper repos, extensions, wheels.

Shared by the pytest fixtures (tests/conftest.py) and the benchmark (scripts/bench_provision.py),
so both install exactly the same thing. Nothing here imports pytest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.gitrepo import Repo
from tests.helpers.wheels import make_wheel

TESTS = Path(__file__).resolve().parent.parent
FIXTURES = TESTS / "fixtures"
DATA = TESTS / "data"
HELPER_REPOS = (("HUGGINGFACE_GUESS_REPO", "huggingface_guess"), ("BLIP_REPO", "BLIP"),
                ("ASSETS_REPO", "stable-diffusion-webui-assets"))
# A value the spec passes to Forge's environment that must never show up in status output.
SECRET_ENV = ("FIXTURE_SECRET_TOKEN", "s3cr3t-fixture-value")


def base_python() -> str:
    """The interpreter a test volume's venv is built on (the one behind this venv, if any)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def make_wheelhouse(folder: Path) -> Path:
    """Local wheels for everything the fixture Forge and extensions pip-install."""
    for name in ("forge-req-dep", "ext-dep", "ext-extra", "fake-torch"):
        make_wheel(folder, name)
    make_wheel(folder, "forge-req-dep", "2.0")
    make_wheel(folder, "xformers", "0.0.27")  # Forge's default XFORMERS_PACKAGE, for specs with --xformers
    return folder


def offline_pip_env(wheelhouse: Path) -> dict[str, str]:
    """Environment that makes every pip call install from ``wheelhouse`` only."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_CACHE_DIR": "1"}


def make_forge_repo(path: Path) -> Repo:
    """A git repository that looks like Forge: launch.py (the stand-in), requirements, extensions-builtin."""
    repo = Repo(path)
    repo.copy_tree(FIXTURES / "forge_repo")
    responses = DATA / "forge" / "responses"
    repo.write({f"responses/{p.name}": p.read_text() for p in responses.glob("*.json")})
    repo.commit("forge")
    repo.tag("v1.0")
    return repo


def make_helper_repos(root: Path) -> dict[str, str]:
    """Forge's helper repositories as local repos, keyed by the variable Forge's launcher reads."""
    env: dict[str, str] = {}
    for var, name in HELPER_REPOS:
        repo = Repo(root / name)
        repo.commit("init", {"README.md": name})
        env[var] = repo.url
    return env


def extension_files(name: str, pip_package: str = "ext-dep", install_py: str | None = None) -> dict[str, str | bytes]:
    """An extension whose install.py pip-installs a package with the launcher's helpers, as real ones do."""
    installer = install_py or (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        f"subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', {pip_package!r}], check=True)\n"
        "Path(__file__).with_name('install-ran.txt').write_text('ok')\n"
    )
    return {"install.py": installer, "scripts/ext.py": f"NAME = {name!r}\n", ".gitignore": "install-ran.txt\n"}


def make_extension_repo(path: Path, name: str, install_py: str | None = None) -> Repo:
    repo = Repo(path)
    repo.commit("extension", extension_files(name, install_py=install_py))
    return repo


def spec_text(forge: Repo, helper_env: dict[str, str], *, extensions: list[tuple[str, str]] | None = None,
              ref: str = "main", extra: str = "", torch: list[str] | None = None,
              env: dict[str, str] | None = None, forge_extra: str = "") -> str:
    """A spec that provisions from local repositories with this interpreter (no torch unless given)."""
    pairs = sorted({**helper_env, **(env or {})}.items())
    env_text = ", ".join(f'{k} = "{v}"' for k, v in pairs)
    torch_text = ", ".join(f'"{t}"' for t in torch or [])
    text = (
        "[forge]\n"
        f'repo = "{forge.url}"\n'
        f'ref = "{ref}"\n'
        f'python = "{base_python()}"\n'
        f"torch = [{torch_text}]\n"
        'args = ["--always-cpu"]\n'
        f"env = {{ {env_text} }}\n"
        f"{forge_extra}"
    )
    for name, url in extensions or []:
        text += f'\n[[extensions]]\nname = "{name}"\nrepo = "{url}"\nref = "main"\npip = ["ext-extra"]\n'
    return text + extra


@dataclass
class World:
    """The repositories one test volume is provisioned from."""

    root: Path
    forge: Repo
    helper_env: dict[str, str]
    extensions: dict[str, Repo] = field(default_factory=dict)

    def spec(self, *, extensions: list[str] | None = None, ref: str = "main", extra: str = "",
             features: list[str] | None = None, features_mirror: str | None = None) -> str:
        """The standard spec: every extension (or the named ones), fake torch, a secret in Forge's env;
        ``features`` (and their mirror) go into [forge]."""
        names = list(self.extensions) if extensions is None else extensions
        forge_extra = ""
        if features is not None:
            forge_extra += "features = [" + ", ".join(f'"{f}"' for f in features) + "]\n"
        if features_mirror is not None:
            forge_extra += f'features_mirror = "{features_mirror}"\n'
        return spec_text(self.forge, self.helper_env, extensions=[(n, self.extensions[n].url) for n in names],
                         ref=ref, extra=extra, torch=["fake-torch"], env=dict([SECRET_ENV]), forge_extra=forge_extra)


def build_world(root: Path, extensions: tuple[str, ...] = ("ext-one", "ext-two")) -> World:
    repos = root / "repos"
    world = World(root=root, forge=make_forge_repo(repos / "stable-diffusion-webui-forge"),
                  helper_env=make_helper_repos(repos))
    for name in extensions:
        world.extensions[name] = make_extension_repo(repos / name, name)
    return world
