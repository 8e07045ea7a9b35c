"""A self-signed certificate for loopback TLS servers, made with the openssl command line.

Valid for 127.0.0.1, 127.0.0.2 (``PRIVATE_MODEL_HOST``) and localhost; a client trusts it through
``REQUESTS_CA_BUNDLE`` (the file is its own CA). Made once per test session.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cert:
    cert: Path  # PEM certificate: also the CA bundle a client trusts
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_cert(folder: Path) -> Cert:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "loopback.pem", folder / "loopback.key"
    result = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                             "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                             "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost",
                             "-addext", "basicConstraints=critical,CA:TRUE"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl could not make a test certificate: {result.stderr.strip()}")
    return Cert(cert, key)
