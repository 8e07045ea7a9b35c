"""A corrupt or truncated state.json or lock has a way out: other commands say to run `install`, and
`install` rebuilds the record from what is on the volume, re-doing and re-downloading nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.provision.conftest import cli, git_calls, pip_installs
from volume_layout import VolumeLayout

LORA = os.urandom(300_000)


def _no_work_redone(spawns: list[list[str]]) -> None:
    assert git_calls(spawns, "clone", "fetch", "checkout", "reset") == []
    assert pip_installs(spawns) == []
    # No launch.py --exit, no compileall. The boot proof's record went with the old state.json, so it runs
    # again (Forge started API-only, then stopped): proving the volume boots is cheap next to preparing it.
    assert not [argv for argv in spawns
                if (any(a.endswith("launch.py") for a in argv) and "--exit" in argv) or "compileall" in argv]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-an-object"])
def test_install_rebuilds_a_corrupt_state_from_the_volume(installed_volume: Path, provisioned_world: World,
                                                          spawns: list[list[str]], damage: str) -> None:
    with FileServer() as server:
        server.add("/style.safetensors", LORA)
        model = f'\n[[models]]\nkind = "lora"\nsource = "{server.url("/style.safetensors")}"\n' \
                f'sha256 = "{hashlib.sha256(LORA).hexdigest()}"\n'
        (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=model))
        assert cli("lock").exit_code == 0
        assert cli("install").exit_code == 0
        route = server.routes["/style.safetensors"]
        sent = route.settled_bytes()
        state = VolumeLayout(installed_volume).state
        text = state.read_text()
        state.write_text({"truncated": text[: len(text) // 2], "empty": "", "not-an-object": "[]"}[damage])

        for command in ("plan", "verify", "refresh-models"):
            result = cli(command)
            assert result.exit_code == 1, (command, result.output)
            assert f"error: {state} is corrupt" in result.stderr
            assert "run `forge-volume install`: it rebuilds the record from what is on the volume" in result.stderr
        assert "is corrupt" in cli("status").stdout

        spawns.clear()
        result = cli("install")
        assert result.exit_code == 0, result.output
        _no_work_redone(spawns)
        assert route.bytes_sent == sent  # the model on the volume was checked, not fetched again
        kept = [p.name for p in state.parent.glob("state.json.corrupt-*")]
        assert len(kept) == 1
        assert (f".forge-volume/state.json was unreadable; kept it as {kept[0]} and rebuilt the record from the "
                "volume: found in place python, venv, torch, forge, extensions, prepare, requirements, config, links, "
                "bytecode"
                in result.stdout)
        assert "adopted 1 already present" in result.stderr
        record = json.loads(state.read_text())
        assert [m["path"] for m in record["models"]] == ["models/Lora/style.safetensors"]
        assert record["forge"]["commit"] == provisioned_world.forge.head()

        assert cli("verify").exit_code == 0
        again = cli("install")
        assert again.exit_code == 0 and again.stdout.startswith("nothing to do")


def test_install_resolves_a_corrupt_lock_again(installed_volume: Path, spawns: list[list[str]]) -> None:
    lock = installed_volume / "forge-volume.lock"
    good = json.loads(lock.read_text())
    lock.write_text(lock.read_text()[:100])
    for command in ("plan", "verify"):
        result = cli(command)
        assert result.exit_code == 1
        assert f"error: {lock}: not a forge-volume lock file" in result.stderr
        assert "run `forge-volume install` (it resolves the spec into a new lock)" in result.stderr
    spawns.clear()
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert "the lock was unreadable" in result.stdout and "forge-volume.lock.corrupt-" in result.stdout
    assert json.loads(lock.read_text())["forge"] == good["forge"]
    _no_work_redone(spawns)
    assert cli("verify").exit_code == 0
