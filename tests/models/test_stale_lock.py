"""`refresh-models` and the worker's `/v1/refresh-models` refuse a lock the spec was edited after,
naming each entry that differs and what to do on that surface (before: "already correct" while the
new model was absent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import cli
from tests.helpers.forge_world import World
from tests.models.conftest import Hosts
from tests.worker.conftest import WorkerProc, module_volume, start_worker, worker_env


def test_cli_refresh_refuses_a_spec_edited_after_locking(installed_volume: Path, provisioned_world: World,
                                                         hosts: Hosts) -> None:
    spec = installed_volume / "forge-volume.toml"
    tofu = hosts.sources["models/embeddings/tofu.pt"]
    spec.write_text(provisioned_world.spec(extra=hosts.models_toml(skip=("models/embeddings/tofu.pt",))))
    assert cli("lock", volume=installed_volume).exit_code == 0
    spec.write_text(provisioned_world.spec(extensions=["ext-one"], extra=hosts.models_toml(
        skip=("models/ESRGAN/upscaler.pth",))))  # tofu.pt added, the upscaler and ext-two removed
    lock_text = (installed_volume / "forge-volume.lock").read_text()
    for args in (("refresh-models",), ("refresh-models", "--dry-run"), ("refresh-models", "--prune")):
        result = cli(*args, volume=installed_volume)
        assert result.exit_code == 1, result.output
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {installed_volume / 'forge-volume.lock'} no longer matches {spec}: "), line
        assert "extension 'ext-two' is in the lock but no longer in the spec" in line
        assert "model embedding/tofu.pt is in the spec but not in the lock" in line
        assert "model upscaler/upscaler.pth is in the lock but no longer in the spec" in line
        assert line.endswith("(run `forge-volume lock` to lock what changed, then run this command again)")
    assert not (installed_volume / "models" / "embeddings" / "tofu.pt").exists()
    assert (installed_volume / "forge-volume.lock").read_text() == lock_text

    assert cli("lock", volume=installed_volume).exit_code == 0
    fixed = cli("refresh-models", volume=installed_volume)
    assert fixed.exit_code == 0, fixed.output
    assert (installed_volume / "models" / "embeddings" / "tofu.pt").read_bytes() == \
        hosts.blobs["models/embeddings/tofu.pt"]
    assert tofu in (installed_volume / "forge-volume.lock").read_text()


@pytest.fixture
def stale_worker(provisioned_world: World, tmp_path: Path, hosts: Hosts) -> Iterator[tuple[WorkerProc, Path]]:
    volume = module_volume(provisioned_world, tmp_path / "w", checkpoint=False)
    spec = volume / "forge-volume.toml"
    spec.write_text(spec.read_text() + '\n[[models]]\nkind = "embedding"\n'
                    f'source = "{hosts.sources["models/embeddings/tofu.pt"]}"\n')
    proc = start_worker(worker_env(volume, tmp_path / "scratch"), tmp_path / "logs")
    try:
        yield proc, volume
    finally:
        proc.stop()


def test_worker_refresh_refuses_a_spec_edited_after_locking(stale_worker: tuple[WorkerProc, Path],
                                                            hosts: Hosts) -> None:
    proc, volume = stale_worker
    before = hosts.total_requests()
    for payload in ({}, {"dry_run": True}):
        out = proc.runsync({"api": {"method": "POST", "endpoint": "/v1/refresh-models"}, "payload": payload},
                           timeout=120)
        assert out["status"] == "FAILED", out
        error = out["error"]
        assert "no longer matches" in error and "model embedding/tofu.pt is in the spec but not in the lock" in error
        assert "on a pod with this volume" in error and "then send the job again" in error
        assert "then run this command again" not in error  # the CLI's advice is no use in a job
    assert hosts.total_requests() == before and not (volume / "models" / "embeddings" / "tofu.pt").exists()
