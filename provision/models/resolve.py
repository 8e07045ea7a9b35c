"""Resolve the spec's models into lock entries: hf:// to a revision, sha256 and size; civitai from its API;
URLs from the spec or the server, which also names a file the URL's path does not (``Content-Disposition``).
A URL without a published checksum is pinned at its first download (trust on first use)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from provision.errors import ChecksumError, ForgeVolumeError, SourceError
from provision.fetch.hub import RemoteFile, probe_url, remote_for
from provision.fetch.names import check_server_name, unlisted_warning, url_path_name
from provision.fetch.sources import CivitaiSource, HfSource, VolumeSource, shown_source
from provision.models.pool import parallel, raise_failures
from provision.progress import Progress
from provision.records.lockfile import LockedModel
from provision.records.spec import ModelSpec
from volume_layout import LayoutError, VolumeLayout

RESOLVE_POOL = 8
_DUMMY = VolumeLayout(Path("/volume"))


def relative_model_path(kind: str, name: str) -> str:
    """A model's path relative to the volume root, e.g. ``models/Lora/x.safetensors``."""
    return _DUMMY.relative(_DUMMY.model_path(kind, name))


# --- lock ------------------------------------------------------------------------------------------

@dataclass
class ResolvedModels:
    models: list[LockedModel]
    warnings: list[str] = field(default_factory=list)


def _url_remote(spec: ModelSpec, url: str) -> RemoteFile:
    """A plain URL: size from the spec or the server; the name from the spec (or the URL's path, when it
    ends in a model file name), else from the server's Content-Disposition, else the path's last segment."""
    if spec.size is not None and spec.name:
        return RemoteFile(url, None, spec.size, name=spec.name)
    announced = probe_url(url)
    return RemoteFile(url, None, spec.size if spec.size is not None else announced.size,
                      name=spec.name or announced.name or url_path_name(url))


def _resolve_one(spec: ModelSpec) -> LockedModel:
    source = spec.source
    if isinstance(source, HfSource):
        remote = remote_for(source)
        pinned_by = "hub" if remote.sha256 else ("spec" if spec.sha256 else "first-download")
        return _locked(spec, remote, pinned_by)
    if isinstance(source, CivitaiSource):
        return _locked(spec, remote_for(source), "server")
    if isinstance(source, VolumeSource):  # kept on the volume: the spec's sha256 is the pin, nothing to ask
        return _locked(spec, RemoteFile("", None, spec.size, name=spec.name), "volume")
    return _locked(spec, _url_remote(spec, source.url), "spec" if spec.sha256 else "first-download")


def _locked(spec: ModelSpec, remote: RemoteFile, pinned_by: str) -> LockedModel:
    shown = shown_source(str(spec.source))
    if spec.sha256 and remote.sha256 and spec.sha256 != remote.sha256:
        raise ChecksumError(f"{shown}: the spec pins sha256 {spec.sha256} but the host says {remote.sha256}")
    if spec.size is not None and remote.size is not None and spec.size != remote.size:
        raise ChecksumError(f"{shown}: the spec says {spec.size:,} bytes but the host says {remote.size:,}")
    name = spec.name or remote.name or spec.source.default_name
    if not name:
        raise SourceError(f"{shown}: cannot tell the file name", "add `name = \"...\"` to the model in the spec")
    try:
        if not spec.name:  # named by the host (an API, a Content-Disposition header): hostile input
            check_server_name(name)
        path = relative_model_path(spec.kind, name)
    except LayoutError as exc:
        raise SourceError(f"{shown}: the file name {name[:80]!r} {'' if spec.name else 'the host gives '}"
                          f"cannot be used: {exc}", "add `name = \"...\"` to the model in the spec") from None
    return LockedModel(kind=spec.kind, name=name, source=str(spec.source), path=path,
                       sha256=spec.sha256 or remote.sha256, size=spec.size if spec.size is not None else remote.size,
                       revision=remote.revision, pinned_by=pinned_by)


def resolve_models(models: Sequence[ModelSpec], progress: Progress) -> ResolvedModels:
    """Pin every model: hf:// to revision, sha256 and size; civitai from its API; URLs from the spec or the
    server. Warns about names Forge would not list."""
    bar = progress.bar(len(models), "resolving models", unit="model")

    def one(spec: ModelSpec) -> LockedModel:
        try:
            return _resolve_one(spec)
        finally:
            bar.update(1)

    results = parallel(models, one, RESOLVE_POOL)
    bar.close()
    raise_failures([(shown_source(str(m.source)), r) for m, r in zip(models, results, strict=True)
                     if isinstance(r, ForgeVolumeError)])
    locked = [r for r in results if isinstance(r, LockedModel)]
    out = ResolvedModels(locked)
    for model in locked:
        if model.sha256 is None:
            progress.info(f"{model.path}: no sha256 known yet; it will be pinned at its first download "
                          "(trust on first use)")
        if warning := unlisted_warning(model.kind, model.name, model.path):
            out.warnings.append(warning)
    return out
