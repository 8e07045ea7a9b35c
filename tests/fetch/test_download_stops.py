"""Downloads that must end: a cancel, a server that stalls or trickles, retries that bring nothing new.

Each runs provision.fetch.download against a real loopback server that misbehaves; deadlines here only
catch a hang (they are far below the 60 s read timeout a stuck download would otherwise wait out).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.errors import DownloadCancelled, DownloadError
from provision.fetch.cancel import CONNECT_ENV, STALL_ENV
from provision.fetch.download import Download, Http, Retry, download
from provision.fetch.netguard import AddressGuard, parse_networks
from provision.fetch.partials import partial_path
from tests.helpers.black_hole import BlackHole, bytes_unread
from tests.helpers.http_server import FileServer
from tests.helpers.tls import Cert, make_cert

FAST = Retry(attempts=3, base=0.01, cap=0.05)
DATA = os.urandom(1 << 20)
SHA = hashlib.sha256(DATA).hexdigest()
HANG_DEADLINE = 20.0  # far below the 60 s read timeout: passing it means the stop did not work


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest, cert: Cert, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """Every test with a server runs over plain http and over TLS (issue 19 hole 11: urllib3 wraps the
    socket, and a cut of the plain one did nothing), the certificate trusted through REQUESTS_CA_BUNDLE."""
    tls = cert if request.param == "https" else None
    if tls is not None:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert.cert))
    with FileServer(tls=tls) as srv:
        yield srv


@pytest.fixture
def silent_tls(cert: Cert, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts the TCP connection and never answers the TLS handshake."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert.cert))
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/m.bin", accepted
    finally:
        listener.close()
        for sock in accepted:
            sock.close()


def in_thread(target: Path, url: str, **kwargs: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            download(Download(url, target, http=Http(retry=FAST, **kwargs)))  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def wait_until(condition: object, deadline: float = HANG_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "condition not reached before the deadline"
        time.sleep(0.02)


def test_a_cancel_stops_a_download_blocked_on_a_silent_server(server: FileServer, tmp_path: Path) -> None:
    """The server sends one chunk, then nothing for a minute: the read is blocked in the kernel.
    Setting the cancel event cuts the connection at once; the bytes so far are kept to resume."""
    route = server.add("/m.bin", DATA, delay_per_chunk=60)
    cancel = threading.Event()
    target = tmp_path / "m.bin"
    thread, errors = in_thread(target, server.url("/m.bin"), cancel=cancel)
    # The chunk in the download's hands, not only written by the server: under load, a cancel set while
    # the bytes were still on their way (or the client was still reading the headers) found 0 bytes read,
    # and rightly kept nothing (1 run in 3 at a load of 15 on 2 cores).
    wait_until(lambda: route.bytes_sent > 0 and bytes_unread(server.port) == 0
               and any(p.name.endswith(".part") for p in tmp_path.iterdir()))
    cancel.set()
    thread.join(HANG_DEADLINE)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert "cancelled" in errors[0].one_line()
    assert not target.exists() and partial_path(target).exists()


@pytest.mark.parametrize("guarded", [False, True], ids=["spec-source", "job-named-url"])
def test_a_cancel_stops_a_download_waiting_for_its_connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           guarded: bool) -> None:
    """Issue 10, hole 7: a server whose TCP connect never completes (its SYNs are dropped). With a
    connect timeout of ten minutes, only the cancel can end the download before the deadline: it cuts
    the connect still pending, through the address guard's connection (a job's URL) or the plain one."""
    monkeypatch.setenv(CONNECT_ENV, "600")
    with BlackHole() as hole:
        guard = AddressGuard.for_url(hole.url("/m.bin"), parse_networks("127.0.0.0/8")) if guarded else None
        cancel = threading.Event()
        target = tmp_path / "m.bin"
        thread, errors = in_thread(target, hole.url("/m.bin"), cancel=cancel, guard=guard)
        wait_until(lambda: hole.pending() > 0)
        cancel.set()
        thread.join(HANG_DEADLINE)
        assert not thread.is_alive(), "the cancel did not end the pending connect"
        assert hole.pending() == 0
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert "cancelled after 0 bytes" in errors[0].one_line()
    assert sorted(tmp_path.iterdir()) == []  # nothing received, nothing kept


@pytest.mark.parametrize("guarded", [False, True], ids=["spec-source", "job-named-url"])
def test_a_cancel_stops_a_download_in_its_tls_handshake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        silent_tls: tuple[str, list[socket.socket]],
                                                        guarded: bool) -> None:
    """Issue 19 hole 11: the server accepted the connection and never answers the ClientHello; with a
    connect timeout of ten minutes only the cancel can end it, through the connection TLS took over."""
    monkeypatch.setenv(CONNECT_ENV, "600")
    url, accepted = silent_tls
    guard = AddressGuard.for_url(url, parse_networks("127.0.0.0/8")) if guarded else None
    cancel = threading.Event()
    thread, errors = in_thread(tmp_path / "m.bin", url, cancel=cancel, guard=guard)
    wait_until(lambda: len(accepted) > 0)
    time.sleep(0.2)  # the ClientHello on its way: the client is waiting in the handshake
    started = time.monotonic()
    cancel.set()
    thread.join(HANG_DEADLINE)
    assert not thread.is_alive(), "the cancel did not end the TLS handshake"
    assert time.monotonic() - started < 5.0
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert sorted(tmp_path.iterdir()) == []


@pytest.fixture
def silent_after_request(cert: Cert, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[socket.socket]]]:
    """A TLS server that completes the handshake, reads the request and never sends the headers."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert.cert))
    listener = socket.create_server(("127.0.0.1", 0))
    context = cert.server_context()
    requests: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = context.wrap_socket(listener.accept()[0], server_side=True)
                conn.recv(65536)  # the request; then silence
                requests.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/m.bin", requests
    finally:
        listener.close()
        for sock in requests:
            sock.close()


def test_a_cancel_stops_a_download_waiting_for_its_headers_over_tls(
        tmp_path: Path, silent_after_request: tuple[str, list[socket.socket]]) -> None:
    """Issue 19 hole 11, the headers phase: the TLS session is up, the request sent, and the server never
    answers; only the cancel ends it before the 60 s read timeout, by cutting the TLS socket."""
    url, requests = silent_after_request
    cancel = threading.Event()
    thread, errors = in_thread(tmp_path / "m.bin", url, cancel=cancel)
    wait_until(lambda: len(requests) > 0)
    started = time.monotonic()
    cancel.set()
    thread.join(HANG_DEADLINE)
    assert not thread.is_alive(), "the cancel did not end the wait for the headers"
    assert time.monotonic() - started < 5.0
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled), errors
    assert sorted(tmp_path.iterdir()) == []


def test_a_server_silent_after_the_tls_handshake_fails_as_stalled(
        tmp_path: Path, silent_after_request: tuple[str, list[socket.socket]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The stall rule in the headers phase over TLS: no byte of an answer within FORGE_DOWNLOAD_STALL_TIMEOUT
    ends the download long before the 60 s read timeout, with the stall named."""
    monkeypatch.setenv(STALL_ENV, "1.0")
    url, requests = silent_after_request
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"stalled: less than 64 KiB arrived in 1 s"):
        download(Download(url, tmp_path / "m.bin", http=Http(retry=FAST)))
    assert time.monotonic() - started < HANG_DEADLINE
    assert len(requests) >= 1 and sorted(tmp_path.iterdir()) == []


def test_the_connect_timeout_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FORGE_DOWNLOAD_CONNECT_TIMEOUT bounds each connect; a bad value is named before any connection."""
    monkeypatch.setenv(CONNECT_ENV, "0.3")
    with BlackHole() as hole, pytest.raises(DownloadError, match="giving up after 3 attempts") as info:
        download(Download(hole.url("/m.bin"), tmp_path / "m.bin", http=Http(retry=FAST)))
    assert f"ConnectTimeout connecting to {hole.url('/m.bin')}" in info.value.one_line()
    monkeypatch.setenv(CONNECT_ENV, "0")
    with pytest.raises(Exception, match=f"{CONNECT_ENV}='0' is not a positive number of seconds"):
        download(Download(hole.url("/m.bin"), tmp_path / "m.bin", http=Http(retry=FAST)))


def test_a_trickling_server_fails_as_stalled(server: FileServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One byte every 0.2 s: every read succeeds, so a per-read timeout never fires; the stall rule
    (less than 64 KiB within FORGE_DOWNLOAD_STALL_TIMEOUT) does."""
    monkeypatch.setenv(STALL_ENV, "1.5")
    server.add("/m.bin", DATA, chunk=1, delay_per_chunk=0.2)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"stalled: less than 64 KiB arrived in 1\.5 s") as info:
        download(Download(server.url("/m.bin"), tmp_path / "m.bin", http=Http(retry=FAST)))
    assert time.monotonic() - started < HANG_DEADLINE
    assert STALL_ENV in info.value.one_line()
    assert not (tmp_path / "m.bin").exists()


def test_a_slow_steady_server_is_not_stalled(server: FileServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """32 KiB every 0.2 s is over 64 KiB a second: never a stall, though a 256 KiB buffer read whole
    (issue 19 hole 11: readinto returned only when full) took 1.6 s to count any of it."""
    monkeypatch.setenv(STALL_ENV, "1.0")
    data = DATA[: 512 << 10]
    server.add("/m.bin", data, chunk=32 << 10, delay_per_chunk=0.2)
    got = download(Download(server.url("/m.bin"), tmp_path / "m.bin",
                            http=Http(retry=Retry(attempts=1, base=0.01, cap=0.05))))
    assert got.sha256 == hashlib.sha256(data).hexdigest()


def test_a_bad_stall_timeout_is_named(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STALL_ENV, "soon")
    server.add("/m.bin", DATA)
    with pytest.raises(Exception, match=f"{STALL_ENV}='soon' is not a positive number of seconds"):
        download(Download(server.url("/m.bin"), tmp_path / "m.bin", http=Http(retry=FAST)))
    assert server.requests == []


def test_a_server_cutting_every_body_and_refusing_every_range_ends(server: FileServer, tmp_path: Path) -> None:
    """Every full answer is cut at 60 %, every Range request gets 416: the 416s and restarts bring no new
    bytes, so the attempts are bounded and the error says why."""
    route = server.add("/m.bin", DATA, drop_at=0.6, drop_times=1000, refuse_ranges=True)
    with pytest.raises(DownloadError, match="giving up after 3 attempts without new bytes") as info:
        download(Download(server.url("/m.bin"), tmp_path / "m.bin", sha256=SHA, http=Http(retry=FAST)))
    assert "refused the resume range" in info.value.one_line() or "connection closed" in info.value.one_line()
    assert route.gets <= 2 * FAST.attempts + 1


def test_a_server_sending_the_wrong_range_every_time_ends(server: FileServer, tmp_path: Path) -> None:
    """Every full answer is cut at 50 %, every Range request answered with another range (the start)."""
    route = server.add("/m.bin", DATA, drop_at=0.5, drop_times=1000, wrong_range=True)
    with pytest.raises(DownloadError, match="attempts without new bytes"):
        download(Download(server.url("/m.bin"), tmp_path / "m.bin", sha256=SHA, http=Http(retry=FAST)))
    assert route.gets <= 2 * FAST.attempts + 1


def test_after_a_success_no_partial_of_the_target_remains(server: FileServer, tmp_path: Path) -> None:
    """Issue 10, hole 12: a kept partial and the temporaries of two killed runs (their flocks are free);
    one of them is resumed, the rest would have survived. After the download none remain, while a
    live writer's temporary (flock held) and another file's temporary stay."""
    import fcntl

    from provision.fetch.partials import host_tag

    server.add("/m.bin", DATA)
    target = tmp_path / "m.bin"
    tag = host_tag()
    partial_path(target).write_bytes(os.urandom(1000))
    dead = [tmp_path / f".m.bin.{tag}{n:04x}.part" for n in (1, 2)]
    for path in dead:
        path.write_bytes(DATA[:300_000])
    live = tmp_path / f".m.bin.{tag}00ff.part"
    live.write_bytes(DATA[:1000])
    other = tmp_path / f".m.bin.v2.{tag}0003.part"  # a temporary of another target, m.bin.v2
    other.write_bytes(b"other")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        download(Download(server.url("/m.bin"), target, sha256=SHA, http=Http(retry=FAST)))
        assert target.read_bytes() == DATA
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


def test_names_like_a_downloads_temporary_are_refused(tmp_path: Path) -> None:
    """Issue 10, hole 4: a job could plant `.x.safetensors.partial` for the next refresh to complete."""
    from provision.models import ModelRequest, fetch_model
    from provision.progress import QUIET
    from volume_layout import LayoutError, VolumeLayout, check_file_name

    for name in (".x.safetensors.partial", ".x.safetensors.1a2b3c4d.part"):
        with pytest.raises(LayoutError, match="looks like a download's temporary file"):
            check_file_name(name)
    (tmp_path / "models").mkdir()
    with pytest.raises(Exception, match="looks like a download's temporary file"):
        fetch_model(VolumeLayout(tmp_path), ModelRequest("https://example.com/x.safetensors", kind="lora",
                                                         name=".x.safetensors.partial"), QUIET)
    assert check_file_name("x.partial") == "x.partial" and check_file_name(".hidden.safetensors")


def test_a_partial_is_never_completed_with_another_sources_bytes(server: FileServer, tmp_path: Path) -> None:
    """Issue 10, hole 4: a partial left by source A, then a download of the same target from source B
    (no sha256 known): B's file is fetched whole, never A[:n] + B[n:]."""
    other = os.urandom(len(DATA))
    server.add("/a.bin", DATA, drop_at=0.5, drop_times=100, headers={"ETag": '"a1"'})
    server.add("/b.bin", other, headers={"ETag": '"b1"'})
    target = tmp_path / "m.bin"
    with pytest.raises(DownloadError):
        download(Download(server.url("/a.bin"), target, http=Http(retry=Retry(attempts=1, base=0.01))))
    assert partial_path(target).stat().st_size == len(DATA) // 2
    got = download(Download(server.url("/b.bin"), target, http=Http(retry=FAST)))
    assert target.read_bytes() == other and got.resumed_from == 0
    assert "range" not in server.requests_to("/b.bin")[0].headers


def test_a_resume_proves_the_file_is_unchanged(server: FileServer, tmp_path: Path) -> None:
    """Same source, but the file changed since the partial: the resume carries If-Range with the ETag
    first sent, so the server answers the whole new file; with the same ETag it resumes."""
    new = os.urandom(len(DATA))
    route = server.add("/m.bin", DATA, drop_at=0.5, drop_times=100, headers={"ETag": '"v1"'})
    target = tmp_path / "m.bin"
    with pytest.raises(DownloadError):
        download(Download(server.url("/m.bin"), target, http=Http(retry=Retry(attempts=1, base=0.01))))
    server.add("/m.bin", new, headers={"ETag": '"v2"'})  # replaced upstream
    got = download(Download(server.url("/m.bin"), target, http=Http(retry=FAST)))
    assert target.read_bytes() == new and got.resumed_from == 0  # the server sent it whole: started over
    assert server.requests_to("/m.bin")[-1].headers["if-range"] == '"v1"'
    target.unlink()
    route = server.add("/m.bin", DATA, drop_at=0.5, drop_times=2, headers={"ETag": '"v1"'})
    with pytest.raises(DownloadError):
        download(Download(server.url("/m.bin"), target, http=Http(retry=Retry(attempts=1, base=0.01))))
    got = download(Download(server.url("/m.bin"), target, http=Http(retry=FAST)))  # unchanged: the resume goes through
    assert target.read_bytes() == DATA and got.resumed_from == len(DATA) // 2
    assert route.bytes_sent == len(DATA)  # half, then the other half


def test_a_partial_without_proof_starts_over(server: FileServer, tmp_path: Path) -> None:
    """No validator from the server and no sha256 known: nothing proves the bytes match, so no resume."""
    server.add("/m.bin", DATA, drop_at=0.5, drop_times=2)
    target = tmp_path / "m.bin"
    with pytest.raises(DownloadError):
        download(Download(server.url("/m.bin"), target, http=Http(retry=Retry(attempts=1, base=0.01))))
    got = download(Download(server.url("/m.bin"), target, http=Http(retry=FAST)))
    assert target.read_bytes() == DATA and got.resumed_from == 0
