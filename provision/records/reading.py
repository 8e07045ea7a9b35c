"""Reading a file from the volume, which any pod may have written: a regular file of bounded size, or an error.

A FIFO planted where a record belongs would block a plain ``open``/``read`` forever (the worker would
never start), a device or a huge file would be read whole into memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit``: never blocks on a FIFO, never reads a device.

    Raises FileNotFoundError when there is nothing at ``path``, OSError (its message says why, without the
    path) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_size > limit:
            raise OSError(f"larger than {limit:,} bytes")
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)
