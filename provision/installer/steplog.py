"""Install's log on the volume: the whole output of its long steps, and the last line on screen.

Each ``install`` that runs a step writes ``.forge-volume/logs/install-<time>.log`` (path from
``volume_layout``): a header per step, then every line its commands print (pip, uv, Forge's
``launch.py --exit``, compileall). A failing command's error names this file. Only the newest
``KEEP`` logs are kept.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import IO

from provision.progress import Progress, StatusLine
from volume_layout import VolumeLayout

KEEP = 10


class StepLog:
    """A sink for ``provision.proc.output_to``: lines to the log file and to the status line."""

    def __init__(self, layout: VolumeLayout, progress: Progress) -> None:
        layout.logs_dir.mkdir(parents=True, exist_ok=True)
        self.path: Path = layout.install_log(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        self._file: IO[str] = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed by close())
        self._status: StatusLine | None = None
        self._progress = progress
        self._lock = threading.Lock()
        _prune(layout)

    def step(self, title: str) -> None:
        """Start a step: a header in the log, a fresh status line on screen."""
        with self._lock:
            self._file.write(f"\n==> {title} ({time.strftime('%H:%M:%S', time.gmtime())} UTC)\n")
            self._file.flush()
            if self._status is not None:
                self._status.close()
            self._status = self._progress.status_line()

    def line(self, text: str) -> None:
        with self._lock:
            self._file.write(text + "\n")
            self._file.flush()  # a killed install's log still says how far it got
            if self._status is not None:
                self._status.show(text)

    def close(self) -> None:
        with self._lock:
            if self._status is not None:
                self._status.close()
                self._status = None
            self._file.close()


def _prune(layout: VolumeLayout) -> None:
    old = sorted(layout.logs_dir.glob("install-*.log"))[:-KEEP]
    for path in old:
        with contextlib.suppress(OSError):
            path.unlink()
