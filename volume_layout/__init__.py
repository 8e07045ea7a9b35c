"""Where everything lives on a forge-volume network volume (layout version 1).

This module is the only place that knows the volume's layout: the provisioning toolkit and
the worker both ask it for paths and neither joins a volume path by hand.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LAYOUT_VERSION = 1

POD_MOUNT = Path("/workspace")
SERVERLESS_MOUNT = Path("/runpod-volume")

# The checkouts whose models/ folder the original runpod-worker-forge's clients name in their paths
# (its install script put Forge at the first; its docs also show A1111's): both mean models/ here.
ORIGINAL_CHECKOUTS = ("stable-diffusion-webui-forge", "stable-diffusion-webui")

SPEC_NAME = "forge-volume.toml"
LOCK_NAME = "forge-volume.lock"

# Model kinds and their folders under models/ (the names Forge and its extensions look for).
MODEL_KIND_DIRS: dict[str, str] = {
    "checkpoint": "Stable-diffusion",
    "lora": "Lora",
    "vae": "VAE",
    "controlnet": "ControlNet",
    "upscaler": "ESRGAN",
    "embedding": "embeddings",
    "hypernetwork": "hypernetworks",
    "text_encoder": "text_encoder",
    "insightface": "insightface",
    "adetailer": "adetailer",
    "clip_vision": "clip_vision",
}


class LayoutError(ValueError):
    """A path or name that does not fit the volume layout."""


def known_kinds() -> str:
    return ", ".join(MODEL_KIND_DIRS)


def provisioning_volume(env: Mapping[str, str] | None = None) -> Path:
    """The volume the CLI works on: $FORGE_VOLUME, else /workspace (a pod's mount)."""
    env = os.environ if env is None else env
    value = env.get("FORGE_VOLUME")
    return Path(value) if value else POD_MOUNT


def worker_volume(env: Mapping[str, str] | None = None, serverless_mount: Path = SERVERLESS_MOUNT) -> Path:
    """The volume a worker serves from: $FORGE_VOLUME, else /runpod-volume if it exists, else /workspace."""
    env = os.environ if env is None else env
    value = env.get("FORGE_VOLUME")
    if value:
        return Path(value)
    return serverless_mount if serverless_mount.exists() else POD_MOUNT


def control_character(text: str) -> str | None:
    """The first control character (newline, carriage return, NUL, escape...) in ``text``, if any."""
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def check_file_name(name: str) -> str:
    """A model file name: one path component, no traversal, no hidden tricks."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\0" in name:
        raise LayoutError(f"{name!r} is not a plain file name (no folders, no '..')")
    if (bad := control_character(name)) is not None:
        raise LayoutError(f"{name[:80]!r} is not a plain file name: it holds the control character "
                          f"U+{ord(bad):04X}")
    if len(name.encode()) > 255:
        raise LayoutError(f"file name {name[:40]!r}... is longer than 255 bytes")
    if name.startswith(".") and name.endswith((".part", ".partial")):
        # A download would take such a file for its own temporary and resume from it (issue 10).
        raise LayoutError(f"{name[:80]!r} is not a usable model name: it looks like a download's temporary file")
    return name


@dataclass(frozen=True)
class VolumeLayout:
    """Every path on one volume, rooted at ``root``."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / SPEC_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def meta_dir(self) -> Path:
        return self.root / ".forge-volume"

    @property
    def state(self) -> Path:
        return self.meta_dir / "state.json"

    @property
    def locks_dir(self) -> Path:
        return self.meta_dir / "locks"

    def lock_file(self, name: str) -> Path:
        """A lock file for one concurrent writer target (``install``, a model path...)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.locks_dir / f"{safe}.lock"

    @property
    def logs_dir(self) -> Path:
        """Install's logs: the whole output of its long steps, one file per run."""
        return self.meta_dir / "logs"

    def install_log(self, stamp: str) -> Path:
        """The log of the install started at ``stamp`` (UTC, e.g. 20261206T010203Z)."""
        return self.logs_dir / f"install-{stamp}.log"

    @property
    def tmp_dir(self) -> Path:
        """Install's scratch on the volume (same filesystem: finished clones move into place with one rename).

        Emptied by every install, under the volume's writer lock; nothing else may keep files here.
        """
        return self.meta_dir / "tmp"

    @property
    def prepare_data_dir(self) -> Path:
        """Forge's --data-dir during install-time environment preparation."""
        return self.meta_dir / "prepare-data"

    @property
    def boot_set_dir(self) -> Path:
        """The boot set: what Forge reads to boot, recorded by install's boot proof, for fast cold starts."""
        return self.meta_dir / "boot-set"

    @property
    def boot_set_index(self) -> Path:
        return self.boot_set_dir / "index.json"

    @property
    def boot_set_archive(self) -> Path:
        return self.boot_set_dir / "files.bin"

    @property
    def code_trees(self) -> tuple[Path, ...]:
        """The folders holding code Forge runs (not models): what a worker may copy to local disk at boot."""
        return (self.python_dir, self.venv, self.forge_dir, self.extensions_dir)

    @property
    def python_dir(self) -> Path:
        return self.root / "python"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def forge_dir(self) -> Path:
        return self.root / "stable-diffusion-webui-forge"

    @property
    def launch_py(self) -> Path:
        return self.forge_dir / "launch.py"

    @property
    def extensions_dir(self) -> Path:
        return self.root / "extensions"

    def extension_dir(self, name: str) -> Path:
        return self.extensions_dir / check_file_name(name)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def kind_dir(self, kind: str) -> Path:
        try:
            return self.models_dir / MODEL_KIND_DIRS[kind]
        except KeyError:
            raise LayoutError(f"unknown model kind {kind!r}; known kinds: {known_kinds()}") from None

    def under_models(self, relative: str) -> Path:
        """A path the lock gives relative to the volume (``models/VAE-approx/model.pt``): plain names
        below models/, no '..', no absolute path; links on the way are the fence's (``inside_models``)."""
        parts = relative.split("/")
        if len(parts) < 3 or parts[0] != "models":
            raise LayoutError(f"{relative[:120]!r} is not a file under models/")
        for part in parts[1:]:
            check_file_name(part)
        return self.root.joinpath(*parts)

    def model_path(self, kind: str, name: str) -> Path:
        return self.kind_dir(kind) / check_file_name(name)

    @property
    def checkout_models_dir(self) -> Path:
        """The Forge checkout's own models/ folder: where runpod-worker-forge's install put models.

        Clients of that worker name models by such absolute paths in extension arguments (ReActor's
        ``/runpod-volume/stable-diffusion-webui-forge/models/insightface/inswapper_128.onnx``); see
        ``checkout_model_link``.
        """
        return self.forge_dir / "models"

    def checkout_model_link(self, kind: str) -> tuple[Path, str]:
        """A kind's folder in the checkout's models/ and the relative link target that leads it to ours.

        Relative (``../../models/<Kind>``), so the link holds at every mount point of the volume.
        """
        link = self.checkout_models_dir / self.kind_dir(kind).name
        return link, os.path.relpath(self.kind_dir(kind), link.parent)

    @property
    def adopt_dir(self) -> Path:
        """``forge-volume adopt``'s records: its journal of moves, its hash cache, saved local changes."""
        return self.meta_dir / "adopt"

    @property
    def original_venv(self) -> Path:
        """Where install puts the original worker's venv (adopted at ``venv/``) before it builds its own there."""
        return self.root / "venv-original"

    def original_checkout(self, name: str) -> Path:
        """The original worker's checkout (one of ``ORIGINAL_CHECKOUTS``)."""
        if name not in ORIGINAL_CHECKOUTS:
            raise LayoutError(f"{name!r} is not one of the original worker's checkouts")
        return self.root / name

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def relative(self, path: Path) -> str:
        """A path on the volume as recorded in state.json (POSIX, relative to the root)."""
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def inside_models(self, candidate: str | Path) -> Path:
        """Resolve a caller-given path (relative to models/ or absolute) and insist it stays in models/.

        Symbolic links are followed, so a link inside models/ that points out (a kind folder too) is
        refused. Control characters are refused, and so is a path that runs through an existing file.
        This is the one fence for every path a helper writes to.
        """
        text = str(candidate)
        if (bad := control_character(text)) is not None:
            raise LayoutError(f"the path {text[:120]!r} holds the control character U+{ord(bad):04X}")
        raw = Path(candidate)
        path = raw if raw.is_absolute() else self.models_dir / raw
        models = self.models_dir.resolve()
        resolved = path.resolve()
        if resolved == models or models not in resolved.parents:
            raise LayoutError(f"{text!r} is outside the volume's models folder {self.models_dir}")
        for parent in resolved.parents:
            if parent == models:
                break
            if parent.exists() and not parent.is_dir():
                raise LayoutError(f"{text!r} runs through {self.relative(parent)!r}, which is a file, not a folder")
        return resolved

    def names_models_root(self, path: str) -> bool:
        """Whether a caller's path names the models folder itself, in any of the original worker's spellings
        (``/workspace/stable-diffusion-webui-forge/models``, ``/runpod-volume/models``, ``.``...)."""
        if control_character(path) is not None:
            return False
        mapped = path
        if path.startswith("/"):
            folder = path.rstrip("/") + "/"
            mapped = self.models_relative(folder)
            if mapped != folder and mapped.strip("/") in ("", "."):
                return True
        elif mapped.strip("/") in ("", "."):
            return True
        raw = Path(mapped)
        try:
            return (raw if raw.is_absolute() else self.models_dir / raw).resolve() == self.models_dir.resolve()
        except (OSError, ValueError):
            return False

    def models_relative(self, path: str) -> str:
        """A caller's model path as a path relative to models/, where it names one.

        The original runpod-worker-forge took absolute paths such as
        ``/runpod-volume/stable-diffusion-webui-forge/models/Lora``: its models lived in the Forge
        checkout (its docs also show A1111's, ``/workspace/stable-diffusion-webui/models``). Such
        paths (under this volume, /runpod-volume or /workspace, in models/ or in either checkout's
        models/) map to the same folder under models/ here. Anything else is returned unchanged, for
        ``inside_models`` to judge.
        """
        if not path.startswith("/"):
            return path
        for mount in dict.fromkeys((self.root, SERVERLESS_MOUNT, POD_MOUNT)):
            for models in (mount / "models", *(mount / checkout / "models" for checkout in ORIGINAL_CHECKOUTS)):
                prefix = f"{models.as_posix().rstrip('/')}/"
                if path.startswith(prefix):
                    return path[len(prefix):]
        return path

    def kind_of(self, path: Path) -> str | None:
        """The model kind whose folder holds ``path`` (directly or below), if any."""
        try:
            top = path.resolve().relative_to(self.models_dir.resolve()).parts[0]
        except (ValueError, IndexError):
            return None
        for kind, folder in MODEL_KIND_DIRS.items():
            if folder == top:
                return kind
        return None
