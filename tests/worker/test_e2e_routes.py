"""Every proxied route through RunPod's local API, against the Forge stand-in booted from an installed volume.

One worker serves the whole module. Each route answers with the shape Forge recorded; caller
mistakes fail the job and leave the worker serving; the volume is not written during inference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, snapshot
from tests.worker.conftest import CHECKPOINT, WorkerProc, worker_env
from worker.routes import FORGE_ROUTES

RESPONSES = {p.stem: json.loads(p.read_text()) for p in (DATA / "forge" / "responses").glob("*.json")}
# The main recording of each route (variants such as _bad_type carry a suffix after the route's name).
PLAIN = {name: r for name, r in RESPONSES.items()
         if name == f"{r['method']}_" + r["path"].strip("/").replace("/", "_") and r["path"] in FORGE_ROUTES}


def call(worker: WorkerProc, method: str, endpoint: str, payload: Any = None, **kw: Any) -> dict[str, Any]:
    job: dict[str, Any] = {"api": {"method": method, "endpoint": endpoint}}
    if payload is not None:
        job["payload"] = payload
    return worker.runsync(job, **kw)


@pytest.fixture(scope="module")
def before(worker_volume: Path) -> dict[str, tuple[int, int]]:
    return snapshot(worker_volume)


def test_recorded_exchanges_cover_every_plain_route() -> None:
    covered = {r["path"] for r in PLAIN.values()}
    unrecorded = set(FORGE_ROUTES) - covered
    # No recording exists for these: the stand-in answers them with Forge's documented shapes.
    assert unrecorded == {"/sdapi/v1/interrogate", "/sdapi/v1/skip"}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_each_route_answers_with_forges_recorded_shape(worker: WorkerProc, before: object, name: str) -> None:
    rec = PLAIN[name]
    payload = rec["request"] if isinstance(rec["request"], dict) else None
    out = call(worker, rec["method"], rec["path"], payload)
    assert out["status"] == "COMPLETED", out
    body, got = rec["body"], out.get("output")
    if body == {}:
        assert got is None  # RunPod drops an empty object; the worker says "nothing" instead
    elif rec["path"] == "/sdapi/v1/sd-models":
        assert [m["title"] for m in got] == [CHECKPOINT] and set(got[0]) == set(body[0])
    elif isinstance(body, dict) and "images" in body:
        assert set(got) == set(body) and len(got["images"]) == len(body["images"])
    elif rec["path"] == "/sdapi/v1/options":
        assert set(got) == set(body)
    else:
        assert got == body


def test_unrecorded_routes_and_the_sd_vae_alias(worker: WorkerProc) -> None:
    assert call(worker, "POST", "/sdapi/v1/interrogate", {"image": "iVBORw0KGgo=", "model": "clip"})["output"] == \
        {"caption": "a cat"}
    assert call(worker, "POST", "/sdapi/v1/skip")["status"] == "COMPLETED"
    progress = call(worker, "GET", "/sdapi/v1/progress", {})["output"]
    assert set(progress) == set(RESPONSES["GET_sdapi_v1_progress"]["body"])
    assert call(worker, "GET", "/sdapi/v1/sd-vae", {})["output"] == RESPONSES["GET_sdapi_v1_sd-modules"]["body"]


def test_run_then_status_works_too(worker: WorkerProc) -> None:
    out = worker.run_and_status({"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}})
    assert out["status"] == "COMPLETED" and out["output"] == RESPONSES["GET_sdapi_v1_samplers"]["body"]


def test_a_generation_reports_progress_in_the_log(worker: WorkerProc) -> None:
    out = call(worker, "POST", "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 60, "batch_size": 2})
    assert out["status"] == "COMPLETED" and len(out["output"]["images"]) == 2
    assert out["output"]["parameters"]["steps"] == 60
    assert f"{out['id']} progress" in worker.log()


@pytest.mark.parametrize(("job_input", "error"), [
    ({"prompt": "a cat"}, "no 'api' object"),
    ({"api": {"method": "DELETE", "endpoint": "/sdapi/v1/txt2img"}}, "must be GET or POST"),
    ({"api": {"method": "GET", "endpoint": "/sdapi/v1/no-such"}}, "unknown endpoint /sdapi/v1/no-such"),
    ({"api": {"method": "GET", "endpoint": "/sdapi/v1/txt2img"}}, "takes POST, not GET"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {"prompt": "x", "steps": "many"}},
     "Forge answered 422 to POST /sdapi/v1/txt2img: steps: Input should be a valid integer"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/options"}, "payload": {"sd_model_checkpoint": "nope"}},
     "Forge answered 500 to POST /sdapi/v1/options: RuntimeError: model 'nope' not found"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/img2img"}, "payload": {"init_images": ["not-base64!!"]}},
     "Forge answered 500 to POST /sdapi/v1/img2img: Invalid encoded image"),
    ({"api": {"method": "POST", "endpoint": "/sdapi/v1/options"}}, "Forge answered 422"),
])
def test_caller_mistakes_fail_the_job_with_one_line_and_keep_the_worker(worker: WorkerProc, job_input: Any,
                                                                        error: str) -> None:
    out = worker.runsync(job_input)
    assert out["status"] == "FAILED" and error in out["error"], out
    assert "\n" not in out["error"] and "Traceback" not in out["error"]
    assert call(worker, "GET", "/sdapi/v1/samplers")["status"] == "COMPLETED"


def test_set_model_then_generate(worker: WorkerProc) -> None:
    assert call(worker, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd15"})["status"] == "COMPLETED"
    assert call(worker, "GET", "/sdapi/v1/options")["output"]["sd_model_checkpoint"] == "tiny-sd15"


def test_inference_wrote_nothing_to_the_volume(worker: WorkerProc, worker_volume: Path,
                                               before: dict[str, tuple[int, int]]) -> None:
    for payload in ({"prompt": "a", "steps": 3}, {"prompt": "b", "steps": 3, "n_iter": 2}):
        assert call(worker, "POST", "/sdapi/v1/txt2img", payload)["status"] == "COMPLETED"
    assert call(worker, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT})["status"] == "COMPLETED"
    assert snapshot(worker_volume) == before


def test_the_local_test_job_runs_and_exits_cleanly(worker_volume: Path, module_tmp: Path) -> None:
    """`python -m worker` in a folder with test_input.json: one job, exit 0, no aiohttp session left open."""
    folder = module_tmp / "local-job"
    folder.mkdir()
    job = {"input": {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"},
                     "payload": {"prompt": "a", "steps": 2}}}
    (folder / "test_input.json").write_text(json.dumps(job), encoding="utf-8")
    env = worker_env(worker_volume, module_tmp / "scratch")
    done = subprocess.run([sys.executable, "-m", "worker"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "completed successfully" in output, output[-3000:]
    assert "Unclosed" not in output, output[-3000:]
