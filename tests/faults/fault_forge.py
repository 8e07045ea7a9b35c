"""Forge's launch.py for the fault suite's volume: the stand-in, plus answers a healthy stand-in never gives.

Copied over ``launch.py`` in the suite's volume (the stand-in's own launcher moves to
``standin_launch.py``), so the worker starts it exactly as it starts Forge. It serves the stand-in
unchanged except that ``POST /sdapi/v1/png-info`` with ``{"image": "fault:<kind>"}`` answers like
a broken or proxied Forge does: ``html`` (502 with an HTML page, as a reverse proxy), ``empty``
(500 with no body), ``404`` (FastAPI's not-found) and ``text`` (200 with plain text).
Every request line it receives, and the names of its environment variables, go to the JSON-lines
file ``$FAULT_FORGE_LOG``, so tests see exactly what reached Forge.
Standard library only: it runs in the volume's venv.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import forge_standin  # noqa: E402  (the checkout's own module, found through ROOT)
import standin_launch  # noqa: E402

_lock = threading.Lock()
FAULTS: dict[str, tuple[int, str, bytes]] = {
    "fault:html": (502, "text/html", b"<html><head><title>502 Bad Gateway</title></head>"
                                     b"<body><h1>502 Bad Gateway</h1></body></html>"),
    "fault:empty": (500, "application/json", b""),
    "fault:404": (404, "application/json", b'{"detail":"Not Found"}'),
    "fault:text": (200, "text/plain", b"all good"),
}


def record(entry: dict[str, Any]) -> None:
    path = os.environ.get("FAULT_FORGE_LOG")
    if path:
        with _lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


def handler_class(forge: Any) -> type[BaseHTTPRequestHandler]:
    base = _stand_in_handler(forge)

    class Faulty(base):  # type: ignore[misc, valid-type]
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            record({"method": method, "path": self.path, "host": self.headers.get("Host")})
            fault = None
            if method == "POST" and self.path == "/sdapi/v1/png-info":
                try:
                    fault = FAULTS.get(json.loads(raw).get("image"))
                except (ValueError, AttributeError):
                    fault = None
            if fault is None:
                status, body = forge.answer(method, self.path.split("?", 1)[0], raw)
                fault = (status, "application/json", json.dumps(body).encode())
            status, kind, data = fault
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Faulty


_stand_in_handler = forge_standin.handler_class
forge_standin.handler_class = handler_class  # serve() looks it up when it builds the server

if __name__ == "__main__":
    record({"boot": True, "env_names": sorted(os.environ)})
    standin_launch.main()
