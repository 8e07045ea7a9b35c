"""Long steps show what they do: their output streams into a log file on the volume and, on a
terminal, the last line shows under the progress bar; a failing step's error names the log."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from tests.provision.conftest import cli

FORGE_VOLUME = str(Path(sys.executable).with_name("forge-volume"))


def _logs(volume: Path) -> list[Path]:
    return sorted((volume / ".forge-volume" / "logs").glob("install-*.log"))


def _retorch(volume: Path) -> None:
    """A spec change that re-runs torch and everything after it (pip, Forge's preparation, compileall)."""
    spec = volume / "forge-volume.toml"
    spec.write_text(spec.read_text().replace('torch = ["fake-torch"]\n',
                                             'torch = ["fake-torch"]\ntorch_index_url = false\n'))
    assert cli("lock").exit_code == 0


def test_a_failing_step_names_the_log_that_holds_its_whole_output(installed_volume: Path) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(spec.read_text().replace('pip = ["ext-extra"]', 'pip = ["no-such-package-xyz"]', 1))
    assert cli("lock").exit_code == 0
    before = _logs(installed_volume)  # the template volume's own install left one
    result = cli("install")
    assert result.exit_code == 1
    logs = [p for p in _logs(installed_volume) if p not in before]
    assert len(logs) == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: pip install the extensions' packages failed with exit code 1: ")
    assert f"(its whole output is in {logs[0]})" in error
    text = logs[0].read_text()
    assert "\n==> extensions (" in text
    assert "No matching distribution found for no-such-package-xyz" in text


def test_a_no_op_install_writes_no_log(installed_volume: Path) -> None:
    before = _logs(installed_volume)
    assert cli("install").stdout.startswith("nothing to do")
    assert _logs(installed_volume) == before


def test_on_a_terminal_the_running_steps_last_line_shows_and_the_log_keeps_it_all(
        installed_volume: Path, cli_env: dict[str, str]) -> None:
    _retorch(installed_volume)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a terminal 200 columns wide
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's other side closed
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([FORGE_VOLUME, "install"], env=cli_env,
                              stdout=subprocess.PIPE, stderr=slave, text=True, timeout=900)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    assert proc.returncode == 0, b"".join(shown).decode(errors="replace")[-2000:]
    screen = b"".join(shown).decode(errors="replace")
    log = _logs(installed_volume)[-1]
    text = log.read_text()
    for header in ("torch", "Forge's environment preparation", "bytecode"):
        assert f"\n==> {header} (" in text
    assert "[launch]" in text and "Exiting because of --exit argument" in text  # Forge's launch.py, all of it
    assert "[launch]" in screen  # ...and its lines under the bar while it ran
    assert f"(the whole output of each step goes to {log})" in screen
    assert f"the steps' whole output: {log}" in proc.stdout


def test_quiet_prints_errors_only(installed_volume: Path) -> None:
    _retorch(installed_volume)
    result = cli("--quiet", "install")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "installed in" in result.stdout
    assert "Exiting because of --exit argument" in _logs(installed_volume)[-1].read_text()


def test_files_this_python_never_imports_are_counted_in_the_log_not_warned_about(installed_volume: Path) -> None:
    """Third-party packages ship Python 2 files (aenum, torch) that compileall cannot compile: Python never
    imports them. Install counts them in its log; it says nothing on screen about them."""
    site = next((installed_volume / "venv").glob("lib/python*/site-packages"))
    (site / "ext_dep" / "_py2_compat.py").write_text('print "this is Python 2"\n')
    for pyc in (installed_volume / "stable-diffusion-webui-forge" / "__pycache__").glob("launch.*.pyc"):
        pyc.unlink()  # the bytecode step's result is gone: it runs again

    result = cli("install")

    assert result.exit_code == 0, result.output
    assert "ran bytecode, boot" in result.output
    assert "warning" not in result.output and "did not compile" not in result.output
    log = Path(result.stdout.split("the steps' whole output: ")[1].split()[0])
    assert "compileall: 1 file(s) do not compile on this Python (SyntaxError: it never imports them, so they " \
           f"need no bytecode): {site / 'ext_dep' / '_py2_compat.py'}" in log.read_text()
