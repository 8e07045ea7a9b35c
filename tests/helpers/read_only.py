"""A command run where a folder (a volume) is mounted read-only: any write to it fails, whoever tries.

``unshare --mount`` gives the command a private mount namespace, in which the folder is bind-mounted
onto itself and remounted read-only; nothing changes for any other process. Needs root (or
CAP_SYS_ADMIN) and util-linux's ``unshare``: ``available()`` says whether this machine has them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_SCRIPT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("mount") is not None


def read_only(folder: Path) -> list[str]:
    """The argv prefix that runs a command with ``folder`` read-only (the command follows it)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, str(folder)]
