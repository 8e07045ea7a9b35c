"""Issue 19 hole 9: no job can make Forge reach another machine or write outside the worker's scratch.

A real worker on RunPod's local API boots the Forge stand-in, which behaves as Forge (dfdcbab6) does
here: the API sets every setting (Forge's set_config skips neither its restrict_api ones nor, without
--hide-ui-dir-config, its folders), an image given by URL is fetched checking the first host only, and
"save_images": true writes into the folder settings, a relative one from the checkout. The worker
runs from the volume (FORGE_FAST_BOOT=0, as on a volume on local disk), so the checkout is the
volume's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.http_server import FileServer
from tests.worker.conftest import CHECKPOINT, WorkerProc, module_volume, start_worker, worker_env

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIA"
                       "X8jx0gAAAABJRU5ErkJggg==")
# What a pod's Forge saves into config.json: folders relative to its checkout (and one absolute).
POD_SETTINGS = {"outdir_txt2img_samples": "outputs/txt2img-images", "save_txt": True,
                "samples_filename_pattern": "../../[prompt]", "api_forbid_local_requests": False}


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*"))
            if not p.is_dir() or p.is_symlink()}


@pytest.fixture(scope="module")
def images() -> Iterator[FileServer]:
    with FileServer() as server:
        server.add("/cat.png", PNG)
        server.add("/hop.png", redirect=server.url("/cat.png"))
        yield server


@pytest.fixture(scope="module")
def volume(provisioned_world: Any, module_tmp: Path) -> Path:
    volume = module_volume(provisioned_world, module_tmp)
    seed = volume / "config" / "config.json"
    settings = json.loads(seed.read_text())
    settings.update(POD_SETTINGS, outdir_img2img_samples=str(volume / "outputs" / "img2img-images"))
    seed.write_text(json.dumps(settings))
    return volume


@pytest.fixture(scope="module")
def worker(volume: Path, module_tmp: Path) -> Iterator[WorkerProc]:
    proc = start_worker(worker_env(volume, module_tmp / "scratch", FORGE_FAST_BOOT="0"), module_tmp / "logs")
    yield proc
    proc.stop()


def call(worker: WorkerProc, method: str, endpoint: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    return worker.runsync({"api": {"method": method, "endpoint": endpoint}, "payload": payload or {}}, timeout=120)


def refused(worker: WorkerProc, endpoint: str, payload: dict[str, Any], *needles: str) -> None:
    out = call(worker, "POST", endpoint, payload)
    assert out.get("status") == "FAILED", out
    assert "\n" not in out["error"] and "unexpectedly" not in out["error"], out["error"]
    for needle in needles:
        assert needle in out["error"], (needle, out["error"])


def test_settings_that_reach_addresses_or_folders_are_refused_by_name(worker: WorkerProc) -> None:
    for payload, named in [
        ({"api_forbid_local_requests": False}, "api_forbid_local_requests"),
        ({"api_enable_requests": True, "api_useragent": "x"}, "api_enable_requests, api_useragent"),
        ({"CLIP_stop_at_last_layers": 2, "outdir_txt2img_samples": "/runpod-volume/out"}, "outdir_txt2img_samples"),
        ({"samples_filename_pattern": "../../../x", "directories_filename_pattern": "[date]"},
         "samples_filename_pattern, directories_filename_pattern"),
        ({"temp_dir": "/runpod-volume", "clean_temp_dir_at_start": True}, "temp_dir, clean_temp_dir_at_start"),
        ({"control_net_detectedmap_dir": "/runpod-volume"}, "control_net_detectedmap_dir"),
    ]:
        refused(worker, "/sdapi/v1/options", payload, f"may not set {named}", "where Forge saves files")
    refused(worker, "/sdapi/v1/txt2img", {"prompt": "a cat", "save_images": True,
                                          "override_settings": {"outdir_txt2img_samples": "/runpod-volume/out"}},
            "may not set override_settings.outdir_txt2img_samples")
    options = call(worker, "GET", "/sdapi/v1/options")["output"]
    assert options["api_forbid_local_requests"] is True and options["api_enable_requests"] is False
    # The seed's documented calls keep working: set the model, and ordinary settings.
    ok = call(worker, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT, "CLIP_stop_at_last_layers": 2,
                                                     "samples_format": "png", "save_txt": False})
    assert ok["status"] == "COMPLETED", ok
    assert call(worker, "GET", "/sdapi/v1/options")["output"]["CLIP_stop_at_last_layers"] == 2


def test_an_image_by_url_is_refused_and_never_fetched(worker: WorkerProc, images: FileServer) -> None:
    for payload, field in [
        ({"init_images": [images.url("/cat.png")]}, "init_images[0]"),
        ({"init_images": [base64.b64encode(PNG).decode(), " HTTPS://x.example/a.png"]}, "init_images[1]"),
        ({"init_images": [base64.b64encode(PNG).decode()], "mask": images.url("/hop.png")}, "mask"),
    ]:
        refused(worker, "/sdapi/v1/img2img", {"prompt": "a cat", "steps": 2, **payload}, f"{field} is a URL",
                "send the image itself, base64-encoded")
    refused(worker, "/sdapi/v1/extra-single-image", {"image": images.url("/cat.png")}, "image is a URL")
    refused(worker, "/sdapi/v1/extra-batch-images", {"imageList": [{"data": images.url("/cat.png"), "name": "x"}]},
            "imageList[0].data is a URL")
    assert images.requests == []


def test_save_images_writes_into_the_scratch_never_onto_the_volume(worker: WorkerProc, volume: Path,
                                                                   module_tmp: Path) -> None:
    before = tree(volume)
    for endpoint, extra in [("/sdapi/v1/txt2img", {}),
                            ("/sdapi/v1/img2img", {"init_images": [base64.b64encode(PNG).decode()]})]:
        # samples_save is an ordinary setting a job may turn on (the volume's seed has it off): then Forge saves.
        out = call(worker, "POST", endpoint, {"prompt": "a cat", "steps": 2, "save_images": True,
                                              "override_settings": {"samples_save": True}, **extra})
        assert out["status"] == "COMPLETED", out
    assert tree(volume) == before
    saved = sorted(p.name for p in (module_tmp / "scratch").rglob("*.png"))
    assert len(saved) >= 2, saved  # Forge saved them: into its own scratch
