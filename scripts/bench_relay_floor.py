"""BENCHMARK FIXTURE, not part of the worker: RunPod's floor, a handler that returns a prebuilt result.

``scripts/bench_relay.py`` runs it behind RunPod's local API (``python scripts/bench_relay_floor.py
--rp_serve_api --rp_api_port N``): whatever a job through the SDK costs with no work in the handler.
At start it asks the backend at ``FLOOR_FORGE_URL`` once for each answer the benchmark's jobs want
(``FLOOR_ENDPOINTS``: ``METHOD /path`` pairs joined by ``,``; a POST sends ``FLOOR_POST_BODY``) and keeps
them parsed; a job then gets the one its ``api.endpoint`` names, the same value a relay would return.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

import runpod

BASE = os.environ["FLOOR_FORGE_URL"]
BODY = os.environ.get("FLOOR_POST_BODY", "{}").encode()


def _fetch(method: str, path: str) -> Any:
    request = urllib.request.Request(BASE + path, method=method, data=BODY if method == "POST" else None,
                                     headers={"content-type": "application/json", "accept-encoding": "identity"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


PREBUILT = {path: _fetch(method, path)
            for method, path in (pair.split(" ", 1) for pair in os.environ["FLOOR_ENDPOINTS"].split(","))}


def handler(job: dict[str, Any]) -> Any:
    return PREBUILT[job["input"]["api"]["endpoint"]]


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
