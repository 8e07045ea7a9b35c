"""Forge's pinned requirements: read them from the checkout, check the venv against them, put them back.

Forge's launcher, on every start that prepares the environment, checks its requirements file
(``REQS_FILE``, default ``requirements_versions.txt`` in the checkout) with ``requirements_met``
and re-runs ``pip install -r`` when a pinned version differs. Extension installers that run during
``launch.py --exit`` lift packages over those pins (numpy 2.x over 1.26.2, protobuf 7.x over 3.20.0
on Forge dfdcbab6), so a venv prepared once does not boot with ``--skip-prepare-environment``.
This module applies the launcher's own rule once, at install time: same file, same parse, same
comparison, same ``pip install -r``. The checks read ``*.dist-info`` folders only (no process).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from provision.errors import CommandError
from provision.installer import pyenv
from provision.proc import run

DEFAULT_REQS_FILE = "requirements_versions.txt"
# modules/launch_utils.py's re_requirement: a name, optionally ``== version``; other lines are not pins.
_REQUIREMENT = re.compile(r"\s*([-_a-zA-Z0-9]+)\s*(?:==\s*([-+_.a-zA-Z0-9]+))?\s*")
PIP_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Drift:
    """One pin the venv does not satisfy."""

    name: str
    wanted: str
    installed: str | None

    def __str__(self) -> str:
        return f"{self.name} {self.installed or '(missing)'} -> {self.wanted}"


def requirements_file(forge_dir: Path, env: Mapping[str, str]) -> Path:
    """The file Forge's launcher reads: ``REQS_FILE`` from the spec's env (relative to the checkout), else
    ``requirements_versions.txt``."""
    name = env.get("REQS_FILE") or DEFAULT_REQS_FILE
    path = Path(name)
    return path if path.is_absolute() else forge_dir / path


def launcher_environ(environ: Mapping[str, str], spec_env: Mapping[str, str]) -> dict[str, str]:
    """The environment Forge's launcher runs in at install: this shell's, then the spec's ``env`` over it.

    ``REQS_FILE`` is the spec's alone: the launcher must install the requirements file that this module
    checks afterwards (one from the shell would make them differ, and its ``pip install -r`` could move
    torch unchecked); ``reqs_file_warning`` says when the shell's is ignored."""
    env = {k: v for k, v in environ.items() if k != "REQS_FILE"}
    return {**env, **spec_env}


def reqs_file_warning(environ: Mapping[str, str], spec_env: Mapping[str, str]) -> str | None:
    """A warning when the shell's ``REQS_FILE`` differs from the spec's (which install uses), naming both."""
    shell = environ.get("REQS_FILE")
    spec = spec_env.get("REQS_FILE")
    if not shell or shell == spec:
        return None
    used = f"REQS_FILE={spec} from the spec's [forge] env" if spec else \
        f"Forge's own {DEFAULT_REQS_FILE} (the spec's [forge] env sets no REQS_FILE)"
    return (f"warning: REQS_FILE={shell} in this shell's environment is not the spec's; install uses {used} "
            "(to use the shell's, put REQS_FILE in the spec's [forge] env and run `forge-volume lock`)")


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` line (the only lines the launcher compares)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read Forge's requirements file {path}: {exc.strerror or exc}",
                           "check REQS_FILE in the spec's [forge] env, or the Forge checkout") from None
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        match = _REQUIREMENT.fullmatch(line)
        if match and match.group(2):
            found[pyenv.normalise(match.group(1))] = match.group(2)
    return found


def installed_versions(venv: Path) -> dict[str, str]:
    """``name -> version`` of every distribution in ``venv``, from its ``.dist-info`` folder name."""
    versions: dict[str, str] = {}
    for folder in pyenv.site_packages(venv):
        for entry in os.scandir(folder):
            stem, dot, suffix = entry.name.rpartition(".")
            if dot and suffix in ("dist-info", "egg-info"):
                name, _, version = stem.partition("-")
                versions[pyenv.normalise(name)] = version.split("-")[0]  # egg-info: ``1.0-py3.11``
    return versions


def _same(wanted: str, installed: str) -> bool:
    try:
        return Version(wanted) == Version(installed)
    except InvalidVersion:
        return wanted == installed


def drift(venv: Path, path: Path) -> list[Drift]:
    """The pins of ``path`` the venv does not satisfy, in file order."""
    have = installed_versions(venv)
    return [Drift(name, wanted, have.get(name)) for name, wanted in pins(path).items()
            if name not in have or not _same(wanted, have[name])]


def restore(venv_python: Path, forge_dir: Path, env: Mapping[str, str]) -> list[Drift]:
    """Put Forge's pins back as its launcher would (``pip install -r``); return what was off. Fails if still off."""
    path = requirements_file(forge_dir, env)
    off = drift(venv_python.parent.parent, path)
    if not off:
        return []
    index = ["--index-url", env["INDEX_URL"]] if env.get("INDEX_URL") else []  # the launcher's INDEX_URL
    run([venv_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r", path,
         "--prefer-binary", *index], cwd=forge_dir, env=launcher_environ(os.environ, env), timeout=PIP_TIMEOUT,
        what=f"pip install -r {path.name} (restoring Forge's pins)", stream=True)
    still = drift(venv_python.parent.parent, path)
    if still:
        raise CommandError(f"pip install -r {path} left Forge's pins unmet: {', '.join(map(str, still))}",
                           "check the requirements file and the package index the venv installs from")
    return off
