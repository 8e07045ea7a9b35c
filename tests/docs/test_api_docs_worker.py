"""Every example in docs/api, sent to the real worker through RunPod's local API.

The worker runs as a user runs it locally (`python -m worker --rp_serve_api`) on a test volume
installed by the real installer, booting the Forge stand-in that answers with Forge's recorded
responses. Hugging Face is a loopback stand-in (HF_ENDPOINT). Each documented request must give
the documented status; a documented output must have the real output's shape (the same keys;
values differ: other seeds, hashes, paths), and a documented error must be the real error.

Two substitutions, both things the pages tell the reader to do: shortened base64 images become a
real image, and an https:// download URL (which would need the internet) becomes a loopback one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docs.apidocs import RESPONSES, Example, all_examples
from tests.helpers.http_server import PRIVATE_MODEL_HOST, FileServer
from tests.worker.conftest import WorkerProc

pytestmark = pytest.mark.slow

PNG = json.loads((RESPONSES / "POST_sdapi_v1_txt2img.json").read_text(encoding="utf-8"))["body"]["images"][0]

EXAMPLES = [e for e in all_examples() if e.responses]


@pytest.fixture(scope="module")
def downloads() -> Iterator[FileServer]:
    with FileServer(PRIVATE_MODEL_HOST) as server:
        yield server


def _runnable(value: Any, downloads: FileServer) -> Any:
    """The example as a reader would send it: real image data for shortened base64, a reachable URL."""
    if isinstance(value, str):
        if value.endswith("...") and value[:8] in ("iVBORw0K", "/9j/4AAQ"):
            return PNG
        if value.startswith("https://"):
            path = "/" + value.split("/", 3)[-1]
            downloads.add(path, b"downloaded model bytes " * 64)
            return downloads.url(path)
        return value
    if isinstance(value, list):
        return [_runnable(v, downloads) for v in value]
    if isinstance(value, dict):
        return {k: _runnable(v, downloads) for k, v in value.items()}
    return value


def _shape(value: Any) -> Any:
    """Types and dict keys, one level down: what a client's code depends on."""
    if isinstance(value, dict):
        return {k: type(v).__name__ if v is not None else "null" for k, v in value.items()}
    if isinstance(value, list):
        return "list"
    return type(value).__name__ if value is not None else "null"


def _keys(value: Any) -> Any:
    return sorted(value) if isinstance(value, dict) else _shape(value)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.request.where for e in EXAMPLES])
def test_example_through_the_worker(example: Example, docs_worker: WorkerProc, downloads: FileServer) -> None:
    body = example.request.data()
    # "webhook" is RunPod's, not the worker's: the local API would POST the result to the example URL.
    job_input = _runnable(body["input"], downloads)
    real = docs_worker.runsync(job_input, timeout=120)
    for response in example.responses:
        documented = response.data()
        assert real.get("status") == documented["status"], (
            f"{response.where}: documented {documented['status']}, the worker answered {json.dumps(real)[:600]}\n"
            f"worker log tail:\n{docs_worker.log()[-2000:]}")
        if documented["status"] == "FAILED":
            assert real["error"] == documented["error"], response.where
            continue
        doc_out, real_out = documented.get("output"), real.get("output")
        assert _keys(doc_out) == _keys(real_out), (
            f"{response.where}: documented output keys {_keys(doc_out)}, real {_keys(real_out)}")


def test_download_in_the_original_form_lands_under_models(docs_worker: WorkerProc, downloads: FileServer) -> None:
    # The doc's https URL needs the internet; the same request against a loopback URL shows where it lands.
    volume = Path(docs_worker.env["FORGE_VOLUME"])
    job = {"api": {"method": "POST", "endpoint": "/v1/download"},
           "payload": {"source_url": "https://example.invalid/models/my-style.safetensors",
                       "download_path": "/runpod-volume/models/Lora"}}
    out = docs_worker.runsync(_runnable(job, downloads), timeout=120)
    assert out["status"] == "COMPLETED", out
    assert (volume / "models" / "Lora" / "my-style.safetensors").is_file()
    assert out["output"]["path"] == "models/Lora/my-style.safetensors"
