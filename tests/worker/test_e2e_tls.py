"""Downloads over TLS through the worker (issue 19 hole 12): a job-named https URL and a /v1/sync of a
repository on an https hub trust the CA bundle the endpoint names (REQUESTS_CA_BUNDLE), as refresh-models
and the CLI do; loopback servers with a self-signed certificate stand for a private-network server, or a
hub mirror, behind a private CA."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import PRIVATE_MODEL_HOST, PRIVATE_MODELS_ENV, FileServer
from tests.helpers.tls import Cert, make_cert
from tests.worker.conftest import WorkerProc, module_volume, start_worker, worker_env

MODEL = os.urandom(300_000)


@pytest.fixture(scope="module")
def cert(module_tmp: Path) -> Cert:
    return make_cert(module_tmp / "tls")


@pytest.fixture(scope="module")
def tls_files(cert: Cert) -> Iterator[FileServer]:
    with FileServer(PRIVATE_MODEL_HOST, tls=cert) as server:
        server.add("/files/model.safetensors", MODEL)
        server.add("/files/hop.safetensors", redirect=server.url("/files/model.safetensors"))
        yield server


@pytest.fixture(scope="module")
def tls_hub(cert: Cert) -> Iterator[FakeHub]:
    with FakeHub(tls=cert) as hub:
        hub.add_repo("org/loras", {"style.safetensors": MODEL, "sub/other.safetensors": b"o" * 2000})
        yield hub


@pytest.fixture(scope="module")
def worker(provisioned_world: Any, module_tmp: Path, cert: Cert, tls_hub: FakeHub) -> Iterator[WorkerProc]:
    volume = module_volume(provisioned_world, module_tmp)
    env = worker_env(volume, module_tmp / "scratch", REQUESTS_CA_BUNDLE=str(cert.cert), HF_ENDPOINT=tls_hub.endpoint,
                     HF_HUB_DISABLE_TELEMETRY="1", **PRIVATE_MODELS_ENV)
    env.pop("SSL_CERT_FILE", None)
    proc = start_worker(env, module_tmp / "logs")
    yield proc
    proc.stop()


def download(worker: WorkerProc, payload: dict[str, Any]) -> dict[str, Any]:
    return worker.runsync({"api": {"method": "POST", "endpoint": "/v1/download"}, "payload": payload}, timeout=180)


def test_a_job_named_https_url_trusts_the_endpoints_ca_bundle(worker: WorkerProc, tls_files: FileServer) -> None:
    for name, path in (("direct.safetensors", "/files/model.safetensors"),
                       ("hop.safetensors", "/files/hop.safetensors")):
        out = download(worker, {"source": tls_files.url(path), "kind": "lora", "name": name})
        assert out["status"] == "COMPLETED", out
        assert out["output"]["sha256"] == hashlib.sha256(MODEL).hexdigest()
        assert (Path(worker.env["FORGE_VOLUME"]) / "models" / "Lora" / name).read_bytes() == MODEL


def test_a_sync_from_an_https_hub_trusts_the_same_bundle(worker: WorkerProc, tls_hub: FakeHub) -> None:
    """huggingface_hub lists the repository through httpx, which reads SSL_CERT_FILE only: with the bundle
    named as requests users name it, the listing failed before any file was asked for."""
    assert tls_hub.endpoint.startswith("https://")
    out = worker.runsync({"api": {"method": "POST", "endpoint": "/v1/sync"},
                          "payload": {"repo_id": "org/loras", "kind": "lora"}}, timeout=180)
    assert out["status"] == "COMPLETED", out
    assert (out["output"]["files"], out["output"]["downloaded"]) == (2, 2)
    lora = Path(worker.env["FORGE_VOLUME"]) / "models" / "Lora"
    assert (lora / "style.safetensors").read_bytes() == MODEL and (lora / "sub" / "other.safetensors").is_file()
    assert tls_hub.cdn.requests_to(f"/blobs/{hashlib.sha256(MODEL).hexdigest()}")
