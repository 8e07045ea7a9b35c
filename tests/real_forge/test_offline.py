"""The real Forge with no network (opt-in, ``FORGE_LAB``; issue 21): a worker whose every first-use file is on
the volume answers the seed's documented calls that use them from a network namespace that has only loopback.

1. Random-weight stand-ins of the real files (``scripts/make_first_use_standins.py``, with the lab venv's
   real module classes; kept in ``$FORGE_LAB_VOLUME/standins`` between runs) are served by a loopback
   mirror laid out as ``<mirror>/<host>/<path>``.
2. ``forge-volume install`` installs the lab's Forge with ``features`` (previews, face restore, one
   upscaler, the interrogators, the openpose preprocessor) and ``features_mirror`` pointing at it.
3. The worker runs under ``unshare --net`` (only ``lo``, up), so nothing Forge tries can leave; the
   test reaches RunPod's local API through a socket made in that namespace. An audit hook loaded into
   Forge's process only (``forge_audit/sitecustomize.py``) logs every non-loopback connect, datagram,
   name lookup and urllib request (must be none) and every file opened under the volume's models
   (proves each call read the installed stand-in, since Forge swallows a failed face restorer or upscaler
   and answers with the unchanged image).

One deviation from production, forced by the stand-ins: OpenAI's ViT-L-14.pt has a sha256 that clip.load
checks on every load (and the lock pins); no generated file can match it. The test re-pins the lock's
CLIP entry to the stand-in's sha256 and the audit shim gives clip that same hash. With the real file
neither is needed.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import snapshot
from tests.helpers.http_server import FileServer
from tests.real_forge.conftest import CHECKPOINT, INSTALL_TIMEOUT, SKIP, forge_volume, spec_text
from tests.real_forge.netns import OfflineWorker, interfaces_of, outbound_syscalls, start_offline_worker
from tests.real_forge.test_real_forge import GETS, SMALL
from tests.worker.conftest import worker_env

pytestmark = [pytest.mark.slow, SKIP, pytest.mark.timeout(INSTALL_TIMEOUT)]

REPO = Path(__file__).resolve().parents[2]
AUDIT_SHIM = Path(__file__).resolve().parent / "forge_audit"
FEATURES = ["previews", "face-restore", "upscale:R-ESRGAN 4x+", "interrogate", "controlnet-preprocessors:openpose"]
CLIP = "models/CLIP/ViT-L-14.pt"
FIRST_JOB_TIMEOUT = 900.0
JOB_TIMEOUT = 600.0


def png(width: int = 64, height: int = 64) -> str:
    """A small RGB PNG (a gradient), base64: the test venv has no Pillow."""
    raw = b"".join(b"\0" + bytes(v for x in range(width) for v in (200, (y * 4) % 256, (x * 4) % 256))
                   for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(data).decode()


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64.split(",")[-1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def lab_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("FORGE_LAB_VOLUME"):
        return Path(os.environ["FORGE_LAB_VOLUME"])
    return tmp_path_factory.mktemp("real-forge-offline")


@pytest.fixture(scope="module")
def standins(lab: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stand-ins' manifest (written once per FORGE_LAB_VOLUME; the generator keeps existing files)."""
    out = lab_base(tmp_path_factory) / "standins"
    started = time.monotonic()
    result = subprocess.run([str(lab / "venv" / "bin" / "python"), str(REPO / "scripts" / "make_first_use_standins.py"),
                             "--forge", str(lab / "forge-src"), "--blip", str(lab / "blip"), "--out", str(out)],
                            capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    print(f"\n[offline] stand-ins ready in {time.monotonic() - started:.1f} s")
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    manifest["root"] = str(out)
    return manifest


@dataclass
class OfflineVolume:
    volume: Path
    install_seconds: float
    install: subprocess.CompletedProcess[str]
    standins: dict[str, Any]


@pytest.fixture(scope="module")
def offline_volume(lab: Path, standins: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[OfflineVolume]:
    volume = lab_base(tmp_path_factory) / "volume-offline"
    volume.mkdir(parents=True, exist_ok=True)  # kept between runs: install brings it to the spec
    root = Path(standins["root"])
    with FileServer() as server:
        for rel, info in standins["files"].items():
            parts = urlsplit(info["upstream"])
            server.add(f"/mirror/{parts.netloc}{parts.path}", file=root / rel)
        server.add(f"/{CHECKPOINT}", file=lab / "models" / "Stable-diffusion" / CHECKPOINT)
        spec = spec_text(lab, server.url(f"/{CHECKPOINT}")).replace(
            "\n\n[[models]]", f"\nfeatures = {json.dumps(FEATURES)}\nfeatures_mirror = \"{server.url('/mirror/')}\"\n"
                              "\n[[models]]", 1)
        (volume / "forge-volume.toml").write_text(spec)
        locked, _ = forge_volume(volume, "lock")
        assert locked.returncode == 0, locked.stdout + locked.stderr
        # The lab-only re-pin of CLIP (see the module's docstring).
        lock_path = volume / "forge-volume.lock"
        lock = json.loads(lock_path.read_text())
        [clip] = [f for f in lock["first_use"] if f["path"] == CLIP]
        clip["sha256"] = standins["files"]["CLIP/ViT-L-14.pt"]["sha256"]
        lock_path.write_text(json.dumps(lock, indent=2) + "\n")
        result, seconds = forge_volume(volume, "install")
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\n[offline] install with features: {seconds:.1f} s")
    yield OfflineVolume(volume, seconds, result, standins)


@dataclass
class Served:
    worker: OfflineWorker
    volume: Path
    before: dict[str, tuple[int, int]]
    audit: Path
    strace: Path
    started: float

    def audit_lines(self) -> list[dict[str, str]]:
        if not self.audit.is_file():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    def opened(self) -> set[str]:
        models = str(self.volume / "models") + "/"
        return {e["detail"].removeprefix(models) for e in self.audit_lines()
                if e["kind"] == "open" and e["detail"].startswith(models)}


@pytest.fixture(scope="module")
def served(offline_volume: OfflineVolume, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    volume = offline_volume.volume
    before = snapshot(volume)
    scratch = tmp_path_factory.mktemp("offline-worker")
    audit = scratch / "audit.jsonl"
    # --no-half: Forge loads RealESRGAN in fp16 unless told not to (realesrgan_model.py: prefer_half), and fp16
    # convolutions on a CPU took over 7 minutes for one 64x64 tile here (right on a GPU, wrong for the lab).
    env = worker_env(volume, scratch / "scratch", FORGE_BOOT_TIMEOUT="900", FORGE_ARGS="--always-cpu --no-half",
                     FORGE_PROGRESS_INTERVAL="1")
    env.update(PYTHONPATH=str(AUDIT_SHIM), FORGE_LAB_AUDIT_LOG=str(audit),
               FORGE_LAB_AUDIT_OPENS=str(volume / "models"),
               FORGE_LAB_CLIP_SHA256=offline_volume.standins["files"]["CLIP/ViT-L-14.pt"]["sha256"])
    env["FORGE_ENV_PASSTHROUGH"] += ",PYTHONPATH,FORGE_LAB_AUDIT_LOG,FORGE_LAB_AUDIT_OPENS,FORGE_LAB_CLIP_SHA256"
    started = time.monotonic()
    worker = start_offline_worker(env, scratch / "logs", strace_log=scratch / "strace.log")
    try:
        yield Served(worker, volume, before, audit, scratch / "strace.log", started)
    finally:
        worker.stop()
        print(f"\n[offline] worker log: {worker.log_path}; audit log: {audit}")


def call(served: Served, method: str, endpoint: str, payload: Any = None, timeout: float = JOB_TIMEOUT
         ) -> dict[str, Any]:
    job: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        job["payload"] = payload
    return served.worker.runsync(job, timeout)


def ok(out: dict[str, Any]) -> Any:
    assert out.get("status") == "COMPLETED", str(out)[:3000]
    return out.get("output")


def timed(served: Served, method: str, endpoint: str, payload: Any = None) -> Any:
    started = time.monotonic()
    got = ok(call(served, method, endpoint, payload))
    print(f"\n[offline] {method} {endpoint}: {time.monotonic() - started:.1f} s")
    return got


def test_install_put_every_feature_file_where_forge_looks(offline_volume: OfflineVolume) -> None:
    lock = json.loads((offline_volume.volume / "forge-volume.lock").read_text())
    paths = {f["path"] for f in lock["first_use"]}
    for rel in ("VAE-approx/model.pt", "VAE-taesd/taesd_decoder.pth", "GFPGAN/GFPGANv1.4.pth",
                "GFPGAN/detection_Resnet50_Final.pth", "GFPGAN/parsing_parsenet.pth",
                "Codeformer/codeformer-v0.1.0.pth", "RealESRGAN/RealESRGAN_x4plus.pth",
                "BLIP/model_base_caption_capfilt_large.pth", "CLIP/ViT-L-14.pt",
                "ControlNetPreprocessor/openpose/body_pose_model.pth"):
        assert f"models/{rel}" in paths
        assert (offline_volume.volume / "models" / rel).stat().st_size == offline_volume.standins["files"][rel]["size"]
    result, _ = forge_volume(offline_volume.volume, "verify")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_worker_has_only_loopback_and_forge_answers(served: Served) -> None:
    assert interfaces_of(served.worker.proc.pid) == ["lo"]
    models = ok(call(served, "GET", "/sdapi/v1/sd-models", timeout=FIRST_JOB_TIMEOUT))
    print(f"\n[offline] worker start to first answer: {time.monotonic() - served.started:.1f} s")
    assert [m["title"].split(" ")[0] for m in models] == [CHECKPOINT]


@pytest.mark.parametrize("endpoint", GETS)
def test_every_documented_get(served: Served, endpoint: str) -> None:
    got = ok(call(served, "GET", endpoint))
    if endpoint == "/sdapi/v1/face-restorers":
        assert {r["name"] for r in got} == {"CodeFormer", "GFPGAN"}
    elif endpoint == "/sdapi/v1/upscalers":
        # Forge lists a built-in upscaler by its URL (data_path) even when it loads the file from the volume.
        [esrgan] = [u for u in got if u["name"] == "R-ESRGAN 4x+"]
        assert esrgan["model_path"].endswith("/RealESRGAN_x4plus.pth"), esrgan
    elif endpoint == "/sdapi/v1/options":
        assert got["live_previews_enable"] is True  # the previews feature turns them on


@pytest.mark.parametrize("method", ["Approx NN", "TAESD"])
def test_progress_has_a_current_image_during_a_txt2img(served: Served, method: str) -> None:
    result: dict[str, Any] = {}
    payload = {"prompt": "a lighthouse", **SMALL, "steps": 6,
               "override_settings": {"show_progress_every_n_steps": 1, "show_progress_type": method}}

    def generate() -> None:
        result["out"] = call(served, "POST", "/sdapi/v1/txt2img", payload)

    started = time.monotonic()
    thread = threading.Thread(target=generate)
    thread.start()
    previews: list[str] = []
    while thread.is_alive() and time.monotonic() - started < JOB_TIMEOUT:
        progress = ok(call(served, "GET", "/sdapi/v1/progress"))
        if progress.get("current_image"):
            previews.append(progress["current_image"])
        time.sleep(0.5)
    thread.join(JOB_TIMEOUT)
    got = ok(result["out"])
    print(f"\n[offline] txt2img with {method} previews: {time.monotonic() - started:.1f} s, {len(previews)} previews")
    assert len(got["images"]) == 1 and previews
    # A 64x64 image's latent is 8x8: Approx NN's decoder doubles it (16x16), TAESD's gives the full 64x64.
    assert png_size(previews[-1]) == ((16, 16) if method == "Approx NN" else (64, 64))
    expected = "VAE-approx/model.pt" if method == "Approx NN" else "VAE-taesd/taesd_decoder.pth"
    assert expected in served.opened()


def test_extras_upscales_and_restores_faces(served: Served) -> None:
    got = timed(served, "POST", "/sdapi/v1/extra-single-image", {
        "image": png(), "upscaling_resize": 2, "upscaler_1": "R-ESRGAN 4x+",
        "gfpgan_visibility": 1, "codeformer_visibility": 1, "codeformer_weight": 0.5})
    assert png_size(got["image"]) == (128, 128)
    # Forge answers with the unchanged image when an upscaler or restorer fails to load: the files it read say
    # that each one ran from the volume.
    opened = served.opened()
    for rel in ("RealESRGAN/RealESRGAN_x4plus.pth", "GFPGAN/GFPGANv1.4.pth", "GFPGAN/detection_Resnet50_Final.pth",
                "GFPGAN/parsing_parsenet.pth", "Codeformer/codeformer-v0.1.0.pth"):
        assert rel in opened, sorted(opened)
    assert "Unable to load" not in served.worker.log()  # Forge's line when a restorer or upscaler fails


def test_interrogate_with_clip(served: Served) -> None:
    got = timed(served, "POST", "/sdapi/v1/interrogate", {"image": png(), "model": "clip"})
    caption = got["caption"]
    assert caption and "<error>" not in caption, caption
    opened = served.opened()
    assert {"BLIP/model_base_caption_capfilt_large.pth", "CLIP/ViT-L-14.pt"} <= opened, sorted(opened)
    # Every category list was read from the volume and ranked: one match per category joins the caption.
    assert caption.count(", ") >= 4, caption


def test_controlnet_detect_with_openpose(served: Served) -> None:
    got = timed(served, "POST", "/controlnet/detect", {"controlnet_module": "openpose",
                                                       "controlnet_input_images": [png()],
                                                       "controlnet_processor_res": 64})
    assert got["info"] == "Success" and len(got["images"]) == 1 and len(got["poses"]) == 1
    pose = "ControlNetPreprocessor/openpose/"
    assert {f"{pose}body_pose_model.pth", f"{pose}hand_pose_model.pth", f"{pose}facenet.pth"} <= served.opened()


def test_forge_tried_no_connection_and_the_volume_is_unchanged(served: Served) -> None:
    served.worker.stop()
    outbound = [e for e in served.audit_lines() if e["kind"] in ("connect", "sendto", "getaddrinfo", "urlopen")]
    assert outbound == []  # Python-level attempts in Forge's process (a download, a name lookup)
    assert outbound_syscalls(served.strace) == []  # system calls of the worker's whole tree, C code included
    assert "launch.py" in served.strace.read_text()  # strace followed Forge's process
    assert f"Stable-diffusion/{CHECKPOINT}" in served.opened()  # the hook was in Forge's process
    log = served.worker.log()
    for sign in ("forge-volume: Forge", "Downloading", "Name or service not known",
                 "Temporary failure in name resolution", "Network is unreachable", "urlopen error"):
        assert sign not in log, sign
    after = snapshot(served.volume)
    changed = sorted(p for p in set(after) | set(served.before) if after.get(p) != served.before.get(p))
    assert changed == []
