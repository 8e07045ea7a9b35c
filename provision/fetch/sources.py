"""Model source strings: ``hf://OWNER/REPO/PATH[@REVISION]``, ``https://...``, ``http://...``, ``civitai://ID``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

import idna

from provision.errors import SourceError

ACCEPTED_FORMS = "hf://OWNER/REPO/PATH[@REVISION], https://..., http://..., civitai://MODEL_VERSION_ID"
_SLASHES = re.compile(r"([/\\]+)")  # slashes and backslashes alike, as lenient URL parsers read them
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_REPO_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def _masked_params(text: str) -> str:
    """Each ``key=value`` as ``key=***`` and each bare item as ``***``: any value may be a credential."""
    return "&".join(f"{p.partition('=')[0]}=***" if "=" in p else ("***" if p else "") for p in text.split("&"))


def _query_start(text: str) -> int:
    """Where the query or fragment begins (the first ``?`` or ``#``), or the length of ``text``."""
    return min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))


def _without_userinfo(text: str) -> str:
    """Drop ``user:password@`` wherever a parser could read an authority: the first segment, the one after
    a scheme (``x:``, however many slashes follow), and any segment after ``//``."""
    end = _query_start(text)
    parts = _SLASHES.split(text[:end])  # segments at even indexes, separators at odd ones
    filled = [i for i in range(0, len(parts), 2) if parts[i]]
    authorities = set(filled[:1])
    if len(filled) > 1 and parts[filled[0]].endswith(":"):
        authorities.add(filled[1])
    authorities |= {i for i in range(2, len(parts), 2) if len(parts[i - 1]) > 1}
    for i in authorities:
        parts[i] = parts[i].rpartition("@")[2]
    return "".join(parts) + text[end:]


def shown_source(text: str) -> str:
    """A source fit for messages, state.json and job results: a URL loses its ``user:password@`` and every
    query value (and fragment) is masked, whatever the parameter's name (``?token=``, ``?X-Amz-Signature=``,
    ``?access=``...). Any string is accepted, well-formed or not: malformed sources are shown this way too.
    The lock keeps the source as written: it is what the download needs."""
    text = _without_userinfo(text)
    end = _query_start(text)
    head, rest = text[:end], text[end:]
    query, hashmark, fragment = rest[1:].partition("#") if rest.startswith("?") else ("", rest[:1], rest[1:])
    shown = head + ("?" + _masked_params(query) if rest.startswith("?") else "")
    return shown + hashmark + ("***" if fragment else "")


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


@dataclass(frozen=True)
class VolumeSource:
    """No known source: a file ``forge-volume adopt`` found on the volume and no index could name.

    It is kept and verified by its sha256, never deleted and never downloaded: the volume holds the only
    copy forge-volume knows of, so it cannot be rebuilt elsewhere."""

    @property
    def default_name(self) -> None:
        return None  # the spec names it

    def __str__(self) -> str:
        return VOLUME_SOURCE


VOLUME_SOURCE = "volume"
Source = HfSource | UrlSource | CivitaiSource | VolumeSource


def host_problem(host: str) -> str | None:
    """Why ``host`` (as urlsplit gives it) cannot name a server, or None: what requests and urllib3 would
    otherwise raise as InvalidURL deep in a request (a full-width or zero-width character, an empty label)."""
    if ":" in host:  # an IPv6 literal; urlsplit dropped its brackets
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return "is not a valid IPv6 address"
        return None
    name = host[:-1] if host.endswith(".") else host
    if not name.isascii():
        try:  # as urllib3 encodes it (strict IDNA 2008, no mapping: a full-width 'localhost' is not localhost)
            name = idna.encode(name.lower(), strict=True, std3_rules=True).decode("ascii")
            idna.encode(host, uts46=True)  # and as requests checks it first
        except (idna.IDNAError, UnicodeError, ValueError):
            return "is not a valid host name (a character no domain name may hold, such as a full-width or " \
                   "zero-width one)"
    labels = name.split(".")
    if len(name) > 253 or any(not label or len(label) > 63 for label in labels):
        return "is not a valid host name (an empty label, or one over 63 characters)"
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return "is not a valid host name (a label begins or ends with '-')"
    return None


def _check_url(text: str) -> None:
    """An http(s) source must be a URL requests can fetch: a host, a port in range, no spaces or controls."""
    shown = shown_source(text)
    if _CONTROL.search(text):
        raise SourceError(f"URL source {shown!r} holds a space or a control character",
                          "percent-encode spaces (%20) and control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        reason = "its port is not a number from 1 to 65535" if "port" in str(exc).lower() else "it is malformed"
        raise SourceError(f"URL source {shown!r} cannot be fetched: {reason}") from None
    if not parts.hostname:
        raise SourceError(f"URL source {shown!r} has no host")
    if (problem := host_problem(parts.hostname)) is not None:
        raise SourceError(f"URL source {shown!r} cannot be fetched: its host {problem}",
                          "check the host name in the URL (copy it again from the address bar)")
    if port == 0:
        raise SourceError(f"URL source {shown!r} cannot be fetched: its port is not a number from 1 to 65535")


def parse_source(text: str) -> Source:
    """Parse a source string, or raise SourceError naming the accepted forms (never echoing a credential)."""
    if text == VOLUME_SOURCE:
        return VolumeSource()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise SourceError(f"model source {shown_source(text)!r} has no scheme; accepted forms: {ACCEPTED_FORMS}")
    if scheme == "hf":
        body, at, revision = rest.rpartition("@")
        if not at or "/" in revision:
            body, revision = rest, ""
        parts = [p for p in body.split("/")]
        if len(parts) < 3 or not all(parts):
            raise SourceError(f"hf source {shown_source(text)!r} must be hf://OWNER/REPO/PATH[@REVISION]")
        return HfSource(repo_id=check_repo_id("/".join(parts[:2])), filename="/".join(parts[2:]),
                        revision=revision or None)
    if scheme in ("http", "https"):
        _check_url(text)
        return UrlSource(text)
    if scheme == "civitai":
        if not rest.isdigit():
            raise SourceError(f"civitai source {shown_source(text)!r} must be civitai://MODEL_VERSION_ID (digits)")
        return CivitaiSource(rest)
    raise SourceError(f"model source {shown_source(text)!r} has unsupported scheme {shown_source(scheme)!r}; "
                      f"accepted forms: {ACCEPTED_FORMS}")


def check_repo_id(repo_id: str) -> str:
    """A Hugging Face repository id, OWNER/NAME, by the hub's own rules (checked before any request)."""
    if (not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id
            or any(part.endswith((".", "-")) for part in repo_id.split("/")) or repo_id.endswith(".git")):
        # Text before an '@' may be credentials pasted into a source (hf://TOKEN@owner/name): never echoed.
        shown = "***@" + repo_id.rpartition("@")[2] if "@" in repo_id else repo_id
        raise SourceError(f"{shown[:100]!r} is not a Hugging Face repository id",
                          "give it as OWNER/NAME, as on the repository's page: letters, digits, '-', '_' and '.'")
    return repo_id
