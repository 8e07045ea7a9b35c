"""Downloads over TLS through the worker (issue 19 hole 12): a job-named https URL trusts the CA bundle
the endpoint names (REQUESTS_CA_BUNDLE), as /v1/sync, refresh-models and the CLI do; a loopback server
with a self-signed certificate stands for a private-network server with a private CA."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
def worker(provisioned_world: Any, module_tmp: Path, cert: Cert) -> Iterator[WorkerProc]:
    volume = module_volume(provisioned_world, module_tmp)
    env = worker_env(volume, module_tmp / "scratch", REQUESTS_CA_BUNDLE=str(cert.cert), **PRIVATE_MODELS_ENV)
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
