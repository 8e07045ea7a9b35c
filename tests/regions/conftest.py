"""A fleet for `forge-volume regions`: the offline Forge world, a spec with a [runpod] table for three
datacenters, and RunPod's API stood in on loopback (tests/helpers/runpod_standin.py).

Installing three volumes from nothing takes the longest (three real installs, in parallel pods), so it
is done once per module (``fleet``); tests that go on from there get their own copy of the stand-in's
volumes, endpoint, spec, lock and record (``fleet_copy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from provision.cli import main
from tests.conftest import _SCRUB, copy_volume
from tests.helpers.forge_world import World, build_world, offline_pip_env
from tests.helpers.http_server import FileServer
from tests.helpers.runpod_standin import RunPodStandIn

KEY = "rpa_TESTKEY0123456789abcdefSECRET"
DCS = ("EU-RO-1", "US-KS-2", "EUR-IS-1")
WEIGHTS = b"\x00regions-weights" * 2048
MORE_WEIGHTS = b"\x01another-lora" * 2048


def runpod_table(*, pod_timeout: int = 120, datacenters: tuple[str, ...] = DCS) -> str:
    dcs = ", ".join(f'"{d}"' for d in datacenters)
    return (f"\n[runpod]\ndatacenters = [{dcs}]\nvolume_name = \"forge\"\nvolume_size = 50\n"
            f"\n[runpod.pod]\nimage = \"example/forge-volume-pod:0.1.0\"\ntimeout = {pod_timeout}\n"
            "\n[runpod.endpoint]\nname = \"forge-sdxl\"\nimage = \"example/forge-volume-worker:0.1.0\"\n"
            "gpus = [\"ADA_24\", \"AMPERE_24\"]\nworkers = 3\nidle_timeout = 5\n"
            "env = { FORGE_DEFAULTS = \"original\" }\n")


def model_entry(server: FileServer, path: str, data: bytes, kind: str = "lora") -> str:
    return (f'\n[[models]]\nkind = "{kind}"\nsource = "{server.url(path)}"\n'
            f'sha256 = "{hashlib.sha256(data).hexdigest()}"\n')


def api_env(standin: RunPodStandIn) -> dict[str, str]:
    return {"RUNPOD_API_KEY": KEY, "RUNPOD_API_URL": standin.url, "FORGE_REGIONS_POLL": "0.2",
            "RUNPOD_API_BACKOFF": "0.01", "RUNPOD_API_TIMEOUT": "10"}


def regions(spec: Path, standin: RunPodStandIn, *args: str, env: dict[str, str] | None = None) -> Result:
    """``forge-volume --spec SPEC regions ARGS`` in-process, with the key and the stand-in's URL."""
    return CliRunner().invoke(main, ["--spec", str(spec), "regions", *args],
                              env={**api_env(standin), **(env or {})}, catch_exceptions=False)


def lock(spec: Path) -> None:
    result = CliRunner().invoke(main, ["--spec", str(spec), "lock"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def plan_actions(spec: Path, standin: RunPodStandIn) -> dict[str, str]:
    """What plan says apply will do, per datacenter and (key "endpoint") for the endpoint."""
    result = regions(spec, standin, "plan", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    return {**{d["datacenter"]: d["action"] for d in data["datacenters"]}, "endpoint": data["endpoint"]["action"]}


def done_actions(result: Result) -> dict[str, str]:
    """What apply says it did, in the plan's words ("nothing" where it did nothing)."""
    data = json.loads(result.stdout)
    did = {d["datacenter"]: "nothing" for d in data["plan"]["datacenters"]}
    did.update({d["datacenter"]: d["action"] for d in data["done"]})
    return {**did, "endpoint": data["endpoint_action"]}


@dataclass
class Fleet:
    world: World
    standin: RunPodStandIn
    spec: Path
    server: FileServer
    first: Result  # the apply from nothing
    planned: dict[str, str]  # what plan said before it
    seconds: float


def folder_of(standin: RunPodStandIn, dc: str) -> Path:
    (volume,) = [v for v in standin.volumes.values() if v["dataCenter"] == dc]
    return standin.folder(volume["id"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    world = build_world(root / "world", extensions=("ext-one",))  # one extension: its clone, pip and installer
    with FileServer() as server, pytest.MonkeyPatch.context() as mp:
        server.add("/files/tiny.safetensors", data=WEIGHTS)
        server.add("/files/more.safetensors", data=MORE_WEIGHTS)
        for name in _SCRUB:
            mp.delenv(name, raising=False)
        for name, value in offline_pip_env(wheelhouse).items():
            mp.setenv(name, value)
        mp.setenv("HF_HOME", str(root / "hf-home"))
        spec = root / "project" / "forge-volume.toml"
        spec.parent.mkdir()
        spec.write_text(world.spec(extra=model_entry(server, "/files/tiny.safetensors", WEIGHTS)) + runpod_table())
        lock(spec)
        with RunPodStandIn(root / "runpod", KEY) as standin:
            planned = plan_actions(spec, standin)
            started = time.monotonic()
            first = regions(spec, standin, "apply", "--json")
            yield Fleet(world, standin, spec, server, first, planned, time.monotonic() - started)


@pytest.fixture(scope="module")
def locked_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spec with the [runpod] table and its lock, nothing installed (for tests whose pods hang or fail)."""
    root = tmp_path_factory.mktemp("locked")
    world = build_world(root / "world", extensions=())
    spec = root / "project" / "forge-volume.toml"
    spec.parent.mkdir()
    spec.write_text(world.spec() + runpod_table())
    lock(spec)
    return spec


@dataclass
class Copy:
    standin: RunPodStandIn
    spec: Path
    server: FileServer


@pytest.fixture
def fleet_copy(fleet: Fleet, tmp_path: Path) -> Iterator[Copy]:
    """This test's own fleet: the volumes (copied), the endpoint, the spec, lock and record, after the
    apply from nothing."""
    assert fleet.first.exit_code == 0, fleet.first.output
    standin = RunPodStandIn(tmp_path / "runpod", KEY)
    standin.volumes = json.loads(json.dumps(fleet.standin.volumes))
    standin.endpoints = json.loads(json.dumps(fleet.standin.endpoints))
    for volume_id in standin.volumes:
        target = standin.folder(volume_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_volume(fleet.standin.folder(volume_id), target)
    project = tmp_path / "project"
    shutil.copytree(fleet.spec.parent, project, ignore=shutil.ignore_patterns("*.lock.lock", "*.json.lock"))
    with standin:
        yield Copy(standin, project / fleet.spec.name, fleet.server)
        assert standin.pods == {} and standin.running_processes() == [], "a pod was left running"
        assert standin.schema_errors == []


def volume_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file that is not a per-install record, with the volume's own path replaced by the
    mount path a pod sees (/workspace): the stand-in maps it to a folder per volume."""
    skip = ("/.git/index", "/__pycache__/", ".forge-volume/logs/", ".forge-volume/state.json", ".forge-volume/locks/",
            ".forge-volume/boot-set/", "/.git/logs/", ".forge-volume/prepare-data/",
            # pip's RECORD holds the sha256 of the venv's scripts, whose shebangs name the volume's path
            ".dist-info/RECORD")
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path).replace(str(folder), "/workspace")
        elif path.is_file() and not any(s in "/" + rel for s in skip):
            data = path.read_bytes().replace(str(folder).encode(), b"/workspace")
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
