"""``scripts/soak_tests.sh``: the test command N times beside a CPU load, as a developer runs it.

The runs here are a few tiny test files (the real soak is the whole suite, which the lead runs); what
is checked is the report (each run's result line and wall time, the summary, the exit status) and
that the busy loops are gone when the script ends, also when it is interrupted with Ctrl-C. The
loops are told from other processes on the machine by a marker in their environment.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers.timing import PROMPT

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "soak_tests.sh"


def marked(marker: str) -> list[int]:
    """Processes whose environment holds the marker (the script, its busy loops, its pytest runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def running(marker: str, needle: bytes) -> list[int]:
    """The marked processes whose command line holds ``needle``."""
    pids = []
    for pid in marked(marker):
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:  # it ended meanwhile
            continue
    return pids


def busy_loops(marker: str) -> list[int]:
    return running(marker, b"while True: pass")


def soak_env(tmp_path: Path, marker: str) -> dict[str, str]:
    # One busy loop (the suite itself shares the machine); pytest without plugins starts fastest.
    return {**os.environ, "SOAK_PYTHON": sys.executable, "SOAK_LOAD": "1", "SOAK_LOGS": str(tmp_path / "logs"),
            "SOAK_TEST_MARKER": marker, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def test_each_run_is_reported_and_the_load_stops(tmp_path: Path) -> None:
    (tmp_path / "test_green.py").write_text("def test_one():\n    assert True\n")
    (tmp_path / "test_red.py").write_text("def test_ok():\n    pass\n\ndef test_broken():\n    assert 1 == 2\n")
    marker = uuid.uuid4().hex
    green = subprocess.run([str(SCRIPT), "2", str(tmp_path / "test_green.py"), "-p", "no:cacheprovider"],
                           env=soak_env(tmp_path, marker), capture_output=True, text=True, timeout=120, check=False)
    assert green.returncode == 0, green.stdout + green.stderr
    assert "beside 1 busy loop(s)" in green.stdout
    assert len(re.findall(r"^run [12]/2: green, \d+m\d\ds: 1 passed in ", green.stdout, re.M)) == 2, green.stdout
    assert re.search(r"^soak: 2 of 2 run\(s\) green .* min \d+s, mean \d+s, max \d+s$", green.stdout, re.M)
    assert (tmp_path / "logs" / "run-2.log").read_text().count("1 passed") == 1
    assert busy_loops(marker) == []

    red = subprocess.run([str(SCRIPT), "1", str(tmp_path / "test_red.py"), "-p", "no:cacheprovider"],
                         env=soak_env(tmp_path, marker), capture_output=True, text=True, timeout=120, check=False)
    assert red.returncode == 1, red.stdout + red.stderr
    assert re.search(r"^run 1/1: red \(exit 1\), \d+m\d\ds: 1 failed, 1 passed in ", red.stdout, re.M), red.stdout
    assert "    FAILED " in red.stdout and "test_broken" in red.stdout
    assert "soak: 0 of 1 run(s) green" in red.stdout
    assert busy_loops(marker) == []


def test_bad_usage_is_one_clear_line(tmp_path: Path) -> None:
    for args in ([], ["none"], ["0"]):
        done = subprocess.run([str(SCRIPT), *args], env=soak_env(tmp_path, "x"), capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 2 and done.stderr.startswith("usage: ") and done.stdout == "", args
    env = {**soak_env(tmp_path, "x"), "SOAK_PYTHON": str(tmp_path / "no-venv" / "python")}
    done = subprocess.run([str(SCRIPT), "1"], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2 and "set the venv up first: python3 -m venv .venv" in done.stderr


def test_ctrl_c_stops_the_load(tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(60)\n")
    marker = uuid.uuid4().hex
    # Its own session, so the SIGINT to its process group is what a Ctrl-C in its terminal sends.
    proc = subprocess.Popen([str(SCRIPT), "1", str(tmp_path / "test_slow.py"), "-p", "no:cacheprovider"],
                            env=soak_env(tmp_path, marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not busy_loops(marker) or not running(marker, b"pytest"):
            assert proc.poll() is None and time.monotonic() < deadline, "the soak did not get going"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=PROMPT * 3)
        assert proc.returncode == 130 and "soak: interrupted" in err, err
        assert busy_loops(marker) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in busy_loops(marker):  # only if the script left them: the test has failed already
            os.kill(pid, signal.SIGKILL)
