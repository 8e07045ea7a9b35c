"""Forge without network: the environment, the startup hook and the refusals a worker reads back.

A worker never downloads at run time: what Forge fetches at first use is installed by
``forge-volume install`` for the spec's features (``provision.forge.first_use``). Forge's process runs
with the Hugging Face libraries offline and ``offline_hook`` as its ``sitecustomize`` (on PYTHONPATH,
in the per-process scratch), which refuses any connection off the machine at once, in one line naming
the file and the spec line that adds it. The worker's own helper jobs (/v1/download, /v1/sync) run
in the worker's process and keep their network.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import ForgeVolumeError
from provision.forge.first_use import FLAGS, all_files
from volume_layout import VolumeLayout

HOOK_SOURCE = Path(__file__).with_name("offline_hook.py")
REFUSAL_LIMIT = 600  # characters of one refusal line the worker passes on
# Forge's own flags that point it at the volume where its default is elsewhere (CLIP: ~/.cache/clip).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "GRADIO_ANALYTICS_ENABLED": "False",
}


def folder_flags(layout: VolumeLayout) -> list[str]:
    """Forge's flags for folders whose default is off the volume: ``--clip-models-path <volume>/models/CLIP``."""
    out: list[str] = []
    for flag, folder in FLAGS.items():
        out += [flag, str(layout.models_dir / folder)]
    return out


def _locked_paths(layout: VolumeLayout) -> set[str]:
    """The first-use files the volume's lock lists (hostile input: anything unreadable lists none)."""
    try:
        data = json.loads(layout.lock.read_text(encoding="utf-8"))
        return {str(f["path"]) for f in data.get("first_use") or [] if isinstance(f, dict) and "path" in f}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def prepare_offline(layout: VolumeLayout, folder: Path) -> None:
    """Write the hook (as ``sitecustomize.py``) and the table it names files from into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HOOK_SOURCE, folder / "sitecustomize.py")
    locked = _locked_paths(layout)
    table = {file.url: {"path": file.path, "feature": feature, "locked": file.path in locked}
             for file, feature in all_files()}
    (folder / "first_use.json").write_text(json.dumps(table), encoding="utf-8")
    (folder / "refused.jsonl").write_bytes(b"")


def offline_env(folder: Path, pythonpath: str | None) -> dict[str, str]:
    """Forge's environment for no network: the hook first on PYTHONPATH, the libraries offline."""
    path = str(folder) + (os.pathsep + pythonpath if pythonpath else "")
    return {**OFFLINE_ENV, "PYTHONPATH": path, "FORGE_VOLUME_FIRST_USE": str(folder / "first_use.json"),
            "FORGE_VOLUME_REFUSALS": str(folder / "refused.jsonl")}


class FirstUseError(ForgeVolumeError):
    """Forge needed a file that is not on the volume (or tried to reach the network)."""


@dataclass
class Refusals:
    """What the hook refused in Forge's process, read back by the worker (``refused.jsonl`` in the scratch)."""

    path: Path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def since(self, mark: int) -> list[str]:
        """The refusal lines written after ``mark`` (each cut to REFUSAL_LIMIT characters)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(mark)
                raw = fh.read(1 << 20)
        except OSError:
            return []
        out = []
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                entry: Any = json.loads(line)
            except ValueError:
                continue
            text = entry.get("message") if isinstance(entry, dict) else None
            if isinstance(text, str) and text:
                out.append(" ".join(text.split())[:REFUSAL_LIMIT])
        return list(dict.fromkeys(out))
