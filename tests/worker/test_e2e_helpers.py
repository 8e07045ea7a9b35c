"""The /v1/* helper jobs end to end through RunPod's local API, against model hosts on loopback.

They reuse the provisioning library: downloads land verified and recorded in state.json, paths
outside models/ are refused, a token sent in a payload is used and never logged or echoed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import PRIVATE_MODEL_HOST, PRIVATE_MODELS_ENV, FileServer
from tests.worker.conftest import WorkerProc, start_worker, worker_env
from volume_layout import VolumeLayout

PRIVATE_TOKEN = "hf_payload_s3cret_token"
UPSCALER = os.urandom(40_000)
LORA = os.urandom(30_000)


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[FakeHub, FileServer]]:
    with FakeHub() as hub, FileServer(PRIVATE_MODEL_HOST) as files:
        hub.add_repo("org/loras", {"style.safetensors": LORA, "sub/other.safetensors": b"x" * 2000,
                                   "README.md": b"# loras\n"})
        hub.add_repo("org/private", {"secret.safetensors": b"s" * 3000}, token=PRIVATE_TOKEN)
        files.add("/files/4x-up.pth", UPSCALER)
        files.add("/files/model.safetensors", b"m" * 5000)
        yield hub, files


@pytest.fixture(scope="module")
def helper_worker(worker_volume: Path, module_tmp: Path, hosts: tuple[FakeHub, FileServer]) -> Iterator[WorkerProc]:
    hub, _ = hosts
    env = worker_env(worker_volume, module_tmp / "scratch", HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1",
                     **PRIVATE_MODELS_ENV)
    env.pop("HF_TOKEN", None)
    proc = start_worker(env, module_tmp / "logs")
    yield proc
    proc.stop()


def helper(worker: WorkerProc, method: str, endpoint: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    job: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        job["payload"] = payload
    return worker.runsync(job, timeout=120)


def state_paths(volume: Path) -> set[str]:
    state = json.loads(VolumeLayout(volume).state.read_text())
    return {m["path"] for m in state.get("models", [])}


def test_download_by_kind_lands_verified_and_recorded(helper_worker: WorkerProc, worker_volume: Path,
                                                      hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    out = helper(helper_worker, "POST", "/v1/download", {"source": files.url("/files/4x-up.pth"), "kind": "upscaler"})
    assert out["status"] == "COMPLETED", out
    assert out["output"]["path"] == "models/ESRGAN/4x-up.pth" and out["output"]["downloaded"] is True
    assert (worker_volume / "models" / "ESRGAN" / "4x-up.pth").read_bytes() == UPSCALER
    assert "models/ESRGAN/4x-up.pth" in state_paths(worker_volume)
    again = helper(helper_worker, "POST", "/v1/download", {"source": files.url("/files/4x-up.pth"), "kind": "upscaler"})
    assert again["output"]["downloaded"] is False


def test_the_original_source_url_and_download_path_form(helper_worker: WorkerProc, worker_volume: Path,
                                                        hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    # A Forge job waits for Forge's boot: helper jobs do not, so without it the download may beat the boot.
    assert helper(helper_worker, "GET", "/sdapi/v1/samplers")["status"] == "COMPLETED"
    out = helper(helper_worker, "POST", "/v1/download", {"source_url": files.url("/files/model.safetensors"),
                                                          "download_path": f"{worker_volume}/models/Stable-diffusion"})
    assert out["status"] == "COMPLETED", out
    assert out["output"]["path"] == "models/Stable-diffusion/model.safetensors"
    assert out["output"]["forge_refreshed"] is True  # Forge was running, and now lists the new checkpoint
    models = helper(helper_worker, "GET", "/sdapi/v1/sd-models")["output"]
    assert "model.safetensors" in [m["title"] for m in models]


def test_the_original_workers_checkout_models_path_maps_to_models(helper_worker: WorkerProc, worker_volume: Path,
                                                                  hosts: tuple[FakeHub, FileServer]) -> None:
    """Old clients name the Forge checkout's models folder; on our volume that folder is models/."""
    _, files = hosts
    out = helper(helper_worker, "POST", "/v1/download", {
        "source_url": files.url("/files/4x-up.pth"),
        "download_path": "/runpod-volume/stable-diffusion-webui-forge/models/ESRGAN"})
    assert out["status"] == "COMPLETED", out
    assert out["output"]["path"] == "models/ESRGAN/4x-up.pth"
    assert (worker_volume / "models" / "ESRGAN" / "4x-up.pth").read_bytes() == UPSCALER
    # One file, in models/; the old path, where it exists, is the checkout's link to models/ESRGAN (links step).
    old = worker_volume / "stable-diffusion-webui-forge" / "models" / "ESRGAN" / "4x-up.pth"
    assert not old.exists() or old.resolve() == (worker_volume / "models" / "ESRGAN" / "4x-up.pth").resolve()


@pytest.mark.parametrize("path", ["../../etc", "/etc/cron.d", "Lora/../../outside.bin"])
def test_a_path_outside_models_is_refused(helper_worker: WorkerProc, worker_volume: Path, path: str,
                                          hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    # A Forge job waits for Forge's boot: helper jobs do not, so without it the download may beat the boot.
    assert helper(helper_worker, "GET", "/sdapi/v1/samplers")["status"] == "COMPLETED"
    out = helper(helper_worker, "POST", "/v1/download", {"source_url": files.url("/files/model.safetensors"),
                                                          "download_path": path})
    assert out["status"] == "FAILED" and "outside the volume's models folder" in out["error"], out
    assert not (worker_volume.parent / "outside.bin").exists()


def test_sync_mirrors_a_repo_including_root_files_and_skips_what_is_there(helper_worker: WorkerProc,
                                                                         worker_volume: Path) -> None:
    out = helper(helper_worker, "POST", "/v1/sync", {"repo_id": "org/loras", "kind": "lora"})
    assert out["status"] == "COMPLETED", out
    lora = worker_volume / "models" / "Lora"
    assert (lora / "style.safetensors").read_bytes() == LORA and (lora / "sub" / "other.safetensors").is_file()
    assert out["output"]["downloaded"] == out["output"]["files"] >= 2
    again = helper(helper_worker, "POST", "/v1/sync", {"repo_id": "org/loras", "sync_path": "Lora"})
    assert again["output"]["downloaded"] == 0 and again["output"]["skipped"] == again["output"]["files"]


def test_a_token_in_the_payload_is_used_but_never_logged_or_echoed(helper_worker: WorkerProc,
                                                                   worker_volume: Path) -> None:
    denied = helper(helper_worker, "POST", "/v1/sync", {"repo_id": "org/private", "kind": "checkpoint"})
    assert denied["status"] == "FAILED"
    out = helper(helper_worker, "POST", "/v1/sync", {"repo_id": "org/private", "kind": "checkpoint",
                                                      "hf_token": PRIVATE_TOKEN})
    assert out["status"] == "COMPLETED", out
    assert (worker_volume / "models" / "Stable-diffusion" / "secret.safetensors").is_file()
    assert PRIVATE_TOKEN not in json.dumps(out) and PRIVATE_TOKEN not in json.dumps(denied)
    assert PRIVATE_TOKEN not in helper_worker.log()


def test_refresh_models_and_volume_status(helper_worker: WorkerProc) -> None:
    out = helper(helper_worker, "POST", "/v1/refresh-models", {"dry_run": True})
    assert out["status"] == "COMPLETED", out
    assert "summary" in out["output"]
    status = helper(helper_worker, "GET", "/v1/volume")
    assert status["status"] == "COMPLETED" and status["output"], status
    bad = helper(helper_worker, "POST", "/v1/refresh-models", {"prune": "yes"})
    assert bad["status"] == "FAILED" and "'prune' must be true or false" in bad["error"]


def test_files_from_helper_jobs_are_extras_verify_passes(helper_worker: WorkerProc, worker_volume: Path,
                                                         hosts: tuple[FakeHub, FileServer]) -> None:
    from click.testing import CliRunner

    from provision.cli import main

    _, files = hosts
    assert helper(helper_worker, "POST", "/v1/download", {"source": files.url("/files/4x-up.pth"),
                                                          "kind": "upscaler"})["status"] == "COMPLETED"
    assert helper(helper_worker, "POST", "/v1/sync", {"repo_id": "org/loras", "kind": "lora"})["status"] == "COMPLETED"
    result = CliRunner().invoke(main, ["--volume", str(worker_volume), "verify"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"extra: models/ESRGAN/4x-up.pth ({len(UPSCALER):,} bytes, from {files.url('/files/4x-up.pth')}): " \
           "not in the lock; kept (`forge-volume refresh-models --prune` removes it)" in lines
    assert any(line.startswith("extra: models/Lora/style.safetensors") and "from hf://org/loras" in line
               for line in lines)
    assert lines[-1].startswith("ok: the volume matches the lock; ") and "extra model file(s)" in lines[-1]
