"""Secrets (issue 5, case 20): HF_TOKEN, CIVITAI_TOKEN, the bucket keys and payload tokens.

Every test of this suite runs with those set to distinctive values, and the leak guard
(conftest.py) greps each test's captured output, its volumes' state.json and lock, every fleet
worker's log and every result posted to RunPod for them. These tests add the paths where a token
is most likely to escape: tokens that are refused, ``--debug`` tracebacks, status, and the worker's
answers about the volume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.forge_world import World
from volume_layout import VolumeLayout

from .conftest import (
    BUCKET_KEY_ID,
    BUCKET_SECRET,
    CIVITAI_SECRET,
    HF_SECRET,
    PAYLOAD_SECRET,
    SECRETS,
    Fleet,
    ModelHosts,
    Streams,
    cli,
    leaks,
    model_toml,
    sha,
)
from .test_worker_faults import fan_out, one_line_error, result


def test_case20_the_leak_guard_finds_what_it_looks_for() -> None:
    """Fault: a secret planted in a stream, and the one exemption (a presigned URL's key ID).
    Expected: every secret is found anywhere in a text; the access key ID only inside a presigned
    URL's X-Amz-Credential is allowed (SigV4 URLs must name it; the secret key never appears).
    Checked after: nothing else; this keeps the guard itself honest."""
    for secret in SECRETS:
        assert leaks("planted", f"line one\nAuthorization: Bearer {secret}\n"), secret
    url = f"http://s3/outputs/a.png?X-Amz-Credential={BUCKET_KEY_ID}%2F20260101%2Fus-east-1&X-Amz-Signature=ab"
    assert leaks("presigned", url) == []
    assert leaks("key id elsewhere", f"{url} key={BUCKET_KEY_ID}")
    assert leaks("secret key in a URL", f"{url}&secret={BUCKET_SECRET}")


def test_case20_toolkit_never_shows_a_token(installed_volume: Path, provisioned_world: World,
                                            model_hosts: ModelHosts, streams: Streams,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: a spec with a private Hugging Face model (needs HF_TOKEN) and a civitai model whose
    download needs CIVITAI_TOKEN; every command run with the right tokens, then with wrong ones
    (each containing the right one, so an echo of it is caught too), with and without --debug.
    Expected: with the right tokens lock, install, plan, verify, status and status --json succeed;
    with wrong ones the errors name the variable (HF_TOKEN, CIVITAI_TOKEN), never its value.
    Checked after: no token in any output, traceback, state.json or lock (leak guard), and the
    status JSON holds no value of Forge's environment."""
    hub = model_hosts.hub
    private = os.urandom(30_000)
    hub.add_repo("org/private", {"private.safetensors": private}, token=HF_SECRET)
    lora = os.urandom(20_000)
    model_hosts.civitai("777", "early-access.safetensors", lora)
    extra = model_toml("checkpoint", "hf://org/private/private.safetensors") + model_toml("lora", "civitai://777")
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
    for args in (("lock",), ("install",), ("plan",), ("verify", "--deep"), ("status",), ("status", "--json")):
        done = cli(streams, *args)
        assert done.exit_code == 0, (args, done.output)
    assert (installed_volume / "models" / "Stable-diffusion" / "private.safetensors").read_bytes() == private
    assert (installed_volume / "models" / "Lora" / "early-access.safetensors").read_bytes() == lora
    report = json.loads(cli(streams, "status", "--json").stdout)
    assert "FIXTURE_SECRET_TOKEN" in report["forge_env_names"] and "s3cr3t-fixture-value" not in json.dumps(report)

    monkeypatch.setenv("HF_TOKEN", HF_SECRET + "-wrong")
    (installed_volume / "forge-volume.lock").unlink()
    for args in (("lock",), ("--debug", "lock")):
        failed = cli(streams, *args)
        assert failed.exit_code == 1, failed.output
        assert "the token in HF_TOKEN has no access" in failed.stderr, failed.stderr
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    assert cli(streams, "lock").exit_code == 0
    for path in ("models/Stable-diffusion/private.safetensors", "models/Lora/early-access.safetensors"):
        (installed_volume / path).unlink()
    monkeypatch.setenv("HF_TOKEN", HF_SECRET + "-wrong")
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_SECRET + "-wrong")
    failed = cli(streams, "--debug", "refresh-models")
    assert failed.exit_code == 1 and "HF_TOKEN" in failed.stderr and "CIVITAI_TOKEN" in failed.stderr, failed.stderr
    streams.add_file(VolumeLayout(installed_volume).state)
    streams.add_file(installed_volume / "forge-volume.lock")
    assert sha(private) in (installed_volume / "forge-volume.lock").read_text()


def test_case20_worker_never_shows_a_token(fleet: Fleet, streams: Streams) -> None:
    """Fault: helper jobs that carry tokens in their payload (hf_token, civitai_token and the original
    worker's token) and are refused upstream, a volume status job, and jobs on the worker whose
    BUCKET_* keys are set.
    Expected: the refusals name what to set, not the value; /v1/volume is the status JSON.
    Checked after: no token or bucket key in any job output, any worker log (one at DEBUG level) or
    any body posted to RunPod (leak guard); Forge's environment holds no BUCKET_* variable."""
    hub = fleet.hosts.hub
    jobs = [
        {"api": {"method": "POST", "endpoint": "/v1/download"},
         "payload": {"source": "hf://org/payload/payload.safetensors", "kind": "lora",
                     "hf_token": PAYLOAD_SECRET + "x"}},
        {"api": {"method": "POST", "endpoint": "/v1/sync"},
         "payload": {"repo_id": "org/payload", "kind": "lora", "token": PAYLOAD_SECRET + "y"}},
        {"api": {"method": "POST", "endpoint": "/v1/download"},
         "payload": {"source": "hf://org/payload/payload.safetensors", "kind": "lora",
                     "civitai_token": PAYLOAD_SECRET, "hf_token": "x" + PAYLOAD_SECRET}},
        {"api": {"method": "GET", "endpoint": "/v1/volume"}},
    ]
    records = fan_out(fleet, jobs, ("main", "bucket"))
    for record in records[:3]:
        body = result(record, streams)
        assert "HF_TOKEN" in one_line_error(body) or "token" in one_line_error(body), body
    status = result(records[3], streams)
    assert status["output"]["volume"] == str(fleet.volume) and status["output"]["provisioned"] is True, status
    assert hub.repos["org/payload"].token == PAYLOAD_SECRET
    for name in ("main", "bucket"):
        assert not [n for n in fleet.forge_env_names(name) if n.startswith(("BUCKET_", "RUNPOD_"))], name
    assert fleet.platform.posts and all(worker.log() for worker in fleet.workers.values())
