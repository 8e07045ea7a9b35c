"""Loaded into Forge's process by the offline lab suite (``PYTHONPATH``, passed through to Forge by name).

Only in Forge's own process (``launch.py``) and only with ``FORGE_LAB_AUDIT_LOG`` set, an audit hook
(PEP 578) writes one JSON line per event to that file:

- ``connect`` / ``sendto``: a socket connect or datagram to anything but loopback or a Unix socket;
- ``getaddrinfo``: a name lookup of anything but a loopback name or address (a resolver's own UDP
  packets are sent from C and never reach ``socket.connect``: the lookup is where they start);
- ``urlopen``: a ``urllib.request.Request`` made to a non-loopback host;
- ``open``: a file opened under one of the folders in ``FORGE_LAB_AUDIT_OPENS`` (``os.pathsep``-separated),
  which proves that the first-use files on the volume were the ones Forge read.

With ``FORGE_LAB_CLIP_SHA256`` set, ``clip.clip._MODELS["ViT-L/14"]`` is given that hash in place of
OpenAI's: clip.load re-downloads any ViT-L-14.pt whose sha256 differs from the hash in its URL, and no
generated stand-in can have OpenAI's. Nothing else of Forge or clip is changed.
"""

from __future__ import annotations

import os
import sys


def _install() -> None:
    import importlib.abc
    import importlib.util
    import ipaddress
    import json
    import socket
    import threading
    from urllib.parse import urlsplit

    fd = os.open(os.environ["FORGE_LAB_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    watch = tuple(p for p in os.environ.get("FORGE_LAB_AUDIT_OPENS", "").split(os.pathsep) if p)
    busy = threading.local()

    def loopback(host: object) -> bool:
        if host is None or host in ("localhost", b"localhost", ""):
            return True
        text = host.decode() if isinstance(host, bytes) else str(host)
        try:
            return ipaddress.ip_address(text.split("%")[0]).is_loopback
        except ValueError:
            return False

    def record(kind: str, detail: object) -> None:
        line = json.dumps({"pid": os.getpid(), "kind": kind, "detail": str(detail)}) + "\n"
        os.write(fd, line.encode())  # os.write raises no audit event: no recursion

    def hook(event: str, args: tuple[object, ...]) -> None:
        if getattr(busy, "on", False):
            return
        busy.on = True
        try:
            if event in ("socket.connect", "socket.sendto"):
                sock, address = args[0], args[1]
                if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) \
                        and not loopback(address[0]):
                    record(event.split(".")[1], address)
            elif event == "socket.getaddrinfo":
                if not loopback(args[0]):
                    record("getaddrinfo", args[0])
            elif event == "urllib.Request":
                if not loopback(urlsplit(str(args[0])).hostname):
                    record("urlopen", args[0])
            elif event == "open" and watch:
                path = args[0]
                if isinstance(path, str) and path.startswith(watch):
                    record("open", os.path.realpath(path))
        except Exception:  # an audit hook must never break Forge
            pass
        finally:
            busy.on = False

    sys.addaudithook(hook)

    clip_sha = os.environ.get("FORGE_LAB_CLIP_SHA256")
    if clip_sha:
        class ClipHash(importlib.abc.MetaPathFinder):
            def find_spec(self, name: str, path: object, target: object = None) -> object:
                if name != "clip.clip":
                    return None
                sys.meta_path.remove(self)
                try:
                    spec = importlib.util.find_spec(name)
                finally:
                    sys.meta_path.insert(0, self)
                if spec is None or spec.loader is None:
                    return None
                exec_module = spec.loader.exec_module

                def patched(module: object) -> None:
                    exec_module(module)  # type: ignore[arg-type]
                    models = module._MODELS  # type: ignore[attr-defined]
                    parts = models["ViT-L/14"].split("/")
                    parts[-2] = clip_sha
                    models["ViT-L/14"] = "/".join(parts)
                    record("clip-hash", models["ViT-L/14"])

                spec.loader.exec_module = patched  # type: ignore[method-assign]
                return spec

        sys.meta_path.insert(0, ClipHash())


if os.environ.get("FORGE_LAB_AUDIT_LOG") and sys.argv and os.path.basename(sys.argv[0]) == "launch.py":
    _install()
