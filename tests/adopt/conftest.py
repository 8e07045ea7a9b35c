"""An original worker's volume to adopt, and the stand-in world to install around it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.forge_world import World, build_world, extension_files
from tests.helpers.http_server import FileServer
from tests.helpers.original_volume import OriginalVolume, lay_out, reactor_repo, with_webui_user
from tests.provision.conftest import spawns

__all__ = ["spawns"]  # every command line started while a test runs (a fixture)


@dataclass
class Original:
    world: World
    volume: OriginalVolume


@pytest.fixture
def civitai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """A loopback stand-in for Civitai's API (it knows no hash until a test adds one): adopt's default lookup
    never leaves this machine."""
    with FileServer() as server:
        monkeypatch.setenv("CIVITAI_API_BASE", server.url("/api/v1"))
        yield server


@pytest.fixture
def original(tmp_path: Path, civitai: FileServer) -> Original:
    """$FORGE_VOLUME laid out by the original's install script: Forge, ReActor at v0.6.1 and ADetailer,
    seven stand-in models of six kinds, settings, a venv folder, logs and a Hugging Face cache."""
    world = build_world(tmp_path / "world", extensions=("adetailer",))
    with_webui_user(world.forge)
    world.extensions["sd-webui-reactor"] = reactor_repo(tmp_path / "world" / "repos" / "sd-webui-reactor",
                                                        extension_files("sd-webui-reactor"))
    volume = lay_out(tmp_path / "volume", world.forge, world.extensions)
    return Original(world, volume)
