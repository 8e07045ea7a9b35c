"""Model hosts: Hugging Face (through huggingface_hub's API) and civitai (its REST API).

Each source becomes a ``RemoteFile``: the URL to fetch, what the host says its sha256 and size are,
the revision it was resolved at, and the credential allowed to go with it. The bytes themselves go
through ``provision.fetch.download`` for every host, so every model gets the same guarantees (sha256
while streaming, resume from a kept partial, one rename of a verified file).

``HF_ENDPOINT`` is read at each call (huggingface_hub reads it once, at import), so a mirror or a
test's fake hub set later is honoured; ``HF_TOKEN`` (or a token passed by the caller, or the one
saved by ``hf auth login``) is sent only to the hub's own hosts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests

from provision.errors import AuthError, DownloadError, NoSourceError, NotFoundError
from provision.fetch.download import TIMEOUT, USER_AGENT, display_url
from provision.fetch.names import disposition_name
from provision.fetch.sources import CivitaiSource, HfSource, Source, UrlSource, VolumeSource
from provision.fetch.tokens import Credential, clean_token, origin_of
from provision.fetch.trust import ca_bundle, not_trusted, trust_for_hub

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
CIVITAI_DEFAULT_API = "https://civitai.com/api/v1"
API_TIMEOUT = 30.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")
Tokens = Mapping[str, str]


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: str | None
    size: int | None
    name: str | None = None
    revision: str | None = None
    credential: Credential | None = None


@dataclass(frozen=True)
class HfEntry:
    path: str
    size: int | None
    sha256: str | None  # LFS files only
    blob_id: str | None  # git blob sha1 (for files kept in git rather than LFS)


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def _given(tokens: Tokens | None, name: str, *keys: str) -> str | None:
    """A token a caller passed (e.g. from a job payload), under its variable name or its short name."""
    return next((clean_token(tokens[k], name) for k in (name, *keys) if tokens and tokens.get(k)), None)


def _hf_token(tokens: Tokens | None) -> str | None:
    if given := _given(tokens, "HF_TOKEN", "hf"):
        return given
    from huggingface_hub import get_token

    # HF_TOKEN from the environment, else the token saved by `hf auth login`
    return clean_token(os.environ.get("HF_TOKEN"), "HF_TOKEN") or clean_token(get_token(), "HF_TOKEN")


def hf_credential(tokens: Tokens | None = None) -> Credential:
    """HF_TOKEN goes to huggingface.co and hf.co over https, and to HF_ENDPOINT's own origin."""
    return Credential("HF_TOKEN", ("huggingface.co", "hf.co"), _hf_token(tokens), (origin_of(hf_endpoint()),))


def civitai_api_base() -> str:
    return (os.environ.get("CIVITAI_API_BASE") or CIVITAI_DEFAULT_API).rstrip("/")


def civitai_credential(tokens: Tokens | None = None) -> Credential:
    token = _given(tokens, "CIVITAI_TOKEN", "civitai") or clean_token(os.environ.get("CIVITAI_TOKEN"), "CIVITAI_TOKEN")
    return Credential("CIVITAI_TOKEN", ("civitai.com",), token, (origin_of(civitai_api_base()),))


def url_credential(url: str, tokens: Tokens | None = None) -> Credential | None:
    """A plain URL on civitai or the hub gets that host's token; any other host gets none."""
    for make in (civitai_credential, hf_credential):
        cred = make(tokens)
        if cred.applies_to(url):
            return cred
    return None


def hf_file_url(repo_id: str, filename: str, revision: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision, endpoint=hf_endpoint())


def _hub_call(what: str, call: Callable[[], T], token_set: bool) -> T:
    """Run one huggingface_hub call, turning its errors into forge-volume's."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    trust_for_hub()
    try:
        return call()
    except GatedRepoError:
        raise AuthError(f"{what}: the repository is gated",
                        "accept its terms on the model page and set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else 404
        if status in (401, 403) and not token_set:
            raise AuthError(f"{what}: repository not found, or private and HF_TOKEN is not set",
                            "check the repo id; for a private repo set HF_TOKEN") from None
        if status in (401, 403):
            raise AuthError(f"{what}: repository not found, or the token in HF_TOKEN has no access to it",
                            "check the repo id, and that HF_TOKEN is a valid token with read access") from None
        raise NotFoundError(f"{what}: repository not found (HTTP {status})", "check the repo id") from None
    except RevisionNotFoundError:
        raise NotFoundError(f"{what}: no such revision (branch, tag or commit)") from None
    except EntryNotFoundError:
        raise NotFoundError(f"{what}: no such file in the repository") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise AuthError(f"{what}: the hub answered {status}",
                            "set HF_TOKEN to a valid token with access to this repository") from None
        raise DownloadError(f"{what}: the hub answered HTTP {status}") from None
    except FileMetadataError as exc:
        raise DownloadError(f"{what}: {hf_endpoint()} did not answer like a Hugging Face hub ({exc})".split("\n")[0],
                            "check HF_ENDPOINT, proxies and the network") from None
    except (httpx2.HTTPError, OSError) as exc:
        if refused := not_trusted(f"{what}: {hf_endpoint()}", exc):
            raise refused from None
        raise DownloadError(f"{what}: cannot reach {hf_endpoint()} ({type(exc).__name__})",
                            "check the network (and HF_ENDPOINT if you use a mirror), then re-run") from None


def resolve_hf(source: HfSource, tokens: Tokens | None = None) -> RemoteFile:
    """The file at the source's revision (default: main): commit, sha256 (LFS files) and size, from one HEAD."""
    from huggingface_hub import get_hf_file_metadata

    cred = hf_credential(tokens)
    url = hf_file_url(source.repo_id, source.filename, source.revision or "main")
    token = cred.token if cred.applies_to(url) else None
    meta = _hub_call(str(source), lambda: get_hf_file_metadata(
        url, token=token or False, timeout=API_TIMEOUT, endpoint=hf_endpoint(), retry_on_errors=True,
    ), bool(token))
    etag = (meta.etag or "").lower()
    commit = meta.commit_hash or source.revision
    return RemoteFile(
        url=hf_file_url(source.repo_id, source.filename, commit or "main"),
        sha256=etag if _SHA256.match(etag) else None,  # a git sha1 etag (non-LFS file) is no sha256
        size=meta.size, name=source.default_name, revision=commit, credential=cred,
    )


def list_hf_repo(repo_id: str, revision: str | None, tokens: Tokens | None = None) -> tuple[str, list[HfEntry]]:
    """Every file of a model repo at a revision, with the commit it resolved to (one API call)."""
    from huggingface_hub import HfApi

    cred = hf_credential(tokens)
    api = HfApi(endpoint=hf_endpoint())
    token = cred.token if cred.applies_to(hf_endpoint()) else None
    info = _hub_call(f"hf://{repo_id}", lambda: api.model_info(
        repo_id, revision=revision, files_metadata=True, timeout=API_TIMEOUT, token=token or False,
    ), bool(token))
    if not info.sha:
        raise DownloadError(f"hf://{repo_id}: the hub did not say which commit {revision or 'main'} is")
    entries = [HfEntry(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id) for s in info.siblings or []]
    return info.sha, entries


def _civitai_get(url: str, cred: Credential, what: str) -> Any:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if cred.token and cred.applies_to(url):
        headers["Authorization"] = f"Bearer {cred.token}"
    try:
        resp = requests.get(url, headers=headers, timeout=(TIMEOUT[0], API_TIMEOUT), verify=ca_bundle())
    except requests.RequestException as exc:
        if refused := not_trusted(f"{what}: {display_url(url)}", exc):
            raise refused from None
        raise DownloadError(f"{what}: cannot reach {display_url(url)} ({type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        raise AuthError(f"{what}: civitai answered {resp.status_code}",
                        "set CIVITAI_TOKEN to a valid civitai API key (needed for early-access or gated models)")
    if resp.status_code == 404:
        raise NotFoundError(f"{what}: civitai has no such model version")
    if resp.status_code != 200:
        raise DownloadError(f"{what}: civitai answered HTTP {resp.status_code}")
    try:
        return resp.json()
    except ValueError:
        raise DownloadError(f"{what}: civitai's answer is not JSON") from None


def resolve_civitai(source: CivitaiSource, tokens: Tokens | None = None) -> RemoteFile:
    """Name, size, sha256 and download URL of a model version's primary file, from civitai's API."""
    cred = civitai_credential(tokens)
    what = str(source)
    data = _civitai_get(f"{civitai_api_base()}/model-versions/{source.version_id}", cred, what)
    files = [f for f in (data.get("files") or []) if isinstance(f, dict)]
    if not files:
        raise NotFoundError(f"{what}: the model version lists no files")
    chosen = next((f for f in files if f.get("primary")), files[0])
    sha = str((chosen.get("hashes") or {}).get("SHA256") or "").lower() or None
    size_kb = chosen.get("sizeKB")
    url = chosen.get("downloadUrl") or data.get("downloadUrl")
    if not url or not chosen.get("name"):
        raise DownloadError(f"{what}: civitai's answer has no file name or download URL")
    return RemoteFile(url=url, sha256=sha if sha and _SHA256.match(sha) else None,
                      size=round(float(size_kb) * 1024) if size_kb is not None else None,
                      name=str(chosen["name"]), revision=None, credential=cred)


@dataclass(frozen=True)
class Announced:
    """What a server says about a URL's file before sending it: its size and the name it gives it."""

    size: int | None
    name: str | None  # from Content-Disposition, unchecked (a server's word: check it before use)


def _announced_size(resp: requests.Response) -> int | None:
    total = resp.headers.get("Content-Range", "").rpartition("/")[2].strip()
    if resp.status_code in (206, 416) and total.isdigit():
        return int(total)
    length = resp.headers.get("Content-Length", "")
    return int(length) if resp.status_code == 200 and length.isdigit() else None


def probe_url(url: str, tokens: Tokens | None = None) -> Announced:
    """Size and Content-Disposition name of a URL's file, redirects followed, without its bytes.

    A GET of the first byte (``Range: bytes=0-0``), not a HEAD: the signed storage URLs that
    civitai and others redirect to are signed for GET only, and answer a HEAD with 403.
    """
    cred = url_credential(url, tokens)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Range": "bytes=0-0"}
    first_scheme = urlsplit(url).scheme.lower()
    try:
        with requests.Session() as session:
            for _ in range(10):
                hop = dict(headers)
                downgraded = first_scheme == "https" and urlsplit(url).scheme.lower() == "http"
                if cred and cred.token and cred.applies_to(url) and not downgraded:
                    hop["Authorization"] = f"Bearer {cred.token}"
                with session.get(url, headers=hop, timeout=(TIMEOUT[0], API_TIMEOUT), allow_redirects=False,
                                 stream=True, verify=ca_bundle()) as resp:  # closed unread: only the headers are wanted
                    if not resp.is_redirect:
                        break
                url = requests.compat.urljoin(resp.url, resp.headers["Location"])
                if urlsplit(url).scheme not in ("http", "https"):
                    return Announced(None, None)
    except requests.RequestException as exc:
        if refused := not_trusted(display_url(url), exc):
            raise refused from None
        raise DownloadError(f"{display_url(url)}: cannot reach the server ({type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        name = cred.env_name if cred else None
        raise AuthError(f"{display_url(url)} answered {resp.status_code}",
                        f"set {name} to a token with access" if name else "use a URL that needs no credentials")
    if resp.status_code in (404, 410):
        raise NotFoundError(f"{display_url(url)} answered {resp.status_code} (the file is not there)")
    ok = resp.status_code in (200, 206)
    return Announced(_announced_size(resp), disposition_name(resp.headers.get("Content-Disposition")) if ok else None)


def remote_for(source: Source, *, revision: str | None = None, tokens: Tokens | None = None) -> RemoteFile:
    """Where to fetch a source's bytes; ``revision`` pins an hf:// file to the locked commit (no network)."""
    if isinstance(source, HfSource):
        if revision:
            return RemoteFile(url=hf_file_url(source.repo_id, source.filename, revision), sha256=None, size=None,
                              name=source.default_name, revision=revision, credential=hf_credential(tokens))
        return resolve_hf(source, tokens)
    if isinstance(source, CivitaiSource):
        return resolve_civitai(source, tokens)
    if isinstance(source, VolumeSource):
        raise NoSourceError("a model with source \"volume\" has no known source: it cannot be downloaded")
    assert isinstance(source, UrlSource)
    return RemoteFile(url=source.url, sha256=None, size=None, name=source.default_name,
                      credential=url_credential(source.url, tokens))
