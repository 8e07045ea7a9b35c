"""Progress reporting: step lines and tqdm bars, both off with --quiet and bars off when not a terminal.

The library takes a ``Progress`` and never prints on its own, so the worker can run the same
code silently (or into its log) and tests can capture it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, *, quiet: bool = False, bars: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bars = (not quiet) and (isatty if bars is None else bars)
        self._lock = threading.Lock()

    def info(self, message: str) -> None:
        """A step line (what is being done), to stderr so stdout stays parseable."""
        if not self.quiet:
            with self._lock:
                tqdm.write(message, file=self.stream)

    def bar(self, total: int | None, desc: str, unit: str = "B", leave: bool = False) -> Any:
        """A progress bar; a disabled bar still accepts update() and close()."""
        # No explicit position: tqdm gives each open bar a free line and reuses it once the bar closes.
        return tqdm(
            total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
            disable=not self.bars, file=self.stream, leave=leave, dynamic_ncols=True,
            mininterval=0.2,
        )


QUIET = Progress(quiet=True)
