"""Running subprocesses: argument lists only, and every failure carries the command's stderr."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from provision.errors import CommandError

TAIL_LINES = 15


def tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 3600,
    error: type[CommandError] = CommandError,
    what: str | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise ``error`` naming it, its exit code and its stderr's last lines.

    With ``capture=False`` output streams to the terminal (long pip steps) and only the exit code
    is known; stderr is then still merged into what the user sees.
    """
    argv = [os.fspath(a) for a in args]
    label = what or " ".join(argv[:3])
    try:
        result = subprocess.run(
            argv, cwd=cwd, env=None if env is None else dict(env), text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None,
        )
    except FileNotFoundError:
        raise error(f"{label} failed: {argv[0]} is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise error(f"{label} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        detail = tail((result.stderr or "") + "\n" + (result.stdout or "")) if capture else "see output above"
        raise error(f"{label} failed with exit code {result.returncode}: {detail}")
    return result
