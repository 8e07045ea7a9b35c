"""Adopting a volume of the original worker on the real Forge (opt-in, ``FORGE_LAB``): the same image before and
after, and no model byte downloaded.

The volume is laid out the original's way from the lab: a depth-1 clone of the lab's Forge with its launcher's
repositories, the lab's venv as the volume's ``venv/`` (a link: it is the lab's, and only read), and the lab's
checkpoint in the checkout's models/Stable-diffusion/ (a hard link, no second 2 GB). Forge is booted the
original's way (``webui.py`` from the volume with the original's ``start.sh`` flags, ``--xformers`` dropped and
``--always-cpu`` added) for one txt2img with a fixed seed. Then ``adopt``, the spec's [forge] set for the lab
(its interpreter, torch pins and offline launcher settings, as a user sets theirs), ``lock``, ``install`` and our
worker on the volume: the same txt2img gives the same pixels, and the model server stand-in (Hugging Face's and
Civitai's endpoints) saw no request. Run it under ``flock /work/lab.lock``: it starts the real Forge twice.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from tests.helpers.http_server import FileServer
from tests.real_forge.conftest import CHECKPOINT, INSTALL_TIMEOUT, ORIGINAL_ENV, SKIP, forge_volume, lab_env
from tests.worker.conftest import free_port, start_worker, worker_env

pytestmark = [pytest.mark.slow, SKIP, pytest.mark.timeout(INSTALL_TIMEOUT + 1800)]
CHECKOUT = "stable-diffusion-webui-forge"
REPO = Path(__file__).resolve().parents[2]
# Files Forge's repository tracks under models/ although its .gitignore has /models/**/* (force-added upstream,
# so a GitHub clone has them). The lab's own git repository of Forge's source was committed through that
# .gitignore, so a clone of the lab lacks them; lay_out_original copies them from the lab's source tree. The
# VAE-approx decoder matters: with live previews on (Forge's default) every txt2img loads it
# (processing.py), and without it Forge downloads it from GitHub: here, a 500 (URLError).
UPSTREAM_MODEL_FILES = ("VAE-approx/model.pt", "karlo/ViT-L-14_stats.th", "ESRGAN/ESRGAN_here",
                        "Stable-diffusion/Put Stable Diffusion checkpoints here.txt", "VAE/Put VAE here.txt",
                        "deepbooru/Put your deepbooru release project folder here.txt",
                        "text_encoder/put_text_encoders_here.txt", "svd/put svd here.txt", "z123/put zero123 here.txt")
TXT2IMG = {"prompt": "a red fox in fresh snow", "negative_prompt": "", "seed": 1234, "steps": 2, "width": 64,
           "height": 64, "sampler_name": "Euler", "cfg_scale": 7, "batch_size": 1, "n_iter": 1}
# runpod-worker-forge's start.sh flags, without --xformers (no CUDA here) and with --always-cpu.
ORIGINAL_FLAGS = ["--no-half-vae", "--skip-python-version-check", "--skip-torch-cuda-test", "--skip-install",
                  "--lowram", "--opt-sdp-attention", "--disable-safe-unpickle", "--api", "--nowebui",
                  "--skip-version-check", "--no-hashing", "--no-download-sd-model", "--always-cpu"]


def pixels(b64: str) -> bytes:
    """A PNG's decoded image data (IDAT), leaving out its text chunks (Forge's parameters and version)."""
    data = base64.b64decode(b64.split(",")[-1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, idat = 8, b""
    while i < len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        if kind == b"IDAT":
            idat += data[i + 8:i + 8 + length]
        i += 12 + length
    return zlib.decompress(idat)


def lay_out_original(lab: Path, volume: Path) -> None:
    """runpod-worker-forge's install script's result, from the lab's parts."""
    shutil.rmtree(volume, ignore_errors=True)
    volume.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--depth=1", f"file://{lab / 'forge-src'}", CHECKOUT], cwd=volume,
                   check=True)
    checkout = volume / CHECKOUT
    missing = [rel for rel in UPSTREAM_MODEL_FILES if not (lab / "forge-src" / "models" / rel).is_file()]
    standins = upstream_standins(lab, volume.parent / "upstream-standins", missing)
    for rel in UPSTREAM_MODEL_FILES:
        (checkout / "models" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(standins.get(rel, lab / "forge-src" / "models" / rel), checkout / "models" / rel)
    shutil.copytree(lab / "forge-src" / "repositories", checkout / "repositories", symlinks=True)
    (volume / "venv").symlink_to(lab / "venv")
    target = checkout / "models" / "Stable-diffusion" / CHECKPOINT
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(lab / "models" / "Stable-diffusion" / CHECKPOINT, target)
    except OSError:
        shutil.copy2(lab / "models" / "Stable-diffusion" / CHECKPOINT, target)
    (volume / "logs").mkdir()


def upstream_standins(lab: Path, out: Path, missing: list[str]) -> dict[str, Path]:
    """Stand-ins for the force-added files a lab's source lacks (``../shared/forge-lab/build.sh`` commits Forge's
    tree through its .gitignore): the VAE-approx decoder as ``scripts/make_first_use_standins.py`` writes it
    (random weights, Forge's own VAEApprox, loaded back by it); the others are placeholders Forge never reads
    on this test's path (karlo's stats are for unCLIP checkpoints only), kept for their names."""
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    if "VAE-approx/model.pt" in missing:
        script = REPO / "scripts" / "make_first_use_standins.py"
        result = subprocess.run([str(lab / "venv" / "bin" / "python"), str(script), "--forge", str(lab / "forge-src"),
                                 "--blip", str(lab / "blip"), "--out", str(out), "--only", "vae-approx"],
                                capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        made["VAE-approx/model.pt"] = out / "VAE-approx" / "model.pt"
    for rel in missing:
        if rel not in made:
            made[rel] = out / rel
            made[rel].parent.mkdir(parents=True, exist_ok=True)
            made[rel].write_bytes(b"")
    return made


def post(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def original_txt2img(lab: Path, volume: Path, log: Path) -> str:
    """Boot Forge the original's way (webui.py from the volume's venv) and run one txt2img; its first image."""
    port = free_port()
    env = {**ORIGINAL_ENV, **lab_env(lab), "HF_HOME": str(volume), "PYTHONUNBUFFERED": "true",
           "VIRTUAL_ENV": str(volume / "venv"), "PATH": f"{volume / 'venv' / 'bin'}:{ORIGINAL_ENV.get('PATH', '')}"}
    argv = [str(volume / "venv" / "bin" / "python3"), str(volume / CHECKOUT / "webui.py"), *ORIGINAL_FLAGS,
            "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=volume / CHECKOUT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, f"the original's Forge exited: {log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the original's Forge did not answer: {log.read_text()[-3000:]}"
                time.sleep(2)
        try:
            image: str = post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", TXT2IMG, 900)["images"][0]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"the original's txt2img failed: {exc.code} {exc.read()[:2000]!r}\n"
                                 f"{log.read_text()[-4000:]}") from None
        return image
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def set_forge_for_the_lab(lab: Path, volume: Path) -> None:
    """What a user edits after adopt here: the lab's interpreter, torch pins and offline launcher settings."""
    env = lab_env(lab)
    torch = shlex.split(env.pop("TORCH_COMMAND"))[2:]
    home = next(line.split("=", 1)[1].strip() for line in (lab / "venv" / "pyvenv.cfg").read_text().splitlines()
                if line.startswith("executable"))
    path = volume / "forge-volume.toml"
    doc = tomlkit.parse(path.read_text())
    forge = doc["forge"]
    args = [a for a in forge["args"] if a != "--xformers"]  # adopt carries the original's image flags; no CUDA here
    forge["python"], forge["torch"], forge["torch_index_url"], forge["args"], forge["env"] = home, torch, "", args, env
    path.write_text(tomlkit.dumps(doc))


def test_adopt_install_and_the_worker_give_the_original_image(lab: Path, tmp_path: Path) -> None:
    base = Path(os.environ["FORGE_LAB_VOLUME"]) if os.environ.get("FORGE_LAB_VOLUME") else tmp_path
    volume = base / "adopt-volume"
    lay_out_original(lab, volume)
    before = original_txt2img(lab, volume, base / "original-forge.log")  # kept: pytest's temp folders rotate
    with FileServer() as models:  # where any model download would go: Hugging Face's and Civitai's endpoints
        ORIGINAL_ENV["HF_ENDPOINT"] = models.url("")  # the CLI's environment (forge_volume)
        ORIGINAL_ENV["CIVITAI_API_BASE"] = models.url("/api/v1")
        try:
            adopted, _ = forge_volume(volume, "adopt", "--no-lookup")
            assert adopted.returncode == 0, adopted.stdout + adopted.stderr
            print(f"\n[adopt-real] {adopted.stdout}")
            set_forge_for_the_lab(lab, volume)
            locked, _ = forge_volume(volume, "lock")
            assert locked.returncode == 0, locked.stdout + locked.stderr
            installed, seconds = forge_volume(volume, "install")
            assert installed.returncode == 0, installed.stdout + installed.stderr
            print(f"[adopt-real] install after adopt: {seconds:.0f} s\n{installed.stdout}")
            verified, _ = forge_volume(volume, "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            scratch = base / "adopt-worker"  # beside the volume, kept like the original's log
            shutil.rmtree(scratch, ignore_errors=True)
            env = worker_env(volume, scratch / "scratch", FORGE_BOOT_TIMEOUT="900", FORGE_ARGS="--always-cpu",
                             HF_ENDPOINT=models.url(""), CIVITAI_API_BASE=models.url("/api/v1"))
            worker = start_worker(env, scratch / "logs")
            try:
                out = worker.runsync({"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": TXT2IMG},
                                     900)
            finally:
                worker.stop()
        finally:
            ORIGINAL_ENV.pop("HF_ENDPOINT", None)
            ORIGINAL_ENV.pop("CIVITAI_API_BASE", None)
        assert models.requests == []  # 0 model bytes downloaded: nothing even asked
    assert out.get("status") == "COMPLETED", f"{out}\n{worker.log_path}: {worker.log()[-4000:]}"
    after = out["output"]["images"][0]
    assert pixels(after) == pixels(before)
    assert (volume / CHECKOUT / "models" / "Stable-diffusion" / CHECKPOINT).is_symlink()
    assert (volume / "venv-original").is_symlink()  # the original's venv (here the lab's, linked) moved aside
    if not os.environ.get("FORGE_LAB_VOLUME"):
        shutil.rmtree(volume, ignore_errors=True)
