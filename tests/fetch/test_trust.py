"""One CA bundle for every https call (issue 19): the hub's API (huggingface_hub, over httpx) trusts what the
downloads (requests) trust, and a refused certificate is one line that names the fix.

The hub and its CDN are loopback servers with a self-signed certificate: a private mirror behind a
private CA, or a TLS-inspecting egress."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.errors import DownloadError
from provision.fetch.download import Download, Http, Retry, download
from provision.fetch.trust import CA_ENV, ca_bundle, named_bundle
from provision.models import ModelRequest, RepoRequest, fetch_model, sync_hf_repo
from provision.progress import QUIET
from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import FileServer
from tests.helpers.tls import Cert, make_cert
from volume_layout import VolumeLayout

FILES = {"README.md": b"# loras\n", "a.safetensors": os.urandom(40_000), "sub/b.safetensors": os.urandom(30_000)}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_hub(cert: Cert, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    for name in CA_ENV:
        monkeypatch.delenv(name, raising=False)
    with FakeHub(tls=cert) as hub:
        hub.add_repo("org/loras", FILES)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


@pytest.mark.parametrize("variable", CA_ENV)
def test_a_repo_syncs_over_https_with_the_bundle_named_either_way(tls_hub: FakeHub, cert: Cert, volume: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  variable: str) -> None:
    """REQUESTS_CA_BUNDLE used to reach the downloads only: huggingface_hub's client reads SSL_CERT_FILE,
    so the listing of the repository failed before any file was asked for. Each name now reaches both."""
    assert tls_hub.endpoint.startswith("https://")
    monkeypatch.setenv(variable, str(cert.cert))
    got = sync_hf_repo(VolumeLayout(volume), RepoRequest("org/loras", kind="lora"), QUIET)
    assert (got["files"], got["downloaded"]) == (3, 3)
    for name, data in FILES.items():
        assert (volume / "models" / "Lora" / name).read_bytes() == data
    assert all(seen.path.startswith("/api/models/org/loras") for seen in tls_hub.server.requests[:1])
    one = fetch_model(VolumeLayout(volume), ModelRequest("hf://org/loras/a.safetensors", kind="checkpoint"), QUIET)
    assert one["downloaded"] is True and (volume / one["path"]).read_bytes() == FILES["a.safetensors"]


def test_without_the_bundle_the_listing_fails_in_one_line_naming_the_fix(tls_hub: FakeHub, volume: Path) -> None:
    with pytest.raises(DownloadError) as info:
        sync_hf_repo(VolumeLayout(volume), RepoRequest("org/loras", kind="lora"), QUIET)
    line = info.value.one_line()
    assert f"hf://org/loras: {tls_hub.endpoint}: the server's certificate is not trusted" in line, line
    assert "REQUESTS_CA_BUNDLE" in line and "\n" not in line
    assert not (volume / "models" / "Lora").exists() or list((volume / "models" / "Lora").iterdir()) == []
    assert tls_hub.cdn.requests == []


def test_a_bundle_that_is_no_file_is_named(tls_hub: FakeHub, volume: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(DownloadError, match=r"REQUESTS_CA_BUNDLE=.*missing\.pem is not a file"):
        sync_hf_repo(VolumeLayout(volume), RepoRequest("org/loras", kind="lora"), QUIET)
    assert tls_hub.server.requests == []


def test_an_untrusted_download_is_refused_at_once_and_not_retried(cert: Cert, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: "giving up after 3 attempts without new bytes: SSLError connecting to ...", after three
    handshakes and the backoffs between them, without the cause or the fix."""
    for name in CA_ENV:
        monkeypatch.delenv(name, raising=False)
    with FileServer(tls=cert) as server:
        server.add("/m.bin", b"x" * 1000)
        with pytest.raises(DownloadError) as info:
            download(Download(server.url("/m.bin"), tmp_path / "m.bin",
                              http=Http(retry=Retry(attempts=3, base=0.01, cap=0.05))))
        line = info.value.one_line()
        assert f"{server.url('/m.bin')}: the server's certificate is not trusted (self-signed certificate)" in line
        assert "REQUESTS_CA_BUNDLE" in line and "attempts" not in line
        assert server.requests == []  # the handshake failed: no request was ever made
    assert list(tmp_path.iterdir()) == []


def test_the_first_variable_set_is_the_bundle() -> None:
    assert ca_bundle({}) is True and named_bundle({}) is None
    assert ca_bundle({"SSL_CERT_FILE": "/c.pem"}) == "/c.pem"
    assert named_bundle({"SSL_CERT_FILE": "/c.pem", "CURL_CA_BUNDLE": "/b.pem"}) == ("CURL_CA_BUNDLE", "/b.pem")
    every = {"REQUESTS_CA_BUNDLE": "/a.pem", "CURL_CA_BUNDLE": "/b.pem", "SSL_CERT_FILE": "/c.pem"}
    assert ca_bundle(every) == "/a.pem"
    assert ca_bundle({"REQUESTS_CA_BUNDLE": "", "SSL_CERT_FILE": "/c.pem"}) == "/c.pem"
