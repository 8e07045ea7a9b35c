"""The venv as part of the volume's record: what it holds, what the lock pins in it, and what moved.

After install, state.json records every distribution of the venv with its version (``venv``).
``verify`` compares the venv with that record; ``install`` puts a venv changed by hand back as
recorded. While install runs, no step may move a package the lock pins (the spec's ``forge.torch``
from the torch step on, Forge's pinned requirements from the requirements step on): a step that
does fails the install, naming the package, the versions and the step. Reads ``*.dist-info``
folder names only (no process).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from provision.errors import CommandError
from provision.installer import forge_reqs, pyenv
from provision.proc import run

FIRST = ("torch", "torchvision", "xformers")  # what decides whether Forge runs on the GPU: shown first
PIP_TIMEOUT = 3600.0


def distributions(venv: Path) -> dict[str, str]:
    """``name -> version`` of every distribution in ``venv`` ({} without a venv)."""
    return forge_reqs.installed_versions(venv) if pyenv.site_packages(venv) else {}


def ordered(names: Iterable[str]) -> list[str]:
    """torch, torchvision and xformers first, then the rest by name."""
    names = set(names)
    return [n for n in FIRST if n in names] + sorted(names - set(FIRST))


def record(venv: Path, requirements_key: str) -> dict[str, object]:
    """state.json's ``venv``: the distributions, and the requirements step's key they were taken under."""
    found = distributions(venv)
    # "torch": the three that decide whether Forge runs on the GPU, apart (state.json's keys are sorted).
    return {"requirements_key": requirements_key, "distributions": {n: found[n] for n in ordered(found)},
            "torch": {n: found.get(n) for n in FIRST}}


def headline(dists: Mapping[str, str]) -> str:
    """``torch 2.13.0, torchvision 0.28.0, no xformers; 123 distributions``."""
    first = [f"{n} {dists[n]}" if n in dists else f"no {n}" for n in FIRST]
    return f"{', '.join(first)}; {len(dists)} distributions"


@dataclass(frozen=True)
class Change:
    """One distribution whose version differs between two looks at the venv (None: absent)."""

    name: str
    before: str | None
    after: str | None

    def __str__(self) -> str:
        if self.before is None:
            return f"{self.name} {self.after} (added)"
        if self.after is None:
            return f"{self.name} {self.before} (removed)"
        return f"{self.name} {self.before} -> {self.after}"


def changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[Change]:
    """What differs from ``before`` to ``after``, torch first."""
    return [Change(n, before.get(n), after.get(n)) for n in ordered({*before, *after})
            if before.get(n) != after.get(n)]


# --- what the lock pins -----------------------------------------------------------------------------

def torch_pins(torch: Iterable[str]) -> dict[str, Requirement]:
    """The spec's ``forge.torch`` requirements by distribution name (a URL or path cannot be checked: left out)."""
    found: dict[str, Requirement] = {}
    for text in torch:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.url is None:
            found[pyenv.normalise(req.name)] = req
    return found


def satisfies(req: Requirement, version: str | None) -> bool:
    if version is None:
        return False
    if not req.specifier:
        return True
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return req.specifier.contains(version, prereleases=True)


def torch_off(torch: Iterable[str], installed: Mapping[str, str]) -> list[tuple[Requirement, str | None]]:
    """The torch requirements the venv does not satisfy, with what it has (None: missing)."""
    return [(req, installed.get(name)) for name, req in torch_pins(torch).items()
            if not satisfies(req, installed.get(name))]


def pinned_by(torch: Iterable[str], forge_pins: Mapping[str, str]) -> dict[str, str]:
    """``name -> who pins it`` for the guard: the spec's torch requirements, then Forge's pins."""
    out = {name: f"the spec's forge.torch ({req})" for name, req in torch_pins(torch).items() if req.specifier}
    for name, version in forge_pins.items():
        out.setdefault(name, f"Forge's pinned requirements ({name}=={version})")
    return out


def guard(step_title: str, before: Mapping[str, str], after: Mapping[str, str], pinned: Mapping[str, str],
          fix: str) -> None:
    """Fail when ``step_title`` moved a package in ``pinned`` (name -> who pins it); one line, the first one."""
    moved = [c for c in changes(before, after) if c.name in pinned and c.before is not None]
    if moved:
        first = moved[0]
        more = f" (also {', '.join(map(str, moved[1:]))})" if moved[1:] else ""
        raise CommandError(f"{step_title} moved {first}, which {pinned[first.name]} pins{more}", fix)


# --- a venv changed since the record ----------------------------------------------------------------

def drift(venv: Path, state_venv: Mapping[str, object] | None) -> list[Change]:
    """How the venv differs from its record (record -> now); [] without a record."""
    recorded = (state_venv or {}).get("distributions")
    if not isinstance(recorded, dict):
        return []
    return changes({str(k): str(v) for k, v in recorded.items()}, distributions(venv))


def problems(venv: Path, state_venv: Mapping[str, object] | None) -> list[str]:
    """``verify``'s lines: each distribution that differs from the record, with its fix."""
    if not pyenv.site_packages(venv):
        return []  # no venv at all: the installer's own check says so
    if not isinstance((state_venv or {}).get("distributions"), dict):
        return ["venv: its packages are not recorded (installed by an older forge-volume); "
                "`forge-volume install` records them"]
    out = []
    for c in drift(venv, state_venv):
        if c.before is None:
            out.append(f"venv: {c.name} {c.after} is installed, but install did not record it (added by hand?); "
                       "`forge-volume install` removes it (to keep it, add it to an extension's pip list in the spec)")
        elif c.after is None:
            out.append(f"venv: {c.name} {c.before} is missing (install recorded it); "
                       "`forge-volume install` puts it back")
        else:
            out.append(f"venv: {c.name} is {c.after}, install recorded {c.before} (changed by hand?); "
                       f"`forge-volume install` puts {c.before} back")
    return out


def put_back(venv_python: Path, moved: list[Change], *, extra_index_url: str | None) -> None:
    """Make the venv as recorded: reinstall the recorded versions (``--no-deps``: the record has every
    dependency), uninstall what was added."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    added = [c.name for c in moved if c.before is None]
    wanted = [f"{c.name}=={c.before}" for c in moved if c.before is not None]
    if added:
        run([venv_python, "-m", "pip", "uninstall", "-y", *added], env=env, timeout=PIP_TIMEOUT,
            what=f"pip uninstall {' '.join(added)} (not in the venv's record)", stream=True)
    if wanted:
        index = ["--extra-index-url", extra_index_url] if extra_index_url else []
        run([venv_python, "-m", "pip", "install", "--no-input", "--no-deps", *index, *wanted], env=env,
            timeout=PIP_TIMEOUT, what=f"pip install {' '.join(wanted)} (the venv's record)", stream=True)
