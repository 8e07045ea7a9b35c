"""docs/api cannot drift from the worker or from Forge.

Every request example is accepted by the worker's own normaliser (and every invalid one refused
with the error its page shows); every documented route is proxied and every proxied route is
documented; every documented Forge response is the recorded real one (abbreviated only where the
page says so); the progress and error texts are what the worker produces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.docs.apidocs import (
    API,
    DOCS,
    KINDS,
    RESPONSES,
    ROOT,
    Example,
    all_examples,
    blocks,
    call_pages,
    matches,
    pages,
    recordings,
)
from worker.normalise import ForgeCall, HelperCall, InputError, normalise
from worker.original_defaults import NOT_IN_SCHEMA, TABLE
from worker.routes import ALIASES, FORGE_ROUTES, HELPER_ROUTES

# The calls the original runpod-worker-forge documented (its docs/api/a1111 and helper pages).
ORIGINAL_CALLS = (
    "get-controlnet-models", "get-embeddings", "get-extensions", "get-face-restorers", "get-hypernetworks",
    "get-loras", "get-latent-upscale-modes", "get-memory", "get-models", "get-options", "get-prompt-styles",
    "get-realesrgan-models", "get-samplers", "get-schedulers", "get-script-info", "get-scripts",
    "get-upscalers", "get-vae", "img2img", "img2img-controlnet", "interrogate", "refresh-checkpoints",
    "refresh-embeddings", "refresh-loras", "refresh-vae", "set-model", "set-vae", "txt2img", "txt2img-reactor",
    "txt2img-adetailer", "txt2img-instantid",
)
ORIGINAL_HELPERS = ("download", "sync")
# Top-level keys RunPod's /run and /runsync accept next to "input".
RUNPOD_BODY_KEYS = {"input", "webhook", "policy", "s3Config"}

EXAMPLES = all_examples()
VALID = [e for e in EXAMPLES if e.request.kind == "request"]
INVALID = [e for e in EXAMPLES if e.request.kind == "request invalid"]


def _ids(examples: list[Example]) -> list[str]:
    return [e.request.where for e in examples]


def _call(example: Example) -> ForgeCall | HelperCall:
    return normalise(example.request.data()["input"])


def test_docs_exist() -> None:
    assert len(call_pages()) >= len(ORIGINAL_CALLS) + len(ORIGINAL_HELPERS)
    assert len(VALID) >= len(call_pages())


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(API)))
def test_examples_are_json_with_known_markers(page: Path) -> None:
    for block in blocks(page):
        assert block.kind in KINDS, f"{block.where}: unknown example marker 'json {block.kind}'"
        try:
            block.data()
        except ValueError as exc:
            pytest.fail(f"{block.where}: not valid JSON: {exc}")


@pytest.mark.parametrize("page", call_pages(), ids=lambda p: str(p.relative_to(API)))
def test_each_call_page_has_a_request_with_its_response(page: Path) -> None:
    found = [e for e in all_examples() if e.request.page == page and e.request.kind == "request"]
    assert found, f"{page.relative_to(ROOT)}: no 'json request' example"
    for example in found:
        assert example.responses, f"{example.request.where}: no 'json response' example after this request"
    for heading in ("## Request", "## Response"):
        assert heading in page.read_text(encoding="utf-8"), f"{page.relative_to(ROOT)}: no '{heading}' section"


@pytest.mark.parametrize("example", VALID, ids=_ids(VALID))
def test_request_is_accepted_and_proxied(example: Example) -> None:
    body = example.request.data()
    assert isinstance(body, dict) and "input" in body, f"{example.request.where}: the body must be {{\"input\": ...}}"
    extra = set(body) - RUNPOD_BODY_KEYS
    assert not extra, f"{example.request.where}: keys RunPod does not take: {extra}"
    try:
        call = normalise(body["input"])
    except InputError as exc:
        pytest.fail(f"{example.request.where}: the worker refuses this example: {exc}")
    if isinstance(call, HelperCall):
        assert call.endpoint in HELPER_ROUTES
    else:
        assert call.method in FORGE_ROUTES[call.route], f"{example.request.where}: {call.method} {call.route}"


@pytest.mark.parametrize("example", INVALID, ids=_ids(INVALID))
def test_invalid_request_fails_with_the_documented_error(example: Example) -> None:
    with pytest.raises(InputError) as caught:
        _call(example)
    (response,) = example.responses
    documented = response.data()
    assert documented["status"] == "FAILED"
    # The handler fails the job with the normaliser's message on one line.
    assert documented["error"] == " ".join(str(caught.value).split()), response.where


def test_every_proxied_route_is_documented() -> None:
    documented = set()
    for example in VALID:
        api = example.request.data()["input"]["api"]
        documented.add((api["method"].upper(), api["endpoint"]))
    served = {(m, r) for r, methods in FORGE_ROUTES.items() for m in methods}
    served |= {(m, r) for r, (_, methods) in ALIASES.items() for m in methods}
    served |= {(m, r) for r, methods in HELPER_ROUTES.items() for m in methods}
    missing = sorted(served - documented)
    assert not missing, f"proxied but without a request example in docs/api: {missing}"


def test_the_original_workers_calls_all_have_a_page() -> None:
    missing = [c for c in ORIGINAL_CALLS if not (API / "forge" / f"{c}.md").exists()]
    missing += [f"helper/{h}" for h in ORIGINAL_HELPERS if not (API / "helper" / f"{h}.md").exists()]
    assert not missing


def _recorded_bodies(method: str, route: str) -> list[tuple[str, Any]]:
    found = []
    for rec in recordings():
        if rec["method"] == method and rec["path"].split("?")[0] == route and rec["status"] == 200:
            # The worker turns Forge's {} into a null output (RunPod drops an empty object).
            found.append((rec["file"], None if rec["body"] == {} else rec["body"]))
    return found


FORGE_RESPONSES = [e for e in VALID
                   if any(r.kind == "response" for r in e.responses) and isinstance(_call(e), ForgeCall)]


@pytest.mark.parametrize("example", FORGE_RESPONSES, ids=_ids(FORGE_RESPONSES))
def test_documented_forge_response_is_the_recorded_one(example: Example) -> None:
    call = _call(example)
    assert isinstance(call, ForgeCall)
    for response in example.responses:
        if response.kind != "response":
            continue
        documented = response.data()
        assert set(documented) >= {"id", "status"}, response.where
        if documented["status"] != "COMPLETED":
            continue  # error texts: test_invalid_request_fails_with_the_documented_error and the live test
        real = _recorded_bodies(call.method, call.route)
        assert real, f"{response.where}: no recording of {call.method} {call.route}; mark it 'json response unrecorded'"
        assert any(matches(documented["output"], body) for _, body in real), (
            f"{response.where}: the documented output is none of the recorded responses of {call.method} {call.route} "
            f"({', '.join(name for name, _ in real)}); copy it from tests/data/forge/responses/")


UNRECORDED = [e for e in VALID if any(r.kind == "response unrecorded" for r in e.responses)]


@pytest.mark.parametrize("example", UNRECORDED, ids=_ids(UNRECORDED))
def test_unrecorded_responses_only_where_no_recording_exists(example: Example) -> None:
    call = _call(example)
    if isinstance(call, ForgeCall):
        real = _recorded_bodies(call.method, call.route)
        assert not real, f"{example.request.where}: a recording exists ({real[0][0]}); document that instead"
    text = example.request.page.read_text(encoding="utf-8")
    assert "Not recorded" in text or "not recorded" in text, f"{example.request.where}: say why it is not recorded"


def test_progress_example_is_what_the_worker_reports() -> None:
    from worker.progress import summarise

    recorded = json.loads((RESPONSES / "GET_sdapi_v1_progress_during_generation.json").read_text(encoding="utf-8"))
    examples = [b for p in pages() for b in blocks(p) if b.kind == "progress"]
    assert examples, "docs/api/jobs.md should show a progress report"
    for block in examples:
        assert block.data() == summarise(recorded["body"]), block.where


def test_result_too_large_message_is_the_workers() -> None:
    from worker.outputs import MB, too_big

    message = too_big(int(31.4 * MB), 20 * MB, upload=False)
    assert message is not None
    assert message in (API / "jobs.md").read_text(encoding="utf-8")


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("page", [*pages(), DOCS / "cli.md", ROOT / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page.relative_to(ROOT)} not written yet")
    for target, _ in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_index_lists_every_call_page() -> None:
    index = (API / "README.md").read_text(encoding="utf-8")
    missing = [p.relative_to(API).as_posix() for p in call_pages() if f"({p.relative_to(API).as_posix()})" not in index]
    assert not missing, f"docs/api/README.md does not link: {missing}"


def test_the_defaults_table_is_the_workers() -> None:
    text = (ROOT / "docs" / "api" / "README.md").read_text(encoding="utf-8")
    section = text.split("## Defaults for fields you leave out", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, tuple[Any, Any]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        values = tuple(NOT_IN_SCHEMA if c == "" else json.loads(c.strip("`")) for c in cells[1:])
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            documented[name] = values
    assert set(documented) == set(TABLE)
    for name, (t2i, i2i) in TABLE.items():
        for doc, real in zip(documented[name], (t2i, i2i), strict=True):
            assert doc is real if real is NOT_IN_SCHEMA else (doc == real and type(doc) is type(real)), name
