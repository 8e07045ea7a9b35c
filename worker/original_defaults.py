"""The original runpod-worker-forge's defaults for txt2img and img2img: one table, the worker's only copy.

The original worker's schema (RunPod's validator) filled in every field a client left out, so Forge
always received the same 40-odd fields: ``eta`` and ``s_noise`` 0 (Forge's own default is 1 for
ancestral and SDE samplers, so the same seed gives another image), ``steps`` 20 (Forge's own: 50)...
Applying the same defaults to fields a client leaves out gives its clients the same images here.
The table is ``seed/COMPAT.md``'s, row for row. Whole numbers in the schema's float-typed fields
(``cfg_scale``, ``denoising_strength``, ``refiner_switch_at``, ``hr_scale``, ``image_cfg_scale``) are
written as floats because the validator sent them so. ``prompt`` and ``init_images`` were required,
so they have no default.

``FORGE_DEFAULTS=forge`` (see ``worker.config``) turns the table off; ``worker.normalise`` applies it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
NOT_IN_SCHEMA = object()  # COMPAT.md's "—": the field is not in that route's schema
NA = NOT_IN_SCHEMA

# field: (txt2img default, img2img default)
TABLE: Mapping[str, tuple[Any, Any]] = MappingProxyType({
    "negative_prompt": ("", ""),
    "styles": ([], []),
    "seed": (-1, -1),
    "subseed": (-1, -1),
    "subseed_strength": (0, 0),
    "seed_resize_from_h": (-1, -1),
    "seed_resize_from_w": (-1, -1),
    "sampler_name": ("Euler a", "Euler a"),
    "batch_size": (1, 1),
    "n_iter": (1, 1),
    "steps": (20, 20),
    "cfg_scale": (7.0, 7.0),
    "width": (512, 512),
    "height": (512, 512),
    "restore_faces": (False, False),
    "tiling": (False, False),
    "do_not_save_samples": (False, False),
    "do_not_save_grid": (False, False),
    "eta": (0, 0),
    "denoising_strength": (0.0, 0.75),
    "s_min_uncond": (0, 0),
    "s_churn": (0, 0),
    "s_tmax": (0, 0),
    "s_tmin": (0, 0),
    "s_noise": (0, 0),
    "override_settings": ({}, {}),
    "override_settings_restore_afterwards": (True, True),
    "refiner_checkpoint": ("", ""),
    "refiner_switch_at": (0.0, 0.0),
    "disable_extra_networks": (False, False),
    "comments": ({}, {}),
    "enable_hr": (False, NA),
    "firstphase_width": (0, NA),
    "firstphase_height": (0, NA),
    "hr_scale": (2.0, NA),
    "hr_upscaler": ("", NA),
    "hr_second_pass_steps": (0, NA),
    "hr_resize_x": (0, NA),
    "hr_resize_y": (0, NA),
    "hr_checkpoint_name": ("", NA),
    "hr_sampler_name": ("", NA),
    "hr_prompt": ("", NA),
    "hr_negative_prompt": ("", NA),
    "sampler_index": ("Euler a", "Euler a"),
    "script_name": ("", ""),
    "script_args": ([], []),
    "send_images": (True, True),
    "save_images": (False, False),
    "alwayson_scripts": ({}, {}),
    "resize_mode": (NA, 0),
    "image_cfg_scale": (NA, 0.0),
    "mask_blur_x": (NA, 4),
    "mask_blur_y": (NA, 4),
    "mask_blur": (NA, 0),
    "inpainting_fill": (NA, 0),
    "inpaint_full_res": (NA, False),
    "inpaint_full_res_padding": (NA, 0),
    "inpainting_mask_invert": (NA, 1),
    "initial_noise_multiplier": (NA, 1),
    "latent_mask": (NA, ""),
    "include_init_images": (NA, False),
})

# Requests the original worker could not send (its schema rejected these fields) whose meaning some
# defaults would change. The original's mask settings never reached a real inpainting request:
# with a `mask`, `inpainting_mask_invert` 1 would invert it and `latent_mask` "" would replace it
# (Forge then fails), so they are left to Forge. With `infotext`, Forge takes every parameter the
# infotext names unless the request sets it: any default would override the infotext.
MASK_SETTINGS = frozenset({"mask_blur_x", "mask_blur_y", "mask_blur", "inpainting_fill", "inpaint_full_res",
                           "inpaint_full_res_padding", "inpainting_mask_invert", "latent_mask"})
LEFT_TO_FORGE: Mapping[str, frozenset[str] | None] = MappingProxyType({
    "mask": MASK_SETTINGS,
    "infotext": None,  # None: every default
})

_COLUMN = {TXT2IMG: 0, IMG2IMG: 1}


def defaults_for(route: str) -> dict[str, Any]:
    """The original defaults of one route (empty for routes that had none), fresh copies to mutate freely."""
    column = _COLUMN.get(route)
    if column is None:
        return {}
    return {k: copy.deepcopy(v[column]) if isinstance(v[column], (list, dict)) else v[column]
            for k, v in TABLE.items() if v[column] is not NOT_IN_SCHEMA}


def with_defaults(route: str, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with the original defaults added for the fields it leaves out; what it sent is kept as sent.

    Returns ``payload`` itself when nothing is added (no copy of a large body for nothing).
    """
    defaults = defaults_for(route)
    for key, skipped in LEFT_TO_FORGE.items():
        if key in payload:
            if skipped is None:
                return payload
            for name in skipped:
                defaults.pop(name, None)
    missing = {k: v for k, v in defaults.items() if k not in payload}
    return {**payload, **missing} if missing else payload
