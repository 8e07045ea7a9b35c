"""The routes a job may call: Forge's API routes the worker proxies, and the worker's own helpers.

Every route the original runpod-worker-forge documented is here, plus Forge's other read and
generate routes. Routes that stop the server or train (``/sdapi/v1/create/*``) are not proxied.
Each route is checked against Forge's own OpenAPI document by the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

GET = frozenset({"GET"})
POST = frozenset({"POST"})

FORGE_ROUTES: Mapping[str, frozenset[str]] = MappingProxyType({
    # Generation and image tools.
    "/sdapi/v1/txt2img": POST,  # also ReActor, ADetailer, InstantID through alwayson_scripts
    "/sdapi/v1/img2img": POST,  # also with ControlNet through alwayson_scripts
    "/sdapi/v1/extra-single-image": POST,
    "/sdapi/v1/extra-batch-images": POST,
    "/sdapi/v1/png-info": POST,
    "/sdapi/v1/interrogate": POST,
    "/sdapi/v1/progress": GET,
    "/sdapi/v1/interrupt": POST,
    "/sdapi/v1/skip": POST,
    # Settings: set-model and set-vae are POSTs of sd_model_checkpoint / sd_vae.
    "/sdapi/v1/options": frozenset({"GET", "POST"}),
    "/sdapi/v1/cmd-flags": GET,
    # Lists.
    "/sdapi/v1/samplers": GET,
    "/sdapi/v1/schedulers": GET,
    "/sdapi/v1/upscalers": GET,
    "/sdapi/v1/latent-upscale-modes": GET,
    "/sdapi/v1/sd-models": GET,
    "/sdapi/v1/sd-modules": GET,
    "/sdapi/v1/hypernetworks": GET,
    "/sdapi/v1/face-restorers": GET,
    "/sdapi/v1/realesrgan-models": GET,
    "/sdapi/v1/prompt-styles": GET,
    "/sdapi/v1/embeddings": GET,
    "/sdapi/v1/loras": GET,
    "/sdapi/v1/memory": GET,
    "/sdapi/v1/scripts": GET,
    "/sdapi/v1/script-info": GET,
    "/sdapi/v1/extensions": GET,
    # Refreshing the model lists after a download, and the checkpoint in memory.
    "/sdapi/v1/refresh-checkpoints": POST,
    "/sdapi/v1/refresh-embeddings": POST,
    "/sdapi/v1/refresh-vae": POST,
    "/sdapi/v1/refresh-loras": POST,
    "/sdapi/v1/unload-checkpoint": POST,
    "/sdapi/v1/reload-checkpoint": POST,
    # The built-in ControlNet extension.
    "/controlnet/model_list": GET,
    "/controlnet/module_list": GET,
    "/controlnet/control_types": GET,
    "/controlnet/detect": POST,
})

# Routes the original worker documented that Forge serves under another name. Forge has no
# /sdapi/v1/sd-vae: it lists VAEs and text encoders at /sdapi/v1/sd-modules, in the same item shape
# (model_name, filename), so clients of the original worker keep working.
ALIASES: Mapping[str, tuple[str, frozenset[str]]] = MappingProxyType({
    "/sdapi/v1/sd-vae": ("/sdapi/v1/sd-modules", GET),
})

# Routes whose job reports Forge's progress while it runs.
GENERATING = frozenset({
    "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images",
})

HELPER_ROUTES: Mapping[str, frozenset[str]] = MappingProxyType({
    "/v1/download": POST,
    "/v1/sync": POST,
    "/v1/refresh-models": POST,
    "/v1/volume": GET,
})


def methods_of(endpoint: str) -> frozenset[str] | None:
    """The methods an endpoint accepts, or None when the worker does not serve it."""
    if endpoint in FORGE_ROUTES:
        return FORGE_ROUTES[endpoint]
    if endpoint in ALIASES:
        return ALIASES[endpoint][1]
    return HELPER_ROUTES.get(endpoint)


def accepted() -> list[str]:
    """Every endpoint a job may call, for error messages."""
    return sorted({*FORGE_ROUTES, *ALIASES, *HELPER_ROUTES})
