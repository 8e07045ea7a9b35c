"""The lock file, ``forge-volume.lock``: the spec with every ref, revision and checksum pinned.

JSON, sorted and indented so that a diff of two locks reads well. ``check_matches`` names every
place where the spec was edited after locking.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from provision import __version__
from provision.errors import CorruptLockError, InvalidLockError, LockError, StaleLockError
from provision.records.atomic import write_atomic
from provision.records.lock_fields import extension_fields, first_use_fields, forge_fields, model_fields
from provision.records.spec import ModelSpec, Spec

LOCK_VERSION = 1


@dataclass(frozen=True)
class LockedForge:
    repo: str
    ref: str
    commit: str
    python: str
    torch: list[str]
    torch_index_url: str | None
    args: list[str]
    env: dict[str, str]
    features: list[str] = field(default_factory=list)  # provision.forge.first_use: fetched by install
    features_mirror: str | None = None


@dataclass(frozen=True)
class LockedExtension:
    name: str
    repo: str
    ref: str
    commit: str
    pip: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LockedModel:
    kind: str
    name: str
    source: str  # as written in the spec
    path: str  # relative to the volume root
    sha256: str | None  # None only until the first download pins it (trust on first use)
    size: int | None
    revision: str | None = None  # hf:// sources: the commit the file was resolved at
    pinned_by: str = "spec"  # spec | hub | server | first-download | volume (no source: kept, never fetched)

    def __post_init__(self) -> None:
        if self.sha256 is not None:  # hex digests compare (and are written) lowercase, whoever gave them
            object.__setattr__(self, "sha256", self.sha256.lower())


FIRST_USE_KIND = "first-use"


@dataclass(frozen=True)
class LockedFirstUse(LockedModel):
    """A file Forge would fetch at first use (``provision.forge.first_use``), installed like a model.

    ``kind`` is FIRST_USE_KIND; ``path`` is where Forge looks (any folder under models/); ``source`` is
    what install fetches (``url``, or its copy on the spec's features_mirror)."""

    feature: str = ""  # the spec's `features` entry that brings it ("previews", "upscale:R-ESRGAN 4x+")
    url: str = ""  # what Forge itself would fetch


@dataclass(frozen=True)
class Lock:
    forge: LockedForge
    extensions: list[LockedExtension] = field(default_factory=list)
    models: list[LockedModel] = field(default_factory=list)
    first_use: list[LockedFirstUse] = field(default_factory=list)
    lock_version: int = LOCK_VERSION

    @property
    def files(self) -> list[LockedModel]:
        """Every file install fetches and verify checks: the models, then the features' first-use files."""
        return [*self.models, *self.first_use]

    def to_json(self) -> str:
        data = {"lock_version": self.lock_version, "generated_by": f"forge-volume {__version__}", **{
            "forge": asdict(self.forge),
            "extensions": [asdict(e) for e in self.extensions],
            "models": [asdict(m) for m in self.models],
            "first_use": [asdict(f) for f in self.first_use],
        }}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def with_model(self, model: LockedModel) -> Lock:
        """The lock with one file entry replaced (same path), e.g. once its hash is pinned."""
        if isinstance(model, LockedFirstUse):
            return replace(self, first_use=[model if f.path == model.path else f for f in self.first_use])
        models = [model if (m.kind, m.name) == (model.kind, model.name) else m for m in self.models]
        return replace(self, models=models)


def lock_from_json(text: str, path: Path) -> Lock:
    """Read a lock, checking every field (it may have been edited by hand): all problems in one error."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CorruptLockError(f"{path}: not a forge-volume lock file (not JSON: {exc})") from None
    # Another lock version is never taken for a corrupt lock (install rebuilds those): check it first.
    if isinstance(data, dict) and "lock_version" in data and data["lock_version"] != LOCK_VERSION:
        raise LockError(f"{path}: lock version {data['lock_version']!r} is not {LOCK_VERSION}")
    if not isinstance(data, dict) or "forge" not in data:
        raise CorruptLockError(f"{path}: not a forge-volume lock file (no forge entry)")
    if data.get("lock_version") != LOCK_VERSION:
        raise LockError(f"{path}: lock version {data.get('lock_version')!r} is not {LOCK_VERSION}")
    problems: list[str] = []
    for key in data:
        if key not in ("lock_version", "generated_by", "forge", "extensions", "models", "first_use"):
            problems.append(f"{key} is not a field of a lock file")
    tables = {key: data.get(key, []) for key in ("extensions", "models", "first_use")}
    for key, value in tables.items():
        if not isinstance(value, list):
            problems.append(f"{key} must be a list, not {type(value).__name__}")
            tables[key] = []
    forge = forge_fields(data["forge"], problems)
    extensions = [extension_fields(i, e, problems) for i, e in enumerate(tables["extensions"])]
    models = [model_fields(i, m, problems) for i, m in enumerate(tables["models"])]
    first_use = [first_use_fields(i, f, problems) for i, f in enumerate(tables["first_use"])]
    if problems:
        raise InvalidLockError(f"{path}: {'; '.join(problems)}")
    return Lock(forge=LockedForge(**forge), extensions=[LockedExtension(**e) for e in extensions],
                models=[LockedModel(**m) for m in models], first_use=[LockedFirstUse(**f) for f in first_use])


def read_lock(path: Path) -> Lock:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(f"lock file {path} does not exist") from None
    except OSError as exc:
        raise LockError(f"cannot read lock file {path}: {exc}") from None
    return lock_from_json(text, path)


def write_lock(path: Path, lock: Lock) -> None:
    write_atomic(path, lock.to_json())


def lock_path_for(spec_path: Path) -> Path:
    """The lock lives next to the spec: ``x/forge-volume.toml`` -> ``x/forge-volume.lock``."""
    return spec_path.with_suffix(".lock")


def model_unchanged(spec: ModelSpec, locked: LockedModel) -> bool:
    """The spec entry still says what it said when ``locked`` was resolved from it."""
    if str(spec.source) != locked.source:
        return False
    if spec.sha256 and spec.sha256 != locked.sha256:
        return False
    return not (spec.size is not None and spec.size != locked.size)


def pair_models(models: Sequence[ModelSpec], locked: Sequence[LockedModel]
                ) -> tuple[list[tuple[ModelSpec, LockedModel | None]], list[LockedModel]]:
    """Each spec model with the lock entry it was locked as (None: not locked yet), and the lock
    entries no spec model claims. A named model is found by kind and name, an unnamed one (civitai://,
    a URL the server names) by kind and source; named ones first, so no unnamed one takes their entry."""
    remaining = list(locked)
    found: dict[int, LockedModel] = {}
    for named in (True, False):
        for i, model in enumerate(models):
            if bool(model.name) != named:
                continue
            match = next((m for m in remaining if m.kind == model.kind and
                          (m.name == model.name if model.name else m.source == str(model.source))), None)
            if match is not None:
                remaining.remove(match)
                found[i] = match
    return [(model, found.get(i)) for i, model in enumerate(models)], remaining


def forge_differences(spec: Spec, lock: Lock) -> list[tuple[str, Any, Any]]:
    """(key, spec value, locked value) for each [forge] setting the spec changed since locking."""
    f, lf = spec.forge, lock.forge
    pairs: list[tuple[str, Any, Any]] = [
        ("repo", f.repo, lf.repo), ("ref", f.ref, lf.ref), ("python", f.python, lf.python),
        ("torch", list(f.torch), lf.torch), ("torch_index_url", f.torch_index_url, lf.torch_index_url),
        ("args", list(f.args), lf.args), ("env", f.env, lf.env),
        ("features", list(f.features), lf.features), ("features_mirror", f.features_mirror, lf.features_mirror),
    ]
    return [(k, a, b) for k, a, b in pairs if a != b]


def spec_differences(spec: Spec, lock: Lock) -> list[str]:
    """Every way the spec differs from what was locked; empty when the lock still fits."""
    out = [f"forge.{k} is {a!r} in the spec but {b!r} in the lock" for k, a, b in forge_differences(spec, lock)]
    locked_ext = {e.name: e for e in lock.extensions}
    for ext in spec.extensions:
        le = locked_ext.pop(ext.name, None)
        if le is None:
            out.append(f"extension {ext.name!r} is in the spec but not in the lock")
        elif (ext.repo, ext.ref, list(ext.pip), ext.files) != (le.repo, le.ref, le.pip, le.files):
            out.append(f"extension {ext.name!r} changed (repo, ref, pip or files) since it was locked")
    out += [f"extension {name!r} is in the lock but no longer in the spec" for name in locked_ext]
    pairs, remaining = pair_models(spec.models, lock.models)
    for model, match in pairs:
        if match is None:
            out.append(f"model {model.key} is in the spec but not in the lock")
        elif not model_unchanged(model, match):
            out.append(f"model {model.key} changed (source, sha256 or size) since it was locked")
    out += [f"model {m.kind}/{m.name} is in the lock but no longer in the spec" for m in remaining]
    if not any(k in ("features", "features_mirror") for k, _, _ in forge_differences(spec, lock)):
        out += first_use_differences(spec, lock)
    return out


def wanted_first_use(spec: Spec) -> list[tuple[str, str, str]]:
    """(path, url, feature entry) of every file the spec's features fetch, as this forge-volume's table says."""
    from provision.forge.first_use import expand

    return [(file.path, file.url, text) for file, text in expand(spec.forge.features)]


def first_use_differences(spec: Spec, lock: Lock) -> list[str]:
    """The lock's first-use files against what the spec's features fetch by this forge-volume's table
    (which a newer forge-volume may have changed)."""
    want = wanted_first_use(spec)
    have = [(f.path, f.url, f.feature) for f in lock.first_use]
    if want == have:
        return []
    return ["the features' files in the lock are not those the spec's features fetch by this forge-volume's "
            "table (it changed since locking)"]


def check_matches(spec: Spec, lock: Lock, lock_path: Path) -> None:
    """Raise StaleLockError naming every entry the spec changed since ``lock`` was written."""
    diffs = spec_differences(spec, lock)
    if diffs:
        raise StaleLockError(f"{lock_path} no longer matches {spec.path}: {'; '.join(diffs)}")
