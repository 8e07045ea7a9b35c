"""Model source strings: ``hf://OWNER/REPO/PATH[@REVISION]``, ``https://...``, ``http://...``, ``civitai://ID``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

from provision.errors import SourceError

ACCEPTED_FORMS = "hf://OWNER/REPO/PATH[@REVISION], https://..., http://..., civitai://MODEL_VERSION_ID"
_SECRET_PARAM = re.compile(r"token|key|sig|secret|pass|auth|cred", re.IGNORECASE)


def shown_source(text: str) -> str:
    """A source fit for messages, state.json and job results: a URL loses its ``user:password@`` and the
    values of query parameters that look like credentials (``token=``, ``api_key=``, ``X-Amz-Signature=``...).
    The lock keeps the source as written: it is what the download needs."""
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        return text
    query = "&".join(f"{p.partition('=')[0]}=***" if _SECRET_PARAM.search(p.partition("=")[0]) else p
                     for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query))


@dataclass(frozen=True)
class HfSource:
    repo_id: str
    filename: str
    revision: str | None = None

    @property
    def default_name(self) -> str:
        return PurePosixPath(self.filename).name

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}/{self.filename}{rev}"


@dataclass(frozen=True)
class UrlSource:
    url: str

    @property
    def default_name(self) -> str | None:
        name = PurePosixPath(unquote(urlsplit(self.url).path)).name
        return name or None

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class CivitaiSource:
    version_id: str

    @property
    def default_name(self) -> None:
        return None  # known only once civitai's API (or the download) names it

    def __str__(self) -> str:
        return f"civitai://{self.version_id}"


Source = HfSource | UrlSource | CivitaiSource


def parse_source(text: str) -> Source:
    """Parse a source string, or raise SourceError naming the accepted forms."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise SourceError(f"model source {text!r} has no scheme; accepted forms: {ACCEPTED_FORMS}")
    if scheme == "hf":
        body, at, revision = rest.rpartition("@")
        if not at or "/" in revision:
            body, revision = rest, ""
        parts = [p for p in body.split("/")]
        if len(parts) < 3 or not all(parts):
            raise SourceError(f"hf source {text!r} must be hf://OWNER/REPO/PATH[@REVISION]")
        return HfSource(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), revision=revision or None)
    if scheme in ("http", "https"):
        if not urlsplit(text).netloc:
            raise SourceError(f"URL source {text!r} has no host")
        return UrlSource(text)
    if scheme == "civitai":
        if not rest.isdigit():
            raise SourceError(f"civitai source {text!r} must be civitai://MODEL_VERSION_ID (digits)")
        return CivitaiSource(rest)
    raise SourceError(f"model source {text!r} has unsupported scheme {scheme!r}; accepted forms: {ACCEPTED_FORMS}")
