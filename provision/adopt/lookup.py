"""Finding where an adopted file came from, by its sha256, in a public index that answers by hash.

Civitai's API does (``GET /model-versions/by-hash/<sha256>``): a file it knows gets the download URL of
that very file as its source (pinned by the sha256, so another volume gets the same bytes). Every other
file is recorded with no source (``source = "volume"``). The index is a parameter (``HashIndex``), so
tests drive it against a loopback stand-in; ``CIVITAI_API_BASE`` points the real one elsewhere.

Offline, it must not hold adopt up: one request at a time with short timeouts, all of them within a
deadline, and the first failure to reach the index ends the lookups (with a note saying so).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import requests

from provision.errors import ForgeVolumeError, SourceError
from provision.fetch.download import USER_AGENT
from provision.fetch.hub import civitai_api_base, civitai_credential
from provision.fetch.sources import CivitaiSource, UrlSource, parse_source, shown_source
from provision.fetch.trust import ca_bundle, untrusted_certificate

TIMEOUT = (3.0, 10.0)  # connect, read
DEADLINE = 60.0  # seconds for all lookups together


class Unreachable(Exception):
    """The index did not answer (offline, refused, timed out, an error status)."""


class HashIndex(Protocol):
    name: str

    def find(self, sha256: str) -> str | None:
        """A source for the file with this sha256, None when the index does not know it; Unreachable."""


@dataclass
class Civitai:
    base: str = field(default_factory=civitai_api_base)
    name: str = "Civitai's by-hash API"

    def find(self, sha256: str) -> str | None:
        url = f"{self.base}/model-versions/by-hash/{sha256}"
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        cred = civitai_credential()
        if cred.token and cred.applies_to(url):
            headers["Authorization"] = f"Bearer {cred.token}"
        try:
            resp = requests.get(url, headers=headers, timeout=TIMEOUT, allow_redirects=False, verify=ca_bundle())
        except requests.RequestException as exc:
            why = untrusted_certificate(exc)
            raise Unreachable(f"its certificate is not trusted ({why})" if why else type(exc).__name__) from None
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise Unreachable(f"HTTP {resp.status_code}")
        try:
            data = resp.json()
        except ValueError:
            raise Unreachable("an answer that is not JSON") from None
        return _source(data, sha256) if isinstance(data, dict) else None


def _source(data: dict[str, object], sha256: str) -> str | None:
    """The matching file's download URL, else the model version; None when the answer names neither."""
    files = data.get("files")
    for f in files if isinstance(files, list) else []:
        hashes = f.get("hashes") if isinstance(f, dict) else None
        if isinstance(hashes, dict) and str(hashes.get("SHA256", "")).lower() == sha256:
            url = f.get("downloadUrl")
            if isinstance(url, str):
                try:
                    if isinstance(parse_source(url), UrlSource) and url.startswith("https://"):
                        return url
                except SourceError:
                    pass
    version = data.get("id")
    if isinstance(version, int) and not isinstance(version, bool) and version > 0:
        return str(CivitaiSource(str(version)))
    return None


@dataclass
class HfRepos:
    """The Hugging Face repositories the user named (``--hf-repo``): one listing each (the hub gives every LFS
    file's sha256), then a file matches by hash. Sources are pinned at the commit listed."""

    repos: tuple[str, ...]
    name: str = "the named Hugging Face repositories"
    _by_hash: dict[str, str] | None = None

    def find(self, sha256: str) -> str | None:
        if self._by_hash is None:
            from provision.fetch.hub import list_hf_repo  # huggingface_hub: only when repos are named

            found: dict[str, str] = {}
            for repo in self.repos:
                try:
                    commit, entries = list_hf_repo(repo, None)
                except ForgeVolumeError as exc:
                    raise Unreachable(f"hf://{repo}: {exc.message}") from None
                for entry in entries:
                    if entry.sha256:
                        found.setdefault(entry.sha256.lower(), f"hf://{repo}/{entry.path}@{commit}")
            self._by_hash = found
        return self._by_hash.get(sha256)


@dataclass
class Found:
    sources: dict[str, str] = field(default_factory=dict)  # sha256 -> source
    notes: list[str] = field(default_factory=list)


def look_up(hashes: Iterable[str], indexes: Iterable[HashIndex], deadline: float = DEADLINE) -> Found:
    """Ask each index in turn for the hashes no earlier one named."""
    out = Found()
    for index in indexes:
        found = _look_up([h for h in dict.fromkeys(hashes) if h not in out.sources], index, deadline)
        out.sources.update(found.sources)
        out.notes += found.notes
    return out


def _look_up(todo: list[str], index: HashIndex, deadline: float) -> Found:
    """Ask ``index`` for each hash until it fails or the deadline passes; say what was skipped."""
    out = Found()
    if not todo:
        return out
    ends = time.monotonic() + deadline
    for i, sha in enumerate(todo):
        if time.monotonic() > ends:
            out.notes.append(f"{index.name}: stopped after {deadline:g} s; {len(todo) - i} file(s) not looked up "
                             "are recorded with no source")
            break
        try:
            source = index.find(sha)
        except Unreachable as exc:
            out.notes.append(f"{index.name} did not answer ({exc}); {len(todo) - i} file(s) not looked up are "
                             "recorded with no source (give one later: edit its `source` in the spec, then "
                             "`forge-volume lock`)")
            break
        if source is not None:
            out.sources[sha] = source
    if out.sources:
        out.notes.append(f"{index.name} named the source of {len(out.sources)} file(s): "
                         + ", ".join(sorted(shown_source(s) for s in out.sources.values())[:5])
                         + (" ..." if len(out.sources) > 5 else ""))
    return out
