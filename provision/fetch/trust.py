"""Which certificates an https call trusts: one CA bundle for every library that makes the calls.

requests (downloads, probes, civitai's API) reads ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``;
huggingface_hub's client (httpx) reads ``SSL_CERT_FILE`` and nothing else. Left alone, a private CA or a
TLS-inspecting egress named the way requests users name it would let a model's bytes through but fail
the hub's listing of the same repository (``/v1/sync``, ``hf://`` sources). Here the first of the three
that is set is the bundle for all of them.

Only the standard library at import: the worker reads settings without loading an HTTP client.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Mapping

from provision.errors import DownloadError

CA_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
TRUST_FIX = "if it comes from a private CA or a TLS-inspecting proxy, name that CA's bundle (PEM) in REQUESTS_CA_BUNDLE"

_hub_lock = threading.Lock()
_hub_bundle: list[str | None] = [None]  # the bundle huggingface_hub's client was last made to trust


def named_bundle(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """The variable naming the CA bundle and its value (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
    ``SSL_CERT_FILE``: the first set), or None."""
    env = os.environ if env is None else env
    return next(((name, env[name]) for name in CA_ENV if env.get(name)), None)


def ca_bundle(env: Mapping[str, str] | None = None) -> str | bool:
    """The CA bundle the environment names, or True for the libraries' default trust (requests' ``verify``)."""
    named = named_bundle(env)
    return named[1] if named else True


def untrusted_certificate(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, when ``exc`` (or what caused it) is a failed verification."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ssl.SSLCertVerificationError):
            return err.verify_message or err.reason or "certificate verify failed"
        todo.extend(e for e in (err.__cause__, err.__context__, *err.args) if isinstance(e, BaseException))
    return None


def not_trusted(where: str, exc: BaseException) -> DownloadError | None:
    """The error to raise when ``exc`` is a refused server certificate (``where``: the URL, or what it was for)."""
    why = untrusted_certificate(exc)
    return None if why is None else DownloadError(f"{where}: the server's certificate is not trusted ({why})",
                                                  TRUST_FIX)


def trust_for_hub() -> None:
    """Make huggingface_hub's shared client trust the bundle ``ca_bundle()`` names (before each hub call:
    the client is made once and kept, and a test or an embedding program may change the environment)."""
    named = named_bundle()
    wanted = named[1] if named else None
    if named and not os.path.isfile(wanted or ""):
        raise DownloadError(f"{named[0]}={wanted} is not a file", "point it at the CA bundle (a PEM file), or unset it")
    with _hub_lock:
        if wanted == _hub_bundle[0]:
            return
        import httpx2
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

        if wanted is None:
            set_client_factory(default_client_factory)
        else:
            def factory() -> httpx2.Client:
                return httpx2.Client(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
                                     timeout=None, verify=ssl.create_default_context(cafile=wanted))
            set_client_factory(factory)
        _hub_bundle[0] = wanted
