"""Python on the volume: the interpreter (a given path, or a standalone CPython installed by uv),
the venv built on it, and pip installs into that venv.

Checks here read files only (``*.dist-info`` folders, ``pyvenv.cfg``) so that an idempotent
install can decide there is nothing to do without starting a single process.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from provision.errors import CommandError, SpecError, UvMissingError
from provision.proc import run

PIP_TIMEOUT = 3 * 3600.0
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str | None:
    """The distribution a pip argument installs, or None when it cannot be told from the text (a URL, a path)."""
    if "://" in requirement.split("@", 1)[0] or requirement.startswith((".", "/", "-")):
        return None
    match = _NAME.match(requirement)
    return normalise(match.group(1)) if match else None


def site_packages(venv: Path) -> list[Path]:
    return sorted(venv.glob("lib/python*/site-packages"))


def installed(venv: Path) -> set[str]:
    """Names of the distributions installed in ``venv`` (from their .dist-info folders)."""
    names: set[str] = set()
    for folder in site_packages(venv):
        for entry in os.scandir(folder):
            if entry.name.endswith((".dist-info", ".egg-info")):
                names.add(normalise(entry.name.rsplit(".", 1)[0].split("-", 1)[0]))
    return names


def missing_packages(venv: Path, requirements: Sequence[str]) -> list[str]:
    """Requirements whose distribution is not in the venv (ones named by URL or path are assumed present)."""
    have = installed(venv) if requirements else set()
    return [r for r in requirements if (name := requirement_name(r)) is not None and name not in have]


def interpreter_version(python: Path) -> str:
    out = run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
              timeout=60, what=f"{python} --version").stdout
    return out.strip()


def find_uv() -> str:
    """The uv binary: next to this interpreter (installed by the [uv] extra into the same venv) or on PATH."""
    here = Path(sys.executable).parent
    found = shutil.which("uv", path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))
    if not found:
        raise UvMissingError("installing Python from a version in the spec needs uv, which is not installed")
    return found


def install_standalone(version: str, install_dir: Path) -> Path:
    """Install CPython ``version`` into ``install_dir`` with uv; return its interpreter."""
    if not _VERSION.match(version):
        raise SpecError(f"forge.python = {version!r} is neither a version like \"3.10\" nor a path to an interpreter")
    uv = find_uv()
    install_dir.mkdir(parents=True, exist_ok=True)
    # UV_PYTHON_BIN_DIR keeps uv's convenience links on the volume instead of the pod's ~/.local/bin.
    env = {**os.environ, "UV_PYTHON_INSTALL_DIR": str(install_dir), "UV_PYTHON_BIN_DIR": str(install_dir / "bin")}
    run([uv, "python", "install", version, "--install-dir", install_dir], env=env, timeout=1800,
        what=f"uv python install {version}", stream=True)
    found = find_standalone(version, install_dir)
    if found is None:
        raise CommandError(f"uv reported Python {version} installed, but no interpreter for it is in {install_dir}")
    return found


def find_standalone(version: str, install_dir: Path) -> Path | None:
    """The newest uv-installed CPython in ``install_dir`` matching ``version`` ("3.10" or "3.10.14")."""
    major_minor = ".".join(version.split(".")[:2])
    candidates = []
    for folder in install_dir.glob("cpython-*"):
        full = folder.name.split("-")[1]
        if full == version or full.startswith(version + "."):
            exe = folder / "bin" / f"python{major_minor}"
            if exe.exists():
                candidates.append((tuple(int(p) for p in re.findall(r"\d+", full)[:3]), exe))
    return max(candidates)[1] if candidates else None


def create_venv(python: Path, venv: Path) -> None:
    """A fresh venv (``--clear``: a half-built one from an interrupted run is rebuilt, not trusted)."""
    run([python, "-m", "venv", "--clear", venv], timeout=900, what=f"create the venv at {venv}")


def venv_home(venv: Path) -> str | None:
    """The folder of the interpreter a venv was built on (``home`` in its pyvenv.cfg), if it says."""
    try:
        text = (venv / "pyvenv.cfg").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return value.strip()
    return None


def venv_ready(venv_python: Path) -> bool:
    # exists() follows the symlink to the base interpreter, so a venv whose Python vanished is not ready.
    return venv_python.exists() and (venv_python.parent.parent / "pyvenv.cfg").is_file()


def pip_install(venv_python: Path, packages: Sequence[str], *, extra_index_url: str | None = None,
                what: str) -> None:
    if not packages:
        return
    index = ["--extra-index-url", extra_index_url] if extra_index_url else []
    run([venv_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *index, *packages],
        timeout=PIP_TIMEOUT, what=what, stream=True)
