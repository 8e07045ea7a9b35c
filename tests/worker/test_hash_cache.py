"""A cold worker does not re-hash the checkpoints the volume's record knows (issue 14).

Forge keeps the sha256 of each checkpoint it loaded in a cache in its data dir, the worker's
per-process scratch: without help, every cold worker hashes every checkpoint on its first load
(seconds per GB from a network volume). The worker seeds that cache from state.json
(``provision.forge.hashes``). The stand-in keeps Forge's cache as the real Forge does (it reads the
seed, trusts an entry while the file's mtime is not newer, hashes otherwise, with Forge's log line);
tests/real_forge checks the same against the real Forge.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from provision.forge.hashes import seed_hash_cache
from provision.models import ModelRequest, fetch_model
from provision.progress import QUIET
from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.worker.conftest import WorkerProc, module_volume, start_worker, worker_env
from volume_layout import VolumeLayout

KEPT, CHANGED = os.urandom(300_000), os.urandom(200_000)
CHANGED_NOW = os.urandom(200_000)


def call(worker: WorkerProc, method: str, endpoint: str, payload: Any = None) -> Any:
    job: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        job["payload"] = payload
    out = worker.runsync(job, 60)
    assert out.get("status") == "COMPLETED", out
    return out.get("output")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_log(worker: WorkerProc, text: str, deadline: float = 30) -> str:
    end = time.monotonic() + deadline
    while text not in worker.log():
        assert time.monotonic() < end, f"{text!r} not in the worker's log:\n{worker.log()[-3000:]}"
        time.sleep(0.05)
    return worker.log()


def test_a_cold_worker_hashes_only_the_checkpoints_that_changed(provisioned_world: World, tmp_path: Path) -> None:
    """Two checkpoints downloaded onto the volume (recorded in state.json with sha256, size, mtime);
    one is then replaced by other bytes with a newer mtime. A cold worker boots on the volume.
    Expected: sd-models lists the unchanged one with the lock's sha256 from the start; its first
    generation does not hash it; the changed one is hashed by Forge at its first load (its true sha256,
    not the stale record); nothing is written to the volume for it."""
    volume = module_volume(provisioned_world, tmp_path, checkpoint=False)
    layout = VolumeLayout(volume)
    with FileServer() as server:
        server.add("/kept.safetensors", KEPT)
        server.add("/changed.safetensors", CHANGED)
        for name in ("kept", "changed"):
            fetch_model(layout, ModelRequest(server.url(f"/{name}.safetensors"), kind="checkpoint"), QUIET)
    folder = layout.kind_dir("checkpoint")
    changed = folder / "changed.safetensors"
    recorded = changed.stat().st_mtime
    changed.write_bytes(CHANGED_NOW)
    os.utime(changed, (recorded + 10, recorded + 10))
    worker = start_worker(worker_env(volume, tmp_path / "scratch"), tmp_path / "logs")
    try:
        listed = {m["model_name"]: m for m in call(worker, "GET", "/sdapi/v1/sd-models")}
        assert listed["kept"]["sha256"] == sha(KEPT) and listed["kept"]["hash"] == sha(KEPT)[:10]
        assert listed["kept"]["title"] == f"kept.safetensors [{sha(KEPT)[:10]}]"
        assert listed["changed"]["sha256"] is None and listed["changed"]["title"] == "changed.safetensors"
        for name in ("kept.safetensors", "changed.safetensors"):
            assert call(worker, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": name}) is None
            assert call(worker, "POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 2})["images"]
        log = wait_log(worker, f"Calculating sha256 for {changed}: {sha(CHANGED_NOW)}")
        assert "Calculating sha256" not in log.split(f"Calculating sha256 for {changed}")[0], log[-3000:]
        assert log.count("Calculating sha256") == 1, log[-3000:]
        listed = {m["model_name"]: m for m in call(worker, "GET", "/sdapi/v1/sd-models")}
        assert listed["changed"]["sha256"] == sha(CHANGED_NOW)
        assert listed["kept"]["sha256"] == sha(KEPT)
    finally:
        worker.stop()
    assert not list(volume.rglob("cache.json"))


def test_the_seed_is_written_only_where_forge_reads_it(provisioned_world: World, tmp_path: Path) -> None:
    """Forge reads cache.json only while its cache folder does not exist; the seed keeps the file's
    other entries; a volume without recorded checkpoints writes nothing."""
    volume = module_volume(provisioned_world, tmp_path, checkpoint=False)
    layout = VolumeLayout(volume)
    data = tmp_path / "data"
    data.mkdir()
    assert seed_hash_cache(layout, data) == 0 and not (data / "cache.json").exists()
    with FileServer() as server:
        server.add("/sub.safetensors", KEPT)
        fetch_model(layout, ModelRequest(server.url("/sub.safetensors"), kind="checkpoint",
                                         dest="Stable-diffusion/sd15/sub.safetensors"), QUIET)
        fetch_model(layout, ModelRequest(server.url("/sub.safetensors"), kind="lora"), QUIET)
    (data / "cache.json").write_text(json.dumps({"hashes": {"vae": {"mtime": 1.0, "sha256": "ab"}},
                                                 "safetensors-metadata": {}}))
    assert seed_hash_cache(layout, data) == 1
    seeded = json.loads((data / "cache.json").read_text())
    path = layout.kind_dir("checkpoint") / "sd15" / "sub.safetensors"
    assert seeded == {"hashes": {"vae": {"mtime": 1.0, "sha256": "ab"},
                                 "checkpoint/sd15/sub.safetensors": {"mtime": os.path.getmtime(path),
                                                                     "sha256": sha(KEPT)}},
                      "safetensors-metadata": {}}
    (data / "cache.json").unlink()
    (data / "cache").mkdir()
    assert seed_hash_cache(layout, data) == 0 and not (data / "cache.json").exists()
