"""What the original worker's install script left on a volume: its checkout, extensions, models, settings.

Reads only (``stat``, folder listings, ``.git`` files and two read-only git commands per checkout): the
plan ``adopt --dry-run`` prints is made from this, and it changes nothing. Paths are relative to the
volume's root, as the journal and state.json record them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from provision.errors import AdoptError, GitError
from provision.installer import gitops
from volume_layout import MODEL_KIND_DIRS, ORIGINAL_CHECKOUTS, LayoutError, VolumeLayout, check_file_name

# What model files are called (Forge's own loaders and the common extensions' suffixes).
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".sft", ".gguf", ".pkl", ".yaml")
# Tracked files the original's install script replaces with its own (so they differ from the commit):
# launch settings for webui.sh, which forge-volume's worker never runs.
SCRIPT_REPLACED = frozenset({"webui-user.sh"})
SETTINGS = ("config.json", "ui-config.json", "styles.csv")
_KIND_BY_FOLDER = {folder.lower(): kind for kind, folder in MODEL_KIND_DIRS.items()}


@dataclass(frozen=True)
class FoundModel:
    src: str  # where the original keeps it (relative to the volume)
    kind: str
    name: str
    size: int
    mtime_ns: int

    @property
    def dest(self) -> str:
        return f"models/{MODEL_KIND_DIRS[self.kind]}/{self.name}"


@dataclass(frozen=True)
class FoundRepo:
    name: str
    path: str  # relative to the volume
    remote: str | None
    commit: str
    ref: str  # the branch it is on, else a tag at its commit, else the commit
    changes: tuple[str, ...] = ()  # tracked files changed since the commit

    @property
    def unexpected_changes(self) -> tuple[str, ...]:
        return tuple(c for c in self.changes if c not in SCRIPT_REPLACED)


@dataclass
class Survey:
    checkout: str  # the original's checkout, relative to the volume
    forge: FoundRepo
    extensions: list[FoundRepo] = field(default_factory=list)
    models: list[FoundModel] = field(default_factory=list)
    unrecognised: list[tuple[str, str]] = field(default_factory=list)  # (path, what adopt does with it)
    settings: list[str] = field(default_factory=list)
    venv: str | None = None  # the original's venv, relative
    venv_python: str | None = None  # its Python version (pyvenv.cfg)
    packages: dict[str, str] = field(default_factory=dict)  # torch, torchvision, xformers: name -> version
    others: list[tuple[str, str]] = field(default_factory=list)  # (path, what it is): kept as it is

    @property
    def model_bytes(self) -> int:
        return sum(m.size for m in self.models)


def find_checkout(layout: VolumeLayout) -> Path:
    """The original's Forge checkout, or AdoptError saying what the folder holds instead."""
    forge = layout.original_checkout(ORIGINAL_CHECKOUTS[0])
    a1111 = layout.original_checkout(ORIGINAL_CHECKOUTS[1])
    if (forge / ".git").exists():
        return forge
    if (a1111 / ".git").exists():
        raise AdoptError(f"{layout.root} holds runpod-worker-a1111's AUTOMATIC1111 checkout ({a1111.name}/), "
                         "not Forge", "adopt takes over volumes of runpod-worker-forge; for an A1111 volume, "
                         "start from `forge-volume init --preset seed` and copy the models you need")
    raise AdoptError(f"no original worker's Forge checkout at {forge} (a git checkout, as runpod-worker-forge's "
                     "install script clones it)", "pass --volume with the volume's mount point (/workspace on a pod)")


def _repo(layout: VolumeLayout, path: Path) -> FoundRepo:
    commit = gitops.head_commit(path)
    if commit is None:
        raise AdoptError(f"{path} is a git checkout with no commit checked out", "check it with `git -C "
                         f"{path} status`; move it out of the volume's tree if it is not needed")
    try:
        remote: str | None = gitops.git("remote", "get-url", "origin", cwd=path) or None
    except GitError:
        remote = None
    try:
        branch = gitops.git("symbolic-ref", "-q", "--short", "HEAD", cwd=path)
    except GitError:
        branch = ""
    ref = branch
    if not ref:
        try:
            tags = gitops.git("tag", "--points-at", "HEAD", cwd=path).split()
        except GitError:
            tags = []
        ref = sorted(tags)[0] if tags else commit
    changes = tuple(gitops.local_changes(path))
    return FoundRepo(name=path.name, path=layout.relative(path), remote=remote, commit=commit, ref=ref,
                     changes=changes)


def _tracked(checkout: Path) -> set[str]:
    """Files git tracks under the checkout's model folders (Forge's placeholders): not models."""
    out = gitops.git("ls-files", "-z", "--", "models", "embeddings", cwd=checkout)
    return {p for p in out.split("\0") if p}


def _kind_folders(checkout: Path) -> list[tuple[Path, str | None]]:
    """Each folder under the checkout's models/ (and its embeddings/), with the kind it holds (None: no kind)."""
    found: list[tuple[Path, str | None]] = []
    models = checkout / "models"
    if models.is_dir() and not models.is_symlink():
        for entry in sorted(os.scandir(models), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                found.append((Path(entry.path), _KIND_BY_FOLDER.get(entry.name.lower())))
            elif not entry.name.startswith("."):
                found.append((Path(entry.path), None))
    embeddings = checkout / "embeddings"
    if embeddings.is_dir() and not embeddings.is_symlink():
        found.append((embeddings, "embedding"))
    return found


def _models(layout: VolumeLayout, checkout: Path, out: Survey) -> None:
    tracked = _tracked(checkout)
    for folder, kind in _kind_folders(checkout):
        rel = layout.relative(folder)
        if kind is None:
            what = "a folder no model kind uses" if folder.is_dir() else "a file outside the kind folders"
            out.unrecognised.append((rel + ("/" if folder.is_dir() else ""), f"{what}: left in place"))
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            name_rel = layout.relative(path)
            if entry.name.startswith(".") or path.relative_to(checkout).as_posix() in tracked:
                continue  # Forge's placeholder files, hidden files
            if entry.is_symlink():
                if _adopted_link(layout, path):
                    continue  # moved by an earlier adopt
                out.unrecognised.append((name_rel, "a link: left in place"))
            elif entry.is_dir(follow_symlinks=False):
                out.unrecognised.append((name_rel + "/", "a subfolder (forge-volume keeps models one level deep "
                                                         "under models/<Kind>/): left in place"))
            elif not entry.name.lower().endswith(MODEL_SUFFIXES):
                out.unrecognised.append((name_rel, "not a model file by its name: left in place"))
            else:
                try:
                    check_file_name(entry.name)
                except LayoutError as exc:
                    out.unrecognised.append((name_rel, f"{exc}: left in place"))
                    continue
                st = entry.stat(follow_symlinks=False)
                out.models.append(FoundModel(src=name_rel, kind=kind, name=entry.name, size=st.st_size,
                                             mtime_ns=st.st_mtime_ns))


def _adopted_link(layout: VolumeLayout, path: Path) -> bool:
    """A link adopt left at an old path: it leads into the volume's models/ or extensions/."""
    try:
        target = path.resolve()
    except OSError:
        return False
    return any(top in target.parents for top in (layout.models_dir.resolve(), layout.extensions_dir.resolve()))


def _extensions(layout: VolumeLayout, checkout: Path, out: Survey) -> None:
    folder = checkout / "extensions"
    if not folder.is_dir():
        return
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        rel = layout.relative(path)
        if entry.name.startswith(".") or (entry.is_symlink() and _adopted_link(layout, path)):
            continue
        if entry.is_symlink() or not entry.is_dir():
            out.unrecognised.append((rel, "not an extension folder: left in place"))
        elif _bad_name(entry.name):
            out.unrecognised.append((rel + "/", f"{_bad_name(entry.name)}: left in place"))
        elif not (path / ".git").exists():
            out.unrecognised.append((rel + "/", "an extension that is not a git checkout (forge-volume installs "
                                                "extensions from git): left in place, not loaded by the new worker"))
        else:
            repo = _repo(layout, path)
            if repo.remote is None:
                out.unrecognised.append((rel + "/", "an extension with no remote to install it from: left in "
                                                    "place, not loaded by the new worker"))
            else:
                out.extensions.append(repo)


def _bad_name(name: str) -> str | None:
    try:
        check_file_name(name)
    except LayoutError as exc:
        return str(exc)
    return None


_DIST = re.compile(r"^(torch|torchvision|xformers)-([^-]+)\.dist-info$", re.IGNORECASE)


def _venv(layout: VolumeLayout, out: Survey) -> None:
    cfg = layout.venv / "pyvenv.cfg"
    if not cfg.is_file():
        return
    out.venv = layout.relative(layout.venv)
    for line in cfg.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            out.venv_python = value.strip()
    for site in layout.venv.glob("lib/python*/site-packages"):
        for entry in os.scandir(site):
            if (match := _DIST.match(entry.name)) is not None:
                out.packages[match.group(1).lower()] = match.group(2)


def survey(layout: VolumeLayout) -> Survey:
    """Everything adopt will take over, and what it will leave alone."""
    checkout = find_checkout(layout)
    out = Survey(checkout=layout.relative(checkout), forge=_repo(layout, checkout))
    _models(layout, checkout, out)
    _extensions(layout, checkout, out)
    out.settings = [layout.relative(checkout / n) for n in SETTINGS if (checkout / n).is_file()]
    _venv(layout, out)
    for name, what in (("logs", "the original worker's log folder"), ("hub", "a Hugging Face cache (HF_HOME)"),
                       (f"{out.checkout}/logs", "Forge's log folder")):
        if (layout.root / name).is_dir():
            out.others.append((name + "/", what))
    return out
