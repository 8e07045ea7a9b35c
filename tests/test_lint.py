"""The CI checks beyond the tests, run as tests so one `pytest` is the whole of CI.

Each tool runs from the venv that runs pytest (so `.ci/run`'s fresh venv checks with the versions
pinned in pyproject's `test` extra) and the test fails with the tool's own output. A check skips
only while the file it checks does not exist yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}; run: {BIN / 'pip'} install -e '.[worker,test]'")
    return str(path)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # The autouse fixture points FORGE_VOLUME and friends at tmp_path; the tools do not care, but
    # mypy and ruff keep their caches in the repository, which is what a developer's run does too.
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1"}, check=False)


def _assert_clean(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"


def test_ruff_is_clean() -> None:
    _assert_clean(_run([_tool("ruff"), "check", "--no-cache", "."]), "ruff check .")


def test_mypy_is_clean() -> None:
    # No arguments: pyproject's [tool.mypy] names the packages (provision, worker, volume_layout).
    _assert_clean(_run([_tool("mypy")], timeout=600), "mypy")


def test_shellcheck_is_clean() -> None:
    scripts = sorted((ROOT / "scripts").glob("*.sh"))
    if not scripts:
        pytest.skip("no scripts/*.sh yet")
    _assert_clean(_run([_tool("shellcheck"), *map(str, scripts)]), "shellcheck scripts/*.sh")


def test_hadolint_is_clean() -> None:
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile yet")
    _assert_clean(_run([_tool("hadolint"), str(dockerfile)]), "hadolint Dockerfile")
