"""A small client for the part of RunPod's REST API v2 that `forge-volume regions` uses.

Network volumes, pods (with their log stream) and serverless endpoints. Every call has a timeout;
429 and 5xx answers are retried with backoff by urllib3's ``Retry`` (bounded, honouring
``Retry-After``), except a POST that reached the server (a 5xx there may have created the thing:
the callers look for it before creating again). Every failure is one ``RunPodError`` line naming the
request; the key lives only in the session's Authorization header and is never part of a message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from provision.errors import RunPodError, RunPodKeyError

DEFAULT_URL = "https://api.runpod.io"
KEY_VARIABLE = "RUNPOD_API_KEY"


class _Retry(Retry):
    """Retries idempotent calls on 429/5xx and read errors; a POST only on 429 (refused before it ran)."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if method.upper() == "POST":
            return status_code == 429 and super().is_retry("GET", status_code, has_retry_after)
        return super().is_retry(method, status_code, has_retry_after)


@dataclass(frozen=True)
class ApiSettings:
    url: str = DEFAULT_URL
    timeout: float = 30.0  # seconds for a connection and for each read
    retries: int = 5
    backoff: float = 1.0  # urllib3's backoff factor: 0, 2, 4, 8... seconds (capped by backoff_max)

    @classmethod
    def from_env(cls, url: str | None = None) -> ApiSettings:
        """``--api-url`` or RUNPOD_API_URL (tests point it at a stand-in); timeouts and retries from
        RUNPOD_API_TIMEOUT, RUNPOD_API_RETRIES, RUNPOD_API_BACKOFF."""
        def number(name: str, default: float) -> float:
            text = os.environ.get(name, "").strip()
            try:
                value = float(text) if text else default
            except ValueError:
                raise RunPodError(f"{name}={text!r} is not a number", f"unset {name} or give it a number") from None
            if value < 0:
                raise RunPodError(f"{name}={text!r} is negative", f"unset {name} or give it a positive number")
            return value

        return cls(url=(url or os.environ.get("RUNPOD_API_URL") or DEFAULT_URL).rstrip("/"),
                   timeout=number("RUNPOD_API_TIMEOUT", 30.0), retries=int(number("RUNPOD_API_RETRIES", 5)),
                   backoff=number("RUNPOD_API_BACKOFF", 1.0))


def api_key() -> str:
    """The key from the environment, stripped; refused (without being shown) when it cannot be a header."""
    key = os.environ.get(KEY_VARIABLE, "").strip()
    if not key:
        raise RunPodKeyError(f"{KEY_VARIABLE} is not set")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise RunPodKeyError(f"{KEY_VARIABLE} holds a space or control character; it cannot be a bearer token")
    return key


class RunPodApi:
    def __init__(self, key: str, settings: ApiSettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        retry = _Retry(total=settings.retries, connect=settings.retries, read=2, status=settings.retries,
                       backoff_factor=settings.backoff, backoff_max=30, allowed_methods=None,
                       status_forcelist=(429, 500, 502, 503, 504), respect_retry_after_header=True,
                       raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Authorization"] = f"Bearer {key}"
        self.session.headers["User-Agent"] = "forge-volume-regions"
        self.calls: list[str] = []  # "METHOD /path" of every call, for the summary of what a run did

    def close(self) -> None:
        self.session.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None, ok: tuple[int, ...] = (200, 201, 204)) -> Any:
        """One call: the decoded JSON answer (None for 204), or one RunPodError line naming the request."""
        what = f"{method} {path}"
        self.calls.append(what)
        try:
            answer = self.session.request(method, self.settings.url + path, json=body, params=params,
                                          timeout=self.settings.timeout)
        except requests.RequestException as exc:
            raise RunPodError(f"RunPod API {what} failed: {_cause(exc)}") from None
        if answer.status_code not in ok:
            raise ApiStatusError(what, answer)
        if answer.status_code == 204 or not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            raise RunPodError(f"RunPod API {what} answered {answer.status_code} with a body that is not JSON") from None

    # --- network volumes -------------------------------------------------------------------------
    def volumes(self) -> list[dict[str, Any]]:
        return _items(self.request("GET", "/v2/network-volumes"), "networkVolumes", "GET /v2/network-volumes")

    def create_volume(self, name: str, size: int, datacenter: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v2/network-volumes",
                                 {"name": name, "size": size, "dataCenter": datacenter}))

    def grow_volume(self, volume_id: str, size: int) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v2/network-volumes/{volume_id}", {"size": size}))

    # --- pods --------------------------------------------------------------------------------------
    def pods(self) -> list[dict[str, Any]]:
        return _items(self.request("GET", "/v2/pods"), "pods", "GET /v2/pods")

    def pod(self, pod_id: str) -> dict[str, Any] | None:
        """The pod, or None once it is gone (terminated pods are deleted)."""
        try:
            return dict(self.request("GET", f"/v2/pods/{pod_id}"))
        except ApiStatusError as exc:
            if exc.status == 404:
                return None
            raise

    def create_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/v2/pods", body))

    def terminate_pod(self, pod_id: str) -> None:
        """Terminate (delete) a pod; one that is already gone counts as terminated."""
        try:
            self.request("POST", f"/v2/pods/{pod_id}/action", {"action": "terminate"})
        except ApiStatusError as exc:
            if exc.status != 404:
                raise

    def pod_log_events(self, pod_id: str, cursor: str | None, idle: float) -> Iterator[tuple[str, str]]:
        """(event id, line) of the pod's container log after ``cursor``, until the stream is quiet for
        ``idle`` seconds (it stays open while the pod lives: we read what is there and come back)."""
        what = f"GET /v2/pods/{pod_id}/logs"
        self.calls.append(what)
        headers = {"Last-Event-ID": cursor} if cursor else {}
        params: dict[str, str | int] = {"source": "container"} if cursor else {"source": "container", "tail": 5000}
        try:
            answer = self.session.get(f"{self.settings.url}/v2/pods/{pod_id}/logs", params=params, headers=headers,
                                      stream=True, timeout=(self.settings.timeout, idle))
        except requests.RequestException as exc:
            raise RunPodError(f"RunPod API {what} failed: {_cause(exc)}") from None
        with answer:
            if answer.status_code == 404:
                return
            if answer.status_code != 200:
                raise ApiStatusError(what, answer)
            event_id = ""
            for raw in _lines(answer):
                line = raw.decode("utf-8", "replace")
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    text = _log_line(line[5:].strip())
                    if text is not None:
                        yield event_id, text

    # --- serverless endpoints ------------------------------------------------------------------------
    def endpoints(self) -> list[dict[str, Any]]:
        return _items(self.request("GET", "/v2/serverless"), "endpoints", "GET /v2/serverless")

    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/v2/serverless", body))

    def update_endpoint(self, endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v2/serverless/{endpoint_id}", body))


class ApiStatusError(RunPodError):
    """An answer with an unexpected status; the message carries RunPod's problem ``title``/``detail``."""

    def __init__(self, what: str, answer: requests.Response) -> None:
        self.status = answer.status_code
        self.detail = _problem(answer)
        super().__init__(f"RunPod API {what} answered {answer.status_code}: {self.detail}",
                         _hint(answer.status_code))


def _problem(answer: requests.Response) -> str:
    """RunPod's problem+json (``title``, ``detail``, ``errors``) as one line; the reason phrase otherwise."""
    try:
        data = answer.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return answer.reason or "no detail"
    parts = [str(data.get("detail") or data.get("title") or answer.reason or "no detail")]
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        parts.append("; ".join(str(e) for e in errors[:5]))
    return " ".join(": ".join(parts).split())[:500]


def _hint(status: int) -> str:
    if status == 401:
        return "RUNPOD_API_KEY is not accepted: create a key in RunPod's console (Settings -> API Keys)"
    if status == 403:
        return "the key lacks access: give it read and write permission in RunPod's console"
    if status == 402:
        return "add funds to the RunPod account"
    if status == 429:
        return "RunPod's rate limit held after the retries; wait a minute and re-run"
    if status >= 500:
        return "RunPod failed after the retries; re-run later (apply resumes)"
    return "fix the [runpod] table in the spec, or check RunPod's console"


def _cause(exc: requests.RequestException) -> str:
    """The failure without the URL's query or any header: the type and the innermost reason."""
    reason: BaseException = exc
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    text = str(getattr(reason, "reason", None) or reason)
    return f"{type(exc).__name__} ({' '.join(text.split())[:200]})"


def _items(data: Any, key: str, what: str) -> list[dict[str, Any]]:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise RunPodError(f"RunPod API {what} answered without a `{key}` list")
    return items


def _lines(answer: requests.Response) -> Iterator[bytes]:
    """The stream's complete lines, as they come. Not ``iter_lines``: it waits for a full chunk, so the
    last events before a quiet spell would be held back until the read timeout drops them."""
    read = getattr(answer.raw, "read1", None)
    pending = b""
    while True:
        try:
            data = read(65536) if read is not None else answer.raw.read(1)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError):
            return  # quiet for the idle time, or the pod went away: what was there has been read
        if not data:
            return
        pending += data
        *complete, pending = pending.split(b"\n")
        yield from (line.rstrip(b"\r") for line in complete)


def _log_line(data: str) -> str | None:
    try:
        event = json.loads(data)
    except ValueError:
        return None
    line = event.get("line") if isinstance(event, dict) else None
    return line if isinstance(line, str) else None
