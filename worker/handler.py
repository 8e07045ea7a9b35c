"""The RunPod handler: normalise the job, then relay it to Forge (or a helper) and map the outcome.

Failures come back as ``{"error": "<one line>", ...detail}``; when Forge refused the call, ``output``
holds Forge's error body, where the original runpod-worker-forge put it. Caller mistakes (bad envelope,
unknown route, anything Forge answered) keep the worker; a dead, refused or wedged Forge adds
``refresh_worker`` so RunPod replaces it. A cancelled or timed-out job interrupts Forge.
No traceback ever reaches the caller: unexpected errors are logged here and summarised.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ForgeVolumeError
from provision.forge.offline import Refusals
from provision.forge.process import READY, ForgeProcess, ForgeUnavailable
from worker import outputs
from worker.config import Settings
from worker.normalise import ForgeCall, HelperCall, InputError, normalise
from worker.progress import Reporter, log_reporter, report_progress
from worker.proxy import ForgeDown, ForgeResponse, ForgeTimeout, Proxy
from worker.scrub import scrub

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
INTERRUPT_TIMEOUT = 5.0
# After a request timeout the job fails at its deadline: the interrupt (useless if Forge is frozen)
# goes on in the background past this short wait instead of holding the answer for SIDE_TIMEOUT.
INTERRUPT_GRACE = 0.5
# After a cancelled job's interrupt, Forge must go idle within this; else it is wedged and is stopped.
SETTLE_TIMEOUT = 30.0
ERROR_TEXT_LIMIT = 2000  # characters of one string in Forge's error body returned as `output`
REFUSAL_POLL = 0.2  # seconds between looks at what Forge's no-network hook refused, during a generation
CHANGES_MODELS = frozenset({"/v1/download", "/v1/sync", "/v1/refresh-models"})
REFRESH_ROUTES = ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-loras",
                  "/sdapi/v1/refresh-embeddings")


@dataclass
class Worker:
    """Everything a job needs; built once at boot (see ``worker.boot``)."""

    settings: Settings
    volume_root: Path
    scratch: Path
    boot_error: ForgeVolumeError | None = None  # the volume or the settings are unusable: every Forge job fails
    forge: ForgeProcess | None = None
    proxy: Proxy | None = None
    report: Reporter = log_reporter
    refusals: Refusals | None = None  # what Forge's no-network hook refused (provision.forge.offline)
    settle_timeout: float = SETTLE_TIMEOUT
    watchdogs: set[asyncio.Task[None]] = field(default_factory=set)
    cleanup: Callable[[], None] | None = None  # stops Forge, removes the scratch and the copy (``worker.boot``)
    # RunPod's local test API (--rp_serve_api) answers a failed job with its `error` alone: there the error
    # also carries the end of `forge_log`, which the caller would not see otherwise.
    local_api: bool = False


def _error(message: str, *, refresh: bool = False, **detail: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"error": " ".join(message.split()), **detail}
    if refresh:
        out["refresh_worker"] = True
    return out


def _forge_message(body: Any) -> str:
    """The cause Forge gave, from its error shapes: FastAPI's 422 list, its own 500 object, or a string."""
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):
            parts = []
            for item in detail[:5]:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                    parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            return "; ".join(parts) or str(detail)[:300]
        message = body.get("message") or detail or body.get("error")
        if message:
            return f"{body['error']}: {message}" if body.get("error") and body.get("message") else str(message)
    return str(body)[:300]


def _error_body(body: Any, settings: Settings) -> Any:
    """Forge's error body as the original worker returned it (``output``), fit to travel back.

    Forge's 422 echoes the offending value, which may be a whole base64 image: strings longer than
    ERROR_TEXT_LIMIT are cut, so a refused request cannot make a result over RunPod's limit. The
    worker's tokens are blanked should Forge ever echo one.
    """
    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > ERROR_TEXT_LIMIT:
            return f"{value[:ERROR_TEXT_LIMIT]}... ({len(value):,} characters, cut by the worker)"
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v) for v in value]
        return value

    return scrub(cut(body), _secrets(settings))


def _secrets(settings: Settings) -> list[str]:
    return [t for t in (settings.hf_token, settings.civitai_token) if t and len(t) >= 4]


class Output(dict[str, Any]):
    """Forge's object answer as returned to RunPod, with a short repr.

    RunPod's SDK formats every handler output into two debug f-strings whatever the log level
    ("Handler output: ...", "run_job return: ..."): for 16 MB of base64 that is a 16 MB copy and 160 ms.
    JSON encoders treat this as the dict it is.
    """

    def __repr__(self) -> str:
        return f"<Forge output: {', '.join(map(str, self))}>"


class OutputList(list[Any]):
    """Forge's list answer (samplers, models, LoRAs...) as returned to RunPod, with a short repr.

    The same two f-strings cost about 60 us for the 2 KB sampler list and grow with the list (a LoRA
    list with metadata runs to megabytes). JSON encoders treat this as the list it is.
    """

    def __repr__(self) -> str:
        return f"<Forge output: {len(self)} items>"


async def _finish(worker: Worker, call: ForgeCall, resp: ForgeResponse, job: dict[str, Any]) -> Any:
    settings = worker.settings
    size = len(resp.body)  # Forge's bytes are what RunPod would send: no need to serialise again
    head = resp.body[:300]
    try:
        body = resp.take_json() if resp.body else None
    except ValueError:
        text = head.decode("utf-8", "replace")
        return _error(f"Forge answered {resp.status} to {call.method} {call.endpoint} with something that is not "
                      f"JSON: {text}", forge_status=resp.status)
    if not 200 <= resp.status < 300:
        if body is None:  # e.g. a proxy or a crashed request handler: say so rather than "None"
            return _error(f"Forge answered {resp.status} to {call.method} {call.endpoint} with an empty body",
                          forge_status=resp.status)
        cause = scrub(_forge_message(body), _secrets(settings))
        # Forge answers caller mistakes with 500 too; only a broken CUDA context means this worker is unusable.
        # Torch's message starts with "CUDA error"; anywhere else it may be the caller's own text echoed back
        # (an unknown checkpoint's name), which must not let a caller recycle workers.
        message = body.get("message") if isinstance(body, dict) else None
        broken = (resp.status >= 500 and isinstance(message, str) and message.startswith("CUDA error")
                  and "out of memory" not in message)
        return _error(f"Forge answered {resp.status} to {call.method} {call.endpoint}: {cause}", refresh=broken,
                      forge_status=resp.status, output=_error_body(body, settings))
    if settings.upload and isinstance(body, dict):
        body = await outputs.upload_images(body, str(job.get("id")), worker.scratch, settings.bucket_name)
        size = len(outputs.jsonio_size(body))
    problem = outputs.too_big(size, settings.result_limit, upload=settings.upload)
    if problem:
        return _error(problem, result_bytes=size)
    # RunPod drops an empty dict output (and its local API answers HTTP 500 for it): say "nothing" instead.
    if body == {}:
        return None
    if isinstance(body, dict):
        return Output(body)
    return OutputList(body) if isinstance(body, list) else body


async def _relay(worker: Worker, call: ForgeCall, job: dict[str, Any]) -> Any:
    if worker.boot_error is not None:
        return _error(worker.boot_error.one_line())
    forge, proxy = worker.forge, worker.proxy
    assert forge is not None and proxy is not None  # boot makes both unless boot_error is set
    try:
        await forge.wait_ready()
    except ForgeUnavailable as exc:
        return _error(exc.one_line(), refresh=True, forge_log=exc.log)
    progress = (asyncio.create_task(report_progress(proxy, job, worker.report, worker.settings.progress_interval))
                if call.generates else None)
    mark = worker.refusals.mark() if worker.refusals is not None else 0
    stopper = (asyncio.create_task(_stop_on_refusal(worker, proxy, mark))
               if call.generates and worker.refusals is not None else None)
    try:
        resp = await proxy.request(call.method, call.route, call.payload, query=call.query)
    except ForgeTimeout as exc:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proxy.interrupt()), INTERRUPT_GRACE)
        return _error(f"{exc}; Forge looks wedged (raise FORGE_REQUEST_TIMEOUT for longer jobs)", refresh=True,
                      forge_log=forge.tail())
    except ForgeDown as exc:
        await asyncio.sleep(0.05)  # let the watcher see an exit, for a precise cause
        cause = forge.failure() if forge.phase != READY else f"Forge did not answer: {exc}"
        return _error(cause, refresh=True, forge_log=forge.tail())
    except asyncio.CancelledError:
        # RunPod cancelled the job or it timed out: stop Forge's generation so the next job does not queue
        # behind it, and make sure it does stop: a cancelled job cannot ask RunPod for a fresh worker itself.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proxy.interrupt()), INTERRUPT_TIMEOUT)
        if call.generates:
            watchdog = asyncio.get_running_loop().create_task(_expect_idle(worker, str(job.get("id"))))
            worker.watchdogs.add(watchdog)
            watchdog.add_done_callback(worker.watchdogs.discard)
        raise
    finally:
        for task in (progress, stopper):
            if task is not None:
                task.cancel()
    refused = worker.refusals.since(mark) if worker.refusals is not None else []
    if refused:
        # Forge needed a file the volume lacks (and may have carried on without it: no preview, the
        # image not upscaled): the job fails with the hook's line, which names the file and the fix.
        detail: dict[str, Any] = {"forge_status": resp.status}
        if len(refused) > 1:
            detail["refused"] = refused
        return _error(refused[0], **detail)
    return await _finish(worker, call, resp, job)


async def _stop_on_refusal(worker: Worker, proxy: Proxy, mark: int) -> None:
    """While a generation runs: once Forge was refused a file it needed (a preview's decoder, say, which
    Forge does without), interrupt it, so the job fails at once with that line instead of at the end."""
    assert worker.refusals is not None
    while not worker.refusals.since(mark):
        await asyncio.sleep(REFUSAL_POLL)
    await proxy.interrupt()


async def _expect_idle(worker: Worker, job_id: str) -> None:
    """After a cancelled generation: wait for Forge to report no running job; stop it if it never does."""
    forge, proxy = worker.forge, worker.proxy
    assert forge is not None and proxy is not None
    deadline = time.monotonic() + worker.settle_timeout
    while time.monotonic() < deadline:
        report = await proxy.progress()
        state = report.get("state") if report else None
        if isinstance(state, dict) and not state.get("job"):
            return
        await asyncio.sleep(0.25)
    if forge.phase == READY:
        forge.abandon(f"Forge was still busy {worker.settle_timeout:g} s after job {job_id} was cancelled and "
                      "interrupted (wedged); the worker stopped it, so RunPod replaces this worker")


async def _refresh_forge(worker: Worker) -> bool:
    """After a helper changed the models: make a running Forge list them (never waits for a booting one)."""
    if worker.forge is None or worker.proxy is None or worker.forge.phase != READY:
        return False
    try:
        answers = [await worker.proxy.request("POST", route, timeout=60) for route in REFRESH_ROUTES]
    except (ForgeDown, ForgeTimeout):
        return False
    return all(a.status == 200 for a in answers)


LOCAL_LOG_LINES = 15


def _with_log_tail(out: Any) -> Any:
    """A failed Forge job's error with the last lines of ``forge_log`` appended (for the local test API)."""
    if not (isinstance(out, dict) and out.get("error") and out.get("forge_log")):
        return out
    lines = [line.strip() for line in out["forge_log"] if str(line).strip()][-LOCAL_LOG_LINES:]
    return {**out, "error": f"{out['error']} -- forge_log (last {len(lines)} lines): {' | '.join(lines)}"}


def make_handler(worker: Worker) -> Handler:
    async def handler(job: dict[str, Any]) -> Any:
        try:
            call = normalise(job.get("input"), original_defaults=worker.settings.original_defaults)
        except InputError as exc:
            return _error(str(exc))
        try:
            if isinstance(call, HelperCall):
                # Loaded on the first helper job: a worker that only relays Forge jobs never loads the downloader.
                from worker.helpers import run_helper

                out = await run_helper(call, worker.volume_root, worker.settings)
                if "error" not in out and call.endpoint in CHANGES_MODELS:
                    out["forge_refreshed"] = await _refresh_forge(worker)
                return out
            out = await _relay(worker, call, job)
            return _with_log_tail(out) if worker.local_api else out
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the boundary: log the traceback here, never send it to the caller
            traceback.print_exc(file=sys.stdout)
            return _error(f"the worker failed unexpectedly ({type(exc).__name__}: {exc}); see the worker's log")

    return handler
