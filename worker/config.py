"""The worker's settings: a pure function of an environment mapping.

Every variable the worker reads is here, with its default and meaning (the README's table).
A bad value raises ``ConfigError``; the worker then serves and fails every job with that message.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from provision.errors import ForgeVolumeError
from provision.fetch.cancel import connect_timeout, stall_timeout
from provision.fetch.netguard import ALLOW_ENV, Network, parse_networks
from provision.fetch.tokens import clean_token
from provision.forge.launch import DEFAULT_PORT, secret_name
from volume_layout import SERVERLESS_MOUNT, worker_volume

MB = 1_000_000


class ConfigError(ForgeVolumeError):
    """An environment variable of the worker has a value it cannot use."""

    hint = "fix the endpoint's environment variables in RunPod's console"


@dataclass(frozen=True)
class Settings:
    volume: Path
    forge_port: int = DEFAULT_PORT
    boot_timeout: float = 600.0  # FORGE_BOOT_TIMEOUT: seconds from boot until Forge must answer
    request_timeout: float = 3600.0  # FORGE_REQUEST_TIMEOUT: a Forge request taking longer means Forge is wedged
    forge_args: list[str] = field(default_factory=list)  # FORGE_ARGS, appended after the spec's args
    env_passthrough: tuple[str, ...] = ()  # FORGE_ENV_PASSTHROUGH: more variables Forge may see
    result_limit: int = 20 * MB  # FORGE_RESULT_LIMIT_MB: RunPod rejects larger job outputs
    progress_interval: float = 1.0  # FORGE_PROGRESS_INTERVAL: seconds between progress updates
    original_defaults: bool = True  # FORGE_DEFAULTS: "original" (the old worker's, for absent fields) or "forge"
    scratch_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))  # FORGE_SCRATCH
    fast_boot: str = "auto"  # FORGE_FAST_BOOT: boot Forge from the boot set laid out on local disk: auto, on, off
    bucket_endpoint: str | None = None
    bucket_name: str | None = None  # BUCKET_NAME: else rp_upload's default (the month, "MM-YY")
    upload: bool = False  # all three BUCKET_* variables are set
    # FORGE_DOWNLOAD_ALLOW_NETWORKS: private networks a /v1/download URL may name (default: none)
    download_allow_networks: tuple[Network, ...] = ()
    hf_token: str | None = field(default=None, repr=False)
    civitai_token: str | None = field(default=None, repr=False)

    @property
    def forge_url(self) -> str:
        return f"http://127.0.0.1:{self.forge_port}"


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value <= minimum:
        raise ConfigError(f"{name}={raw!r} must be greater than {minimum:g}")
    return value


def _port(env: Mapping[str, str]) -> int:
    raw = env.get("FORGE_PORT", "").strip() or str(DEFAULT_PORT)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"FORGE_PORT={raw!r} is not a TCP port (1-65535)")
    return int(raw)


def _args(env: Mapping[str, str]) -> list[str]:
    raw = env.get("FORGE_ARGS", "")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"FORGE_ARGS cannot be split into arguments ({exc}): {raw!r}") from None


def _defaults(env: Mapping[str, str]) -> bool:
    raw = env.get("FORGE_DEFAULTS", "").strip().lower() or "original"
    if raw not in ("original", "forge"):
        raise ConfigError(f"FORGE_DEFAULTS={raw!r} is neither 'original' nor 'forge'",
                          "set FORGE_DEFAULTS=original (runpod-worker-forge's defaults for fields a txt2img or "
                          "img2img leaves out) or FORGE_DEFAULTS=forge (Forge's own), or leave it unset")
    return raw == "original"


def _fast_boot(env: Mapping[str, str]) -> str:
    raw = env.get("FORGE_FAST_BOOT", "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise ConfigError(f"FORGE_FAST_BOOT={raw!r} is not auto, on or off",
                      "set FORGE_FAST_BOOT=auto (the default: when the volume answers over a network), 1 or 0")


def _networks(env: Mapping[str, str]) -> tuple[Network, ...]:
    try:
        return parse_networks(env.get(ALLOW_ENV, ""))
    except ValueError as exc:
        raise ConfigError(f"{ALLOW_ENV}: {exc}") from None


def _token(env: Mapping[str, str], name: str) -> str | None:
    """A token variable, stripped of surrounding whitespace; one with a control character inside fails the boot
    (without showing it)."""
    try:
        return clean_token(env.get(name), name)
    except ForgeVolumeError as exc:
        raise ConfigError(exc.message, f"set {name} to the token alone in the endpoint's secrets") from None


def _check_download_timeouts(env: Mapping[str, str]) -> None:
    """FORGE_DOWNLOAD_STALL_TIMEOUT and _CONNECT_TIMEOUT are read by each download; a bad value fails the
    worker's boot instead."""
    try:
        stall_timeout(env)
        connect_timeout(env)
    except ForgeVolumeError as exc:
        raise ConfigError(exc.message) from None


def _passthrough(env: Mapping[str, str]) -> tuple[str, ...]:
    names = tuple(n for n in re.split(r"[,\s]+", env.get("FORGE_ENV_PASSTHROUGH", "")) if n)
    secret = [n for n in names if secret_name(n)]
    if secret:
        raise ConfigError(f"FORGE_ENV_PASSTHROUGH names {', '.join(secret)}: the worker never passes "
                          "tokens, keys or credentials to Forge",
                          "remove them from FORGE_ENV_PASSTHROUGH (the helpers read HF_TOKEN and CIVITAI_TOKEN "
                          "themselves)")
    return names


def load_settings(env: Mapping[str, str], serverless_mount: Path = SERVERLESS_MOUNT) -> Settings:
    endpoint = env.get("BUCKET_ENDPOINT_URL") or None
    keys = bool(env.get("BUCKET_ACCESS_KEY_ID")) and bool(env.get("BUCKET_SECRET_ACCESS_KEY"))
    if endpoint and not keys:
        raise ConfigError("BUCKET_ENDPOINT_URL is set but BUCKET_ACCESS_KEY_ID or BUCKET_SECRET_ACCESS_KEY is not",
                          "set all three bucket variables, or none to return images inline")
    scratch = env.get("FORGE_SCRATCH") or tempfile.gettempdir()
    _check_download_timeouts(env)
    return Settings(
        volume=worker_volume(env, serverless_mount).absolute(),
        forge_port=_port(env),
        boot_timeout=_number(env, "FORGE_BOOT_TIMEOUT", 600.0),
        request_timeout=_number(env, "FORGE_REQUEST_TIMEOUT", 3600.0),
        forge_args=_args(env),
        env_passthrough=_passthrough(env),
        result_limit=int(_number(env, "FORGE_RESULT_LIMIT_MB", 20.0) * MB),
        progress_interval=_number(env, "FORGE_PROGRESS_INTERVAL", 1.0),
        original_defaults=_defaults(env),
        fast_boot=_fast_boot(env),
        scratch_root=Path(scratch),
        bucket_endpoint=endpoint,
        bucket_name=env.get("BUCKET_NAME") or None,
        upload=bool(endpoint and keys),
        download_allow_networks=_networks(env),
        hf_token=_token(env, "HF_TOKEN"),
        civitai_token=_token(env, "CIVITAI_TOKEN"),
    )
