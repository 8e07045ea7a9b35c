"""Progress reporting: step lines and tqdm bars, both off with --quiet and bars off when not a terminal.

The library takes a ``Progress`` and never prints on its own, so the worker can run the same
code silently (or into its log) and tests can capture it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO


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
                from tqdm import tqdm  # here, not at the top: the worker's boot imports human_bytes

                tqdm.write(message, file=self.stream)

    def status_line(self) -> StatusLine:
        """A line under the bars showing the latest output of a running command (terminals only)."""
        return StatusLine(self)

    def bar(self, total: int | None, desc: str, unit: str = "B", leave: bool = False) -> Any:
        """A progress bar; a disabled bar still accepts update() and close()."""
        from tqdm import tqdm

        # No explicit position: tqdm gives each open bar a free line and reuses it once the bar closes.
        return tqdm(
            # Bytes in powers of 1024, labelled so (tqdm writes its prefix before the unit: "MiB", "GiB").
            total=total, desc=desc, unit="iB" if unit == "B" else unit, unit_scale=unit == "B",
            unit_divisor=1024 if unit == "B" else 1000,
            disable=not self.bars, file=self.stream, leave=leave, dynamic_ncols=True,
            mininterval=0.2,
        )


UNITS = ("B", "KiB", "MiB", "GiB", "TiB")  # one convention everywhere: powers of 1024, labelled as such


def human_bytes(n: int | float | None) -> str:
    """A byte count for people: ``2.0 GiB`` (binary prefixes: 1 GiB = 1024**3 bytes); ``?`` when unknown."""
    if n is None:
        return "?"
    size = float(n)
    for unit in UNITS:
        if size < 1024 or unit == UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable: the loop returns at the last unit


class StatusLine:
    """One terminal line that shows the last line a command printed, replaced as the next one comes."""

    def __init__(self, progress: Progress) -> None:
        self._bar: Any = None
        if progress.bars:
            from tqdm import tqdm

            self._bar = tqdm(total=0, bar_format="    {desc}", file=progress.stream, leave=False,
                             dynamic_ncols=True, mininterval=0.2)

    def show(self, text: str) -> None:
        if self._bar is not None:
            width = (self._bar.ncols or 80) - 5
            self._bar.set_description_str(" ".join(text.split())[:max(width, 10)])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


QUIET = Progress(quiet=True)
