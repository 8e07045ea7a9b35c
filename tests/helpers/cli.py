"""The CLI as a user types it, and the records it leaves: shared by every test directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from provision.cli import main
from volume_layout import VolumeLayout


def cli(*args: str, volume: Path | None = None) -> Result:
    """Run ``forge-volume ARGS`` in-process (``--volume VOLUME`` first when given, else the volume is
    $FORGE_VOLUME's); exceptions propagate, so a crash is a test failure, not an exit code."""
    argv = ["--volume", str(volume), *args] if volume is not None else list(args)
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def state_of(volume: Path) -> dict[str, Any]:
    """The volume's state.json, parsed."""
    return json.loads(VolumeLayout(volume).state.read_text(encoding="utf-8"))
