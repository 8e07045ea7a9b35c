"""Stopping what a test started (a worker and its Forge, a CLI) as a whole, even when the test failed.

Long-lived processes are started in their own session (``start_new_session=True``), so each is the
leader of a process group that holds everything it starts. ``stop_group`` asks the leader to stop
the way the platform would, kills it if it does not within its grace, and then kills whatever is
left in the group: a Forge that outlived its worker, or one a test froze with SIGSTOP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """SIGKILL every process left in the group ``proc`` leads (started with start_new_session=True)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int = signal.SIGINT,
               grace: float = 15.0) -> None:
    """Send ``sig`` to the group's leader, wait up to ``grace`` seconds, then kill the whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait(10)
    kill_group(proc)


def interrupt(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str, float]:
    """Ctrl-C to ``proc`` as a user's terminal sends it; its output and the seconds it took to exit.
    A process still running at ``timeout`` is killed (communicate raises)."""
    try:
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = proc.communicate(timeout=timeout)
        return out, err, time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
