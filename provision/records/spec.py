"""The spec file, ``forge-volume.toml``: parsed and checked into frozen dataclasses.

Every error names the file, the key and what was expected, so a user can fix it in one go.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from provision.errors import SourceError, SpecError
from provision.fetch.names import url_file_name
from provision.fetch.sources import Source, UrlSource, VolumeSource, parse_source
from provision.forge.first_use import parse_feature
from volume_layout import MODEL_KIND_DIRS, LayoutError, check_file_name, known_kinds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORGE_REPO = "https://github.com/lllyasviel/stable-diffusion-webui-forge.git"
DEFAULT_TORCH = ("torch==2.3.1", "torchvision==0.18.1")
DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cu121"
PRESETS = ("minimal", "sdxl", "seed")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ForgeSpec:
    repo: str = FORGE_REPO
    ref: str = "main"
    python: str = "3.10"
    torch: tuple[str, ...] = DEFAULT_TORCH
    torch_index_url: str | None = DEFAULT_TORCH_INDEX
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # What Forge would fetch at first use, installed onto the volume instead (provision.forge.first_use).
    features: tuple[str, ...] = ()
    features_mirror: str | None = None  # fetch the features' files from here: <mirror>/<host>/<path>

    @property
    def python_is_path(self) -> bool:
        """`python = "/usr/bin/python3"` names an interpreter; `python = "3.10"` a version to install."""
        return "/" in self.python


@dataclass(frozen=True)
class ExtensionSpec:
    name: str
    repo: str
    ref: str = "main"
    pip: tuple[str, ...] = ()
    # Settings files written into the extension's folder after checkout, e.g. ReActor's
    # last_device.txt = "CUDA" (else it swaps faces on the CPU), relative path -> content.
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    source: Source
    name: str | None = None  # None for civitai:// and server-named URLs until the lock names them
    sha256: str | None = None
    size: int | None = None

    @property
    def key(self) -> str:
        """Identifies the model across spec and lock: its target on the volume, or its source."""
        return f"{self.kind}/{self.name}" if self.name else f"{self.kind}?{self.source}"


@dataclass(frozen=True)
class Spec:
    path: Path
    forge: ForgeSpec
    extensions: tuple[ExtensionSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    runpod: RunPodSpec | None = None  # the [runpod] table: the datacenters `forge-volume regions` provisions


@dataclass(frozen=True)
class PodSpec:
    """The short-lived pod that installs one datacenter's volume."""

    image: str
    cpu: str | None = "cpu3c"  # a CPU flavor (GET /v2/catalog/cpus); RunPod mounts network volumes on CPU pods
    vcpus: int = 4
    gpu: str | None = None  # a GPU type instead of the CPU flavor, where a datacenter has no CPU pods
    disk: int = 20  # container disk, GB
    env: dict[str, str] = field(default_factory=dict)  # e.g. HF_TOKEN = "{{ RUNPOD_SECRET_hf_token }}"
    timeout: int = 7200  # seconds one pod may take, from its creation to its result


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    image: str
    gpus: tuple[str, ...]  # serverless GPU pool ids, e.g. ADA_24 (GET /v2/catalog/gpus, `pool`)
    workers: int = 3  # the most workers
    min_workers: int = 0
    idle_timeout: int = 5  # seconds
    execution_timeout: int = 600  # seconds a job may run
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPodSpec:
    datacenters: tuple[str, ...]
    volume_name: str
    volume_size: int  # GB; a volume is grown to it, never shrunk
    pod: PodSpec
    endpoint: EndpointSpec


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")


class Lines:
    """Where things are written in the spec's text, for errors: a table's header, a key's line.

    tomllib gives no positions, so the text is scanned: headers ``[name]`` and ``[[name]]`` (the
    n-th of an array), and ``key =`` lines under them. Good enough to point at a line; None when
    the text is written some other way (an inline table)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def _tables(self) -> list[tuple[int, str, str]]:
        """(line index, name, how it is written) of every header."""
        out = []
        for i, line in enumerate(self.lines):
            match = _HEADER.match(line)
            if match:
                name = match.group(2).replace(" ", "").replace('"', "")
                out.append((i, name, f"{match.group(1)}{name}{']' * len(match.group(1))}"))
        return out

    def table(self, name: str, index: int | None = None) -> tuple[int, str] | None:
        """(line number, as written) of ``[name]``, or of the ``index``-th ``[[name]]``."""
        found = [(i, written) for i, n, written in self._tables() if n == name]
        if index is not None:
            found = [(i, w) for i, w in found if w.startswith("[[")]
            found = found[index:index + 1]
        return (found[0][0] + 1, found[0][1]) if found else None

    def key(self, key: str, table: str | None, index: int | None = None) -> int | None:
        """The line number of ``key =`` in a table (``table`` None: before the first header)."""
        headers = self._tables()
        if table is None:
            start, end = 0, headers[0][0] if headers else len(self.lines)
        else:
            at = self.table(table, index)
            if at is None:
                return None
            start = at[0]
            end = next((i for i, _, _ in headers if i >= start), len(self.lines))
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*[=.]")
        return next((i + 1 for i in range(start, end) if pattern.match(self.lines[i])), None)


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


class _Reader:
    """Checks one TOML table's keys and types, naming file, line and key in every error."""

    def __init__(self, path: Path, where: str, table: Any, lines: Lines | None = None) -> None:
        self.path, self.where, self.lines = path, where, lines or Lines("")
        # "forge", "models[2]": which table of the text this is, to find its lines
        name, _, rest = where.partition("[")
        self._table = None if where == "spec" else name
        self._index = int(rest.rstrip("]")) if rest else None
        if not isinstance(table, dict):
            self.fail("", f"must be a table, not {type(table).__name__}")
        self.table: dict[str, Any] = table

    def line_of(self, key: str) -> int | None:
        if key:
            return self.lines.key(key, self._table, self._index)
        at = self.lines.table(self._table or "", self._index) if self._table else None
        return at[0] if at else None

    def fail(self, key: str, problem: str, *, shown: str | None = None) -> NoReturn:
        name = shown or (f"{self.where}.{key}" if key else self.where)
        line = self.line_of(key)
        at = f"line {line}: " if line else ""
        raise SpecError(f"{self.path}: {at}`{name}` {problem}")

    def only(self, *allowed: str) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, f"is not a known key{did_you_mean(key, allowed)} (allowed here: {', '.join(allowed)})")

    def string(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        if key not in self.table:
            if required:
                self.fail(key, "is missing (a string is required)")
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, not {value!r}")
        return value.strip()

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, f"must be a list of non-empty strings, not {value!r}")
        return tuple(v.strip() for v in value)

    def mapping(self, key: str) -> dict[str, str]:
        value = self.table.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            self.fail(key, f"must be a table of strings, e.g. {{ NAME = \"value\" }}, not {value!r}")
        return dict(value)

    def integer(self, key: str) -> int | None:
        value = self.table.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            self.fail(key, f"must be a non-negative integer (bytes), not {value!r}")
        return value


def _torch_index(r: _Reader) -> str | None:
    """The extra index torch comes from; ``""`` or ``false`` switches it off (the default index, or a
    mirror set in pip's own configuration)."""
    value = r.table.get("torch_index_url")
    if value is False or (isinstance(value, str) and not value.strip()):
        return None
    if value is True:
        r.fail("torch_index_url", "must be a URL, or \"\" / false for no extra index, not true")
    return r.string("torch_index_url", DEFAULT_TORCH_INDEX)


def _forge(path: Path, table: Any, lines: Lines) -> ForgeSpec:
    r = _Reader(path, "forge", table, lines)
    r.only("repo", "ref", "python", "torch", "torch_index_url", "args", "env", "features", "features_mirror")
    index = _torch_index(r)
    features = r.strings("features")
    for text in features:
        try:
            parse_feature(text)
        except ValueError as exc:
            r.fail("features", f"entry {exc}")
    mirror = r.string("features_mirror")
    if mirror is not None and not mirror.startswith(("http://", "https://")):
        r.fail("features_mirror", f"must be an http:// or https:// URL, not {mirror!r}")
    return ForgeSpec(
        repo=r.string("repo", FORGE_REPO) or FORGE_REPO,
        ref=r.string("ref", "main") or "main",
        python=r.string("python", "3.10") or "3.10",
        torch=r.strings("torch", DEFAULT_TORCH),
        torch_index_url=index,
        args=r.strings("args"),
        env=r.mapping("env"),
        features=tuple(dict.fromkeys(features)),
        features_mirror=mirror,
    )


def _extension(path: Path, i: int, table: Any, lines: Lines) -> ExtensionSpec:
    r = _Reader(path, f"extensions[{i}]", table, lines)
    r.only("name", "repo", "ref", "pip", "files")
    repo = r.string("repo", required=True) or ""
    default_name = repo.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    name = r.string("name", default_name) or default_name
    try:
        check_file_name(name)
    except LayoutError as exc:
        r.fail("name", f"is not usable as a folder name: {exc}")
    files = r.mapping("files")
    for rel in files:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in {"", ".", "..", ".git"} for p in parts) or "\\" in rel:
            r.fail("files", f"has {rel!r}: each key must be a relative path inside the extension's folder")
    return ExtensionSpec(name=name, repo=repo, ref=r.string("ref", "main") or "main", pip=r.strings("pip"),
                         files=files)


def _model(path: Path, i: int, table: Any, lines: Lines) -> ModelSpec:
    r = _Reader(path, f"models[{i}]", table, lines)
    r.only("kind", "source", "name", "sha256", "size")
    kind = r.string("kind", required=True) or ""
    if kind not in MODEL_KIND_DIRS:
        r.fail("kind", f"is {kind!r}, not a known kind{did_you_mean(kind, list(MODEL_KIND_DIRS))} "
                       f"(known kinds: {known_kinds()})")
    text = r.string("source", required=True) or ""
    try:
        source = parse_source(text)
    except SourceError as exc:
        r.fail("source", f"is invalid: {exc.message}; accepted: hf://OWNER/REPO/PATH[@REVISION], "
               "https://..., http://..., civitai://MODEL_VERSION_ID, or \"volume\" (kept on the volume, no source)")
    # A URL whose path does not end in a model file name (civitai's /api/download/models/ID) is
    # named by the server, at lock time.
    name = r.string("name") or (url_file_name(source.url) if isinstance(source, UrlSource) else source.default_name)
    if name is not None:
        try:
            check_file_name(name)
        except LayoutError as exc:
            r.fail("name", f"is not usable as a file name: {exc}")
    sha = r.string("sha256")
    if sha is not None:
        sha = sha.lower()
        if not _SHA256.match(sha):
            r.fail("sha256", "must be 64 hexadecimal digits")
    if isinstance(source, VolumeSource) and (name is None or sha is None):
        r.fail("source", "is \"volume\" (a file kept on this volume, with no source to fetch it from), which "
               "needs `name` and `sha256` to say which file")
    return ModelSpec(kind=kind, source=source, name=name, sha256=sha, size=r.integer("size"))


def parse_spec(text: str, path: Path) -> Spec:
    """Parse spec text (``path`` names it in errors)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    lines = Lines(text)
    top = _Reader(path, "spec", data, lines)
    _only_tables(top, lines)
    for key in ("extensions", "models"):
        if key in data and not isinstance(data[key], list):
            top.fail(key, f"must be an array of tables ([[{key}]]), not {type(data[key]).__name__}", shown=key)
    forge = _forge(path, data.get("forge", {}), lines)
    extensions = tuple(_extension(path, i, t, lines) for i, t in enumerate(data.get("extensions", [])))
    models = tuple(_model(path, i, t, lines) for i, t in enumerate(data.get("models", [])))
    _no_duplicates(path, "extensions", [e.name for e in extensions], "name", lines)
    _no_duplicates(path, "models", [m.key for m in models], "kind + name", lines)
    runpod = _runpod(path, data["runpod"], lines) if "runpod" in data else None
    return Spec(path=path, forge=forge, extensions=extensions, models=models, runpod=runpod)


_DATACENTER = re.compile(r"^[A-Z]{2,4}-[A-Z0-9]{2,4}-[0-9]{1,3}$")  # RunPod's ids: EU-RO-1, US-KS-2, EUR-IS-1


def _number(r: _Reader, key: str, default: int | None, low: int, high: int) -> int:
    value = r.table.get(key, default)
    if value is None:
        r.fail(key, f"is missing (an integer from {low} to {high} is required)")
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        r.fail(key, f"must be an integer from {low} to {high}, not {value!r}")
    return value


def _runpod(path: Path, table: Any, lines: Lines) -> RunPodSpec:
    r = _Reader(path, "runpod", table, lines)
    r.only("datacenters", "volume_name", "volume_size", "pod", "endpoint")
    datacenters = r.strings("datacenters")
    if not datacenters:
        r.fail("datacenters", "is missing: list the datacenters to keep a volume in, e.g. [\"EU-RO-1\", \"US-KS-2\"]")
    for dc in datacenters:
        if not _DATACENTER.match(dc):
            r.fail("datacenters", f"has {dc!r}, which is not a RunPod datacenter id (like EU-RO-1 or US-KS-2)")
    _no_duplicates(path, "runpod.datacenters", list(datacenters), "datacenter")
    pod = _Reader(path, "runpod.pod", r.table.get("pod", {}), lines)
    pod.only("image", "cpu", "vcpus", "gpu", "disk", "env", "timeout")
    gpu = pod.string("gpu")
    if gpu and "cpu" in pod.table:
        pod.fail("gpu", "and `cpu` are both set; a pod is either a CPU or a GPU pod")
    vcpus = _number(pod, "vcpus", 4, 2, 64)
    if vcpus & (vcpus - 1):
        pod.fail("vcpus", f"must be a power of two (RunPod's rule), not {vcpus}")
    ep = _Reader(path, "runpod.endpoint", r.table.get("endpoint", {}), lines)
    ep.only("name", "image", "gpus", "workers", "min_workers", "idle_timeout", "execution_timeout", "env")
    gpus = ep.strings("gpus")
    if not gpus:
        ep.fail("gpus", "is missing: list the serverless GPU pools, e.g. [\"ADA_24\"] (GET /v2/catalog/gpus)")
    endpoint = EndpointSpec(
        name=ep.string("name", required=True) or "", image=ep.string("image", required=True) or "", gpus=gpus,
        workers=_number(ep, "workers", 3, 0, 100), min_workers=_number(ep, "min_workers", 0, 0, 100),
        idle_timeout=_number(ep, "idle_timeout", 5, 1, 3600),
        execution_timeout=_number(ep, "execution_timeout", 600, 5, 7 * 24 * 3600), env=ep.mapping("env"))
    if endpoint.min_workers > endpoint.workers:
        ep.fail("min_workers", f"({endpoint.min_workers}) is above `workers` ({endpoint.workers})")
    return RunPodSpec(
        datacenters=datacenters, volume_name=r.string("volume_name", required=True) or "",
        volume_size=_number(r, "volume_size", None, 10, 4096),
        pod=PodSpec(image=pod.string("image", required=True) or "", cpu=None if gpu else pod.string("cpu", "cpu3c"),
                    vcpus=vcpus, gpu=gpu, disk=_number(pod, "disk", 20, 1, 1000), env=pod.mapping("env"),
                    timeout=_number(pod, "timeout", 7200, 1, 7 * 24 * 3600)),
        endpoint=endpoint)


TABLES = {"forge": "[forge]", "extensions": "[[extensions]]", "models": "[[models]]", "runpod": "[runpod]"}


def _only_tables(top: _Reader, lines: Lines) -> None:
    """The top level holds [forge], [[extensions]] and [[models]]; anything else is named as it is written."""
    for key in top.table:
        if key in TABLES:
            continue
        at = lines.table(key)
        shown = at[1] if at else key
        guess = difflib.get_close_matches(key, list(TABLES), n=1, cutoff=0.6)
        mean = f"; did you mean `{TABLES[guess[0]]}`?" if guess else ""
        line = at[0] if at else lines.key(key, None)
        where = f"line {line}: " if line else ""
        raise SpecError(f"{top.path}: {where}`{shown}` is not a known table{mean} "
                        f"(a spec holds {', '.join(TABLES.values())})")


def _no_duplicates(path: Path, where: str, keys: list[str], what: str, lines: Lines | None = None) -> None:
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key in seen:
            at = lines.table(where, i) if lines is not None else None
            line = f"line {at[0]}: " if at else ""
            raise SpecError(f"{path}: {line}`{where}[{i}]` repeats {what} {key!r}; each must be unique")
        seen.add(key)


def load_spec(path: Path) -> Spec:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"spec file {path} does not exist",
            "write one with `forge-volume init --preset sdxl`, or pass --spec FILE",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {path}: {exc}") from None
    return parse_spec(text, path)


def preset_text(name: str) -> str:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}", "pick one of the presets")
    return resources.files("provision.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
