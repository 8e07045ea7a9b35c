"""Helpers for the provisioning tests: run the real CLI (``tests.helpers.cli``), and see every process it starts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import cli, state_of

__all__ = ["cli", "git_calls", "installed_dists", "pip_installs", "spawns", "state_of"]

_recording: list[list[str]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Python raises this audit event for every subprocess, whoever starts it: no patching needed.
    if event == "subprocess.Popen" and _recording is not None:
        argv = args[1]
        _recording.append([str(a) for a in argv] if isinstance(argv, (list, tuple)) else [str(argv)])


sys.addaudithook(_audit)


@pytest.fixture
def spawns() -> Iterator[list[list[str]]]:
    """Every command line started from this process while the test runs."""
    global _recording
    _recording = []
    try:
        yield _recording
    finally:
        _recording = None


def installed_dists(volume: Path) -> dict[str, str]:
    """name -> version of what the volume's venv holds, read from its .dist-info folders."""
    out = {}
    for info in volume.glob("venv/lib/python*/site-packages/*.dist-info"):
        name, version = info.name.removesuffix(".dist-info").split("-", 1)
        out[name] = version
    return out


def git_calls(calls: list[list[str]], *verbs: str) -> list[list[str]]:
    """The git invocations among ``calls`` whose subcommand is one of ``verbs``."""
    found = []
    for argv in calls:
        if argv and Path(argv[0]).name == "git":
            words = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
            if words and words[0] in verbs:
                found.append(argv)
    return found


def pip_installs(calls: list[list[str]]) -> list[list[str]]:
    return [argv for argv in calls if "pip" in argv and "install" in argv]
