"""A worker on RunPod's local API whose Forge stand-in logs every request it receives.

The worker downloads from a fake Hugging Face hub and a file server on a private loopback
address it is allowed to reach, for the helper jobs' original forms.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.fake_hub import FakeHub
from tests.helpers.forge_world import World
from tests.helpers.http_server import PRIVATE_MODEL_HOST, PRIVATE_MODELS_ENV, FileServer
from tests.worker.conftest import WorkerProc, module_volume, start_worker, worker_env


@dataclass
class Compat:
    """A worker and what its Forge received."""

    worker: WorkerProc
    log: Path
    hub: FakeHub
    files: FileServer

    @property
    def volume(self) -> Path:
        return Path(self.worker.env["FORGE_VOLUME"])

    def received(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def job(self, job_input: dict[str, Any], *, polls: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run one job; its answer and the requests Forge received for it (without the worker's progress polls)."""
        before = len(self.received())
        answer = self.worker.runsync(job_input, timeout=120)
        got = [r for r in self.received()[before:] if polls or r["path"] != "/sdapi/v1/progress"]
        return answer, got


def _compat(world: World, folder: Path, **extra: str) -> Iterator[Compat]:
    volume = module_volume(world, folder)
    log = folder / "forge-requests.jsonl"
    with FakeHub() as hub, FileServer(PRIVATE_MODEL_HOST) as files:
        env = worker_env(volume, folder / "scratch", FORGE_STANDIN_RECORD=str(log), HF_ENDPOINT=hub.endpoint,
                         HF_HUB_DISABLE_TELEMETRY="1", **PRIVATE_MODELS_ENV, **extra)
        env.pop("HF_TOKEN", None)
        proc = start_worker(env, folder / "logs")
        try:
            yield Compat(proc, log, hub, files)
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def compat(provisioned_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compat]:
    yield from _compat(provisioned_world, tmp_path_factory.mktemp("compat"))


@pytest.fixture(scope="module")
def compat_forge_defaults(provisioned_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compat]:
    yield from _compat(provisioned_world, tmp_path_factory.mktemp("compat-forge"), FORGE_DEFAULTS="forge")
