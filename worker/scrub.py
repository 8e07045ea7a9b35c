"""Secrets kept out of what a job returns: every form a token may take in an error text, replaced.

Apart from the helper jobs, so that a Forge job's error path never loads the downloader."""

from __future__ import annotations

import json
from typing import Any


def secret_forms(secrets: list[str]) -> list[str]:
    """Each secret as written, stripped, and quoted as Python's repr or JSON would show it (a token with a
    stray newline appears as ``'Bearer abc\\n'`` in an HTTP library's error), longest first."""
    forms = {form for s in secrets for form in (s, s.strip(), repr(s)[1:-1], json.dumps(s)[1:-1]) if len(form) >= 4}
    return sorted(forms, key=len, reverse=True)


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` with every secret replaced, wherever a string holds one (see ``secret_forms``)."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    return value
