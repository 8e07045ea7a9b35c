"""Find and check the provisioned volume, and make its recorded mount point lead to it.

The venv on the volume holds absolute paths of the mount point it was provisioned at
(``state.json``'s ``mount_point``, ``/workspace`` on a pod). When the worker finds the volume
elsewhere (``/runpod-volume`` on serverless) it makes that path a symbolic link to the volume,
so those paths hold; it refuses when the path is anything but missing, an empty folder or such a link.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.boot.proof import boot_problem
from provision.errors import StateError, VolumeError
from provision.records.state import read_state
from volume_layout import VolumeLayout

INSTALL_HINT = "run `forge-volume install` on a pod with this volume attached, then restart the workers"


@dataclass(frozen=True)
class Volume:
    layout: VolumeLayout
    state: dict[str, Any]

    @property
    def forge_args(self) -> list[str]:
        return [str(a) for a in self.state.get("forge_args") or []]

    @property
    def forge_env(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.state.get("forge_env") or {}).items()}


def check_volume(root: Path) -> Volume:
    """The volume at ``root`` with its state, or a VolumeError/StateError saying what is wrong and how to fix it."""
    if not root.is_dir():
        raise VolumeError(f"no volume at {root}",
                          "attach the network volume to the endpoint (it must be in the endpoint's datacenter), "
                          "or set FORGE_VOLUME to where it is mounted")
    layout = VolumeLayout(root)
    state = read_state(layout)
    if state is None:
        raise VolumeError(f"the volume at {root} is not provisioned (no {layout.relative(layout.state)})", INSTALL_HINT)
    if not state.get("forge"):
        raise StateError(f"the volume at {root} has no Forge installed yet (install did not finish)", INSTALL_HINT)
    for path, what in ((layout.venv_python, "Forge's venv"), (layout.launch_py, "Forge's checkout")):
        if not os.path.lexists(path):
            raise VolumeError(f"{what} is missing on the volume ({path})", INSTALL_HINT)
    problem = boot_problem(state)
    if problem:
        # Forge would die at boot (or write its first-start files into the shared volume): say so at once.
        raise StateError(problem, INSTALL_HINT)
    return Volume(layout, state)


def link_mount_point(volume: Volume) -> Path | None:
    """Make the recorded mount point a link to the volume; returns the link made, or None when none was needed."""
    recorded = volume.state.get("mount_point")
    if not recorded:
        return None
    link = Path(str(recorded))
    root = volume.layout.root
    if link == root or (link.exists() and _same(link, root)):
        return None
    refuse = VolumeError(
        f"the volume was provisioned at {link}, which exists here as something other than an empty folder "
        f"or a link to {root}",
        f"remove {link} from the image, or provision the volume with FORGE_VOLUME={root}",
    )
    if link.is_symlink():  # a link to somewhere else (a dangling or foreign link)
        raise refuse
    if link.is_dir():
        if any(link.iterdir()):
            raise refuse
    elif os.path.lexists(link):
        raise refuse
    try:
        if link.is_dir():
            link.rmdir()  # may fail (a mount point, a read-only image): a clear boot error, never a crash
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(root, target_is_directory=True)
    except OSError as exc:
        raise VolumeError(f"cannot link {link} to the volume at {root}: {exc}",
                          "run the worker as root, or provision the volume at the worker's mount point") from None
    return link


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
