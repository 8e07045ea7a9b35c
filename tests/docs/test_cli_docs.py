"""docs/cli.md is the real `--help` output of forge-volume; this fails when a help text moved on."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_cli_docs.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_doc_is_up_to_date() -> None:
    gen = _generator()
    expected = gen.render()
    current = gen.CLI_DOC.read_text(encoding="utf-8") if gen.CLI_DOC.exists() else ""
    assert current == expected, f"docs/cli.md is stale (a help text changed); regenerate it: {gen.REGENERATE}"


def test_cli_doc_covers_every_command() -> None:
    from provision.cli import main

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name in main.commands:
        assert f"## forge-volume {name}\n" in text
        assert f"Usage: forge-volume {name} [OPTIONS]" in text


def test_check_mode_fails_on_a_stale_doc_and_names_the_fix(tmp_path: Path) -> None:
    # Run the script as a user or CI would, against a doc that has gone stale.
    stale = tmp_path / "cli.md"
    stale.write_text(_generator().render().replace("Show a traceback on errors.", "old text"), encoding="utf-8")
    args = [sys.executable, str(SCRIPT), "--check", "--output", str(stale)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stale; run: python scripts/gen_cli_docs.py" in result.stderr

    subprocess.run([sys.executable, str(SCRIPT), "--output", str(stale)], cwd=ROOT, timeout=60, check=True)
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
