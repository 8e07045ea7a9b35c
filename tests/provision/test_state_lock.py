"""state.json's writer lock: a holder that never lets go is named, not an 'unexpected Timeout'."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.errors import VolumeBusyError
from provision.records.state import state_lock
from tests.helpers.timing import PROMPT
from volume_layout import VolumeLayout

HOLD = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(30)
"""


def test_a_state_lock_held_elsewhere_is_a_clear_busy_error(volume: Path) -> None:
    layout = VolumeLayout(volume)
    layout.locks_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(layout.lock_file("state"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(VolumeBusyError) as caught, state_lock(layout, timeout=0.3):
            pass
        assert time.monotonic() - started < 0.3 + PROMPT  # at its timeout, not when the holder exits
        line = caught.value.one_line()
        assert "state.json stayed locked by another process for 0.3 s" in line and "state.lock" in line
    finally:
        holder.kill()
        holder.wait()
    with state_lock(layout, timeout=5):  # released with its holder
        pass
