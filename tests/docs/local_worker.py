"""A tiny real RunPod handler for testing the example client against RunPod's real local API.

Run as `python -m tests.docs.local_worker --rp_serve_api --rp_api_port PORT`. It answers with
Forge's recorded responses, so the client sees real shapes; it is not the worker, whose own
end-to-end tests live in tests/worker. Routes:

- POST /sdapi/v1/txt2img: the recorded txt2img response (one base64 PNG)
- GET  /sdapi/v1/samplers: the recorded sampler list
- POST /test/urls: images as URLs, as the worker returns them when a bucket is configured
- POST /test/fail: a failed job, the way the worker reports one (`error` plus detail fields)
- POST /test/sleep: sleeps `payload.seconds`, for the client's deadline
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import runpod

RESPONSES = Path(__file__).resolve().parents[1] / "data" / "forge" / "responses"


def recorded(name: str) -> Any:
    return json.loads((RESPONSES / name).read_text(encoding="utf-8"))["body"]


async def handler(job: dict[str, Any]) -> Any:
    job_input = job["input"]
    api = job_input.get("api", {})
    route = (api.get("method"), api.get("endpoint"))
    payload = job_input.get("payload") or {}
    if route == ("POST", "/sdapi/v1/txt2img"):
        return recorded("POST_sdapi_v1_txt2img.json")
    if route == ("GET", "/sdapi/v1/samplers"):
        return recorded("GET_sdapi_v1_samplers.json")
    if route == ("POST", "/test/urls"):
        return {"images": ["https://bucket.example.invalid/job/0.png"], "info": "{}"}
    if route == ("POST", "/test/fail"):
        return {"error": "Forge answered 500 on POST /sdapi/v1/options: model 'nope' not found; "
                         "list checkpoints with GET /sdapi/v1/sd-models", "status_code": 500}
    if route == ("POST", "/test/sleep"):
        await asyncio.sleep(float(payload.get("seconds", 1)))
        return {"slept": payload.get("seconds", 1)}
    return {"error": f"unknown route {route}"}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
