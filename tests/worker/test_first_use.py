"""A worker never downloads: first-use files come from the volume, or the job fails at once in one line.

On the stand-in, which fetches its live-preview decoder at first use as Forge does
(torch.hub.download_url_to_file through urllib): without the file, the generation's job fails with the
hook's line naming the file and the spec line that adds it (and no lookup leaves the machine); with
"previews" in the spec, install fetches the decoder from a loopback mirror, verify checks it, and with
the mirror gone a progress call during a generation returns a current_image.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from click.testing import CliRunner

from provision.cli import main
from provision.forge.first_use import expand
from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.worker.conftest import module_volume, start_worker, worker_env

GENERATE = {"prompt": "a lighthouse", "steps": 40}  # 2 s at the stand-in's 0.05 s a step
PREVIEWS_ON = {"live_previews_enable": True, "show_progress_every_n_steps": 1, "show_progress_type": "Approx NN"}


def call(worker: Any, method: str, endpoint: str, payload: Any = None) -> dict[str, Any]:
    job: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        job["payload"] = payload
    return worker.runsync(job)  # type: ignore[no-any-return]


def generate_and_poll(worker: Any, steps: int = 40) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A txt2img, and GET /sdapi/v1/progress jobs while it runs: (its answer, the progress answers)."""
    result: dict[str, Any] = {}
    payload = {**GENERATE, "steps": steps}
    thread = threading.Thread(target=lambda: result.update(out=call(worker, "POST", "/sdapi/v1/txt2img", payload)))
    thread.start()
    polls = []
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        polls.append(call(worker, "GET", "/sdapi/v1/progress"))
        time.sleep(0.1)
    thread.join(60)
    return result["out"], polls


def test_a_missing_decoder_fails_the_job_at_once_naming_the_feature(provisioned_world: World, tmp_path: Path) -> None:
    volume = module_volume(provisioned_world, tmp_path)
    env = worker_env(volume, tmp_path / "scratch", FORGE_STANDIN_STEP_SECONDS="0.05")
    worker = start_worker(env, tmp_path / "logs")
    try:
        assert call(worker, "POST", "/sdapi/v1/options", PREVIEWS_ON)["status"] == "COMPLETED"
        started = time.monotonic()
        out, polls = generate_and_poll(worker, steps=1200)  # a minute, were it not cut short
        took = time.monotonic() - started
    finally:
        worker.stop()
    want = ("forge-volume: Forge needs models/VAE-approx/model.pt, which is not on the volume, and a worker never "
            "downloads: add \"previews\" to `features` in [forge] of forge-volume.toml (features = [\"previews\"]), "
            "then run `forge-volume lock && forge-volume install` on a pod with this volume")
    assert out["status"] == "FAILED" and out["error"] == want, out
    failed = [p for p in polls if p["status"] == "FAILED"]
    assert failed and all(p["error"] == want for p in failed), polls
    # Forge does without a preview, but the job stops at once: the worker interrupted the generation (60 s),
    # and no resolver or host was waited on.
    assert took < 30
    log = worker.log()
    assert want in log  # Forge's log says it too
    assert "Name or service not known" not in log and "Temporary failure in name resolution" not in log
    assert not (volume / "models" / "VAE-approx" / "model.pt").exists()


def test_with_the_feature_install_fetches_it_and_previews_work_offline(provisioned_world: World,
                                                                        tmp_path: Path) -> None:
    volume = module_volume(provisioned_world, tmp_path)
    blobs = {}
    with FileServer() as mirror:
        for file, _ in expand(("previews",)):
            parts = urlsplit(file.url)
            blobs[file.path] = f"decoder {file.name}".encode()
            mirror.add(f"/mirror/{parts.netloc}{parts.path}", blobs[file.path])
        spec = provisioned_world.spec(features=["previews"], features_mirror=mirror.url("/mirror/"))
        (volume / "forge-volume.toml").write_text(spec)
        runner = CliRunner()
        for command in ("lock", "install", "verify"):
            result = runner.invoke(main, ["--volume", str(volume), command], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    for path, data in blobs.items():  # the mirror is gone: nothing can be fetched from here on
        assert (volume / path).read_bytes() == data
    assert '"live_previews_enable": true' in (volume / "config" / "config.json").read_text()

    env = worker_env(volume, tmp_path / "scratch", FORGE_STANDIN_STEP_SECONDS="0.05")
    worker = start_worker(env, tmp_path / "logs")
    try:
        assert call(worker, "POST", "/sdapi/v1/options", {"show_progress_every_n_steps": 1})["status"] == "COMPLETED"
        out, polls = generate_and_poll(worker)
    finally:
        worker.stop()
    assert out["status"] == "COMPLETED", out
    assert all(p["status"] == "COMPLETED" for p in polls), polls
    previews = [p["output"]["current_image"] for p in polls if p["output"]["state"]["job"]]
    assert previews and any(isinstance(img, str) and len(img) > 100 for img in previews), polls
    assert "forge-volume: Forge" not in worker.log()


def test_forges_own_approx_decoder_in_its_checkout_needs_no_feature(provisioned_world: World,
                                                                    tmp_path: Path) -> None:
    """Upstream Forge's git ships models/VAE-approx/model.pt (the SD 1.5 decoder), and sd_vae_approx.model()
    looks in the checkout when --models-dir lacks it: a checkout cloned from GitHub makes "Approx NN" previews
    with no feature and no download (read in the lab's Forge source; the lab's re-made repository lacks the file)."""
    volume = module_volume(provisioned_world, tmp_path)
    shipped = volume / "stable-diffusion-webui-forge" / "models" / "VAE-approx" / "model.pt"
    shipped.parent.mkdir(parents=True, exist_ok=True)
    shipped.write_bytes(b"the checkout's approx decoder\n")
    # FORGE_FAST_BOOT=0: Forge runs from the volume's checkout, where this file was put after install.
    env = worker_env(volume, tmp_path / "scratch", FORGE_STANDIN_STEP_SECONDS="0.05", FORGE_FAST_BOOT="0")
    worker = start_worker(env, tmp_path / "logs")
    try:
        assert call(worker, "POST", "/sdapi/v1/options", PREVIEWS_ON)["status"] == "COMPLETED"
        out, polls = generate_and_poll(worker)
    finally:
        worker.stop()
    assert out["status"] == "COMPLETED", out
    assert all(p["status"] == "COMPLETED" for p in polls), polls
    previews = [p["output"]["current_image"] for p in polls if p["output"]["state"]["job"]]
    assert any(isinstance(img, str) and len(img) > 100 for img in previews), polls
    log = worker.log()
    assert "forge-volume: Forge" not in log and "Downloading" not in log
    assert not (volume / "models" / "VAE-approx" / "model.pt").exists()


HOOKED = r"""
import json, socket, sys, time, urllib.request
sys.path.insert(0, sys.argv[2])
from forge_standin import no_traffic_off_loopback
sys.addaudithook(no_traffic_off_loopback)  # after the worker's hook: should it let anything through, it stops here
from http.server import BaseHTTPRequestHandler, HTTPServer
import threading

class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass

server = HTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=server.serve_forever, daemon=True).start()
out = {"loopback": urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=5).read().decode()}

def download_url_to_file(url, dst):  # torch.hub's shape: the URL is a local of the calling frame
    urllib.request.urlopen(urllib.request.Request(url))

for name, attempt in [
    ("table", lambda: download_url_to_file(sys.argv[1], "/tmp/x")),
    ("unknown", lambda: download_url_to_file("https://example.invalid/weights.bin", "/tmp/x")),
    ("connect", lambda: socket.create_connection(("192.0.2.1", 443), timeout=5)),
]:
    started = time.monotonic()
    try:
        attempt()
        out[name] = "connected"
    except OSError as exc:
        out[name] = [type(exc).__name__, str(exc), round(time.monotonic() - started, 3)]
print(json.dumps(out))
"""


def test_the_hook_refuses_every_connection_off_the_machine_at_once(tmp_path: Path) -> None:
    """Forge's interpreter with the worker's hook: loopback works; a table file, an unknown URL and a bare
    connection are refused before any lookup or packet, each with its line (and recorded for the worker)."""
    import json
    import subprocess
    import sys

    from provision.forge.offline import Refusals, offline_env, prepare_offline
    from volume_layout import VolumeLayout

    folder = tmp_path / "offline"
    prepare_offline(VolumeLayout(tmp_path / "volume"), folder)
    url = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
    env = {"PATH": "/usr/bin:/bin", **offline_env(folder, None)}
    standin = Path(__file__).resolve().parents[1] / "fixtures" / "forge_repo"
    done = subprocess.run([sys.executable, "-c", HOOKED, url, str(standin)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["loopback"] == "ok"
    kind, text, seconds = out["table"]
    assert kind == "URLError" and seconds < 1  # urllib wraps the refusal (an OSError) as it wraps any
    line = ("forge-volume: Forge needs models/RealESRGAN/RealESRGAN_x4plus.pth, which is not on the volume, "
                    "and a worker never downloads: add \"upscale:R-ESRGAN 4x+\" to `features` in [forge] of "
                    "forge-volume.toml (features = [\"upscale:R-ESRGAN 4x+\"]), then run `forge-volume lock && "
                    "forge-volume install` on a pod with this volume")
    assert text == f"<urlopen error {line}>"
    assert "forge-volume: Forge tried to download https://example.invalid/weights.bin" in out["unknown"][1]
    connect = "forge-volume: Forge tried to connect to 192.0.2.1:443 at run time; a worker gives Forge no network"
    assert out["connect"][:2] == ["NoNetwork", connect] and out["connect"][2] < 1
    refused = Refusals(folder / "refused.jsonl").since(0)
    assert refused[0] == line and refused[2] == connect and len(refused) == 3
    assert line in done.stderr  # Forge's log
