"""What a job may not ask Forge to do: reach another machine, or write outside the worker's scratch.

Forge's own settings decide both. Its API (``POST /sdapi/v1/options``, and a generation's
``override_settings``) sets any of them, including the ones Forge itself keeps from the API
(``restrict_api``: ``api_forbid_local_requests``...) and the folders it saves into (``outdir_*``,
``*_filename_pattern``). The worker starts Forge with ``--hide-ui-dir-config``, with URL images off
and the seed's folders dropped (``provision.forge.locked_settings``), and refuses here, naming them,
the settings that would undo either.

An image given by URL (img2img's ``init_images`` or ``mask``, or any image field Forge decodes) is
refused: Forge would fetch it with no deadline on the whole transfer, checking only the first
host's address while its HTTP client follows redirects anywhere. Send the image's base64 instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provision.forge.locked_settings import locked_setting

WHY = ("a job may not change where Forge saves files or which addresses it fetches from: the worker keeps "
       "Forge's files in its own scratch and takes images only as base64")
# Fields that carry one image, or a list of them, by route (Forge's request models).
IMAGE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "/sdapi/v1/img2img": ("init_images", "mask"),
    "/sdapi/v1/extra-single-image": ("image",),
    "/sdapi/v1/png-info": ("image",),
    "/sdapi/v1/interrogate": ("image",),
    "/controlnet/detect": ("controlnet_input_images", "controlnet_masks"),
}


class JobRuleError(ValueError):
    """A job asked for something the worker never lets Forge do (a caller mistake)."""


def is_url(value: object) -> bool:
    """Forge fetches an image string that starts with http:// or https:// (it checks just that)."""
    return isinstance(value, str) and value.lstrip()[:8].lower().startswith(("http://", "https://"))


def check_forge_call(route: str, payload: Mapping[str, Any] | None) -> None:
    """Raise JobRuleError naming every locked setting, or every image given by URL, in a job's request."""
    if not payload:
        return
    settings: list[str] = []
    if route == "/sdapi/v1/options":
        settings += [str(k) for k in payload if locked_setting(str(k))]
    override = payload.get("override_settings")
    if isinstance(override, Mapping):
        settings += [f"override_settings.{k}" for k in override if locked_setting(str(k))]
    if settings:
        raise JobRuleError(f"{route} may not set {', '.join(settings)}: {WHY}; send the other settings without them")
    urls = []
    for field in IMAGE_FIELDS.get(route, ()):
        value = payload.get(field)
        items = value if isinstance(value, list) else [value]
        urls += [f"{field}[{i}]" if isinstance(value, list) else field for i, item in enumerate(items) if is_url(item)]
    for i, item in enumerate(payload.get("imageList") or [] if route == "/sdapi/v1/extra-batch-images" else []):
        if isinstance(item, Mapping) and is_url(item.get("data")):
            urls.append(f"imageList[{i}].data")
    if urls:
        raise JobRuleError(f"{route}: {', '.join(urls)} is a URL; the worker does not let Forge fetch images "
                           "(send the image itself, base64-encoded, as Forge's API takes it)")
