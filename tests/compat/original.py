"""The original runpod-worker-forge, as an oracle: its txt2img/img2img schema and its documented jobs.

``original_body`` computes what the original worker sent Forge for a payload: it runs RunPod's own
validator (the one the original handler called) on the original schema, written out here from
``seed/COMPAT.md``'s table with each field's type. The validator fills in the defaults and turns
whole numbers in float-typed fields into floats, as it did for the original worker.

``JOBS`` are the original worker's documented example jobs (its README's endpoint list), written
from its docs' forms: the same fields, the same envelopes (``"payload": {}`` on every GET).
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from typing import Any

from runpod.serverless.utils.rp_validator import validate

from tests.conftest import DATA

TXT2IMG, IMG2IMG = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}

# field | type | txt2img default | img2img default   ("required"; "—": not in that schema)
SCHEMA_TABLE = """
prompt | str | required | required
negative_prompt | str | "" | ""
styles | list | [] | []
seed | int | -1 | -1
subseed | int | -1 | -1
subseed_strength | int | 0 | 0
seed_resize_from_h | int | -1 | -1
seed_resize_from_w | int | -1 | -1
sampler_name | str | "Euler a" | "Euler a"
batch_size | int | 1 | 1
n_iter | int | 1 | 1
steps | int | 20 | 20
cfg_scale | float | 7 | 7
width | int | 512 | 512
height | int | 512 | 512
restore_faces | bool | false | false
tiling | bool | false | false
do_not_save_samples | bool | false | false
do_not_save_grid | bool | false | false
eta | int | 0 | 0
denoising_strength | float | 0 | 0.75
s_min_uncond | int | 0 | 0
s_churn | int | 0 | 0
s_tmax | int | 0 | 0
s_tmin | int | 0 | 0
s_noise | int | 0 | 0
override_settings | dict | {} | {}
override_settings_restore_afterwards | bool | true | true
refiner_checkpoint | str | "" | ""
refiner_switch_at | float | 0 | 0
disable_extra_networks | bool | false | false
comments | dict | {} | {}
enable_hr | bool | false | —
firstphase_width | int | 0 | —
firstphase_height | int | 0 | —
hr_scale | float | 2 | —
hr_upscaler | str | "" | —
hr_second_pass_steps | int | 0 | —
hr_resize_x | int | 0 | —
hr_resize_y | int | 0 | —
hr_checkpoint_name | str | "" | —
hr_sampler_name | str | "" | —
hr_prompt | str | "" | —
hr_negative_prompt | str | "" | —
sampler_index | str | "Euler a" | "Euler a"
script_name | str | "" | ""
script_args | list | [] | []
send_images | bool | true | true
save_images | bool | false | false
alwayson_scripts | dict | {} | {}
init_images | list | — | required
resize_mode | int | — | 0
image_cfg_scale | float | — | 0
mask_blur_x | int | — | 4
mask_blur_y | int | — | 4
mask_blur | int | — | 0
inpainting_fill | int | — | 0
inpaint_full_res | bool | — | false
inpaint_full_res_padding | int | — | 0
inpainting_mask_invert | int | — | 1
initial_noise_multiplier | int | — | 1
latent_mask | str | — | ""
include_init_images | bool | — | false
"""


def schema(route: str) -> dict[str, dict[str, Any]]:
    """The original worker's schema for one route, in RunPod's validator's format."""
    column = {TXT2IMG: 2, IMG2IMG: 3}[route]
    out: dict[str, dict[str, Any]] = {}
    for line in SCHEMA_TABLE.strip().splitlines():
        cells = [c.strip() for c in line.split("|")]
        name, kind, value = cells[0], TYPES[cells[1]], cells[column]
        if value == "—":
            continue
        out[name] = {"type": kind, "required": True} if value == "required" else \
            {"type": kind, "required": False, "default": json.loads(value)}
    return out


def original_body(route: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What the original worker sent Forge for ``payload`` (which it must have accepted)."""
    result = validate(copy.deepcopy(payload), schema(route))
    assert "errors" not in result, f"the original worker would have refused this payload: {result['errors']}"
    return result["validated_input"]


def strict_diff(a: Any, b: Any, where: str = "body") -> str | None:
    """Where two parsed JSON values differ, types included (7 and 7.0 differ), or None when they do not."""
    if type(a) is not type(b):
        return f"{where}: {a!r} ({type(a).__name__}) != {b!r} ({type(b).__name__})"
    if isinstance(a, dict):
        if set(a) != set(b):
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            return f"{where}: keys only in the first {only_a}, only in the second {only_b}"
        for key in a:
            found = strict_diff(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = strict_diff(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


# A real PNG (Forge's recorded txt2img image), as the docs' base64 images are.
PNG = json.loads((DATA / "forge" / "responses" / "POST_sdapi_v1_txt2img.json").read_text())["body"]["images"][0]
assert base64.b64decode(PNG)[:4] == b"\x89PNG"
INSWAPPER = "/runpod-volume/stable-diffusion-webui-forge/models/insightface/inswapper_128.onnx"


@dataclass(frozen=True)
class Job:
    name: str  # the original docs' page
    method: str
    endpoint: str
    payload: dict[str, Any]

    @property
    def input(self) -> dict[str, Any]:
        return {"api": {"method": self.method, "endpoint": self.endpoint}, "payload": copy.deepcopy(self.payload)}


def _controlnet_unit(**extra: Any) -> dict[str, Any]:
    return {"input_image": PNG, "mask": "", "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
            "weight": 1, "resize_mode": "Crop and Resize", "lowvram": False, "processor_res": 512,
            "threshold_a": 100, "threshold_b": 200, "guidance_start": 0, "guidance_end": 1,
            "control_mode": "Balanced", "pixel_perfect": False, **extra}


_TXT2IMG = {
    "override_settings": {"sd_model_checkpoint": "deliberate_v2", "sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": "",
    "refiner_switch_at": 0.8,
    "prompt": "a photograph of an astronaut riding a horse",
    "negative_prompt": "",
    "seed": -1,
    "batch_size": 1,
    "steps": 30,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "sampler_name": "DPM++ SDE Karras",
    "sampler_index": "DPM++ SDE Karras",
    "restore_faces": False,
}
_IMG2IMG = {
    "init_images": [PNG],
    "include_init_images": False,
    "resize_mode": 0,
    "denoising_strength": 0.75,
    "prompt": "a photograph of an astronaut riding a horse, oil painting",
    "negative_prompt": "",
    "seed": -1,
    "batch_size": 1,
    "steps": 30,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "sampler_name": "DPM++ SDE Karras",
    "sampler_index": "DPM++ SDE Karras",
    "restore_faces": False,
    "override_settings": {"sd_model_checkpoint": "deliberate_v2"},
}
_REACTOR_ARGS = [PNG, True, "0", "0", INSWAPPER, "CodeFormer", 1, True, "None", 1.5, 1, False, True, 1, 0, 0,
                 False, 0.5, False, False, "CUDA", True, 0, ""]
_ADETAILER_ARGS = [True, False, {"ad_model": "face_yolov8n.pt", "ad_prompt": "", "ad_negative_prompt": "",
                                 "ad_confidence": 0.3, "ad_mask_blur": 4, "ad_denoising_strength": 0.4,
                                 "ad_inpaint_only_masked": True, "ad_inpaint_only_masked_padding": 32}]

GENERATION_JOBS = (
    Job("txt2img", "POST", TXT2IMG, _TXT2IMG),
    Job("txt2img-reactor", "POST", TXT2IMG,
        {**_TXT2IMG, "alwayson_scripts": {"reactor": {"args": _REACTOR_ARGS}}}),
    Job("txt2img-adetailer", "POST", TXT2IMG,
        {**_TXT2IMG, "alwayson_scripts": {"ADetailer": {"args": _ADETAILER_ARGS}}}),
    Job("txt2img-instantid", "POST", TXT2IMG, {
        **_TXT2IMG, "override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0"}, "width": 1024, "height": 1024,
        "cfg_scale": 4.5, "steps": 25,
        "alwayson_scripts": {"controlnet": {"args": [
            _controlnet_unit(module="InsightFace (InstantID)", model="ip-adapter_instant_id_sdxl [eb2d3ec0]",
                             processor_res=768),
            _controlnet_unit(module="instant_id_face_keypoints", model="control_instant_id_sdxl [c5c25a50]",
                             processor_res=768),
        ]}}}),
    Job("img2img", "POST", IMG2IMG, _IMG2IMG),
    Job("img2img-controlnet", "POST", IMG2IMG, {**_IMG2IMG, "alwayson_scripts": {"controlnet": {"args": [
        _controlnet_unit()]}}}),
)

# The original README's GET pages: (page, endpoint); sd-vae is served by Forge's sd-modules.
GET_JOBS = tuple(Job(name, "GET", endpoint, {}) for name, endpoint in (
    ("get-controlnet-models", "/controlnet/model_list"), ("get-embeddings", "/sdapi/v1/embeddings"),
    ("get-extensions", "/sdapi/v1/extensions"), ("get-face-restorers", "/sdapi/v1/face-restorers"),
    ("get-hypernetworks", "/sdapi/v1/hypernetworks"), ("get-loras", "/sdapi/v1/loras"),
    ("get-latent-upscale-modes", "/sdapi/v1/latent-upscale-modes"), ("get-memory", "/sdapi/v1/memory"),
    ("get-models", "/sdapi/v1/sd-models"), ("get-options", "/sdapi/v1/options"),
    ("get-prompt-styles", "/sdapi/v1/prompt-styles"), ("get-realesrgan-models", "/sdapi/v1/realesrgan-models"),
    ("get-samplers", "/sdapi/v1/samplers"), ("get-schedulers", "/sdapi/v1/schedulers"),
    ("get-script-info", "/sdapi/v1/script-info"), ("get-scripts", "/sdapi/v1/scripts"),
    ("get-upscalers", "/sdapi/v1/upscalers"), ("get-vae", "/sdapi/v1/sd-vae"),
))

POST_JOBS = tuple(Job(name, "POST", endpoint, payload) for name, endpoint, payload in (
    ("refresh-checkpoints", "/sdapi/v1/refresh-checkpoints", {}),
    ("refresh-embeddings", "/sdapi/v1/refresh-embeddings", {}),
    ("refresh-loras", "/sdapi/v1/refresh-loras", {}),
    ("refresh-vae", "/sdapi/v1/refresh-vae", {}),
    ("interrogate", "/sdapi/v1/interrogate", {"image": PNG, "model": "clip"}),
))
