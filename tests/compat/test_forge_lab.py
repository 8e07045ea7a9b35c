"""Opt-in: the original worker's defaults against a real Forge (``FORGE_LAB=/work/lab``, see shared/forge-lab).

Skipped without ``FORGE_LAB``. Boots the lab's Forge (CPU, random-weight SD 1.5) on loopback and
sends it what the worker's normaliser makes of a request, with the defaults on and off:
- with the defaults, Forge samples with the original's ``eta`` 0 (its infotext says so) and the same
  seed gives another image than with Forge's own defaults: the reason the defaults exist;
- img2img with every original default is accepted; with a ``mask`` the worker leaves the mask
  settings to Forge and inpainting works, while the original's mask settings (``latent_mask`` "")
  make Forge fail: the reason for that exception.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compat.original import PNG
from tests.worker.conftest import free_port
from worker.normalise import ForgeCall, normalise
from worker.original_defaults import MASK_SETTINGS, defaults_for

LAB = os.environ.get("FORGE_LAB")
pytestmark = pytest.mark.skipif(not LAB, reason="set FORGE_LAB to a built Forge lab (shared/forge-lab) to run")
BOOT_DEADLINE = 600.0


def _post(url: str, body: dict[str, Any] | None, timeout: float = 600) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def forge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    lab = Path(str(LAB))
    data = tmp_path_factory.mktemp("forge-lab-data")
    port = free_port()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = (data / "forge.log").open("wb")
    proc = subprocess.Popen(
        [str(lab / "venv" / "bin" / "python"), "launch.py", "--nowebui", "--api", "--server-name", "127.0.0.1",
         "--port", str(port), "--always-cpu", "--skip-torch-cuda-test", "--disable-nan-check",
         "--skip-prepare-environment", "--skip-version-check", "--no-download-sd-model",
         "--ckpt-dir", str(lab / "models" / "Stable-diffusion"), "--data-dir", str(data)],
        cwd=lab / "forge-src", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Forge exited with {proc.returncode}: {(data / 'forge.log').read_text()[-3000:]}")
            try:
                if _post(url + "/sdapi/v1/sd-models", None, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Forge did not answer within {BOOT_DEADLINE:g} s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _body(route: str, payload: dict[str, Any], *, original_defaults: bool = True) -> dict[str, Any]:
    call = normalise({"api": {"method": "POST", "endpoint": route}, "payload": payload},
                     original_defaults=original_defaults)
    assert isinstance(call, ForgeCall) and call.payload is not None
    return call.payload


SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler a"}


def test_the_defaults_reach_sampling_and_change_the_image_for_the_same_seed(forge: str) -> None:
    status, ours = _post(forge + "/sdapi/v1/txt2img", _body("/sdapi/v1/txt2img", SMALL))
    assert status == 200, ours
    assert "Eta: 0" in json.loads(ours["info"])["infotexts"][0]
    status, forges = _post(forge + "/sdapi/v1/txt2img", _body("/sdapi/v1/txt2img", SMALL, original_defaults=False))
    assert status == 200, forges
    assert "Eta: 0" not in json.loads(forges["info"])["infotexts"][0]
    assert ours["images"][0] != forges["images"][0]


def test_img2img_with_every_default_and_inpainting_with_forges_mask_settings_work(forge: str) -> None:
    plain = {**SMALL, "init_images": [PNG]}
    status, answer = _post(forge + "/sdapi/v1/img2img", _body("/sdapi/v1/img2img", plain))
    assert status == 200, answer
    masked = _body("/sdapi/v1/img2img", {**plain, "mask": PNG})
    assert not set(masked) & MASK_SETTINGS
    status, answer = _post(forge + "/sdapi/v1/img2img", masked)
    assert status == 200, answer
    # What the original's mask settings would have done to the same request (it refused `mask` itself):
    originals = {k: v for k, v in defaults_for("/sdapi/v1/img2img").items() if k in MASK_SETTINGS}
    status, answer = _post(forge + "/sdapi/v1/img2img", {**masked, **originals})
    assert status != 200, answer
