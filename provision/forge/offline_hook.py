"""Forge's process gets no network: the worker installs this as ``sitecustomize`` in Forge's interpreter.

Standard library only: it runs in the volume's venv, before Forge imports anything. An audit hook
refuses, at once, every name lookup and connection to anything but this machine (loopback, local
sockets), so a download Forge starts at first use (``load_file_from_url``, torch.hub's
``download_url_to_file``, clip's ``_download``, insightface's) fails in microseconds instead of waiting
on a resolver or a host; Hugging Face's libraries are told to stay offline by the environment.

Each refusal is one line, naming the file (the URL found in the calling frames, looked up in the
table the worker wrote: ``FORGE_VOLUME_FIRST_USE``) and the spec line that adds it. It is raised (an
OSError, which Forge's callers already handle as a failed download), printed to stderr (Forge's log)
and appended to ``FORGE_VOLUME_REFUSALS`` as a JSON line, where the worker finds it and fails the job
that caused it even when Forge swallowed the error (a preview, an upscaler, the interrogator's categories).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import threading
from typing import Any

MARK = "forge-volume:"
_TABLE_ENV = "FORGE_VOLUME_FIRST_USE"
_REFUSALS_ENV = "FORGE_VOLUME_REFUSALS"
_URL_NAMES = ("url", "fullurl", "model_url", "remote_url", "remote_model_path", "remote_path", "download_url",
              "checkpoint_file", "source_url")
_LOCAL_NAMES = frozenset({"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class NoNetwork(ConnectionRefusedError):
    """A download (or any connection off this machine) from Forge's process on a worker."""


_state: dict[str, Any] = {"table": None}
_lock = threading.Lock()
_inside = threading.local()


def _table() -> dict[str, Any]:
    if _state["table"] is None:
        try:
            with open(os.environ[_TABLE_ENV], encoding="utf-8") as fh:
                data = json.load(fh)
            _state["table"] = data if isinstance(data, dict) else {}
        except (KeyError, OSError, ValueError):
            _state["table"] = {}
    table: dict[str, Any] = _state["table"]
    return table


def _local_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip().lower().rstrip(".")
    if name in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _url_in_stack() -> str | None:
    """The URL the download was asked for: a local variable of one of the calling frames."""
    frame = sys._getframe(2)
    while frame is not None:
        for name in _URL_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                return value
            full = getattr(value, "full_url", None)  # a urllib Request
            if isinstance(full, str) and full.startswith(("http://", "https://")):
                return full
        frame = frame.f_back  # type: ignore[assignment]
    return None


def message(url: str | None, where: str) -> str:
    """The one line for a refused download (or connection) ``where`` (host:port)."""
    entry = _table().get(url or "") if url else None
    if isinstance(entry, dict):
        path, feature = str(entry.get("path")), str(entry.get("feature"))
        if entry.get("locked"):
            return (f"{MARK} Forge needs {path} (feature {feature!r}), which the volume's lock lists but the volume "
                    "lacks; a worker never downloads: run `forge-volume install` on a pod with this volume")
        return (f"{MARK} Forge needs {path}, which is not on the volume, and a worker never downloads: add "
                f"\"{feature}\" to `features` in [forge] of forge-volume.toml (features = [\"{feature}\"]), then "
                "run `forge-volume lock && forge-volume install` on a pod with this volume")
    if url:
        return (f"{MARK} Forge tried to download {url} at run time, and a worker never downloads (no feature of "
                "forge-volume fetches it): put the file on the volume ([[models]] in the spec, or the /v1/download "
                "job) where Forge looks for it")
    return f"{MARK} Forge tried to connect to {where} at run time; a worker gives Forge no network"


def _refuse(where: str) -> None:
    url = _url_in_stack()
    line = message(url, where)
    with _lock:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        target = os.environ.get(_REFUSALS_ENV)
        if target:
            try:
                fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (json.dumps({"message": line, "url": url, "where": where}) + "\n").encode())
                finally:
                    os.close(fd)
            except OSError:
                pass
    raise NoNetwork(line)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in ("socket.getaddrinfo", "socket.connect", "socket.gethostbyname", "socket.gethostbyname_ex",
                     "socket.gethostbyaddr", "socket.sendto"):
        return
    if getattr(_inside, "busy", False):
        return
    _inside.busy = True
    try:
        if event == "socket.getaddrinfo":
            host, port = args[0], args[1]
            if not _local_host(host):
                _refuse(f"{host}:{port}")
        elif event in ("socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
            if not _local_host(args[0]):
                _refuse(str(args[0]))
        else:  # socket.connect / socket.sendto: (socket, address)
            sock, address = args[0], args[-1]
            if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) \
                    and not _local_host(address[0]):
                _refuse(f"{address[0]}:{address[1] if len(address) > 1 else '?'}")
    finally:
        _inside.busy = False


def install() -> None:
    sys.addaudithook(_hook)


def _chain() -> None:
    """Run the sitecustomize this one shadows (a distribution's), as Python would have without us."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # as site.py does: a broken sitecustomize is reported, not fatal
            sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}\n")


if __name__ == "sitecustomize":
    install()
    _chain()
