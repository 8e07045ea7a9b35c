"""BENCHMARK FIXTURE, not part of the worker: the original runpod-worker-forge's handler, reconstructed.

``scripts/bench_relay.py`` runs it behind RunPod's local API (``python scripts/bench_relay_original.py
--rp_serve_api --rp_api_port N``) to compare our relay with the worker users migrate from. It relays
to ``ORIGINAL_FORGE_URL`` (the original hard-coded ``http://127.0.0.1:3000``) so the benchmark can point
it at the same backend as our worker.

Source: ashleykleynhans/runpod-worker-forge, ``rp_handler.py`` at its last commit (read through its
forks nik-devs/runpod-worker-forge@48169394 and swimmingyoshi/runpod-worker-forge, which keep its
relay unchanged), and ``../shared/seed/COMPAT.md``. Rewritten here, not copied, with the same work per
job: RunPod's ``validate`` on the input, the ``api`` object and (txt2img/img2img) the payload schema;
``endpoint.lstrip('/')``; a module-level ``requests.Session`` mounted with ``Retry(total=10,
backoff_factor=0.1, status_forcelist=[502, 503, 504])`` and a 600 s timeout; its ``RunPodLogger`` line
per job; ``response.json()`` on a 200; ``{"error": "HTTP status code: N", "output": ..., "refresh_worker":
True}`` otherwise; a POST answered 404 retried up to 3 times. The helpers (/v1/download, /v1/sync) and
the readiness loop before ``serverless.start`` are left out: the benchmark calls neither.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import requests
import runpod
from requests.adapters import HTTPAdapter, Retry
from runpod.serverless.modules.rp_logger import RunPodLogger
from runpod.serverless.utils.rp_validator import validate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.compat.original import IMG2IMG, TXT2IMG, schema  # its schemas, from COMPAT.md

BASE_URI = os.environ.get("ORIGINAL_FORGE_URL", "http://127.0.0.1:3000")
TIMEOUT = 600
POST_RETRIES = 3

# Its schemas/api.py: the endpoint list it accepted, without the leading '/'. Its schemas/input.py is not in
# the sources read; every job its docs show sends both objects, so both are taken as required objects here.
INPUT_SCHEMA = {"api": {"type": dict, "required": True}, "payload": {"type": dict, "required": True}}
ENDPOINTS = (
    "sdapi/v1/txt2img", "sdapi/v1/progress", "sdapi/v1/img2img", "sdapi/v1/sd-models", "sdapi/v1/options",
    "sdapi/v1/samplers", "sdapi/v1/upscalers", "sdapi/v1/sd-vae", "sdapi/v1/hypernetworks",
    "sdapi/v1/face-restorers", "sdapi/v1/realesrgan-models", "sdapi/v1/prompt-styles", "sdapi/v1/embeddings",
    "sdapi/v1/memory", "sdapi/v1/scripts", "sdapi/v1/script-info", "sdapi/v1/loras", "controlnet/model_list",
    "sdapi/v1/refresh-checkpoints", "sdapi/v1/refresh-loras", "sdapi/v1/interrogate", "v1/download", "v1/sync",
)
API_SCHEMA = {
    "method": {"type": str, "required": True, "constraints": lambda method: method in ("GET", "POST")},
    "endpoint": {"type": str, "required": True, "constraints": lambda endpoint: endpoint in ENDPOINTS},
}
PAYLOAD_SCHEMAS = {TXT2IMG.lstrip("/"): schema(TXT2IMG), IMG2IMG.lstrip("/"): schema(IMG2IMG)}

session = requests.Session()
session.mount("http://", HTTPAdapter(max_retries=Retry(total=10, backoff_factor=0.1,
                                                       status_forcelist=[502, 503, 504])))
logger = RunPodLogger()


def send_get_request(endpoint: str) -> requests.Response:
    return session.get(url=f"{BASE_URI}/{endpoint}", timeout=TIMEOUT)


def send_post_request(endpoint: str, payload: dict[str, Any], job_id: str, retry: int = 0) -> requests.Response:
    response = session.post(url=f"{BASE_URI}/{endpoint}", json=payload, timeout=TIMEOUT)
    if response.status_code == 404 and retry < POST_RETRIES:  # the model may still be loading
        logger.warn(f"Received HTTP 404 from endpoint: {endpoint}, Retrying: {retry + 1}", job_id)
        time.sleep(0.2)
        send_post_request(endpoint, payload, job_id, retry + 1)  # the original discarded the retry's answer
    return response


def handler(job: dict[str, Any]) -> dict[str, Any]:
    checked = validate(job["input"], INPUT_SCHEMA)
    if "errors" in checked:
        return {"error": "\n".join(checked["errors"])}
    api = job["input"]["api"]
    api["endpoint"] = api["endpoint"].lstrip("/")
    checked = validate(api, API_SCHEMA)
    if "errors" in checked:
        return {"error": "\n".join(checked["errors"])}
    method, endpoint = api["method"], api["endpoint"]
    payload = job["input"]["payload"]
    if endpoint in PAYLOAD_SCHEMAS:
        logger.info(f"Validating /{endpoint} payload", job["id"])
        checked = validate(payload, PAYLOAD_SCHEMAS[endpoint])
        if "errors" in checked:
            return {"error": "\n".join(checked["errors"])}
        payload = checked["validated_input"]
    try:
        logger.info(f"Sending {method} request to: /{endpoint}", job["id"])
        get = method == "GET"
        response = send_get_request(endpoint) if get else send_post_request(endpoint, payload, job["id"])
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        logger.error(f"HTTP Status code: {response.status_code}", job["id"])
        logger.error(f"Response: {response.json()}", job["id"])
        return {"error": f"HTTP status code: {response.status_code}", "output": response.json(),
                "refresh_worker": True}
    except Exception as exc:  # as the original: the traceback goes to the caller
        logger.error(f"An exception was raised: {exc}")
        return {"error": traceback.format_exc(), "refresh_worker": True}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
