"""Lock entries for the files the spec's features fetch (``provision.forge.first_use``'s table).

Each is a plain URL pinned as a URL model is: its size from the server at lock time, its sha256 from
the table when Forge's source gives one, else measured at its first download and written into the
lock (trust on first use). With ``features_mirror``, the file is fetched from
``<mirror>/<host>/<path of the URL>`` instead (a local copy of the hosts, for a closed network).
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from provision.errors import ForgeVolumeError
from provision.fetch.hub import probe_url
from provision.forge.first_use import FirstUseFile, expand
from provision.models.pool import parallel, raise_failures
from provision.progress import Progress
from provision.records.lockfile import FIRST_USE_KIND, LockedFirstUse

RESOLVE_POOL = 8


def source_for(url: str, mirror: str | None) -> str:
    """Where install fetches ``url`` from: the URL itself, or its copy under the mirror."""
    if not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


def _resolve(file: FirstUseFile, feature: str, mirror: str | None) -> LockedFirstUse:
    source = source_for(file.url, mirror)
    size = probe_url(source).size
    return LockedFirstUse(kind=FIRST_USE_KIND, name=file.name, source=source, path=file.path, sha256=file.sha256,
                          size=size, pinned_by="forge-volume" if file.sha256 else "first-download",
                          feature=feature, url=file.url)


def resolve_first_use(features: Sequence[str], mirror: str | None, previous: Sequence[LockedFirstUse],
                      progress: Progress, again: bool = False) -> tuple[list[LockedFirstUse], int]:
    """The lock's first-use entries for ``features``, and how many were resolved over the network.

    An entry of ``previous`` for the same file, URL, source and feature is kept as it is (its pinned
    sha256 included) unless ``again``."""
    old = {f.path: f for f in previous}
    wanted = expand(tuple(features))
    out: list[LockedFirstUse | None] = []
    todo: list[tuple[int, FirstUseFile, str]] = []
    for file, feature in wanted:
        kept = old.get(file.path)
        if not again and kept is not None and (kept.url, kept.source, kept.feature) == (
                file.url, source_for(file.url, mirror), feature):
            out.append(kept)
        else:
            todo.append((len(out), file, feature))
            out.append(None)
    if todo:
        bar = progress.bar(len(todo), "resolving the features' files", unit="file")

        def one(item: tuple[int, FirstUseFile, str]) -> LockedFirstUse:
            try:
                return _resolve(item[1], item[2], mirror)
            finally:
                bar.update(1)

        results = parallel(todo, one, RESOLVE_POOL)
        bar.close()
        raise_failures([(f.path, r) for (_, f, _), r in zip(todo, results, strict=True)
                        if isinstance(r, ForgeVolumeError)])
        for (i, _, _), r in zip(todo, results, strict=True):
            if isinstance(r, LockedFirstUse):
                out[i] = r
    return [f for f in out if f is not None], len(todo)
