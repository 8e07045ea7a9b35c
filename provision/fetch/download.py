"""Streaming, verified, resumable HTTP downloads into a final path, replaced in one rename.

Bytes go to a unique temporary sibling ``.<name>.<random>.part``; sha256 is computed while they
arrive (``provision.fetch.stream``); size and sha256 are checked; then one ``os.replace`` puts the file
in place. The final path therefore only ever holds
a complete, verified file, and a file already there is replaced only by a good one.

An interrupted download keeps its bytes under the stable name ``.<name>.partial`` for the next
attempt to claim (``provision.fetch.partials``); a token goes only where its ``Credential`` allows
(``provision.fetch.tokens``).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from provision import __version__
from provision.errors import AuthError, ChecksumError, DiskFullError, DownloadCancelled, DownloadError, NotFoundError
from provision.fetch import resume
from provision.fetch.cancel import Watchdog, connect_timeout, current_cancel, stall_timeout
from provision.fetch.netguard import AddressGuard, AddressRefused, Sockets
from provision.fetch.partials import claim, partial_path, sweep_leftovers
from provision.fetch.session import watch_session
from provision.fetch.sources import host_problem, shown_source
from provision.fetch.stream import OnBytes, Sink
from provision.fetch.tokens import Credential
from provision.fetch.trust import ca_bundle, not_trusted

TIMEOUT = (15.0, 60.0)  # (connect, between two reads) seconds; a download's connect: FORGE_DOWNLOAD_CONNECT_TIMEOUT
MAX_REDIRECTS = 10
RESERVE_MAX = 1 << 30  # a download of unknown size stops while min(1 GiB, 2 % of the volume) is still free
RESERVE_SHARE = 2
USER_AGENT = f"forge-volume/{__version__}"
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_TRANSIENT: tuple[type[BaseException], ...] = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.SSLError,
    ConnectionError, TimeoutError,
)


@dataclass(frozen=True)
class Retry:
    """Transient failures (timeouts, resets, 408/429/5xx) are retried with exponential backoff."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 20.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), self.cap)
        return min(self.base * (2 ** max(attempt - 1, 0)), self.cap)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int
    transferred: int  # bytes received over the network by this call (resumed bytes excluded)
    resumed_from: int  # bytes taken over from a kept partial


def display_url(url: str) -> str:
    """A URL fit for messages: no user info, every query value masked (signed URLs and tokens live there)."""
    return shown_source(url)


def _check_scheme(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"refusing to fetch {display_url(url)!r}: only http and https are allowed, not {scheme!r}",
                            "check the source URL (a redirect to another scheme is refused too)")
    host = urlsplit(url).hostname or ""
    if (problem := host_problem(host) if host else "is missing") is not None:  # a redirect's too
        raise DownloadError(f"refusing to fetch {display_url(url)!r}: its host {problem}",
                            "check the source URL (a redirect to such a host is refused too)")


def disk_reserve(folder: Path) -> int:
    """Free space a download of unknown size leaves on the volume: 2 % of it, at most 1 GiB."""
    return min(RESERVE_MAX, shutil.disk_usage(folder).total * RESERVE_SHARE // 100)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskFullError(f"{what} needs {needed:,} bytes but {folder} has {free:,} free")


def _status_error(resp: requests.Response, url: str, credential: Credential | None, what: str) -> DownloadError:
    where = display_url(url)
    status = resp.status_code
    if status in (401, 403):
        if credential is None:
            return AuthError(f"{what}: {where} answered {status} (it needs credentials)",
                             "use a public URL, or an hf:// or civitai:// source with its token variable set")
        if not credential.applies_to(url):
            return AuthError(f"{what}: {where} answered {status}",
                             "the link may have expired or need credentials forge-volume cannot send; retry later")
        if credential.token:
            return AuthError(f"{what}: {where} answered {status}: the token in {credential.env_name} was refused",
                             f"check {credential.env_name}: it must be valid and have access to this file "
                             "(gated models need their terms accepted)")
        return AuthError(f"{what}: {where} answered {status}: it needs a token",
                         f"set {credential.env_name} to a token with access to this file")
    if status in (404, 410):
        return NotFoundError(f"{what}: {where} answered {status} (the file is not there)")
    return DownloadError(f"{what}: {where} answered HTTP {status} {resp.reason or ''}".rstrip())


def _open(session: requests.Session, url: str, offset: int, credential: Credential | None,
          headers: dict[str, str], timeout: tuple[float, float]) -> requests.Response:
    """GET with manual redirects, so every hop's scheme is checked and a token only goes where it belongs.

    A guarded session's connections check their addresses (``provision.fetch.netguard``); a refusal says
    which URL (the one named, or a redirect's) it was for."""
    first_scheme = urlsplit(url).scheme.lower()
    origin = url
    for hop_number in range(MAX_REDIRECTS + 1):
        _check_scheme(url)
        hop = {"User-Agent": USER_AGENT, **headers, "Accept-Encoding": "identity"}
        if offset:
            hop["Range"] = f"bytes={offset}-"
        downgraded = first_scheme == "https" and urlsplit(url).scheme.lower() == "http"
        if credential and credential.token and credential.applies_to(url) and not downgraded:
            hop["Authorization"] = f"Bearer {credential.token}"
        try:
            resp = session.get(url, headers=hop, stream=True, timeout=timeout, allow_redirects=False,
                               verify=ca_bundle())
        except requests.exceptions.SSLError as exc:
            if refused := not_trusted(display_url(url), exc):
                raise refused from None
            raise
        except AddressRefused as exc:
            if hop_number:
                raise AddressRefused(f"refusing to follow a redirect from {display_url(origin)} to "
                                     f"{display_url(url)}: {exc.message}") from None
            raise AddressRefused(f"refusing to fetch {display_url(url)}: {exc.message}") from None
        if resp.is_redirect:
            url = urljoin(resp.url, resp.headers["Location"])
            resp.close()
            continue
        return resp
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects fetching {display_url(url)}")


def _content_range_start(resp: requests.Response) -> tuple[int, int | None] | None:
    value = resp.headers.get("Content-Range", "")
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-")[0])
        return (start, int(total) if total.strip().isdigit() else None) if unit == "bytes" else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Http:
    """How a download talks to its host: the credential, extra headers, timeouts, retries, the address guard
    and the cancel event (grouped as pip's ``Downloader`` and huggingface_hub's keyword arguments are).

    ``timeout`` is (connect, between two reads) in seconds; None: (``FORGE_DOWNLOAD_CONNECT_TIMEOUT`` or 15,
    60). ``guard`` fences every connection, redirects included, to the addresses a job may reach (for URLs a
    job named; see ``provision.fetch.netguard``). ``cancel`` (None: the ambient one, ``provision.fetch.cancel``)
    stops the download within a fraction of a second, a pending connect included."""

    credential: Credential | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: tuple[float, float] | None = None
    retry: Retry = Retry()
    guard: AddressGuard | None = None
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class Download:
    """One download: where from (``url``), where to (``target``), what the file must be (``sha256``, ``size``,
    each checked when given), how to talk HTTP (``http``), and the name messages give it (``what``: by
    default the target's file name)."""

    url: str
    target: Path
    sha256: str | None = None
    size: int | None = None
    http: Http = Http()
    what: str | None = None

    @property
    def label(self) -> str:
        return self.what or self.target.name


def download(job: Download, on_bytes: OnBytes | None = None) -> Downloaded:
    """Fetch ``job.url`` into ``job.target``: verified against its sha256/size when given, then renamed in place.

    ``on_bytes`` receives byte counts as they arrive (negative when a restart discards bytes). A cancel
    (``job.http.cancel``) stops it within a fraction of a second; so does receiving almost nothing for the
    stall timeout. A server without Content-Length is read only while a reserve of free space remains
    (``disk_reserve``). Attempts that bring no new bytes are bounded by ``job.http.retry.attempts``.
    Raises AuthError, NotFoundError, ChecksumError, DiskFullError or DownloadError; ``target`` is
    untouched unless the whole call succeeds.
    """
    _check_scheme(job.url)
    http = job.http
    job = replace(job, http=replace(http, timeout=http.timeout or (connect_timeout(), TIMEOUT[1]),
                                    cancel=http.cancel if http.cancel is not None else current_cancel()))
    if job.http.cancel is not None and job.http.cancel.is_set():  # no connection for work already cancelled
        raise DownloadCancelled(f"{job.label}: cancelled before it started")
    target = job.target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, held = claim(target)
    keep = False
    try:
        result = _download_into(job, tmp, on_bytes)
        os.replace(tmp, target)
        sweep_leftovers(target)  # e.g. an orphan of a killed run that was not the one resumed
        return result
    except (ChecksumError, DiskFullError, AuthError, NotFoundError):
        raise
    except (DownloadError, KeyboardInterrupt):
        keep = True  # transient failure or interrupt: the bytes so far are worth resuming from
        raise
    finally:
        try:
            if tmp.exists():
                if keep and tmp.stat().st_size > 0:
                    os.replace(tmp, partial_path(target))
                else:
                    tmp.unlink(missing_ok=True)
        finally:
            os.close(held)  # releases the flock: from here on a kept partial is anyone's to resume


def _download_into(job: Download, tmp: Path, on_bytes: OnBytes | None) -> Downloaded:
    offset = tmp.stat().st_size
    origin = resume.Origin(resume.source_id(job.url))
    if offset:
        with open(tmp, "rb") as probe:
            allowed, origin.validator = resume.may_resume(probe.fileno(), job.url, job.sha256)
        if not allowed or (job.size is not None and offset > job.size):
            offset = 0  # another source's, of unknown origin, or longer than the file: not ours to resume
            os.truncate(tmp, 0)
    if job.size is not None:
        check_free_space(job.target.parent, job.size - offset, job.label)
    stall = stall_timeout()
    sockets = Sockets()
    cancel = job.http.cancel
    with open(tmp, "r+b", buffering=0) as fh, requests.Session() as session:
        watch_session(session, job.http.guard, sockets)
        attempt = Sink(fh, job.target.parent, offset, on_bytes, cancel)
        attempt.origin = origin
        try:
            with Watchdog(lambda: attempt.transferred, sockets, cancel, stall) as watchdog:
                return _attempts(session, job, attempt, watchdog)
        finally:
            attempt.pipe.finish()  # stops its threads whatever happened


def _attempts(session: requests.Session, job: Download, attempt: Sink, watchdog: Watchdog) -> Downloaded:
    label = job.label
    failures = 0
    best = attempt.written  # only bytes past the furthest point ever reached count as progress
    fresh_retry_done = False
    while True:
        try:
            _one_request(session, job, attempt)
        except _Transient as exc:
            watchdog.check(label, attempt.written)  # a cancel or a stall cut the connection: say so
            if attempt.written > best:
                best, failures = attempt.written, 0
            else:  # a 416, an unexpected range or a restart brings nothing new, however often it happens
                failures += 1
            if failures >= job.http.retry.attempts:
                raise DownloadError(f"{label}: giving up after {failures} attempts without new bytes: {exc}") from None
            _backoff(attempt, job.http.retry.delay(failures, exc.retry_after), watchdog, label)
            continue
        watchdog.check(label, attempt.written)  # a cut connection can look like the end of a body
        # No fsync before the rename, like huggingface_hub and curl: forcing a GB to disk would
        # bound the download by the disk's sync speed. A file torn by a host crash is caught by
        # its size (ext4's ordered mode and NFS's close-to-open never expose unwritten blocks
        # as data) and, in any case, by `verify --deep`.
        digest = attempt.digest()
        problem = _mismatch(attempt.written, digest, job.size, job.sha256)
        if problem is None:
            return Downloaded(job.target, digest, attempt.written, attempt.transferred, attempt.resumed_from)
        if attempt.resumed_from and not fresh_retry_done:
            # A kept partial may have come from an older version of the file: one clean retry.
            fresh_retry_done = True
            attempt.restart()
            continue
        raise ChecksumError(f"{label}: {problem}")


def _backoff(attempt: Sink, seconds: float, watchdog: Watchdog, label: str) -> None:
    """Wait before the next attempt in short slices, reporting 0 bytes each time: a cancel (through
    ``on_bytes`` or the cancel event) or a stall stops a download waiting out its retries at once."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if attempt.on_bytes is not None:
            attempt.on_bytes(0)
        watchdog.check(label, attempt.written)
        time.sleep(min(left, 0.1))


def _mismatch(written: int, digest: str, size: int | None, sha256: str | None) -> str | None:
    if size is not None and written != size:
        return f"got {written:,} bytes but expected {size:,}"
    if sha256 is not None and digest != sha256.lower():
        return f"sha256 is {digest} but expected {sha256.lower()}"
    return None


class _Transient(Exception):
    def __init__(self, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _one_request(session: requests.Session, job: Download, attempt: Sink) -> None:
    url, size, label, credential = job.url, job.size, job.label, job.http.credential
    offset = attempt.written
    if size is not None and offset == size:
        return  # the kept partial is already whole; only verification remains
    try:
        headers = dict(job.http.headers)
        validator = attempt.origin.validator if attempt.origin is not None else None
        if offset and validator:  # the server proves the file is the one our bytes came from, or sends it all
            headers["If-Range"] = validator
        resp = _open(session, url, offset, credential, headers, job.http.timeout or TIMEOUT)
    except _TRANSIENT as exc:
        raise _Transient(f"{type(exc).__name__} connecting to {display_url(url)}") from None
    with resp:
        status = resp.status_code
        if status in _RETRY_STATUS:
            raise _Transient(f"{display_url(url)} answered HTTP {status}", resp.headers.get("Retry-After"))
        if status == 416 and offset:
            attempt.restart()  # our partial does not fit the server's file: start again cleanly
            raise _Transient(f"{display_url(url)} refused the resume range")
        if status not in (200, 206):
            raise _status_error(resp, resp.url, credential, label)
        if status == 206:
            span = _content_range_start(resp)
            if span is None or span[0] != offset:
                attempt.restart()
                raise _Transient(f"{display_url(url)} sent an unexpected range")
            total = span[1]
        else:
            if offset:
                attempt.restart()  # the server ignored Range, or If-Range said the file changed: start over
            attempt.origin.validator = resume.validator_of(resp.headers)
            attempt.origin.write(attempt.fh.fileno())  # before any byte: a killed run's temporary carries it
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{label}: the server has {total:,} bytes but {size:,} were expected")
        if size is None and total is not None:
            check_free_space(attempt.folder, total - attempt.written, label)
        try:
            attempt.pump(resp, label, reserve=disk_reserve(attempt.folder) if total is None else None)
        except _TRANSIENT as exc:
            raise _Transient(f"connection lost after {attempt.written:,} bytes ({type(exc).__name__})") from None
        if total is not None and attempt.written < total:
            raise _Transient(f"connection closed after {attempt.written:,} of {total:,} bytes")
