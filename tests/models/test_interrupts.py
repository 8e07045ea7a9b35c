"""An interrupted `install` or `refresh-models` resumes its download on the next run.

Real processes and real signals: the CLI runs as a subprocess fetching from a loopback server that
sends the first 60 % of the file fast and the rest slowly; the test stops it at 60 % with Ctrl-C
(once or twice), SIGTERM, SIGHUP (a closed web terminal) or SIGKILL, then runs the command again
and counts what the server sent: the second run fetches only what was missing, and leaves no
partial or temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import cli
from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer

FORGE_VOLUME = str(Path(sys.executable).with_name("forge-volume"))
SIZE = 6 << 20
DATA = os.urandom(SIZE)
NAME = "big.safetensors"
DEADLINE = 120.0


@pytest.fixture
def server(server: FileServer) -> FileServer:
    # Fast to 60 %, then 64 KiB per 0.1 s; the test slows it further while it stops the command.
    server.add(f"/{NAME}", DATA, delay_per_chunk=0.1, slow_from=0.6)
    return server


@pytest.fixture
def with_model(installed_volume: Path, provisioned_world: World, server: FileServer) -> Path:
    model = f'\n[[models]]\nkind = "lora"\nsource = "{server.url("/" + NAME)}"\n' \
            f'sha256 = "{hashlib.sha256(DATA).hexdigest()}"\n'
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=model))
    assert cli("lock", volume=installed_volume).exit_code == 0
    return installed_volume


def _leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(".*") if p.name.endswith((".part", ".partial")))


def _wait(what: str, condition: object) -> None:
    end = time.monotonic() + DEADLINE
    while not callable(condition) or not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize(("command", "signals"), [
    ("refresh-models", [signal.SIGINT]),
    ("refresh-models", [signal.SIGINT, signal.SIGINT]),  # Ctrl-C twice: no patience for a clean stop
    ("refresh-models", [signal.SIGTERM]),
    ("refresh-models", [signal.SIGHUP]),
    ("refresh-models", [signal.SIGKILL]),
    ("install", [signal.SIGTERM]),
    ("install", [signal.SIGKILL]),
], ids=["refresh-ctrl-c", "refresh-ctrl-c-twice", "refresh-sigterm", "refresh-sighup", "refresh-sigkill",
        "install-sigterm", "install-sigkill"])
def test_an_interrupted_download_resumes_on_the_next_run(with_model: Path, server: FileServer, command: str,
                                                         signals: list[signal.Signals],
                                                         cli_env: dict[str, str]) -> None:
    lora = with_model / "models" / "Lora"
    route = server.routes[f"/{NAME}"]
    if command == "install":  # the models step must be due: as after a new model in the lock
        assert cli("plan", volume=with_model).stdout.startswith("models (")
    proc = subprocess.Popen([FORGE_VOLUME, "--volume", str(with_model), command], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def at_60() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{command} ended early: {proc.communicate()}")
            temps = _leftovers(lora) if lora.is_dir() else []
            return bool(temps) and temps[0].stat().st_size >= 0.6 * SIZE

        _wait("the download to reach 60 %", at_60)
        # The rest would now take about 20 s: the command stops well before that, however busy the machine.
        route.delay_per_chunk = 0.5
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.05)
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if signals[0] == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 1, (out, err)
        assert "unexpected" not in err and "Traceback" not in err, err
        said = {signal.SIGINT: "error: interrupted; re-run the same command to resume",
                signal.SIGTERM: "error: stopped by SIGTERM; re-run the same command to resume",
                signal.SIGHUP: "error: stopped by SIGHUP; re-run the same command to resume"}[signals[0]]
        assert said in err, err
    kept = _leftovers(lora)
    assert len(kept) == 1 and kept[0].stat().st_size >= 0.6 * SIZE, kept
    assert not (lora / NAME).exists()
    if signals == [signal.SIGTERM]:  # a clean stop hands its bytes over under the stable name
        assert kept[0].name == f".{NAME}.partial"

    sent_before = route.settled_bytes()
    route.delay_per_chunk = 0  # the rest at full speed: what is counted is bytes, not time
    again = subprocess.run([FORGE_VOLUME, "--volume", str(with_model), command], env=cli_env,
                           capture_output=True, text=True, timeout=DEADLINE)
    assert again.returncode == 0, again.stderr
    fetched_again = route.bytes_sent - sent_before
    assert fetched_again <= 0.45 * SIZE, f"{fetched_again / SIZE:.0%} of the file fetched again"
    assert (lora / NAME).read_bytes() == DATA
    assert _leftovers(lora) == []
    assert cli("verify", volume=with_model).exit_code == 0


def test_ctrl_c_during_add_then_the_same_add_again_finishes_it(installed_volume: Path, server: FileServer,
                                                               cli_env: dict[str, str]) -> None:
    """Day one: Ctrl-C during `add`, then the same `add` again, as the message says: it resumes the
    download and finishes (the entry the first run put in the spec is the same, not a duplicate)."""
    lora = installed_volume / "models" / "Lora"
    route = server.routes[f"/{NAME}"]
    args = [FORGE_VOLUME, "--volume", str(installed_volume), "add", "lora", server.url(f"/{NAME}"),
            "--sha256", hashlib.sha256(DATA).hexdigest()]
    proc = subprocess.Popen(args, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def at_60() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"add ended early: {proc.communicate()}")
            temps = _leftovers(lora) if lora.is_dir() else []
            return bool(temps) and temps[0].stat().st_size >= 0.6 * SIZE

        _wait("the download to reach 60 %", at_60)
        route.delay_per_chunk = 0.5
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    # The message names the command that finishes the job.
    assert "error: interrupted; re-run the same command to resume (`forge-volume --volume " \
           f"{installed_volume} add lora {server.url('/' + NAME)} --sha256 " in err, err
    sent_before = route.settled_bytes()
    route.delay_per_chunk = 0

    again = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=DEADLINE)

    assert again.returncode == 0, again.stderr
    assert f"model models/Lora/{NAME}: already in the spec and the lock; fetching it" in again.stdout
    assert f"fetched models/Lora/{NAME}" in again.stdout
    assert route.bytes_sent - sent_before <= 0.45 * SIZE  # resumed, not fetched again
    assert (lora / NAME).read_bytes() == DATA and _leftovers(lora) == []
    assert (installed_volume / "forge-volume.toml").read_text().count(f"/{NAME}") == 1  # one entry
    assert cli("verify", volume=installed_volume).exit_code == 0
