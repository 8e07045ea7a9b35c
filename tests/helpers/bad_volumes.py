"""Volumes a worker must refuse, each with the pattern of the one-line error it must give."""

from __future__ import annotations

import json
import os
from pathlib import Path

from volume_layout import LAYOUT_VERSION, VolumeLayout


def _state(root: Path, text: str) -> Path:
    layout = VolumeLayout(root)
    layout.meta_dir.mkdir(parents=True)
    layout.state.write_text(text)
    return root


def bad_volumes(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (volume path, regex its jobs' error must match). Nothing under ``root`` exists yet."""
    (root / "empty").mkdir(parents=True)
    folder = root / "state-is-a-folder"
    VolumeLayout(folder).state.mkdir(parents=True)
    fifo = root / "state-is-a-fifo"  # a plain read would block the worker forever
    VolumeLayout(fifo).meta_dir.mkdir(parents=True)
    os.mkfifo(VolumeLayout(fifo).state)
    huge = _state(root / "state-is-huge", "")
    with open(VolumeLayout(huge).state, "wb") as f:
        f.truncate(65 << 20)  # sparse: read whole, it would be 65 MiB of memory for nothing
    return {
        "missing": (root / "no-such-volume", "no volume at .*no-such-volume .*attach the network volume"),
        "empty": (root / "empty", "is not provisioned \\(no .forge-volume/state.json\\) .*run `forge-volume install`"),
        "future": (_state(root / "future", json.dumps({"layout_version": LAYOUT_VERSION + 1})),
                   f"has layout version {LAYOUT_VERSION + 1}; this forge-volume reads version "
                   f"{LAYOUT_VERSION} .*release that provisioned this volume"),
        "corrupt": (_state(root / "corrupt", '{"layout_version": 1, "forge": {"repo"'),
                    "state.json is corrupt .*run `forge-volume install`"),
        "state-is-a-folder": (folder, "cannot read .*state.json: not a regular file.*run `forge-volume install`"),
        "state-is-a-fifo": (fifo, "cannot read .*state.json: not a regular file.*run `forge-volume install`"),
        "state-is-huge": (huge, "cannot read .*state.json: larger than 67,108,864 bytes.*run `forge-volume install`"),
        "unfinished": (_state(root / "unfinished", json.dumps({"layout_version": LAYOUT_VERSION, "forge": None})),
                       "has no Forge installed yet \\(install did not finish\\)"),
    }
