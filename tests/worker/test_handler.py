"""The handler in-process against a real Forge stand-in: what RunPod gets back beyond the local API's view.

RunPod's local API strips ``refresh_worker`` and cannot cancel, so those are checked here by
calling the handler directly, with the same boot code ``python -m worker`` runs.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import urllib.request
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import DATA
from tests.helpers.timing import PROMPT
from tests.worker.conftest import free_port, worker_env
from worker.boot import build_worker
from worker.handler import Worker, make_handler

T = TypeVar("T")


def job(method: str, endpoint: str, payload: Any = None, job_id: str = "job-1") -> dict[str, Any]:
    body: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        body["payload"] = payload
    return {"id": job_id, "input": body}


def run(worker: Worker, coro: Awaitable[T]) -> T:
    async def go() -> T:
        try:
            return await coro
        finally:
            if worker.proxy is not None:
                await worker.proxy.close()

    return asyncio.run(go())


async def cancelled_after(handler: Any, a_job: dict[str, Any], seconds: float) -> None:
    """Start a job, cancel it after ``seconds`` as RunPod would, and see the cancellation through."""
    task = asyncio.create_task(handler(a_job))
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture(scope="module")
def live(worker_volume: Path, module_tmp: Path) -> Iterator[Worker]:
    worker = build_worker(worker_env(worker_volume, module_tmp / "scratch", FORGE_STANDIN_STEP_SECONDS="0.01"))
    yield worker
    assert worker.forge is not None
    worker.forge.stop()


def test_caller_mistakes_never_ask_for_a_fresh_worker(live: Worker) -> None:
    handler = make_handler(live)
    for bad in (job("POST", "/sdapi/v1/txt2img", {"steps": "many"}),
                job("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "nope"}),
                job("GET", "/nope"), {"id": "x", "input": None}):
        out = run(live, handler(bad))
        assert out["error"] and "refresh_worker" not in out, out
    out = run(live, handler(job("POST", "/sdapi/v1/txt2img", {"steps": "many"})))
    assert out["forge_status"] == 422 and out["output"]["detail"][0]["loc"] == ["body", "steps"]


def test_forges_error_body_comes_back_as_output_cut_to_size_and_without_the_workers_tokens(live: Worker) -> None:
    handler = make_handler(live)
    huge = "A" * 3_000_000  # Forge's 422 echoes the bad value: a whole "image" here
    out = run(live, handler(job("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": huge})))
    assert out["error"].startswith("Forge answered 422 to POST /sdapi/v1/txt2img: steps: ")
    echoed = out["output"]["detail"][0]["input"]
    assert echoed.startswith("AAAA") and echoed.endswith("(3,000,000 characters, cut by the worker)")
    assert len(json.dumps(out)) < 10_000 and "refresh_worker" not in out
    token = "hf_workerSecretToken123"
    worker = dataclasses.replace(live, settings=dataclasses.replace(live.settings, hf_token=token))
    out = run(worker, make_handler(worker)(job("POST", "/sdapi/v1/options", {"sd_model_checkpoint": token})))
    assert out["forge_status"] == 500 and "not found" in out["output"]["message"]
    assert token not in json.dumps(out)


def test_the_sdk_gets_answers_whole_and_logs_only_a_summary(live: Worker, capsys: pytest.CaptureFixture[str]) -> None:
    """RunPod's run_job formats every output into two debug lines, whatever the log level: not the answer itself."""
    from fastapi.encoders import jsonable_encoder

    from worker.sdk import import_runpod

    import_runpod()
    from runpod.serverless.modules import rp_job

    handler = make_handler(live)
    samplers = json.loads((DATA / "forge" / "responses" / "GET_sdapi_v1_samplers.json").read_text())["body"]
    level, rp_job.log.level = rp_job.log.level, "DEBUG"
    try:
        listed = run(live, rp_job.run_job(handler, job("GET", "/sdapi/v1/samplers")))
        options = run(live, rp_job.run_job(handler, job("GET", "/sdapi/v1/options")))
    finally:
        rp_job.log.level = level
    logged = capsys.readouterr().out
    # Whole, and plain JSON to the platform's encoder and to the local API's.
    assert listed == {"output": samplers} and json.loads(json.dumps(listed)) == {"output": samplers}
    assert jsonable_encoder(listed) == {"output": samplers} and type(jsonable_encoder(listed)["output"]) is list
    assert isinstance(options["output"], dict) and jsonable_encoder(options)["output"] == options["output"]
    assert f"Handler output: <Forge output: {len(samplers)} items>" in logged
    assert "Handler output: <Forge output: samples_save, " in logged
    assert samplers[0]["name"] not in logged and options["output"]["outdir_txt2img_samples"] not in logged


def test_progress_is_reported_while_generating(live: Worker) -> None:
    updates: list[dict[str, Any]] = []
    worker = dataclasses.replace(live, report=lambda j, u: updates.append(u),
                                 settings=dataclasses.replace(live.settings, progress_interval=0.1))
    out = run(worker, make_handler(worker)(job("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 100})))
    assert len(out["images"]) == 1
    steps = [u["sampling_step"] for u in updates]
    assert len(updates) >= 3 and steps == sorted(steps) and updates[0]["sampling_steps"] == 100
    assert updates[0]["job"] == "scripts_txt2img" and 0 < updates[-1]["progress"] <= 1


def test_a_cancelled_job_interrupts_forge(live: Worker) -> None:
    handler = make_handler(live)

    async def cancel_then_generate() -> tuple[float, Any]:
        await cancelled_after(handler, job("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 100_000}), 0.5)
        started = time.monotonic()  # without the interrupt this would queue behind ~1000 s of generation
        out = await asyncio.wait_for(handler(job("POST", "/sdapi/v1/txt2img", {"prompt": "b", "steps": 2})), 60)
        return time.monotonic() - started, out

    seconds, out = run(live, cancel_then_generate())
    assert len(out["images"]) == 1 and seconds < PROMPT


def test_a_result_over_the_limit_fails_with_its_size_and_the_fix(live: Worker) -> None:
    worker = dataclasses.replace(live, settings=dataclasses.replace(live.settings, result_limit=50_000))
    out = run(worker, make_handler(worker)(job("POST", "/sdapi/v1/txt2img", {"steps": 2, "batch_size": 6})))
    assert "the result is 0.1 MB, over RunPod's 0 MB limit" in out["error"] and "BUCKET_ENDPOINT_URL" in out["error"]
    assert out["result_bytes"] > 50_000 and "refresh_worker" not in out


def test_images_become_bucket_urls_when_upload_is_configured(live: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for name, value in (("BUCKET_ENDPOINT_URL", endpoint), ("BUCKET_ACCESS_KEY_ID", "test-key"),
                            ("BUCKET_SECRET_ACCESS_KEY", "test-secret"), ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test-key", aws_secret_access_key="test-secret",
                     region_name="us-east-1").create_bucket(Bucket="outputs")
        worker = dataclasses.replace(live, settings=dataclasses.replace(
            live.settings, upload=True, bucket_endpoint=endpoint, bucket_name="outputs", result_limit=50_000))
        out = run(worker, make_handler(worker)(job("POST", "/sdapi/v1/txt2img", {"steps": 2, "batch_size": 6})))
        assert len(out["images"]) == 6 and all(u.startswith(endpoint + "/outputs/job-1/") for u in out["images"])
        with urllib.request.urlopen(out["images"][0], timeout=10) as resp:
            assert resp.read()[:4] == b"\x89PNG"
        assert out["parameters"]["batch_size"] == 6  # the rest of Forge's answer is unchanged
        single = run(worker, make_handler(worker)(job("POST", "/sdapi/v1/extra-single-image",
                                                      {"image": base64.b64encode(b"\x89PNG..").decode()})))
        assert single["image"].startswith(endpoint)
    finally:
        server.stop()


def test_a_dead_forge_asks_for_a_fresh_worker_and_a_bad_volume_does_not(worker_volume: Path, module_tmp: Path) -> None:
    crashed = build_worker(worker_env(worker_volume, module_tmp / "scratch", FORGE_STANDIN_MODE="crash_at_boot"))
    out = run(crashed, make_handler(crashed)(job("GET", "/sdapi/v1/samplers")))
    assert out["refresh_worker"] is True and "exited with code 1 while booting" in out["error"]
    assert any("CUDA error" in line for line in out["forge_log"])
    missing = build_worker(worker_env(module_tmp / "absent", module_tmp / "scratch"))
    out = run(missing, make_handler(missing)(job("GET", "/sdapi/v1/samplers")))
    assert "no volume at" in out["error"] and "refresh_worker" not in out


def test_only_a_broken_cuda_context_asks_for_a_fresh_worker(live: Worker, worker_volume: Path,
                                                            module_tmp: Path) -> None:
    # Forge echoes the caller's checkpoint name in its 500: a caller mistake, whatever the name says.
    out = run(live, make_handler(live)(job("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "CUDA error"})))
    assert out["forge_status"] == 500 and "model 'CUDA error' not found" in out["error"]
    assert "refresh_worker" not in out, out
    broken = build_worker(worker_env(worker_volume, module_tmp / "scratch", FORGE_STANDIN_MODE="cuda_error"))
    try:
        out = run(broken, make_handler(broken)(job("POST", "/sdapi/v1/txt2img", {"steps": 2})))
    finally:
        assert broken.forge is not None
        broken.forge.stop()
    assert "CUDA error: an illegal memory access" in out["error"] and out["refresh_worker"] is True, out


def test_forges_gzip_middleware_does_not_garble_answers(live: Worker) -> None:
    # Forge gzips bodies of 1000 bytes or more for a client that accepts gzip (the stand-in does too).
    assert live.forge is not None
    request = urllib.request.Request(f"http://127.0.0.1:{live.forge.port}/sdapi/v1/options",
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["content-encoding"] == "gzip"
    out = run(live, make_handler(live)(job("GET", "/sdapi/v1/options")))
    assert "error" not in out and "sd_model_checkpoint" in out, str(out)[:300]
    out = run(live, make_handler(live)(job("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 2})))
    assert "error" not in out and base64.b64decode(out["images"][0])[:4] == b"\x89PNG", str(out)[:300]


def test_a_forge_still_busy_after_a_cancelled_job_is_stopped_and_the_worker_replaced(
        worker_volume: Path, module_tmp: Path) -> None:
    """A generation that ignores the interrupt (Forge wedged): a cancelled job cannot return
    refresh_worker, so the worker stops Forge and the next job asks RunPod for a fresh worker."""
    wedged = build_worker(worker_env(worker_volume, module_tmp / "scratch", FORGE_STANDIN_MODE="wedge_generation"))
    wedged = dataclasses.replace(wedged, settle_timeout=1.0)
    handler = make_handler(wedged)

    async def cancel_then_next() -> Any:
        # Cancel a generation Forge has started: a cancel while the job still waits for Forge's boot (a slow
        # start on a loaded machine) sent nothing to Forge, and rightly leaves no watchdog behind.
        assert wedged.forge is not None
        await wedged.forge.wait_ready()
        await cancelled_after(handler, job("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 5}), 1.0)
        assert wedged.watchdogs, "a watchdog must follow the cancelled generation"
        await asyncio.gather(*wedged.watchdogs)
        started = time.monotonic()
        out = await handler(job("GET", "/sdapi/v1/samplers"))
        return time.monotonic() - started, out

    try:
        seconds, out = run(wedged, cancel_then_next())
    finally:
        assert wedged.forge is not None
        wedged.forge.stop()
    assert out["refresh_worker"] is True and "still busy 1 s after job job-1 was cancelled" in out["error"], out
    assert seconds < 10.0 + PROMPT  # at most the stop's grace (10 s), never FORGE_REQUEST_TIMEOUT (an hour)


def test_a_cancelled_job_on_a_healthy_forge_leaves_it_running(live: Worker) -> None:
    worker = dataclasses.replace(live, settle_timeout=30.0)  # ends as soon as Forge settles
    handler = make_handler(worker)

    async def cancel() -> None:
        await cancelled_after(handler, job("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 1000}), 0.5)
        await asyncio.gather(*worker.watchdogs)

    run(worker, cancel())
    assert live.forge is not None and live.forge.phase == "ready" and not live.forge.stop_reason
    assert len(run(live, make_handler(live)(job("POST", "/sdapi/v1/txt2img", {"steps": 2})))["images"]) == 1
