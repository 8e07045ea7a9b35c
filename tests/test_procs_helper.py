"""``tests/helpers/procs.py``: stopping a process a test started leaves nothing of it behind.

A worker that exits on SIGINT but leaves a child (a Forge frozen by SIGSTOP, which no SIGTERM
reaches) must not outlive the test: ``stop_group`` kills the whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.procs import stop_group

# A leader that starts a child which ignores SIGINT and SIGTERM and freezes itself, prints the
# child's pid, and exits on SIGINT without a thought for it.
LEADER = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); os.kill(os.getpid(), signal.SIGSTOP)"],
    stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_group_leaves_no_child_behind() -> None:
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert leader.stdout is not None
        child = int(leader.stdout.readline())
        assert alive(child)
        stop_group(leader, grace=30)
        assert leader.returncode is not None
        deadline = time.monotonic() + 30  # the kernel reaps the orphan through init: poll for it
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child), "the frozen child outlived its group's stop"
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


def test_a_test_servers_error_never_lands_in_the_output_of_a_cli_run_in_process(
        capfd: pytest.CaptureFixture[str]) -> None:
    """click's CliRunner swaps sys.stderr for the whole process while a command runs: a loopback server
    thread's traceback became part of the command's output (a soak failure of a "no Traceback" check)."""
    import urllib.error
    import urllib.request

    import click
    from click.testing import CliRunner

    from tests.helpers.http_server import FileServer

    def broken(handler: object, head: bool) -> bool:
        raise RuntimeError("the server's own bug")

    @click.command()
    @click.argument("url")
    def fetch(url: str) -> None:
        try:
            urllib.request.urlopen(url, timeout=10).read()
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            click.echo(f"failed: {type(exc).__name__}", err=True)

    with FileServer() as server:
        server.custom = broken
        result = CliRunner().invoke(fetch, [server.url("/x")])
    assert "failed:" in result.output and "Traceback" not in result.output, result.output
    assert "RuntimeError: the server's own bug" in capfd.readouterr().err  # still shown, on the real stderr
