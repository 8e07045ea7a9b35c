"""Turn a job's input into the one call it asks for, or say precisely what is wrong with it.

Pure: no I/O, no globals. The envelope is the original runpod-worker-forge one,
``{"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {...}}``.
As lenient as the original worker: the method is case-insensitive ("post" means POST), an endpoint
without its leading ``/`` works, and a GET's payload fields become query parameters (the original
ignored a GET's payload; every documented GET sends ``{}``). The payload goes on with every field as
sent, no schema; txt2img and img2img get the original worker's defaults for the fields they leave
out (``worker.original_defaults``) unless ``original_defaults`` is off.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

from worker.job_rules import JobRuleError, check_forge_call
from worker.original_defaults import with_defaults
from worker.routes import ALIASES, GENERATING, HELPER_ROUTES, accepted, methods_of

METHODS = ("GET", "POST")
EXAMPLE = '{"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {"prompt": "a cat"}}'


class InputError(ValueError):
    """The job input is malformed: a caller mistake, never a reason to restart the worker."""


@dataclass(frozen=True)
class ForgeCall:
    """A request to pass to Forge: ``payload`` None means no request body."""

    method: str
    route: str  # Forge's path
    payload: dict[str, Any] | None
    endpoint: str  # as the caller named it (differs from route for aliases)
    query: tuple[tuple[str, str], ...] = ()  # a GET's payload fields, as query parameters

    @property
    def generates(self) -> bool:
        return self.route in GENERATING


@dataclass(frozen=True)
class HelperCall:
    """A job for one of the worker's own /v1/* helpers."""

    endpoint: str
    payload: dict[str, Any]


def normalise(job_input: object, *, original_defaults: bool = True) -> ForgeCall | HelperCall:
    if not isinstance(job_input, dict):
        raise InputError(f"the job input must be a JSON object like {EXAMPLE}, not {_kind(job_input)}")
    api = job_input.get("api")
    if api is None:
        raise InputError(f"the job input has no 'api' object; send {EXAMPLE}")
    if not isinstance(api, dict):
        raise InputError(f"'api' must be an object with 'method' and 'endpoint', not {_kind(api)}")
    method = _method(api.get("method"))
    endpoint = _endpoint(api.get("endpoint"))
    payload = _payload(job_input.get("payload"))

    allowed = methods_of(endpoint)
    if allowed is None:
        raise InputError(_unknown(endpoint))
    if method not in allowed:
        raise InputError(f"{endpoint} takes {' or '.join(sorted(allowed))}, not {method}")
    if endpoint in HELPER_ROUTES:
        return HelperCall(endpoint, payload or {})
    route = ALIASES[endpoint][0] if endpoint in ALIASES else endpoint
    if method == "GET":
        return ForgeCall(method, route, None, endpoint, _query(payload or {}))
    try:
        check_forge_call(route, payload)
    except JobRuleError as exc:
        raise InputError(str(exc)) from None
    if payload is not None and original_defaults:
        payload = with_defaults(route, payload)
    return ForgeCall(method, route, payload, endpoint)


def _method(value: object) -> str:
    if value is None:
        raise InputError("'api.method' is missing; use GET or POST")
    if not isinstance(value, str) or value.strip().upper() not in METHODS:
        raise InputError(f"'api.method' must be GET or POST, not {value!r}")
    return value.strip().upper()


def _endpoint(value: object) -> str:
    if value is None:
        raise InputError("'api.endpoint' is missing; give Forge's path, e.g. /sdapi/v1/txt2img")
    if not isinstance(value, str) or not value:
        raise InputError(f"'api.endpoint' must be a path such as /sdapi/v1/txt2img, not {value!r}")
    if "://" in value or value.startswith("//"):
        raise InputError(f"'api.endpoint' must be a path such as /sdapi/v1/txt2img, not a URL ({value!r})")
    if not value.startswith("/"):
        value = f"/{value}"  # the original worker took "sdapi/v1/txt2img" too
    if "?" in value or "#" in value:
        raise InputError(f"'api.endpoint' must not carry a query string ({value!r}); put parameters in 'payload'")
    if any(part in {".", ".."} for part in value.split("/")) or "\\" in value:
        raise InputError(f"'api.endpoint' must not contain '.', '..' or backslashes ({value!r})")
    return value.rstrip("/") if len(value) > 1 else value


def _payload(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"'payload' must be a JSON object, not {_kind(value)}")
    return value


def _query(payload: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A GET's payload as query parameters, the way FastAPI reads them back.

    Strings go as they are, true/false and numbers as JSON writes them, a list as the parameter
    repeated, null not at all; anything else as its JSON text. Never an error: the original worker
    accepted any GET payload (it ignored it).
    """
    query: list[tuple[str, str]] = []
    for key, value in payload.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                query.append((str(key), item if isinstance(item, str) else json.dumps(item)))
    return tuple(query)


def _unknown(endpoint: str) -> str:
    names = accepted()
    close = difflib.get_close_matches(endpoint, names, n=1, cutoff=0.75)
    guess = f"did you mean {close[0]}? " if close else ""
    return f"unknown endpoint {endpoint}; {guess}accepted: {', '.join(names)}"


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
