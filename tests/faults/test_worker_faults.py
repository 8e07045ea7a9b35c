"""Worker faults (issue 5, cases 1-8), through the real worker's production job loop.

Every job goes through ``python -m worker`` taking it from the loopback RunPod job API
(``platform.py``), so what is checked is what RunPod sees: the posted result, its ``stopPod``
(the handler's ``refresh_worker``), progress posts, cancellation, timings from take to result.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.helpers.bad_volumes import bad_volumes
from tests.helpers.timing import PROMPT
from tests.worker.conftest import worker_env
from worker.boot import build_worker
from worker.handler import INTERRUPT_GRACE, Worker, make_handler

from .conftest import Fleet, Streams
from .platform import JobRecord, cmdline

SAMPLERS = {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}}
VOLUME = {"api": {"method": "GET", "endpoint": "/v1/volume"}}


def call(method: str, endpoint: str, payload: Any = None) -> dict[str, Any]:
    job: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        job["payload"] = payload
    return job


def txt2img(steps: int, **extra: Any) -> dict[str, Any]:
    return call("POST", "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": steps, **extra})


def result(record: JobRecord, streams: Streams) -> dict[str, Any]:
    """The body the worker posted for the job (kept for the secrets check)."""
    assert record.result is not None
    streams.add(f"job {record.job_id}", json.dumps(record.result))
    return record.result


def one_line_error(body: dict[str, Any]) -> str:
    error = body.get("error")
    assert isinstance(error, str) and error and "\n" not in error, body
    assert 'File "' not in error, body  # no traceback frames of the worker's own code
    return error


def fan_out(fleet: Fleet, jobs: list[Any], names: tuple[str, ...], timeout: float = 60) -> list[JobRecord]:
    """Submit jobs round-robin to several workers and wait for them all.

    RunPod's SDK takes at most one job per second on a worker running one at a time, so jobs that
    do not depend on which worker runs them are spread to keep the suite fast.
    """
    records = [fleet[names[i % len(names)]].submit(job) for i, job in enumerate(jobs)]
    return [fleet.platform.wait(r, timeout) for r in records]


def still_serving(fleet: Fleet, name: str, streams: Streams) -> None:
    """The worker process is up and answers a helper job (it never waits for Forge)."""
    worker = fleet[name]
    assert worker.proc.poll() is None, f"worker {name} exited:\n{worker.log()[-2000:]}"
    body = result(worker.run(VOLUME, timeout=30), streams)
    assert "error" not in body and body["output"]["volume"], body


# --- case 1 --------------------------------------------------------------------------------------

def test_case01_forge_exits_mid_txt2img(fleet: Fleet, streams: Streams) -> None:
    """Fault: Forge's process exits (code 3) half way through a txt2img.
    Expected: the job fails promptly (not at the request timeout of an hour) with the exit code and
    Forge's last lines, and asks RunPod for a fresh worker (stopPod); the next Forge job fails at once
    the same way, without booting Forge again.
    Checked after: the worker process still runs and serves helper jobs; Forge's crash message is
    in the worker's log (RunPod's log stream); no traceback reached the caller."""
    worker = fleet["exit"]
    record = worker.run(txt2img(40), timeout=30)
    body = result(record, streams)
    error = one_line_error(body)
    assert "Forge exited with code 3 after it was ready" in error and "simulated crash" in error, body
    assert body.get("stopPod") is True, body
    assert any("simulated crash mid-generation" in line for line in body["output"]["forge_log"]), body
    assert record.seconds < PROMPT, record.seconds

    boots = fleet.forge_boots("exit")
    again = worker.run(SAMPLERS, timeout=30)
    body = result(again, streams)
    assert "exited with code 3" in one_line_error(body) and body.get("stopPod") is True, body
    assert again.seconds < PROMPT and fleet.forge_boots("exit") == boots == 1, (again.seconds, boots)
    still_serving(fleet, "exit", streams)
    assert "forge-standin: simulated crash mid-generation" in worker.log()


# --- case 2 --------------------------------------------------------------------------------------

def test_case02_forge_hangs_accepting_connections_never_answering(fleet: Fleet, streams: Streams) -> None:
    """Fault: Forge is frozen (SIGSTOP): the kernel still accepts its connections, nobody answers.
    Expected: with FORGE_REQUEST_TIMEOUT=2 a txt2img fails at that deadline (not later) with a
    one-line "Forge looks wedged" error and stopPod; the next job is not stuck behind it: it too
    ends at its own deadline; once Forge runs again (SIGCONT) the following job succeeds.
    Checked after: the worker process still runs; jobs' timings from take to result."""
    worker = fleet["hang"]
    forge = worker.forge_pid()
    os.kill(forge, signal.SIGSTOP)
    try:
        first = worker.submit(txt2img(3))
        second = worker.submit(SAMPLERS)
        fleet.platform.wait(first, 30)
        fleet.platform.wait(second, 30)
    finally:
        os.kill(forge, signal.SIGCONT)
    for record, route in ((first, "POST /sdapi/v1/txt2img"), (second, "GET /sdapi/v1/samplers")):
        body = result(record, streams)
        error = one_line_error(body)
        assert f"no answer from Forge to {route} within 2 s" in error and "wedged" in error, body
        assert body.get("stopPod") is True, body
        # Its own deadline (plus the short wait for the interrupt), not the first job's and not never.
        assert 1.9 < record.seconds < 2 + INTERRUPT_GRACE + PROMPT, (route, record.seconds)
    recovered = worker.run(SAMPLERS, timeout=30)
    body = result(recovered, streams)
    assert "error" not in body and body["output"], body
    assert recovered.seconds < PROMPT
    assert worker.proc.poll() is None


# --- case 3 --------------------------------------------------------------------------------------

FORGE_ERRORS: list[tuple[dict[str, Any], int, str]] = [
    (call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "no-such-model"}), 500,
     "Forge answered 500 to POST /sdapi/v1/options: RuntimeError: model 'no-such-model' not found"),
    (txt2img(2, width="wide"), 422,
     "Forge answered 422 to POST /sdapi/v1/txt2img: width: Input should be a valid integer"),
    (call("POST", "/sdapi/v1/png-info", {"image": "fault:404"}), 404,
     "Forge answered 404 to POST /sdapi/v1/png-info: Not Found"),
    (call("POST", "/sdapi/v1/png-info", {"image": "fault:html"}), 502,
     "Forge answered 502 to POST /sdapi/v1/png-info with something that is not JSON: <html><head><title>502 Bad"),
    (call("POST", "/sdapi/v1/png-info", {"image": "fault:empty"}), 500,
     "Forge answered 500 to POST /sdapi/v1/png-info with an empty body"),
    (call("POST", "/sdapi/v1/png-info", {"image": "fault:text"}), 200,
     "Forge answered 200 to POST /sdapi/v1/png-info with something that is not JSON: all good"),
]


def test_case03_forge_error_answers_become_one_line_errors(fleet: Fleet, streams: Streams) -> None:
    """Fault: Forge answers 500 with its own error shape (unknown checkpoint), 422 with FastAPI's
    validation details, 404, an HTML page with 502 (a proxy in front of it), 500 with an empty body,
    and 200 with plain text.
    Expected: each job fails with one line naming Forge's status and its detail, with forge_status;
    a live Forge answered, so no stopPod (caller mistakes never restart the worker).
    Checked after: both workers still serve Forge jobs and helper jobs; no traceback in their logs."""
    names = ("main", "bucket")
    records = fan_out(fleet, [job for job, _, _ in FORGE_ERRORS], names)
    for record, (job, status, expected) in zip(records, FORGE_ERRORS, strict=True):
        body = result(record, streams)
        assert one_line_error(body).startswith(expected), (job, body)
        assert body["output"]["forge_status"] == status and "stopPod" not in body, (job, body)
    for record in fan_out(fleet, [SAMPLERS, SAMPLERS], names):
        body = result(record, streams)
        assert "error" not in body and body["output"], body
    for name in names:
        still_serving(fleet, name, streams)
        assert "Traceback" not in fleet[name].log()


# --- case 4 --------------------------------------------------------------------------------------

def test_case04_forge_crashes_at_boot(fleet: Fleet, streams: Streams) -> None:
    """Fault: Forge's process dies while booting (a CUDA error, exit 1).
    Expected: every Forge job fails at once (no second boot) with the exit code and the tail of
    Forge's log (forge_log, and its last lines in the error), and asks for a fresh worker.
    Checked after: the worker keeps running (no crash loop) and answers helper jobs; Forge's
    traceback is in the worker's log."""
    worker = fleet["crash"]
    for job in (SAMPLERS, txt2img(2)):
        record = worker.run(job, timeout=30)
        body = result(record, streams)
        error = one_line_error(body)
        assert "Forge exited with code 1 while booting" in error and "CUDA error" in error, body
        assert "RuntimeError: CUDA error: no kernel image is available" in body["output"]["forge_log"], body
        assert body.get("stopPod") is True and record.seconds < PROMPT, (record.seconds, body)
    assert fleet.forge_boots("crash") == 1
    still_serving(fleet, "crash", streams)
    assert "RuntimeError: CUDA error" in worker.log()


def test_case04_forge_boots_slower_than_the_boot_timeout(fleet: Fleet, streams: Streams) -> None:
    """Fault: Forge needs 120 s to answer; FORGE_BOOT_TIMEOUT is 20 s.
    Expected: a job queued before the worker started is taken while Forge boots, waits for it and
    fails at the boot deadline (not when Forge would answer) with "did not become ready within
    FORGE_BOOT_TIMEOUT=20 s", the fix, the tail of Forge's log and stopPod; a later job fails at once.
    Checked after: the worker stopped the hung Forge (no Forge child left) without booting another,
    keeps running and answers helper jobs."""
    worker = fleet["slow"]
    early = fleet.platform.wait(fleet.early["slow"], 90)
    assert early.taken is not None and early.done is not None
    stopping = "Forge did not answer within 20 s; stopping it"
    worker.wait_log(stopping, 30)
    log = worker.log()
    assert log.index(f"{early.job_id} | Started") < log.index(stopping), \
        "the job was taken only after the boot deadline"
    # The deadline is a wall-clock floor; the ceiling only tells it from Forge's 120 s boot.
    assert 20.0 <= early.done - worker.proc_started < 20.0 + 3 * PROMPT, early.done - worker.proc_started
    for record in (early, worker.run(txt2img(2), timeout=30)):
        body = result(record, streams)
        error = one_line_error(body)
        assert "Forge did not become ready within FORGE_BOOT_TIMEOUT=20 s" in error, body
        assert "raise FORGE_BOOT_TIMEOUT" in error and body.get("stopPod") is True, body
        assert "forge-standin: booting (mode=normal)" in body["output"]["forge_log"], body
    assert record.seconds < PROMPT and fleet.forge_boots("slow") == 1, record.seconds
    deadline = time.monotonic() + 30
    while [p for p in worker.children() if "launch.py" in cmdline(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in worker.children() if "launch.py" in cmdline(p)], "the hung Forge is still running"
    still_serving(fleet, "slow", streams)


# --- case 5 --------------------------------------------------------------------------------------

MALFORMED: list[tuple[Any, str]] = [
    (None, "the job input must be a JSON object"),
    ("txt2img", "the job input must be a JSON object"),
    ({"payload": {"prompt": "a cat"}}, "the job input has no 'api' object"),
    ({"api": "POST /sdapi/v1/txt2img"}, "'api' must be an object with 'method' and 'endpoint', not a string"),
    ({"api": ["POST", "/sdapi/v1/txt2img"]}, "'api' must be an object with 'method' and 'endpoint', not a list"),
    (call("DELETE", "/sdapi/v1/options"), "'api.method' must be GET or POST, not 'DELETE'"),
    (call("PATCH", "/sdapi/v1/options"), "'api.method' must be GET or POST, not 'PATCH'"),
    (call("GET", "/sdapi/v1/../v1/options"), "must not contain '.', '..' or backslashes"),
    (call("GET", "/sdapi/v1/%2e%2e/v1/options"), "unknown endpoint /sdapi/v1/%2e%2e/v1/options"),
    (call("GET", "/sdapi/v1/samplers\\..\\options"), "must not contain '.', '..' or backslashes"),
    (call("GET", "/sdapi/v1/samplers?limit=1"), "must not carry a query string"),
    (call("GET", "/sdapi/v1/samplers#top"), "must not carry a query string"),
    (call("POST", "/sdapi/v1/txt2img", ["a cat"]), "'payload' must be a JSON object, not a list"),
    (call("POST", "/sdapi/v1/txt2img", "a cat"), "'payload' must be a JSON object, not a string"),
    (call("GET", "/sdapi/v1/txt2img"), "/sdapi/v1/txt2img takes POST, not GET"),
    (call("POST", "/sdapi/v1/create/embedding", {"name": "x"}), "unknown endpoint /sdapi/v1/create/embedding"),
    (call("POST", "/sdapi/v1/server-kill"), "unknown endpoint /sdapi/v1/server-kill"),
]


def test_case05_malformed_envelopes_get_precise_errors_and_reach_nothing(fleet: Fleet, streams: Streams) -> None:
    """Fault: malformed job inputs: no input, no or non-object 'api', unknown or lower-case methods,
    endpoints with '..' (plain, percent-encoded, backslashes), with a query string or fragment, as a
    full URL to another host (http://, protocol-relative //), payloads that are not objects, routes
    that stop the server or train.
    Expected: each fails with its precise one-line error and no stopPod; the documented
    normalisations (method case and spaces, a trailing slash, no leading slash, an empty GET payload,
    a GET payload's fields as query parameters) go through.
    Checked after: the canary server the URL endpoints name saw no request; every request the Forges
    of six workers saw was for a known route on their loopback port; the worker still serves."""
    worker = fleet["main"]
    canary = fleet.hosts.canary
    urls = [canary.url("/x.bin"), "//" + canary.url("/x.bin").split("://", 1)[1],
            "https://" + canary.url("/x.bin").split("://", 1)[1]]
    cases = MALFORMED + [(call("GET", url), "'api.endpoint' must be a path such as /sdapi/v1/txt2img, not a URL")
                         for url in urls]
    names = ("main", "bucket", "hang", "exit", "crash", "slow")  # a caller mistake never depends on Forge
    before = {name: len(fleet.forge_requests(name)) for name in names}
    for record, (job, message) in zip(fan_out(fleet, [job for job, _ in cases], names), cases, strict=True):
        body = result(record, streams)
        assert message in one_line_error(body), (job, body)
        assert "stopPod" not in body and "forge_status" not in body.get("output", {}), body
    for job in (call(" post ", "/sdapi/v1/txt2img", {"steps": 2}), call("get", "/sdapi/v1/samplers/", {}),
                call("Get", "/sdapi/v1/sd-vae"), call("GET", "sdapi/v1/samplers", {}),
                call("GET", "/sdapi/v1/samplers", {"limit": 1})):
        body = result(worker.run(job, timeout=30), streams)
        assert "error" not in body and "output" in body, (job, body)
    assert canary.requests == []
    allowed = {("POST", "/sdapi/v1/txt2img"), ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/sd-modules"),
               ("GET", "/sdapi/v1/progress?skip_current_image=true"), ("GET", "/sdapi/v1/samplers?limit=1")}
    for name in names:
        seen = fleet.forge_requests(name)[before[name]:]
        assert {(r["method"], r["path"]) for r in seen} <= allowed, (name, seen)
        assert {r["host"] for r in seen} <= {f"127.0.0.1:{fleet[name].env['FORGE_PORT']}"}, (name, seen)
    assert any(r["path"] == "/sdapi/v1/sd-modules" for r in fleet.forge_requests("main"))  # the sd-vae alias
    still_serving(fleet, "main", streams)


# --- case 6 --------------------------------------------------------------------------------------

def test_case06_result_over_runpods_limit_without_a_bucket(fleet: Fleet, streams: Streams) -> None:
    """Fault: a txt2img whose answer (1700 images, about 21.6 MB) is over RunPod's 20 MB output limit;
    no bucket is configured.
    Expected: the job fails with one line naming the size, the limit and the fix (the BUCKET_*
    variables), with result_bytes; nothing that large is posted to RunPod; no stopPod.
    Checked after: the posted body is small; the worker still serves."""
    worker = fleet["main"]
    record = worker.run(txt2img(2, batch_size=1700), timeout=60)
    body = result(record, streams)
    error = one_line_error(body)
    assert "the result is 21.7 MB, over RunPod's 20 MB limit for a job's output" in error, body
    assert "set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY" in error
    assert body["output"]["result_bytes"] > 20_000_000 and "stopPod" not in body
    assert len(json.dumps(body)) < 5_000
    still_serving(fleet, "main", streams)


def test_case06_result_over_the_limit_with_a_bucket_comes_back_as_urls(fleet: Fleet, streams: Streams) -> None:
    """Fault: a txt2img answer over the limit (8 images of 3 MB each) on a worker with BUCKET_* set
    (a loopback S3 server).
    Expected: the job completes; every image is a URL into the bucket, the rest of Forge's answer is
    unchanged, and what is posted to RunPod is small.
    Checked after: an uploaded object downloads as the PNG Forge made; the bucket keys appear in no
    output or log (leak guard)."""
    import urllib.request

    worker = fleet["bucket"]
    record = worker.run(txt2img(2, batch_size=8), timeout=60)
    body = result(record, streams)
    assert "error" not in body, body
    images = body["output"]["images"]
    assert len(images) == 8 and all(u.startswith(f"{fleet.s3_endpoint}/outputs/{record.job_id}/") for u in images)
    assert body["output"]["parameters"]["batch_size"] == 8
    assert len(json.dumps(body)) < 20_000
    with urllib.request.urlopen(images[0], timeout=10) as resp:
        assert resp.read()[:4] == b"\x89PNG"


# --- case 7 --------------------------------------------------------------------------------------

def test_case07_cancelled_job_interrupts_forge(fleet: Fleet, streams: Streams) -> None:
    """Fault: RunPod cancels a job (its stop channel) while Forge generates (100000 steps, ~1000 s).
    Expected: the handler interrupts Forge (POST /sdapi/v1/interrupt) at once; no result is posted for
    the cancelled job; the next job runs at once instead of queueing behind the generation.
    Checked after: Forge received the interrupt before the next job's txt2img; the next job is taken
    and completes promptly (not after the generation); Forge reports no generation running."""
    worker = fleet["main"]
    before = len(fleet.forge_requests("main"))
    record = worker.submit(txt2img(100_000))
    fleet.platform.wait_for(record, "progress", 30)
    cancelled_at = time.monotonic()
    fleet.platform.cancel(record.job_id)
    worker.wait_log(f"{record.job_id} | Job stopped.", 30)
    following = worker.run(txt2img(2), timeout=30)
    body = result(following, streams)
    assert "error" not in body and len(body["output"]["images"]) == 1, body
    assert following.seconds < PROMPT, following.seconds
    assert following.taken is not None and following.taken - cancelled_at < PROMPT
    seen = [(r["method"], r["path"]) for r in fleet.forge_requests("main")[before:]]
    assert ("POST", "/sdapi/v1/interrupt") in seen
    assert seen.index(("POST", "/sdapi/v1/interrupt")) < len(seen) - 1  # before the next job's txt2img
    assert record.result is None  # RunPod marks it cancelled itself; the worker posts nothing for it
    progress = result(worker.run(call("GET", "/sdapi/v1/progress"), timeout=30), streams)
    assert progress["output"]["state"]["job"] == "" and progress["output"]["progress"] == 0, progress


# --- case 8 --------------------------------------------------------------------------------------

async def one_job(worker: Worker, job: dict[str, Any]) -> Any:
    return await make_handler(worker)(job)


def test_case08_bad_volumes_fail_every_job_clearly_at_once(tmp_path: Path, streams: Streams,
                                                                   fleet: Fleet) -> None:
    """Fault: the volume is missing; present but never provisioned; state.json corrupt, a folder,
    from a future layout version, or from an install that never got to Forge.
    Expected: booting the worker (the code ``python -m worker`` runs) and a Forge job end at once and
    fail with a one-line cause and fix; no Forge is started; no stopPod (a fresh worker would find the
    same volume). End to end, the fleet's ``corrupt`` worker answers the same.
    Checked after: the corrupt-volume worker keeps running and answers the next job at once."""
    import re

    for name, (path, pattern) in bad_volumes(tmp_path).items():
        started = time.monotonic()
        worker = build_worker(worker_env(path, tmp_path / "scratch"))
        out = asyncio.run(one_job(worker, {"id": name, "input": txt2img(2)}))
        seconds = time.monotonic() - started
        streams.add(name, json.dumps(out))
        assert re.search(pattern, one_line_error(out)), (name, out)
        assert worker.forge is None and "refresh_worker" not in out, (name, out)
        assert seconds < PROMPT, (name, seconds)
    corrupt = fleet["corrupt"]
    for job in (txt2img(2), SAMPLERS):
        record = corrupt.run(job, timeout=30)
        body = result(record, streams)
        assert "state.json is corrupt" in one_line_error(body) and "stopPod" not in body, body
        assert record.seconds < PROMPT
    assert corrupt.proc.poll() is None and fleet.forge_boots("corrupt") == 0
