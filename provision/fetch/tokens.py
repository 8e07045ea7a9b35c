"""Bearer tokens: cleaned as read from the environment or a payload, and sent only where they belong.

A ``Credential`` names the variable a token came from (errors name it; the value never appears) and the
hosts and origins it may go to. Nothing here talks to the network, so the worker's settings can check a
token without loading the downloader.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from provision.errors import AuthError


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, the port always written out; "" for a URL without a valid one."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"https": 443, "http": 80}.get(scheme, 0)
    except ValueError:
        return ""
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


_CONTROL_CHARS = frozenset(chr(c) for c in (*range(0x20), 0x7F))


def clean_token(value: str | None, name: str) -> str | None:
    """A token as read from the environment or a payload: surrounding whitespace stripped (a pasted
    newline), None when empty; a control character inside is refused by a message that never shows it."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if any(ch in _CONTROL_CHARS or ch.isspace() for ch in value):
        raise AuthError(f"{name} holds a space or a control character inside the token",
                        f"set {name} to the token alone, as the site shows it")
    return value


@dataclass(frozen=True)
class Credential:
    """A bearer token, the variable it came from (named in errors; the value never is), and where it may go:
    over https on the default port to ``hosts`` (and their subdomains), or to one of ``origins`` exactly
    (``scheme://host:port`` of an endpoint the operator configured, e.g. HF_ENDPOINT's mirror)."""

    env_name: str
    hosts: tuple[str, ...]
    token: str | None = None
    origins: tuple[str, ...] = ()

    def applies_to(self, url: str) -> bool:
        origin = origin_of(url)
        if not origin:
            return False
        if origin in self.origins:
            return True
        scheme, _, rest = origin.partition("://")
        host, _, port = rest.rpartition(":")
        return scheme == "https" and port == "443" and any(host == h or host.endswith("." + h) for h in self.hosts)

    def __repr__(self) -> str:  # never show the token, even in a traceback's locals
        return (f"Credential(env_name={self.env_name!r}, hosts={self.hosts!r}, origins={self.origins!r}, "
                f"token={'set' if self.token else None})")
