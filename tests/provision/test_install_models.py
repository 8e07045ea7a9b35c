"""install's models step: it hands the lock's models to the models code, and never deletes any."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.provision.conftest import cli, state_of

WEIGHTS = b"\x00fixture-weights" * 4096


@pytest.fixture
def server(server: FileServer) -> FileServer:
    server.add("/files/tiny.safetensors", data=WEIGHTS)
    return server


def test_install_fetches_models_then_leaves_them_alone(provisioned_world: World, installed_volume: Path,
                                                       server: FileServer, spawns: list[list[str]]) -> None:
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    model = f'\n[[models]]\nkind = "lora"\nsource = "{server.url("/files/tiny.safetensors")}"\nsha256 = "{sha}"\n'
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=model))
    hand_placed = installed_volume / "models" / "Stable-diffusion" / "mine.safetensors"
    hand_placed.parent.mkdir(parents=True)
    hand_placed.write_bytes(b"not in any lock")
    assert cli("lock").exit_code == 0

    result = cli("install")

    assert result.exit_code == 0, result.output
    assert "ran models;" in result.stdout  # only the models step: Forge and its venv did not change
    target = installed_volume / "models" / "Lora" / "tiny.safetensors"
    assert target.read_bytes() == WEIGHTS
    assert [m["path"] for m in state_of(installed_volume)["models"]] == ["models/Lora/tiny.safetensors"]
    assert hand_placed.read_bytes() == b"not in any lock"  # install never deletes under models/

    spawns.clear()
    gets = len(server.requests_to("/files/tiny.safetensors"))
    again = cli("install")
    assert again.exit_code == 0 and "nothing to do" in again.stdout
    assert spawns == [] and len(server.requests_to("/files/tiny.safetensors")) == gets  # no network either

    target.unlink()
    assert "fetch models/Lora/tiny.safetensors" in cli("plan").stdout
    repaired = cli("install")
    assert repaired.exit_code == 0, repaired.output
    assert "ran models;" in repaired.stdout and target.read_bytes() == WEIGHTS

    # Dropping the model from the spec does not delete the file: that is refresh-models --prune's job.
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec())
    assert cli("lock").exit_code == 0
    assert cli("install").exit_code == 0
    assert target.read_bytes() == WEIGHTS and hand_placed.exists()
