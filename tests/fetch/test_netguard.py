"""The address fence of job-named downloads (provision.fetch.netguard) through the downloader, on real sockets.

A canary server listens on every local address: any loopback spelling that got through would reach
it. Refusals happen before a connection is opened, so the refused private and link-local addresses
(which route nowhere here) cost no time either.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provision.errors import DownloadError
from provision.fetch.download import Download, Http, Retry, download
from provision.fetch.netguard import AddressGuard, AddressRefused, parse_networks
from tests.helpers.http_server import PRIVATE_MODEL_HOST, FileServer
from tests.helpers.internal_addresses import internal_spellings

FAST = Retry(attempts=2, base=0.01, cap=0.05)
DATA = os.urandom(200_000)
SHA = hashlib.sha256(DATA).hexdigest()
OPT_IN = parse_networks(f"{PRIVATE_MODEL_HOST}/32")


@pytest.fixture
def canary() -> Iterator[FileServer]:
    with FileServer("0.0.0.0") as srv:
        srv.add("/x.bin", b"must never be fetched")
        yield srv


@pytest.fixture
def models() -> Iterator[FileServer]:
    with FileServer(PRIVATE_MODEL_HOST) as srv:
        srv.add("/m.bin", DATA)
        yield srv


def fetch(url: str, target: Path, allowed: Any = ()) -> None:
    download(Download(url, target, http=Http(retry=FAST, guard=AddressGuard.for_url(url, allowed))))


def test_every_spelling_of_an_internal_address_is_refused_before_connecting(canary: FileServer,
                                                                             tmp_path: Path) -> None:
    for url, rule in internal_spellings(canary.port):
        with pytest.raises(AddressRefused) as info:
            fetch(url, tmp_path / "m.bin")
        message = info.value.one_line()
        assert f"a {rule} address" in message and "FORGE_DOWNLOAD_ALLOW_NETWORKS" in message, (url, message)
        assert "\n" not in message and "user@" not in message
    assert canary.requests == []
    assert list(tmp_path.iterdir()) == []


def test_opt_in_allows_the_named_private_host_but_no_redirect_to_another(models: FileServer, canary: FileServer,
                                                                          tmp_path: Path) -> None:
    url = models.url("/m.bin")
    with pytest.raises(AddressRefused, match="a loopback address"):
        fetch(url, tmp_path / "m.bin")  # 127.0.0.2 is loopback: refused without the opt-in
    assert models.requests == []
    fetch(url, tmp_path / "m.bin", OPT_IN)
    assert (tmp_path / "m.bin").read_bytes() == DATA
    # Within the opted-in network, but another port than the one the job named: refused.
    models.add("/to-other-port", redirect=f"http://{PRIVATE_MODEL_HOST}:{canary.port}/x.bin")
    models.add("/to-loopback", redirect=canary.url("/x.bin", host="localhost"))
    for path in ("/to-other-port", "/to-loopback"):
        with pytest.raises(AddressRefused, match="refusing to follow a redirect from") as info:
            fetch(models.url(path), tmp_path / "r.bin", OPT_IN)
        assert "FORGE_DOWNLOAD_ALLOW_NETWORKS" in info.value.one_line()
    assert canary.requests == []


def test_dns_rebinding_gains_nothing(models: FileServer, canary: FileServer, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that resolves to an allowed address when checked and to the canary afterwards.

    No DNS server can be run here, so getaddrinfo is the one function replaced: it answers the
    allowed address once, then loopback (the canary) for every later lookup. The connection goes
    to the address that was checked, resolved once."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "models.rebind.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        answer = PRIVATE_MODEL_HOST if len(lookups) == 1 else "127.0.0.1"
        return real(answer, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    models.add("/c.bin", DATA)  # the canary's port on 127.0.0.1 would be reached only through a second lookup
    url = f"http://models.rebind.test:{models.port}/c.bin"
    download(Download(url, tmp_path / "c.bin", http=Http(retry=FAST, guard=AddressGuard.for_url(url, OPT_IN))))
    assert (tmp_path / "c.bin").read_bytes() == DATA and lookups == ["models.rebind.test"]
    assert models.requests_to("/c.bin")[0].headers["host"] == f"models.rebind.test:{models.port}"
    # The next connection resolves again, to loopback, which the opt-in does not cover: refused.
    with pytest.raises(AddressRefused, match=r"127\.0\.0\.1"):
        download(Download(url, tmp_path / "d.bin", http=Http(retry=FAST, guard=AddressGuard.for_url(url, OPT_IN))))
    assert canary.requests == []


def test_a_name_with_one_internal_address_among_public_ones_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    real = socket.getaddrinfo

    def mixed(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "mixed.test":
            return real(host, port, *args, **kwargs)
        return real("93.184.215.14", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    with pytest.raises(AddressRefused, match=r"mixed\.test \(127\.0\.0\.1\) is a loopback address"):
        fetch("http://mixed.test/x.bin", tmp_path / "x.bin")


def test_without_a_guard_the_cli_fetches_loopback(models: FileServer, tmp_path: Path) -> None:
    """The user's own spec (forge-volume) is not fenced: a mirror on the pod's own network is theirs to use."""
    download(Download(models.url("/m.bin"), tmp_path / "m.bin", sha256=SHA, http=Http(retry=FAST)))
    assert (tmp_path / "m.bin").read_bytes() == DATA


def test_bad_networks_are_named() -> None:
    assert [str(n) for n in parse_networks(" 10.0.0.0/8, fd00::/8 ,192.168.1.20")] == [
        "10.0.0.0/8", "fd00::/8", "192.168.1.20/32"]
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a network"):
        parse_networks("10.0.0.0/33")


def test_refusal_is_a_download_error() -> None:
    assert issubclass(AddressRefused, DownloadError)
