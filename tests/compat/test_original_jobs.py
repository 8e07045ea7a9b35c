"""The original runpod-worker-forge's documented jobs, sent through the worker to the Forge stand-in.

Each job goes through RunPod's local API to a worker booted from a volume the toolkit installed; the
stand-in logs what reached it. For every generation job the body Forge received must equal the one
the original worker sent (``original_body``: RunPod's validator on the original schema), except that
the client's own fields keep the JSON type the client wrote. GETs, options, refreshes and
interrogate must reach Forge as the same call and come back with Forge's answer. The download and
sync helpers, in the original's forms, answer with the original's fields and tell Forge to list the
new models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import Compat
from tests.compat.original import (
    GENERATION_JOBS,
    GET_JOBS,
    IMG2IMG,
    INSWAPPER,
    PNG,
    POST_JOBS,
    TXT2IMG,
    Job,
    original_body,
    strict_diff,
)
from tests.conftest import DATA
from tests.worker.conftest import CHECKPOINT
from volume_layout import SERVERLESS_MOUNT, VolumeLayout
from worker.routes import ALIASES

RESPONSES = DATA / "forge" / "responses"
MINIMAL = (Job("txt2img, fields left out", "POST", TXT2IMG, {"prompt": "a cat", "steps": 3}),
           Job("img2img, fields left out", "POST", IMG2IMG, {"prompt": "a cat", "init_images": [PNG], "steps": 3}))


def expected_body(job: Job) -> dict[str, Any]:
    """The original worker's body, with the client's own fields as the client wrote them."""
    return {**original_body(job.endpoint, job.payload), **job.payload}


@pytest.mark.parametrize("job", GENERATION_JOBS + MINIMAL, ids=lambda j: j.name)
def test_a_generation_reaches_forge_as_the_original_worker_sent_it(compat: Compat, job: Job) -> None:
    answer, received = compat.job(job.input)
    assert answer["status"] == "COMPLETED", answer
    (request,) = received
    assert (request["method"], request["path"]) == ("POST", job.endpoint)
    problem = strict_diff(request["body"], expected_body(job))
    assert problem is None, f"{job.name}: what reached Forge differs from the original worker's body: {problem}"
    output = answer["output"]
    assert set(output) == {"images", "parameters", "info"} and len(output["images"]) == 1
    assert output["parameters"]["alwayson_scripts"] == job.payload.get("alwayson_scripts", {})


def test_the_original_sent_floats_for_whole_numbers_in_float_fields_and_so_do_the_defaults(compat: Compat) -> None:
    # The client's cfg_scale 7 stays an int (Forge takes either); left-out float fields arrive as floats.
    _, (request,) = compat.job(MINIMAL[0].input)
    body = request["body"]
    assert [type(body[k]) for k in ("cfg_scale", "denoising_strength", "hr_scale", "refiner_switch_at")] == [float] * 4
    assert (body["steps"], body["eta"], body["s_noise"], body["sampler_name"]) == (3, 0, 0, "Euler a")
    _, (request,) = compat.job(GENERATION_JOBS[0].input)
    assert request["body"]["cfg_scale"] == 7 and type(request["body"]["cfg_scale"]) is int


def test_fields_the_original_refused_are_passed_and_a_mask_keeps_forges_mask_settings(compat: Compat) -> None:
    payload = {"prompt": "a cat", "init_images": [PNG], "mask": PNG, "steps": 3, "scheduler": "Karras",
               "distilled_cfg_scale": 3.5}
    answer, (request,) = compat.job({"api": {"method": "POST", "endpoint": IMG2IMG}, "payload": payload})
    assert answer["status"] == "COMPLETED", answer
    body = request["body"]
    assert {k: body[k] for k in payload} == payload and body["eta"] == 0 and body["denoising_strength"] == 0.75
    for left_to_forge in ("inpainting_mask_invert", "latent_mask", "mask_blur", "mask_blur_x", "inpainting_fill",
                          "inpaint_full_res", "inpaint_full_res_padding"):
        assert left_to_forge not in body


def test_forge_defaults_setting_sends_every_payload_exactly_as_written(compat_forge_defaults: Compat) -> None:
    job = GENERATION_JOBS[1]  # ReActor
    answer, (request,) = compat_forge_defaults.job(job.input)
    assert answer["status"] == "COMPLETED", answer
    assert strict_diff(request["body"], job.payload) is None


def _recorded(method: str, route: str) -> Any:
    return json.loads((RESPONSES / f"{method}_{route.strip('/').replace('/', '_')}.json").read_text())["body"]


@pytest.mark.parametrize("job", GET_JOBS, ids=lambda j: j.name)
def test_a_documented_get_reaches_forge_without_a_body_and_returns_forges_answer(compat: Compat, job: Job) -> None:
    answer, received = compat.job(job.input)
    assert answer["status"] == "COMPLETED", answer
    route = ALIASES[job.endpoint][0] if job.endpoint in ALIASES else job.endpoint
    (request,) = received
    assert request == {"method": "GET", "path": route, "query": [], "body": None}
    if route == "/sdapi/v1/sd-models":  # the stand-in lists the volume's checkpoints
        # Once a generation loaded (and hashed) it, Forge's title ends in " [<short hash>]".
        assert [m["title"].split(" [")[0] for m in answer["output"]] == [CHECKPOINT]
    elif route != "/sdapi/v1/options":  # options: the stand-in's, changed by set-model below
        assert answer["output"] == _recorded("GET", route)


@pytest.mark.parametrize("job", POST_JOBS, ids=lambda j: j.name)
def test_refreshes_and_interrogate_reach_forge_as_sent(compat: Compat, job: Job) -> None:
    answer, (request,) = compat.job(job.input)
    assert answer["status"] == "COMPLETED", answer
    assert (request["method"], request["path"], request["body"]) == ("POST", job.endpoint, job.payload)
    if job.endpoint == "/sdapi/v1/interrogate":
        assert answer["output"] == {"caption": "a cat"}
    else:
        assert answer.get("output") == _recorded("POST", job.endpoint)


def test_set_model_and_set_vae_are_options_posts_and_get_options_shows_them(compat: Compat) -> None:
    for payload in ({"sd_model_checkpoint": CHECKPOINT}, {"sd_vae": "sdxl_vae.safetensors"}):
        answer, (request,) = compat.job({"api": {"method": "POST", "endpoint": "/sdapi/v1/options"},
                                         "payload": payload})
        assert answer["status"] == "COMPLETED" and answer.get("output") is None, answer
        assert request["body"] == payload
    answer, _ = compat.job({"api": {"method": "GET", "endpoint": "/sdapi/v1/options"}, "payload": {}})
    assert (answer["output"]["sd_model_checkpoint"], answer["output"]["sd_vae"]) == (CHECKPOINT, "sdxl_vae.safetensors")


def test_an_endpoint_without_its_leading_slash_works(compat: Compat) -> None:
    answer, (request,) = compat.job({"api": {"method": "POST", "endpoint": "sdapi/v1/txt2img"},
                                     "payload": {"prompt": "a cat", "steps": 2}})
    assert answer["status"] == "COMPLETED" and request["path"] == TXT2IMG, answer
    answer, (request,) = compat.job({"api": {"method": "GET", "endpoint": "sdapi/v1/samplers"}, "payload": {}})
    assert answer["output"] == _recorded("GET", "/sdapi/v1/samplers") and request["path"] == "/sdapi/v1/samplers"


def test_a_gets_payload_goes_to_forge_as_query_parameters(compat: Compat) -> None:
    answer, received = compat.job({"api": {"method": "GET", "endpoint": "/sdapi/v1/progress"},
                                   "payload": {"skip_current_image": True}}, polls=True)
    assert answer["status"] == "COMPLETED" and set(answer["output"]) >= {"progress", "state"}, answer
    assert received == [{"method": "GET", "path": "/sdapi/v1/progress", "query": [["skip_current_image", "true"]],
                         "body": None}]
    # The proxy keeps one URL per route: the next job's parameters are its own, none carried over.
    answer, received = compat.job({"api": {"method": "GET", "endpoint": "/sdapi/v1/progress"},
                                   "payload": {"id_live_preview": 3}}, polls=True)
    assert answer["status"] == "COMPLETED", answer
    assert [r["query"] for r in received] == [[["id_live_preview", "3"]]]
    answer, received = compat.job({"api": {"method": "GET", "endpoint": "/sdapi/v1/progress"}, "payload": {}},
                                  polls=True)
    assert answer["status"] == "COMPLETED" and [r["query"] for r in received] == [[]], answer


def test_a_refused_call_keeps_its_one_line_error_and_the_worker(compat: Compat) -> None:
    # The local API shows `error` only; the `output` detail field is checked in tests/worker/test_handler.py.
    answer, _ = compat.job({"api": {"method": "POST", "endpoint": "/sdapi/v1/options"},
                            "payload": {"sd_model_checkpoint": "no-such-model"}})
    assert answer["status"] == "FAILED"
    assert answer["error"].startswith("Forge answered 500 to POST /sdapi/v1/options: ") and "\n" not in answer["error"]
    answer, _ = compat.job({"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}, "payload": {}})
    assert answer["status"] == "COMPLETED"



def test_reactors_documented_model_path_names_the_volumes_model(compat: Compat) -> None:
    """args[4] of the original docs, /runpod-volume/stable-diffusion-webui-forge/models/insightface/...,
    read on this volume (mounted elsewhere here) names the file the volume holds under models/insightface.
    ReActor gets the path as sent (test_a_generation_reaches_forge_as_the_original_worker_sent_it)."""
    volume = Path(compat.worker.env["FORGE_VOLUME"])
    layout = VolumeLayout(volume)
    model = layout.model_path("insightface", "inswapper_128.onnx")
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"not really a model\n")
    here = volume / Path(INSWAPPER).relative_to(SERVERLESS_MOUNT)
    assert here.is_file() and here.resolve() == model.resolve()
    assert here.read_bytes() == model.read_bytes()


REFRESHES = [{"method": "POST", "path": f"/sdapi/v1/refresh-{kind}", "query": [], "body": None}
             for kind in ("checkpoints", "vae", "loras", "embeddings")]


def test_download_in_the_original_form_lands_where_the_original_path_names_it(compat: Compat) -> None:
    weights = b"lora weights " * 100
    compat.files.add("/loras/detail-tweaker.safetensors", weights)
    original_path = "/runpod-volume/stable-diffusion-webui-forge/models/Lora/detail-tweaker.safetensors"
    answer, received = compat.job({"api": {"method": "POST", "endpoint": "/v1/download"}, "payload": {
        "source_url": compat.files.url("/loras/detail-tweaker.safetensors"), "download_path": original_path}})
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["msg"] == "Download successful"
    assert output["source_url"] == compat.files.url("/loras/detail-tweaker.safetensors")
    assert Path(output["download_path"]).read_bytes() == weights
    # The original's own path, read on this volume, names the same file (the checkout's models/Lora link).
    here = compat.volume / Path(original_path).relative_to(SERVERLESS_MOUNT)
    assert here.read_bytes() == weights and here.resolve() == Path(output["download_path"]).resolve()
    assert received == REFRESHES  # Forge is told to list the new model


def test_sync_in_the_original_form_mirrors_the_repos_folders_into_the_kind_folders(compat: Compat) -> None:
    files = {"Lora/sync-lora.safetensors": b"l" * 300, "embeddings/sync-embedding.pt": b"e" * 200,
             "README.md": b"# not a model\n"}
    compat.hub.add_repo("someone/models-for-forge", files)
    answer, received = compat.job({"api": {"method": "POST", "endpoint": "/v1/sync"}, "payload": {
        "repo_id": "someone/models-for-forge", "sync_path": "/runpod-volume/stable-diffusion-webui-forge/models",
        "hf_token": ""}})
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["synced_count"] == 2 and len(output["synced_files"]) == 2
    landed = {Path(p).relative_to(compat.volume / "models").as_posix(): Path(p).read_bytes()
              for p in output["synced_files"]}
    assert landed == {k: v for k, v in files.items() if "/" in k}  # root files skipped, as the original did
    assert received == REFRESHES
