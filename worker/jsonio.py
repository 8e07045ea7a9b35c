"""Fast JSON for relaying Forge's bodies: orjson when installed, the standard library otherwise.

A generation's response is mostly base64 text (16 MB is common); orjson parses it straight from
bytes without the decode copy that ``json.loads`` makes. Both fall back to the standard library for
what orjson refuses (NaN, integers beyond 64 bits), which Forge can send or a caller can write.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # the worker extra installs it; the provisioning install may not
    orjson = None  # type: ignore[assignment]


def loads(data: bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return json.loads(data)  # NaN/Infinity, which the standard library accepts (or a real error)
    return json.loads(data)


def dumps(value: Any) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:
            return json.dumps(value, ensure_ascii=False).encode()  # integers beyond 64 bits
    return json.dumps(value, ensure_ascii=False).encode()
