"""Issue 19 hole 9 on the real Forge (opt-in, ``FORGE_LAB``): no job can make Forge fetch a URL or save
outside the worker's scratch, and Forge's own locks hold behind the worker's (asked directly on its port).

Alone: ``FORGE_LAB=... FORGE_LAB_VOLUME=... pytest tests/real_forge/test_job_rules.py`` (installs first).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import snapshot
from tests.helpers.http_server import FileServer
from tests.real_forge.conftest import CHECKPOINT, INSTALL_TIMEOUT, SKIP, Served
from tests.real_forge.test_real_forge import SMALL, call, ok, png

pytestmark = [pytest.mark.slow, SKIP, pytest.mark.timeout(INSTALL_TIMEOUT)]


@pytest.fixture(scope="module")
def image_host() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


def forge(served: Served, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Forge's own API on the worker's loopback port, bypassing the worker's rules."""
    request = urllib.request.Request(f"http://127.0.0.1:{served.worker.forge_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_worker_refuses_settings_and_image_urls_by_name(served: Served, image_host: FileServer) -> None:
    txt = ok(call(served, "POST", "/sdapi/v1/txt2img", {"prompt": "a fox", **SMALL}))
    image_host.add("/fox.png", png(txt["images"][0]))
    url = image_host.url("/fox.png")
    for payload, named in [({"api_forbid_local_requests": False}, "api_forbid_local_requests"),
                           ({"outdir_txt2img_samples": "/tmp/x", "samples_format": "png"}, "outdir_txt2img_samples")]:
        out = call(served, "POST", "/sdapi/v1/options", payload)
        assert out["status"] == "FAILED" and f"may not set {named}" in out["error"], out
    out = call(served, "POST", "/sdapi/v1/img2img", {"prompt": "a fox", **SMALL, "init_images": [url]})
    assert out["status"] == "FAILED" and "init_images[0] is a URL" in out["error"], out
    assert image_host.requests == []
    # The seed's documented options call still works.
    title = next(m["title"] for m in ok(call(served, "GET", "/sdapi/v1/sd-models"))
                 if m["title"].startswith(Path(CHECKPOINT).stem))
    ok(call(served, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 2}))
    assert ok(call(served, "GET", "/sdapi/v1/options"))["CLIP_stop_at_last_layers"] == 2


def test_forges_own_locks_hold_behind_the_worker(served: Served, image_host: FileServer) -> None:
    status, options = forge(served, "GET", "/sdapi/v1/options")
    assert status == 200 and options["api_enable_requests"] is False and options["api_forbid_local_requests"] is True
    before = options["outdir_txt2img_samples"]
    assert before.startswith(served.worker.env["FORGE_SCRATCH"]), before
    # --hide-ui-dir-config: Forge takes the call and keeps its folder.
    status, _ = forge(served, "POST", "/sdapi/v1/options", {"outdir_txt2img_samples": "/tmp/elsewhere"})
    assert status == 200
    assert forge(served, "GET", "/sdapi/v1/options")[1]["outdir_txt2img_samples"] == before
    # api_enable_requests off: Forge refuses a URL image itself, before any request.
    image_host.add("/any.png", b"x")
    status, body = forge(served, "POST", "/sdapi/v1/img2img",
                         {"prompt": "a fox", **SMALL, "init_images": [image_host.url("/any.png")]})
    assert status == 500 and body["detail"] == "Requests not allowed", body
    assert image_host.requests == []


def test_save_images_writes_into_the_scratch(served: Served) -> None:
    volume = Path(served.worker.env["FORGE_VOLUME"])
    before = snapshot(volume)
    # samples_save is an ordinary setting a job may turn on (the volume's seed has it off): then Forge saves.
    ok(call(served, "POST", "/sdapi/v1/txt2img", {"prompt": "a fox", **SMALL, "save_images": True,
                                                  "override_settings": {"samples_save": True}}))
    saved = list(Path(served.worker.env["FORGE_SCRATCH"]).rglob("*.png"))
    assert saved, "Forge saved no image"
    assert snapshot(volume) == before
