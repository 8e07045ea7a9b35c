"""Fixtures of the fault suite: secrets to hunt for, the streams they must never reach, and a fleet of workers.

Secrets. Every test here runs with HF_TOKEN, CIVITAI_TOKEN and the BUCKET_* keys set to distinctive
values (and some jobs carry a token in their payload). ``streams`` collects what a test captured
(CLI output, job outputs, files); after each test the leak guard greps all of it, every fleet
worker's log and every body a worker posted to the platform, and fails the test on a hit.

Fleet. Real ``python -m worker`` processes in production mode against a loopback RunPod job API
(``platform.py``), all started at once when a test first asks for one (their boots overlap):
``main`` (Forge stand-in with extra fault answers, model hosts on loopback), ``bucket`` (images
uploaded to a loopback S3 server), ``hang`` (short request timeout; its Forge gets SIGSTOPped),
``exit`` (Forge dies mid-generation), ``crash`` (Forge dies at boot), ``slow`` (Forge boots past
FORGE_BOOT_TIMEOUT) and ``corrupt`` (a volume whose state.json is broken).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from tests.helpers.cli import cli as run_cli
from tests.helpers.fake_hub import FakeHub
from tests.helpers.forge_world import World
from tests.helpers.http_server import PRIVATE_MODEL_HOST, PRIVATE_MODELS_ENV, FileServer
from tests.helpers.tls import Cert, make_cert
from tests.worker.conftest import free_port, module_volume, worker_env
from volume_layout import VolumeLayout

from .platform import FakePlatform, FleetWorker, JobRecord, start_fleet_worker

HERE = Path(__file__).resolve().parent

# Distinctive values: any of them in a captured stream is a leak.
HF_SECRET = "hf_FAULTsuiteHFtokenA1b2C3"
CIVITAI_SECRET = "civFAULTsuiteCIVITAItokenD4e5"
BUCKET_KEY_ID = "AKIAFAULTSUITEKEYIDF6G7"
BUCKET_SECRET = "faultSuiteBucketSecretKeyH8i9J0"
PAYLOAD_SECRET = "hf_FAULTsuitePAYLOADtokenK1l2"
SECRETS = (HF_SECRET, CIVITAI_SECRET, BUCKET_KEY_ID, BUCKET_SECRET, PAYLOAD_SECRET)
SECRET_ENV = {"HF_TOKEN": HF_SECRET, "CIVITAI_TOKEN": CIVITAI_SECRET, "BUCKET_ACCESS_KEY_ID": BUCKET_KEY_ID,
              "BUCKET_SECRET_ACCESS_KEY": BUCKET_SECRET}
CHECKPOINT = "tiny-sd15.safetensors"


@dataclass
class Streams:
    """Everything a test captured that a user or RunPod's log would see."""

    texts: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def add(self, name: str, text: str) -> str:
        self.texts[f"{name}#{len(self.texts)}"] = text
        return text

    def add_file(self, path: Path) -> None:
        self.files.append(path)


# A presigned S3 URL must name the access key ID (SigV4's X-Amz-Credential): that is how a bucket URL
# works without the secret key, which it never holds. Anywhere else the key ID is a leak.
_PRESIGNED_KEY_ID = re.compile(r"(X-Amz-Credential=|AWSAccessKeyId=)" + re.escape(BUCKET_KEY_ID))


def leaks(name: str, text: str) -> list[str]:
    text = _PRESIGNED_KEY_ID.sub(r"\1<key-id>", text)
    return [f"{name} holds {secret[:10]}..." for secret in SECRETS if secret in text]


@pytest.fixture
def streams() -> Streams:
    return Streams()


@pytest.fixture(autouse=True)
def secret_env(isolated_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The secrets in this process's environment, as on a pod with the endpoint's secrets set."""
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(autouse=True)
def leak_guard(request: pytest.FixtureRequest, streams: Streams, tmp_path: Path) -> Iterator[None]:
    """After each test: no secret in its streams, its volumes' state/lock/spec files, or the fleet's output."""
    yield
    found: list[str] = []
    for name, text in streams.texts.items():
        found += leaks(name, text)
    files = list(streams.files)
    for pattern in ("state.json", "forge-volume.lock", "*.log"):
        files += tmp_path.rglob(pattern)
    for path in files:
        if path.is_file():
            found += leaks(str(path), path.read_text(encoding="utf-8", errors="replace"))
    fleet: Fleet | None = getattr(request.config, "_fault_fleet", None)
    if fleet is not None:
        for worker in fleet.workers.values():
            found += leaks(f"worker {worker.name}'s log", worker.log())
        found += leaks("bodies posted to the platform", "\n".join(fleet.platform.posts))
        if fleet.forge_logs.exists():
            for path in fleet.forge_logs.iterdir():
                found += leaks(str(path), path.read_text(encoding="utf-8", errors="replace"))
    assert not found, "secrets leaked: " + "; ".join(found)


# --- model hosts for the worker's helpers -------------------------------------------------------

@dataclass
class Hosts:
    hub: FakeHub
    files: FileServer  # plain URLs
    canary: FileServer  # nothing may ever reach it
    tls_files: FileServer  # https URLs, its certificate trusted by the workers through REQUESTS_CA_BUNDLE
    cert: Cert


PRIVATE_LORA = os.urandom(20_000)
PAYLOAD_LORA = os.urandom(15_000)


@pytest.fixture(scope="package")
def worker_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    cert = make_cert(tmp_path_factory.mktemp("tls"))
    # The canary listens on every address, so a request to any loopback spelling would reach it.
    with FakeHub() as hub, FileServer(PRIVATE_MODEL_HOST) as files, FileServer("0.0.0.0") as canary, \
            FileServer(PRIVATE_MODEL_HOST, tls=cert) as tls_files:
        hub.add_repo("org/private", {"private.safetensors": PRIVATE_LORA}, token=HF_SECRET)
        hub.add_repo("org/payload", {"payload.safetensors": PAYLOAD_LORA}, token=PAYLOAD_SECRET)
        canary.add("/x.bin", b"must never be fetched")
        yield Hosts(hub, files, canary, tls_files, cert)


# --- the fleet ----------------------------------------------------------------------------------

@dataclass
class Fleet:
    platform: FakePlatform
    workers: dict[str, FleetWorker]
    volume: Path
    forge_logs: Path
    s3_endpoint: str
    hosts: Hosts
    early: dict[str, JobRecord] = field(default_factory=dict)  # jobs queued before their worker started

    def __getitem__(self, name: str) -> FleetWorker:
        return self.workers[name]

    def _forge_log(self, name: str) -> list[dict[str, Any]]:
        path = self.forge_logs / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def forge_requests(self, name: str) -> list[dict[str, Any]]:
        """The requests that reached the named worker's Forge (fault_forge.py's request log)."""
        return [r for r in self._forge_log(name) if "path" in r]

    def forge_boots(self, name: str) -> int:
        """How many times the named worker's Forge was started."""
        return sum(1 for r in self._forge_log(name) if r.get("boot"))

    def forge_env_names(self, name: str) -> list[str]:
        """The names of the environment variables the named worker's Forge was started with."""
        boots = [r for r in self._forge_log(name) if r.get("boot")]
        assert boots, f"worker {name}'s Forge never booted"
        return [str(n) for n in boots[-1]["env_names"]]


def fault_volume(world: World, folder: Path) -> Path:
    """A copy of the installed test volume with one checkpoint, whose launch.py is fault_forge.py."""
    volume = module_volume(world, folder)
    checkout = volume / "stable-diffusion-webui-forge"
    os.replace(checkout / "launch.py", checkout / "standin_launch.py")
    shutil.copy2(HERE / "fault_forge.py", checkout / "launch.py")
    return volume


def corrupt_volume(folder: Path) -> Path:
    volume = folder / "corrupt-volume"
    (volume / ".forge-volume").mkdir(parents=True)
    VolumeLayout(volume).state.write_text('{"layout_version": 1, "forge": {', encoding="utf-8")
    return volume


def _s3_server(port: int) -> object:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    return server


@pytest.fixture(scope="package")
def fleet(provisioned_world: World, tmp_path_factory: pytest.TempPathFactory, worker_hosts: Hosts,
          pytestconfig: pytest.Config) -> Iterator[Fleet]:
    import boto3

    root = tmp_path_factory.mktemp("fleet")
    volume = fault_volume(provisioned_world, root)
    forge_logs = root / "forge-requests"
    forge_logs.mkdir()
    s3_port = free_port()
    s3 = _s3_server(s3_port)
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=BUCKET_KEY_ID,
                 aws_secret_access_key=BUCKET_SECRET, region_name="us-east-1").create_bucket(Bucket="outputs")
    hub = worker_hosts.hub
    common = {**SECRET_ENV, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
              "HF_HOME": str(root / "hf-home"), "CIVITAI_API_BASE": worker_hosts.files.url("/api/v1"),
              "REQUESTS_CA_BUNDLE": str(worker_hosts.cert.cert), **PRIVATE_MODELS_ENV}
    bucket_env = {"BUCKET_ENDPOINT_URL": s3_endpoint, "BUCKET_NAME": "outputs", "AWS_DEFAULT_REGION": "us-east-1",
                  "FORGE_STANDIN_IMAGE_BYTES": "3000000"}  # 8 images are over RunPod's 20 MB
    scratch = root / "scratch"
    specs: dict[str, tuple[Path, dict[str, str]]] = {
        # The strictest log level: a secret must not show up even in the SDK's debug lines.
        # Its downloads wait ten minutes for a connect: only a cancel ends one to a host that never answers.
        "main": (volume, {"RUNPOD_LOG_LEVEL": "DEBUG", "FORGE_DOWNLOAD_CONNECT_TIMEOUT": "600"}),
        "bucket": (volume, bucket_env),
        "hang": (volume, {"FORGE_REQUEST_TIMEOUT": "2"}),
        "exit": (volume, {"FORGE_STANDIN_MODE": "exit_mid_generation"}),
        "crash": (volume, {"FORGE_STANDIN_MODE": "crash_at_boot"}),
        # A deadline well past the SDK's start-up (seven workers import it at once on a busy machine),
        # and a boot far past the deadline.
        "slow": (volume, {"FORGE_STANDIN_BOOT_SECONDS": "120", "FORGE_BOOT_TIMEOUT": "20"}),
        "corrupt": (corrupt_volume(root), {}),
    }
    platform = FakePlatform().__enter__()
    # Queued before the slow worker starts, so it waits for Forge's boot and meets the boot deadline.
    early = {"slow": platform.submit("slow", {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}})}
    workers: dict[str, FleetWorker] = {}
    try:
        for name, (vol, extra) in specs.items():
            env = worker_env(vol, scratch, **common, **extra, FAULT_FORGE_LOG=str(forge_logs / f"{name}.jsonl"))
            workers[name] = start_fleet_worker(platform, name, env, root / "logs")
        fleet = Fleet(platform, workers, volume, forge_logs, s3_endpoint, worker_hosts, early)
        pytestconfig._fault_fleet = fleet  # type: ignore[attr-defined]  # for the leak guard
        deadline = time.monotonic() + 90
        for name in ("main", "bucket", "hang"):
            workers[name].wait_log("Forge ready", max(deadline - time.monotonic(), 1))
        for worker in workers.values():
            platform.wait_polled(worker.name, max(deadline - time.monotonic(), 1))
        yield fleet
    finally:
        for worker in workers.values():  # all at once: each takes a moment to wind its job loop down
            worker.proc.send_signal(signal.SIGINT)
        for worker in workers.values():
            worker.stop()
        platform.__exit__()
        s3.stop()  # type: ignore[attr-defined]


# --- the CLI and model hosts for the toolkit's cases ---------------------------------------------

def cli(streams: Streams, *args: str) -> Result:
    """``forge-volume ARGS`` in-process, as typed on a pod (volume from $FORGE_VOLUME); output kept."""
    result = run_cli(*args)
    streams.add(f"forge-volume {' '.join(args)}", result.output)
    return result


def cli_process(streams: Streams, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``forge-volume ARGS`` as a separate process (for concurrency and signals); output kept."""
    done = subprocess.run([sys.executable, "-m", "provision.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    streams.add(f"forge-volume {' '.join(args)} (process)", done.stdout + done.stderr)
    return done


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ModelHosts:
    """Loopback model hosts: a fake Hugging Face hub and a plain file server that also plays civitai."""

    hub: FakeHub
    files: FileServer

    def civitai(self, version: str, name: str, data: bytes) -> None:
        """A civitai model version whose download needs CIVITAI_TOKEN, as early-access models do."""
        self.files.add(f"/civitai-blob/{version}", data)
        self.files.add(f"/api/download/models/{version}", require_token=CIVITAI_SECRET,
                       redirect=self.files.url(f"/civitai-blob/{version}", host="localhost"))
        self.files.add(f"/api/v1/model-versions/{version}", json.dumps({
            "id": int(version), "files": [{"name": name, "sizeKB": len(data) / 1024, "type": "Model",
                                           "primary": True, "hashes": {"SHA256": sha(data).upper()},
                                           "downloadUrl": self.files.url(f"/api/download/models/{version}")}],
        }).encode(), headers={"Content-Type": "application/json"})


@pytest.fixture
def model_hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelHosts]:
    with FakeHub() as hub, FileServer() as files:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("CIVITAI_API_BASE", files.url("/api/v1"))
        yield ModelHosts(hub, files)


def model_toml(kind: str, source: str, *, name: str | None = None, sha256: str | None = None) -> str:
    text = f'\n[[models]]\nkind = "{kind}"\nsource = "{source}"\n'
    if name is not None:
        text += f"name = {json.dumps(name, ensure_ascii=False)}\n"
    if sha256 is not None:
        text += f'sha256 = "{sha256}"\n'
    return text


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root`` with its size, mtime and (outside the venv) a digest: to prove that
    nothing changed. The toolkit's lock files are left out: taking a lock is not writing content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path(".forge-volume"):
            dirnames[:] = [d for d in dirnames if d != "locks"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_dir() and not path.is_symlink():
                out[str(rel_dir / name)] = (0, 0, "dir")  # a temporary made and removed inside touches its mtime
                continue
            hashed = path.is_file() and not path.is_symlink() and rel_dir.parts[:1] != ("venv",)
            out[str(rel_dir / name)] = (st.st_size, st.st_mtime_ns, sha(path.read_bytes()) if hashed else "")
    return out


def state_models(volume: Path) -> dict[str, dict[str, object]]:
    state = json.loads(VolumeLayout(volume).state.read_text(encoding="utf-8"))
    return {m["path"]: m for m in state.get("models") or []}


def temporaries(volume: Path) -> list[str]:
    """Download temporaries and partials left under models/."""
    return sorted(str(p.relative_to(volume)) for p in (volume / "models").rglob(".*")
                  if p.name.endswith((".part", ".partial")))
