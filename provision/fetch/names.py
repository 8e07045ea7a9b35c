"""A model's file name: from the URL's path, else from the server's ``Content-Disposition``; and whether
Forge lists a file of that name in its kind's folder.

The suffixes are the ones Forge (and its built-in extensions) scan each folder for; kinds that Forge
itself never lists (insightface, adetailer, clip_vision: read by extensions) take any model suffix.
A name the server sends is hostile input: it passes the same check as a name written in the spec.
"""

from __future__ import annotations

from email.message import Message
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from volume_layout import LayoutError, check_file_name

# What Forge lists, per kind (modules/sd_models.py, sd_vae.py, modules_forge/main_entry.py,
# esrgan_model.py, textual_inversion.py, hypernetwork.py, sd_forge_lora, sd_forge_controlnet).
_WEIGHTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf")
LISTED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "checkpoint": (".safetensors", ".ckpt", ".gguf"),
    "lora": (".safetensors", ".ckpt", ".pt"),
    "vae": (".safetensors", ".ckpt", ".pt", ".bin", ".gguf"),
    "text_encoder": (".safetensors", ".ckpt", ".pt", ".bin", ".gguf"),
    "controlnet": (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".patch"),
    "upscaler": (".safetensors", ".pt", ".pth"),
    "embedding": (".safetensors", ".pt", ".bin", ".png", ".webp", ".jxl", ".avif"),
    "hypernetwork": (".pt",),
}
MODEL_SUFFIXES = frozenset(_WEIGHTS).union(*LISTED_SUFFIXES.values())


def suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def url_file_name(url: str) -> str | None:
    """The last segment of the URL's path when it is a model file name (``.../x.safetensors``); None for
    paths such as civitai's ``/api/download/models/12345``, whose name only the server knows."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name if name and suffix(name) in MODEL_SUFFIXES else None


def url_path_name(url: str) -> str | None:
    """The last segment of the URL's path, whatever it looks like (the fallback when the server names nothing)."""
    return PurePosixPath(unquote(urlsplit(url).path)).name or None


def disposition_name(header: str | None) -> str | None:
    """The file name a ``Content-Disposition`` header gives (``filename*=UTF-8''...`` preferred), or None."""
    if not header:
        return None
    message = Message()
    message["Content-Disposition"] = header
    try:
        name = message.get_filename()
    except (ValueError, LookupError):  # a malformed RFC 2231 value or an unknown charset
        return None
    return name.strip() if name and name.strip() else None


def check_server_name(name: str) -> str:
    """A name a server sent, refused unless it is a plain, visible file name (raises LayoutError)."""
    check_file_name(name)
    if name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise LayoutError(f"{name!r} is not a plain file name (hidden, or holds control characters)")
    return name


def unlisted_warning(kind: str, name: str, path: str) -> str | None:
    """A warning when Forge would not list ``name`` in ``kind``'s folder (None when it would)."""
    listed = LISTED_SUFFIXES.get(kind, tuple(sorted(_WEIGHTS)))
    if suffix(name) in listed:
        return None
    return (f"warning: {path}: Forge lists only {', '.join(listed)} files for kind {kind}, so it will not "
            "show this file; give the model a `name` with one of those suffixes if it is a model")
