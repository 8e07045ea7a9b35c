#!/usr/bin/env python3
"""Send one job to a forge-volume worker and save what comes back.

Against a RunPod serverless endpoint (key from RUNPOD_API_KEY, never printed):

    python examples/client.py --endpoint-id abc123xyz --input test_input.json --out outputs/
    python examples/client.py --endpoint-id abc123xyz --endpoint /sdapi/v1/txt2img \\
        --payload '{"prompt": "a red fox in snow", "steps": 20}' --out outputs/
    python examples/client.py --endpoint-id abc123xyz --method GET --endpoint /sdapi/v1/sd-models

Against the worker's local test API (`python -m worker --rp_serve_api --rp_api_port 8000`):

    python examples/client.py --base-url http://127.0.0.1:8000 --input test_input.json --out outputs/

It submits with /run and polls /status (or uses /runsync with --sync), prints the status and
Forge's progress while it waits, gives up at --timeout (cancelling the job on RunPod), saves
base64 images under --out, prints image URLs when the worker uploaded them to a bucket, and prints
the rest of the output as JSON. Exit 0 when the job COMPLETED, 1 when it failed, was cancelled or
timed out, or the endpoint could not be reached; 2 on a usage error. Needs only `requests`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

RUNPOD_API = "https://api.runpod.ai/v2"
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# Seconds for one HTTP exchange that is not a blocking /runsync or local /status.
REQUEST_TIMEOUT = 30.0
# Statuses worth retrying a poll for: the platform's transient hiccups, not our mistakes.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class ClientError(Exception):
    """A failure to report as one line and exit 1."""


@dataclass(frozen=True)
class Target:
    """Where jobs go: RunPod's API for one endpoint, or a worker's local test API."""

    base: str
    headers: Mapping[str, str]
    local: bool

    @classmethod
    def runpod(cls, endpoint_id: str, api_key: str, api_base: str = RUNPOD_API) -> Target:
        return cls(f"{api_base.rstrip('/')}/{endpoint_id}", {"Authorization": f"Bearer {api_key}"}, local=False)

    @classmethod
    def local_api(cls, base_url: str) -> Target:
        return cls(base_url.rstrip("/"), {}, local=True)


def build_body(job_file: Path | None, method: str, endpoint: str | None, payload: str | None,
               webhook: str | None) -> dict[str, Any]:
    """The JSON body for /run or /runsync: a job file as written, or an envelope from the options."""
    if job_file is not None:
        try:
            body = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the job file {job_file}: {exc}") from exc
        if not isinstance(body, dict):
            raise ClientError(f"{job_file} must hold a JSON object like {{\"input\": {{\"api\": ...}}}}")
        if "input" not in body:  # a bare {"api": ..., "payload": ...} is accepted too
            body = {"input": body}
    else:
        if not endpoint:
            raise ClientError("give --input FILE, or --endpoint ROUTE (and --payload JSON for a POST)")
        try:
            data = json.loads(payload) if payload else {}
        except ValueError as exc:
            raise ClientError(f"--payload is not valid JSON: {exc}") from exc
        body = {"input": {"api": {"method": method, "endpoint": endpoint}, "payload": data}}
    if webhook:
        body["webhook"] = webhook
    return body


def _post(session: requests.Session, url: str, timeout: float, body: Any = None) -> dict[str, Any]:
    return _exchange(session, "POST", url, timeout, body)


def _exchange(session: requests.Session, method: str, url: str, timeout: float, body: Any = None) -> dict[str, Any]:
    try:
        response = session.request(method, url, json=body, timeout=timeout)
    except requests.Timeout as exc:
        raise ClientError(f"{method} {url}: no answer within {timeout:.0f}s") from exc
    except requests.ConnectionError as exc:
        raise ClientError(f"{method} {url}: cannot connect ({type(exc).__name__}); is the URL right "
                          "and the endpoint or local API running?") from exc
    if response.status_code == 401:
        raise ClientError(f"{method} {url}: 401 unauthorized; check RUNPOD_API_KEY (a key with access to this "
                          "endpoint)")
    if response.status_code == 404:
        raise ClientError(f"{method} {url}: 404; check the endpoint id (or the job expired)")
    if response.status_code >= 400:
        raise _HTTPStatus(response.status_code, f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        data = response.json()
    except ValueError as exc:
        raise ClientError(f"{method} {url}: the answer is not JSON: {response.text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise ClientError(f"{method} {url}: expected a JSON object, got {type(data).__name__}")
    return data


class _HTTPStatus(ClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _describe(job: Mapping[str, Any]) -> str:
    """One status line: the state and, while running, what the worker reported about progress."""
    status = str(job.get("status", "?"))
    output = job.get("output")
    if status == "IN_PROGRESS" and isinstance(output, Mapping):
        progress = output.get("progress")
        if isinstance(progress, int | float) and not isinstance(progress, bool):
            line = f"{status} {progress * 100:.0f}%"
            # Forge's /sdapi/v1/progress nests the step counters under `state`; accept either place.
            nested = output.get("state")
            state: Mapping[str, Any] = nested if isinstance(nested, Mapping) else output
            step, steps = state.get("sampling_step"), state.get("sampling_steps")
            if isinstance(step, int) and isinstance(steps, int) and steps:
                line += f" (step {step}/{steps})"
            eta = output.get("eta_relative")
            if isinstance(eta, int | float) and eta > 0:
                line += f", about {eta:.0f}s left"
            return line
        return f"{status} {json.dumps(output)[:120]}"
    return status


def run_job(target: Target, body: Mapping[str, Any], *, sync: bool, timeout: float, poll: float,
            log: Any = print) -> dict[str, Any]:
    """Submit the job and wait, at most `timeout` seconds, for a final status; returns the final job JSON."""
    deadline = time.monotonic() + timeout
    session = requests.Session()
    session.headers.update(target.headers)
    with session:
        if sync:
            # /runsync blocks up to about 90 s on RunPod (then answers with a non-final status) and
            # until the job ends on the local API: wait for it, within our deadline.
            job = _post(session, f"{target.base}/runsync", max(1.0, deadline - time.monotonic()), body)
        else:
            job = _post(session, f"{target.base}/run", REQUEST_TIMEOUT, body)
        job_id = str(job.get("id", ""))
        if not job_id:
            raise ClientError(f"the endpoint answered without a job id: {json.dumps(job)[:300]}")
        log(f"job {job_id}: {_describe(job)}")
        last = _describe(job)
        backoff = poll
        while str(job.get("status")) not in FINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _cancel(session, target, job_id, log)
                raise ClientError(f"job {job_id} did not finish within {timeout:.0f}s (last status {last}); "
                                  "raise --timeout, or check the worker's logs")
            if target.local:
                # The local API's /run only stores the job; POST /status/{id} runs it and answers
                # when it is done, so this one call is the whole wait.
                log(f"job {job_id}: running on the local API (it answers when the job is done)")
                job = _post(session, f"{target.base}/status/{job_id}", max(1.0, remaining))
            else:
                time.sleep(min(backoff, max(0.0, remaining)))
                try:
                    job = _exchange(session, "GET", f"{target.base}/status/{job_id}",
                                    min(REQUEST_TIMEOUT, max(1.0, remaining)))
                    backoff = poll
                except _HTTPStatus as exc:
                    if exc.status not in RETRY_STATUS:
                        raise
                    backoff = min(backoff * 2, 10.0)
                    log(f"job {job_id}: status poll answered {exc.status}; retrying in {backoff:.0f}s")
                    continue
            line = _describe(job)
            if line != last:
                log(f"job {job_id}: {line}")
                last = line
        return job


def _cancel(session: requests.Session, target: Target, job_id: str, log: Any) -> None:
    if target.local:
        return  # the local API has no /cancel
    try:
        _post(session, f"{target.base}/cancel/{job_id}", REQUEST_TIMEOUT)
        log(f"job {job_id}: cancelled")
    except ClientError as exc:
        log(f"job {job_id}: could not cancel it: {exc}")


_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"RIFF", ".webp"), (b"GIF8", ".gif"))


def _extension(data: bytes) -> str:
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".bin")


def save_images(output: Any, out_dir: Path, job_id: str, log: Any = print) -> Any:
    """Write base64 images (`images` list or single `image`) to files; print URLs; return the output with
    each image replaced by where it went, so the rest can be printed without megabytes of base64."""
    if not isinstance(output, dict):
        return output
    result = dict(output)
    for key in ("images", "image"):
        value = output.get(key)
        items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
        if not items:
            continue
        placed: list[Any] = []
        for index, item in enumerate(items):
            placed.append(_place(item, out_dir, f"{job_id}-{key}-{index}", log))
        result[key] = placed if isinstance(value, list) else placed[0]
    return result


def _place(item: Any, out_dir: Path, stem: str, log: Any) -> Any:
    if not isinstance(item, str):
        return item
    if item.startswith(("http://", "https://")):
        log(f"image URL: {item}")
        return item
    try:
        data = base64.b64decode(item.split(",", 1)[1] if item.startswith("data:") else item, validate=True)
    except (binascii.Error, ValueError):
        # Not base64: RunPod's upload fallback returns a path on the worker; show it as it is.
        log(f"image reference: {item}")
        return item
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}{_extension(data)}"
    path.write_bytes(data)
    log(f"saved {path} ({len(data)} bytes)")
    return str(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Send one job to a forge-volume worker (RunPod endpoint or local test API) and save the images.",
        epilog="The API key is read from RUNPOD_API_KEY and never printed.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint-id", help="RunPod serverless endpoint id (uses RUNPOD_API_KEY)")
    where.add_argument("--base-url", help="a local test API, e.g. http://127.0.0.1:8000 (no key needed)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--input", type=Path, help='a job file: {"input": {"api": {...}, "payload": {...}}}')
    what.add_argument("--endpoint", help="the Forge or helper route, e.g. /sdapi/v1/txt2img")
    parser.add_argument("--method", default="POST", choices=["GET", "POST"], help="with --endpoint (default POST)")
    parser.add_argument("--payload", help="with --endpoint: the payload as JSON (default {})")
    parser.add_argument("--webhook", help="a URL RunPod POSTs the finished job to")
    parser.add_argument("--sync", action="store_true", help="use /runsync instead of /run + /status")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status polls (default 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for images (default ./outputs)")
    parser.add_argument("--api-base", default=os.environ.get("RUNPOD_API_BASE", RUNPOD_API), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.endpoint_id:
            api_key = os.environ.get("RUNPOD_API_KEY", "")
            if not api_key:
                raise ClientError("RUNPOD_API_KEY is not set; export your RunPod API key (Settings > API Keys)")
            target = Target.runpod(args.endpoint_id, api_key, args.api_base)
        else:
            target = Target.local_api(args.base_url)
        body = build_body(args.input, args.method, args.endpoint, args.payload, args.webhook)
        job = run_job(target, body, sync=args.sync, timeout=args.timeout, poll=args.poll, log=log)
    except ClientError as exc:
        log(f"error: {exc}")
        return 1
    status = job.get("status")
    job_id = str(job.get("id", "job"))
    output = save_images(job.get("output"), args.out, job_id, log)
    if status != "COMPLETED":
        log(f"error: job {job_id} {status}: {job.get('error') or 'no error message'}")
        if output is not None:
            log(json.dumps(output, indent=2))
        return 1
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
