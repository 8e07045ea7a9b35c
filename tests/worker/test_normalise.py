"""The job-input normaliser and the routes table: pure functions, no worker needed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import DATA
from worker.normalise import ForgeCall, HelperCall, InputError, normalise
from worker.original_defaults import MASK_SETTINGS, NOT_IN_SCHEMA, TABLE
from worker.routes import ALIASES, FORGE_ROUTES, GENERATING, HELPER_ROUTES

OPENAPI = json.loads((DATA / "forge" / "openapi.json").read_text())
SEED_ROUTES = {  # the original runpod-worker-forge's documented endpoints, as Forge routes
    ("GET", "/controlnet/model_list"), ("GET", "/sdapi/v1/embeddings"), ("GET", "/sdapi/v1/extensions"),
    ("GET", "/sdapi/v1/face-restorers"), ("GET", "/sdapi/v1/hypernetworks"), ("GET", "/sdapi/v1/loras"),
    ("GET", "/sdapi/v1/latent-upscale-modes"), ("GET", "/sdapi/v1/memory"), ("GET", "/sdapi/v1/sd-models"),
    ("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/prompt-styles"), ("GET", "/sdapi/v1/realesrgan-models"),
    ("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/schedulers"), ("GET", "/sdapi/v1/script-info"),
    ("GET", "/sdapi/v1/scripts"), ("GET", "/sdapi/v1/upscalers"), ("GET", "/sdapi/v1/sd-vae"),
    ("POST", "/sdapi/v1/img2img"), ("POST", "/sdapi/v1/interrogate"), ("POST", "/sdapi/v1/refresh-checkpoints"),
    ("POST", "/sdapi/v1/refresh-embeddings"), ("POST", "/sdapi/v1/refresh-loras"), ("POST", "/sdapi/v1/refresh-vae"),
    ("POST", "/sdapi/v1/options"), ("POST", "/sdapi/v1/txt2img"),
}
DESIGN_ROUTES = {"/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/png-info",
                 "/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images", "/sdapi/v1/schedulers",
                 "/sdapi/v1/sd-modules", "/sdapi/v1/cmd-flags", "/controlnet/module_list", "/controlnet/control_types",
                 "/controlnet/detect", "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint"}


def envelope(method: str, endpoint: str, payload: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        out["payload"] = payload
    return out


def test_every_proxied_route_and_method_is_in_forges_openapi() -> None:
    for route, methods in FORGE_ROUTES.items():
        assert route in OPENAPI["paths"], route
        assert methods == {m.upper() for m in OPENAPI["paths"][route]}, route
    for target, methods in ALIASES.values():
        assert methods <= FORGE_ROUTES[target]


def test_the_original_workers_routes_and_the_designs_are_all_served() -> None:
    for method, endpoint in SEED_ROUTES:
        call = normalise(envelope(method, endpoint, {} if method == "POST" else None))
        assert isinstance(call, ForgeCall) and call.method == method and call.route in OPENAPI["paths"]
    assert set(FORGE_ROUTES) >= DESIGN_ROUTES


def test_training_and_server_control_routes_are_not_proxied() -> None:
    unproxied = set(OPENAPI["paths"]) - set(FORGE_ROUTES)
    assert unproxied == {"/sdapi/v1/create/embedding", "/sdapi/v1/create/hypernetwork"}
    with pytest.raises(InputError, match="unknown endpoint /sdapi/v1/create/embedding"):
        normalise(envelope("POST", "/sdapi/v1/create/embedding", {}))


def test_the_payload_passes_through_untouched_where_the_original_had_no_defaults() -> None:
    payload = {"prompt": "a cat", "scheduler": "karras", "distilled_cfg_scale": 3.5, "no_such_field": [1, {"x": None}]}
    call = normalise(envelope("POST", "/sdapi/v1/txt2img", payload), original_defaults=False)
    assert call == ForgeCall("POST", "/sdapi/v1/txt2img", payload, "/sdapi/v1/txt2img")
    assert call.payload is payload and call.generates
    options = {"sd_model_checkpoint": "x"}
    assert normalise(envelope("POST", "/sdapi/v1/options", options)).payload is options


def test_txt2img_gets_the_original_defaults_for_what_it_leaves_out_and_keeps_what_it_sent() -> None:
    payload = {"prompt": "a cat", "cfg_scale": 7, "steps": 30, "scheduler": "Karras", "distilled_cfg_scale": 3,
               "eta": 0.5}
    call = normalise(envelope("POST", "/sdapi/v1/txt2img", dict(payload)))
    assert isinstance(call, ForgeCall) and call.payload is not None
    sent = call.payload
    for key, value in payload.items():  # the caller's fields: same value, same JSON type
        assert sent[key] == value and type(sent[key]) is type(value), key
    picked = (sent["sampler_name"], sent["s_noise"], sent["denoising_strength"], sent["hr_scale"])
    assert picked == ("Euler a", 0, 0.0, 2.0)
    assert type(sent["denoising_strength"]) is float and type(sent["s_noise"]) is int
    assert "init_images" not in sent and "mask_blur" not in sent  # img2img's fields are not txt2img's
    assert set(sent) == set(payload) | {k for k, (t, _) in TABLE.items() if t is not NOT_IN_SCHEMA}


def test_img2img_gets_its_own_column_and_a_mask_keeps_forges_mask_settings() -> None:
    plain = normalise(envelope("POST", "/sdapi/v1/img2img", {"prompt": "a", "init_images": ["x"]})).payload
    assert plain is not None
    assert (plain["denoising_strength"], plain["image_cfg_scale"], plain["inpainting_mask_invert"]) == (0.75, 0.0, 1)
    assert "enable_hr" not in plain and "hr_scale" not in plain
    masked = normalise(envelope("POST", "/sdapi/v1/img2img", {"prompt": "a", "init_images": ["x"], "mask": "m",
                                                              "mask_blur": 8})).payload
    assert masked is not None and masked["mask_blur"] == 8 and masked["steps"] == 20
    assert not (set(masked) & (MASK_SETTINGS - {"mask_blur"}))


def test_an_infotext_request_gets_no_defaults_they_would_override_it() -> None:
    payload = {"prompt": "", "infotext": "a cat\nSteps: 7, Sampler: Euler, CFG scale: 3, Seed: 1"}
    assert normalise(envelope("POST", "/sdapi/v1/txt2img", payload)).payload is payload


def test_defaults_are_fresh_copies_per_request() -> None:
    first = normalise(envelope("POST", "/sdapi/v1/txt2img", {"prompt": "a"})).payload
    assert first is not None
    first["override_settings"]["sd_model_checkpoint"] = "mutated"
    first["styles"].append("mutated")
    second = normalise(envelope("POST", "/sdapi/v1/txt2img", {"prompt": "b"})).payload
    assert second is not None and second["override_settings"] == {} and second["styles"] == []


def test_an_endpoint_without_its_leading_slash_works_as_in_the_original() -> None:
    call = normalise(envelope("POST", "sdapi/v1/txt2img", {"prompt": "a"}))
    assert isinstance(call, ForgeCall) and (call.route, call.endpoint) == ("/sdapi/v1/txt2img", "/sdapi/v1/txt2img")
    assert normalise(envelope("GET", "v1/volume")) == HelperCall("/v1/volume", {})


def test_a_gets_payload_fields_become_query_parameters() -> None:
    call = normalise(envelope("GET", "/sdapi/v1/progress", {"skip_current_image": True}))
    assert call == ForgeCall("GET", "/sdapi/v1/progress", None, "/sdapi/v1/progress", (("skip_current_image", "true"),))
    call = normalise(envelope("GET", "/sdapi/v1/samplers", {"n": 2, "s": "x y", "l": ["a", 1], "none": None,
                                                            "d": {"k": 1}}))
    assert isinstance(call, ForgeCall)
    assert call.query == (("n", "2"), ("s", "x y"), ("l", "a"), ("l", "1"), ("d", '{"k": 1}'))


def test_lower_case_method_and_trailing_slash_are_normalised() -> None:
    call = normalise(envelope("post", "/sdapi/v1/img2img/", {"init_images": []}))
    assert isinstance(call, ForgeCall) and (call.method, call.route) == ("POST", "/sdapi/v1/img2img")


def test_a_get_may_carry_an_empty_payload_as_the_original_docs_did() -> None:
    call = normalise(envelope("GET", "/sdapi/v1/sd-models", {}))
    assert call == ForgeCall("GET", "/sdapi/v1/sd-models", None, "/sdapi/v1/sd-models")
    assert not call.generates and call.query == ()


def test_no_payload_means_no_body_not_an_injected_default() -> None:
    call = normalise(envelope("POST", "/sdapi/v1/refresh-checkpoints"))
    assert isinstance(call, ForgeCall) and call.payload is None


def test_sd_vae_is_served_by_forges_sd_modules() -> None:
    call = normalise(envelope("GET", "/sdapi/v1/sd-vae"))
    assert isinstance(call, ForgeCall) and call.route == "/sdapi/v1/sd-modules" and call.endpoint == "/sdapi/v1/sd-vae"


def test_helpers_are_helper_calls() -> None:
    assert set(HELPER_ROUTES) == {"/v1/download", "/v1/sync", "/v1/refresh-models", "/v1/volume"}
    assert normalise(envelope("GET", "/v1/volume")) == HelperCall("/v1/volume", {})
    call = normalise(envelope("POST", "/v1/download", {"source_url": "https://x/y", "download_path": "Lora"}))
    assert call == HelperCall("/v1/download", {"source_url": "https://x/y", "download_path": "Lora"})


def test_progress_is_reported_for_generating_routes_only() -> None:
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image",
            "/sdapi/v1/extra-batch-images"} == set(GENERATING)


@pytest.mark.parametrize(("job_input", "message"), [
    (None, "must be a JSON object"),
    ("txt2img", "must be a JSON object.*not a string"),
    ({}, "no 'api' object"),
    ({"payload": {}}, "no 'api' object"),
    ({"api": "POST /sdapi/v1/txt2img"}, "'api' must be an object"),
    ({"api": {"endpoint": "/sdapi/v1/txt2img"}}, "'api.method' is missing"),
    (envelope("PUT", "/sdapi/v1/txt2img"), "must be GET or POST, not 'PUT'"),
    (envelope(7, "/sdapi/v1/txt2img"), "must be GET or POST, not 7"),  # type: ignore[arg-type]
    ({"api": {"method": "GET"}}, "'api.endpoint' is missing"),
    (envelope("GET", ""), "must be a path"),
    (envelope("GET", "http://127.0.0.1:7861/sdapi/v1/samplers"), "not a URL"),
    (envelope("GET", "//evil.example/sdapi/v1/samplers"), "not a URL"),
    (envelope("GET", "/sdapi/v1/progress?skip_current_image=true"), "must not carry a query string"),
    (envelope("GET", "/sdapi/v1/../v1/samplers"), "must not contain '.', '..'"),
    (envelope("GET", "/sdapi/v1/sd_models"), "unknown endpoint /sdapi/v1/sd_models; did you mean /sdapi/v1/sd-models"),
    (envelope("GET", "/nothing"), "unknown endpoint /nothing; accepted: .*/sdapi/v1/txt2img"),
    (envelope("GET", "/sdapi/v1/txt2img"), "/sdapi/v1/txt2img takes POST, not GET"),
    (envelope("POST", "/v1/volume"), "/v1/volume takes GET, not POST"),
    (envelope("POST", "/sdapi/v1/txt2img", ["a cat"]), "'payload' must be a JSON object, not a list"),
    (envelope("POST", "/sdapi/v1/txt2img", "a cat"), "'payload' must be a JSON object, not a string"),
])
def test_each_malformed_input_gets_a_precise_one_line_error(job_input: Any, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        normalise(job_input)
    assert "\n" not in str(info.value)
