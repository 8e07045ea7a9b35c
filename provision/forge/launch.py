"""Forge's command line and environment: one builder for the worker's boot and install's boot proof.

``forge_command`` is a pure function of the volume, the launch settings and a base environment, so
the install step that proves a volume boots starts Forge exactly as a worker will. It lives in
``provision`` (which never imports the RunPod SDK) because both halves use it.

Forge's environment is allow-listed, not filtered: it gets what Python, CUDA, the NVIDIA runtime
and Forge need (``ALLOWED_NAMES``, ``ALLOWED_PREFIXES``), the spec's ``env`` (written for Forge),
the names the endpoint lists in the worker's ``FORGE_ENV_PASSTHROUGH``, and nothing else: the endpoint's
tokens (``HF_TOKEN``, ``CIVITAI_TOKEN``), bucket keys, cloud credentials and RunPod's variables
never reach it. A name that looks like a secret is dropped even from the allowed prefixes.
Forge gets no network either (``provision.forge.offline``): the Hugging Face libraries offline, and a
startup hook that refuses every connection off the machine, whatever the spec's env says.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from provision.forge.first_use import HF_CACHE_MARKERS, HF_HUB_FOLDER
from provision.forge.hashes import seed_hash_cache
from provision.forge.locked_settings import HIDE_DIRS_SWITCH, fence_settings_file
from provision.forge.offline import folder_flags, offline_env, prepare_offline
from volume_layout import VolumeLayout

DEFAULT_PORT = 7861  # Forge's API port with --nowebui
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib/libtcmalloc_minimal.so.4")
# Passed through from the worker's (or pod's) environment when set.
ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "HOSTNAME", "SHELL",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK",
    "SD_WEBUI_LOG_LEVEL",
})
ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "PYTORCH_", "TORCH_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "NCCL_",
                    "CUBLAS_", "CUDNN_", "TF_")
# Never passed, even when a prefix or FORGE_ENV_PASSTHROUGH would allow it (the spec's own env may still set them).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE|AUTH|SESSION"
                         r"|^AWS_|^BUCKET_|^RUNPOD_|^GOOGLE_|^AZURE_", re.IGNORECASE)


@dataclass(frozen=True)
class Scratch:
    """Per-process folders on local disk for everything Forge writes (its data dir, caches, temp)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def offline(self) -> Path:
        """The hook that keeps Forge off the network (``provision.forge.offline``) and what it refused."""
        return self.root / "offline"


@dataclass(frozen=True)
class ForgeCommand:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


@dataclass(frozen=True)
class Launch:
    """What decides Forge's command line besides the volume: the spec's args and env, the port, the host."""

    spec_args: tuple[str, ...] = ()  # state.json's forge_args (the spec's [forge] args)
    spec_env: Mapping[str, str] | None = None  # state.json's forge_env (the spec's [forge] env)
    extra_args: tuple[str, ...] = ()  # the worker's FORGE_ARGS
    port: int = DEFAULT_PORT
    always_cpu: bool = False  # add --always-cpu (install's boot proof on a pod without a GPU)
    tcmalloc: str | None = None
    passthrough: tuple[str, ...] = ()  # the worker's FORGE_ENV_PASSTHROUGH: more names Forge may see


# A word of the name (split at '_', '-', '.', digits and camelCase) that names a secret: CIVITAI_KEY,
# NVIDIA_NGC_KEY, DB_PASS, openaiKey. (Not PWD: that is the working directory.)
SECRET_WORDS = frozenset({"KEY", "KEYS", "PASS", "PASSWD", "PASSWORD", "PASSPHRASE", "SECRET", "SECRETS", "TOKEN",
                          "TOKENS", "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH", "PRIVATE", "APIKEY", "COOKIE"})
_WORD_BREAK = re.compile(r"[^A-Za-z]+|(?<=[a-z])(?=[A-Z])")


def secret_name(name: str) -> bool:
    words = {w.upper() for w in _WORD_BREAK.split(name) if w}
    return bool(SECRET_NAME.search(name)) or bool(words & SECRET_WORDS)


def allowed_env(base_env: Mapping[str, str], extra: Iterable[str] = ()) -> dict[str, str]:
    """The part of ``base_env`` Forge may see."""
    extra_names = set(extra)
    return {k: v for k, v in base_env.items()
            if (k in ALLOWED_NAMES or k.startswith(ALLOWED_PREFIXES) or k in extra_names) and not secret_name(k)}


def _hub_cache(layout: VolumeLayout) -> dict[str, str]:
    """The Hub cache is Forge's own on the volume (models/diffusers), from the start: Forge sets it only after
    transformers has read it. First-use files there (BLIP's tokenizer) are read, never written, once install
    has written the libraries' markers (provision.installer.hf_cache); where they are missing (a volume
    installed before them), the libraries would write them at import, so the cache stays in the scratch."""
    hub = layout.models_dir / HF_HUB_FOLDER
    return {"HF_HUB_CACHE": str(hub)} if all((hub / name).is_file() for name in HF_CACHE_MARKERS) else {}


def forge_command(layout: VolumeLayout, scratch: Scratch, base_env: Mapping[str, str], launch: Launch,
                  code: VolumeLayout | None = None) -> ForgeCommand:
    """Forge's argv and environment, API-only on loopback, with scratch for data and models from the volume.

    ``code``: where the code trees (venv, checkout) are read from, when not from the volume itself: the
    boot set laid out on local disk (``provision.boot.layout_child``). Models always come from the volume.
    """
    code = code or layout
    argv = [
        str(code.venv_python), str(code.launch_py),
        "--nowebui", "--api", "--skip-prepare-environment", "--skip-install", "--skip-version-check",
        "--no-download-sd-model", "--server-name", "127.0.0.1",
        "--data-dir", str(scratch.data),
        "--models-dir", str(layout.models_dir),
        # --data-dir would move these two into the scratch; they are models, so they stay on the volume.
        "--embeddings-dir", str(layout.kind_dir("embedding")),
        "--hypernetwork-dir", str(layout.kind_dir("hypernetwork")),
        # Forge's own lock on its folder settings (outdir_*, *_filename_pattern, temp_dir): the API cannot
        # set them (provision.forge.locked_settings).
        HIDE_DIRS_SWITCH,
        # Forge's defaults for these are off the volume (CLIP: ~/.cache/clip): the features' files are on it.
        *folder_flags(layout),
    ]
    if launch.port != DEFAULT_PORT:
        # Only when needed: with --port, Forge's GET /sdapi/v1/cmd-flags fails (port declared str, given int).
        argv += ["--port", str(launch.port)]
    argv += [*launch.spec_args, *launch.extra_args]
    if launch.always_cpu and "--always-cpu" not in argv:
        argv.append("--always-cpu")
    env = allowed_env(base_env, launch.passthrough)
    env.update(launch.spec_env or {})
    env.update({
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ written into the volume's checkout or venv
        "PYTHONUNBUFFERED": "1",  # log lines reach RunPod as they happen
        # Forge imports GitPython at start; the worker's image has no git executable, and GitPython
        # refuses to import without one unless told to stay quiet. Forge never runs git when it serves.
        "GIT_PYTHON_REFRESH": "quiet",
        "VIRTUAL_ENV": str(code.venv),
        "PATH": f"{code.venv / 'bin'}{os.pathsep}{base_env.get('PATH', os.defpath)}",
        "HOME": base_env.get("HOME") or str(scratch.root),
        "HF_HOME": str(scratch.cache / "huggingface"),
        **_hub_cache(layout),
        "TORCH_HOME": str(scratch.cache / "torch"),
        "XDG_CACHE_HOME": str(scratch.cache),
        "MPLCONFIGDIR": str(scratch.cache / "matplotlib"),
        "TMPDIR": str(scratch.tmp),
        "GRADIO_TEMP_DIR": str(scratch.tmp),
        # No network for Forge: what it fetches at first use is on the volume (provision.forge.offline).
        **offline_env(scratch.offline, env.get("PYTHONPATH")),
    })
    if launch.tcmalloc:
        env["LD_PRELOAD"] = f"{launch.tcmalloc} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else launch.tcmalloc
    return ForgeCommand(argv, env, code.forge_dir)


def find_tcmalloc() -> str | None:
    return next((p for p in TCMALLOC if os.path.exists(p)), None)


def has_gpu() -> bool:
    """An NVIDIA GPU is visible to this machine (the driver's device nodes exist)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def prepare_scratch(layout: VolumeLayout, root: Path) -> Scratch:
    """Make the scratch folders: Forge's settings seeded from the volume, extensions linked to the volume's,
    and Forge's sha256 cache seeded from state.json (``provision.forge.hashes``: no checkpoint re-hashed)."""
    scratch = Scratch(root)
    for folder in (scratch.data, scratch.cache, scratch.tmp):
        folder.mkdir(parents=True, exist_ok=True)
    seed = layout.config_dir
    if seed.is_dir():
        for item in seed.iterdir():
            if item.is_file():
                shutil.copy2(item, scratch.data / item.name)
    fence_settings_file(scratch.data / "config.json")
    if layout.extensions_dir.is_dir():
        link_extensions(scratch, layout.extensions_dir)
    seed_hash_cache(layout, scratch.data)
    prepare_offline(layout, scratch.offline)
    return scratch


def link_extensions(scratch: Scratch, extensions: Path) -> None:
    """Point Forge's extensions folder (in its data dir) at ``extensions``, replacing an earlier link."""
    link = scratch.data / "extensions"
    tmp = link.with_name(".extensions.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(extensions, target_is_directory=True)
    os.replace(tmp, link)
