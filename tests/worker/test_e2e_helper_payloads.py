"""What the /v1/* helpers accept and refuse, through RunPod's local API (issue 10: holes 5 and
13-16; issue 11: the original worker's download and sync forms).

Every caller mistake is a one-line error that says what is wrong and what to do from a job (never
"failed unexpectedly", never a traceback in the log, never the CLI's advice), and fails the job
before anything on the volume changes. A helper never replaces a model the lock pins or one that
came from another source, unless the job says "overwrite".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from provision.records.lockfile import LockedModel, read_lock, write_lock
from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import PRIVATE_MODEL_HOST, PRIVATE_MODELS_ENV, FileServer
from tests.worker.conftest import WorkerProc, module_volume, start_worker, worker_env
from volume_layout import VolumeLayout

MODEL = os.urandom(20_000)
LCM_SDXL, LCM_SD15, OTHER = os.urandom(9_000), os.urandom(8_000), os.urandom(7_000)
ORIGINAL_REPO = {"Lora/orig-lora.safetensors": os.urandom(3_000),
                 "Stable-diffusion/orig-checkpoint.safetensors": os.urandom(4_000),
                 "README.md": b"# models for the original worker\n"}
# Advice that only works in a shell on a pod: it must never reach a helper job's error.
CLI_ADVICE = ("forge-volume lock` again", "run `forge-volume", "--wait", "--prune", "in the spec", "re-run")


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[FakeHub, FileServer]]:
    with FakeHub() as hub, FileServer(PRIVATE_MODEL_HOST) as files:
        hub.add_repo("org/loras", {"Lora/style.safetensors": MODEL})
        hub.add_repo("latent-consistency/lcm-lora-sdxl", {"pytorch_lora_weights.safetensors": LCM_SDXL})
        hub.add_repo("latent-consistency/lcm-lora-sdv1-5", {"pytorch_lora_weights.safetensors": LCM_SD15})
        hub.add_repo("orig/models", ORIGINAL_REPO)
        hub.add_repo("orig/odd", {"Lora/fine.safetensors": b"f" * 100, "workflows/x.json": b"{}"})
        files.add("/files/model.safetensors", MODEL)
        files.add("/files/other.safetensors", OTHER)
        files.add("/files/gone.safetensors", status=404)
        yield hub, files


@pytest.fixture(scope="module")
def volume(provisioned_world: Any, module_tmp: Path) -> Path:
    return module_volume(provisioned_world, module_tmp)


@pytest.fixture(scope="module")
def worker(volume: Path, module_tmp: Path, hosts: tuple[FakeHub, FileServer]) -> Iterator[WorkerProc]:
    hub, _ = hosts
    env = worker_env(volume, module_tmp / "scratch", HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1",
                     **PRIVATE_MODELS_ENV)
    env.pop("HF_TOKEN", None)
    proc = start_worker(env, module_tmp / "logs")
    yield proc
    proc.stop()


def job(worker: WorkerProc, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
    return worker.runsync({"api": {"method": "POST", "endpoint": endpoint}, "payload": payload}, timeout=120)


def refused(worker: WorkerProc, endpoint: str, payload: dict[str, Any], *needles: str) -> str:
    """The job failed with a one-line caller error holding every needle, and the log has no traceback."""
    out = job(worker, endpoint, payload)
    assert out.get("status") == "FAILED", out
    error = out["error"]
    assert "\n" not in error and "unexpectedly" not in error, error
    for needle in needles:
        assert needle in error, (needle, error)
    for advice in CLI_ADVICE:
        assert advice not in error, (advice, error)
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
    return str(error)


def models_tree(volume: Path) -> dict[str, int]:
    return {str(p.relative_to(volume)): p.lstat().st_size for p in (volume / "models").rglob("*")}


# --- hole 15: unknown keys ----------------------------------------------------------------------

def test_an_unknown_key_fails_the_job_before_anything_changes(worker: WorkerProc, volume: Path,
                                                              hosts: tuple[FakeHub, FileServer]) -> None:
    """{"dryrun": true, "prune": true} used to prune every unlisted model; "sha265" skipped the checksum."""
    _, files = hosts
    unlisted = volume / "models" / "Lora" / "mine.safetensors"
    unlisted.parent.mkdir(parents=True, exist_ok=True)
    unlisted.write_bytes(b"a model the lock does not list")
    before = models_tree(volume)
    refused(worker, "/v1/refresh-models", {"dryrun": True, "prune": True}, "'dryrun'", "did you mean 'dry_run'")
    refused(worker, "/v1/download", {"source": files.url("/files/model.safetensors"), "kind": "lora",
                                     "sha265": "0" * 64}, "'sha265'", "did you mean 'sha256'")
    refused(worker, "/v1/sync", {"repo_id": "org/loras", "kind": "lora", "syncpath": "Lora"},
            "'syncpath'", "did you mean 'sync_path'")
    refused(worker, "/v1/download", {"source": files.url("/files/model.safetensors"), "kind": "lora",
                                     "nonsense": 1}, "'nonsense'", "accepted: source")
    assert unlisted.is_file() and models_tree(volume) == before


# --- hole 14: input gaps ------------------------------------------------------------------------

@pytest.mark.parametrize(("payload", "needle"), [
    ({"kind": "lora", "name": "evil\n.safetensors"}, "U+000A"),
    ({"kind": "lora", "name": "evil\r.safetensors"}, "U+000D"),
    ({"kind": "lora", "name": "bell\x07.safetensors"}, "U+0007"),
    ({"download_path": "Lora/x\0.safetensors"}, "U+0000"),
    ({"download_path": "/runpod-volume/models/Lora/a\nb.safetensors"}, "U+000A"),
])
def test_control_characters_in_names_and_paths_are_refused(worker: WorkerProc, volume: Path, payload: dict[str, Any],
                                                           needle: str, hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    before = models_tree(volume)
    refused(worker, "/v1/download", {"source": files.url("/files/model.safetensors"), **payload},
            "control character", needle)
    assert models_tree(volume) == before


def test_caller_mistakes_are_one_line_caller_errors(worker: WorkerProc, volume: Path,
                                                    hosts: tuple[FakeHub, FileServer]) -> None:
    """A port out of range, an invalid repo_id, a path through an existing file: once "failed unexpectedly"."""
    _, files = hosts
    blocker = volume / "models" / "Lora" / "blocker.safetensors"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"a file, not a folder")
    before = models_tree(volume)
    refused(worker, "/v1/download", {"source": "http://127.0.0.1:99999/x.safetensors", "kind": "lora"},
            "port is not a number from 1 to 65535")
    refused(worker, "/v1/download", {"source": "http://[::1/x.safetensors", "kind": "lora"}, "malformed")
    refused(worker, "/v1/download", {"source": "hf://../etc/x.safetensors", "kind": "lora"},
            "not a Hugging Face repository id")
    for repo_id in ("../../etc", "a/b/c", "org/re po", "org--x/y"):
        refused(worker, "/v1/sync", {"repo_id": repo_id, "kind": "lora"}, "not a Hugging Face repository id",
                "OWNER/NAME")
    refused(worker, "/v1/download", {"source": files.url("/files/model.safetensors"),
                                     "download_path": "Lora/blocker.safetensors/x.safetensors"},
            "models/Lora/blocker.safetensors", "is a file, not a folder")
    refused(worker, "/v1/sync", {"repo_id": "org/loras", "sync_path": "Lora/blocker.safetensors/sub"},
            "is a file, not a folder")
    assert models_tree(volume) == before


# --- hole 13: a kind folder that is a link out of models/ -----------------------------------------

def test_a_kind_folder_linked_out_of_models_is_refused_on_every_path(worker: WorkerProc, volume: Path,
                                                                     module_tmp: Path,
                                                                     hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    outside = module_tmp / "outside-embeddings"
    outside.mkdir()
    link = VolumeLayout(volume).kind_dir("embedding")
    if link.exists():
        link.rmdir()
    link.symlink_to(outside, target_is_directory=True)
    try:
        source = files.url("/files/model.safetensors")
        for endpoint, payload in [
            ("/v1/download", {"source": source, "kind": "embedding"}),
            ("/v1/download", {"source": source, "download_path": "embeddings"}),
            ("/v1/download", {"source": source, "download_path": "/runpod-volume/models/embeddings/x.safetensors"}),
            ("/v1/sync", {"repo_id": "org/loras", "kind": "embedding"}),
            ("/v1/sync", {"repo_id": "org/loras", "sync_path": "embeddings"}),
        ]:
            refused(worker, endpoint, payload, "outside the volume's models folder")
        assert list(outside.iterdir()) == []
    finally:
        link.unlink()


def test_refresh_models_does_not_write_through_a_kind_folder_linked_out_of_models(
        worker: WorkerProc, volume: Path, module_tmp: Path, hosts: tuple[FakeHub, FileServer]) -> None:
    """Issue 19 hole 7: the lock's own paths go through the same fence as a job's (refresh-models wrote
    models/embeddings/x through a link out of models/, which /v1/download refused)."""
    _, files = hosts
    layout = VolumeLayout(volume)
    outside = module_tmp / "outside-embeddings-refresh"
    outside.mkdir()
    link = layout.kind_dir("embedding")
    if link.exists():
        link.rmdir()
    link.symlink_to(outside, target_is_directory=True)
    saved_spec, saved_lock = layout.spec.read_bytes(), layout.lock.read_bytes()
    source = files.url("/files/model.safetensors")
    layout.spec.write_text(saved_spec.decode() + f'\n[[models]]\nkind = "embedding"\nsource = "{source}"\n'
                           'name = "fenced.safetensors"\n')
    lock = read_lock(layout.lock)
    entry = LockedModel(kind="embedding", name="fenced.safetensors", source=source,
                        path="models/embeddings/fenced.safetensors", sha256=None, size=None)
    write_lock(layout.lock, dataclasses.replace(lock, models=[*lock.models, entry]))
    try:
        for payload in ({}, {"prune": True}):
            refused(worker, "/v1/refresh-models", payload, "outside the volume's models folder",
                    "make models/embeddings a real folder on the volume")
        assert list(outside.iterdir()) == []
    finally:
        link.unlink()
        layout.spec.write_bytes(saved_spec)
        layout.lock.write_bytes(saved_lock)


@pytest.mark.parametrize("host", ["\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # full-width localhost
                                  "exa\u200bmple.com", "a..b.com", ".example.com", "-x-.example.com"])
def test_a_host_no_domain_name_may_have_is_a_caller_error(worker: WorkerProc, host: str) -> None:
    """Issue 19 hole 10: these failed "unexpectedly (InvalidURL ...)" with a traceback in the log."""
    refused(worker, "/v1/download", {"source": f"http://{host}/x.safetensors", "kind": "lora"},
            "is not a valid host name", "check the host name in the URL")


def test_a_redirect_to_a_host_no_domain_name_may_have_is_refused(worker: WorkerProc, volume: Path,
                                                                  hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    files.add("/files/to-bad-host.safetensors", redirect="http://a..b.com/x.safetensors")
    refused(worker, "/v1/download", {"source": files.url("/files/to-bad-host.safetensors"), "kind": "lora"},
            "refusing to fetch 'http://a..b.com/x.safetensors': its host is not a valid host name")
    assert not (volume / "models" / "Lora" / "to-bad-host.safetensors").exists()


# --- hole 16: advice that works on a job ---------------------------------------------------------

def test_helper_errors_give_advice_that_works_from_a_job(worker: WorkerProc, volume: Path,
                                                         hosts: tuple[FakeHub, FileServer]) -> None:
    """Each of these carried the CLI's advice ("run `forge-volume lock` again", "pass --wait", "check the
    source in the spec", "re-run"); from a job they say what a job can do."""
    _, files = hosts
    source = files.url("/files/model.safetensors")
    refused(worker, "/v1/download", {"source": source, "kind": "lora", "name": "advice.safetensors",
                                     "sha256": "0" * 64}, "sha256", "send the new sha256 (or none) with the job")
    refused(worker, "/v1/download", {"source": files.url("/files/gone.safetensors"), "kind": "lora"},
            "404", "check the source;")
    layout = VolumeLayout(volume)
    layout.locks_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(layout.lock_file("volume"))):  # an install running on a pod
        refused(worker, "/v1/refresh-models", {}, "busy", "send the job again when it has finished")
    lock = layout.lock
    saved = lock.read_bytes()
    try:
        lock.write_text("{not json", encoding="utf-8")
        refused(worker, "/v1/refresh-models", {"dry_run": True}, "not a forge-volume lock file",
                "written on a pod with this volume")
    finally:
        lock.write_bytes(saved)
    assert not (volume / "models" / "Lora" / "advice.safetensors").exists()


def test_the_cli_keeps_its_own_advice(volume: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The same failures on the CLI still say what to type there."""
    from click.testing import CliRunner

    from provision.cli import main

    layout = VolumeLayout(volume)
    with FileLock(str(layout.lock_file("volume"))):
        busy = CliRunner().invoke(main, ["--volume", str(volume), "refresh-models"])
    assert busy.exit_code == 1 and "pass --wait" in busy.output, busy.output
    assert json.loads(layout.lock.read_text(encoding="utf-8"))  # untouched


# --- hole 5: nothing is silently replaced -----------------------------------------------------------

def test_two_syncs_of_repos_sharing_a_file_name_do_not_leave_only_the_second(worker: WorkerProc,
                                                                             volume: Path) -> None:
    target = volume / "models" / "Lora" / "pytorch_lora_weights.safetensors"
    first = job(worker, "/v1/sync", {"repo_id": "latent-consistency/lcm-lora-sdxl", "kind": "lora"})
    assert first["status"] == "COMPLETED", first
    assert target.read_bytes() == LCM_SDXL
    error = refused(worker, "/v1/sync", {"repo_id": "latent-consistency/lcm-lora-sdv1-5", "kind": "lora"},
                    "models/Lora/pytorch_lora_weights.safetensors",
                    "hf://latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors",
                    '"overwrite": true', '"sync_path": "Lora/')
    assert "lcm-lora-sdv1-5" in error
    assert target.read_bytes() == LCM_SDXL
    again = job(worker, "/v1/sync", {"repo_id": "latent-consistency/lcm-lora-sdxl", "kind": "lora"})
    assert again["status"] == "COMPLETED" and again["output"]["skipped"] == 1, again  # same source: fine
    aside = job(worker, "/v1/sync", {"repo_id": "latent-consistency/lcm-lora-sdv1-5", "sync_path": "Lora/lcm-sd15"})
    assert aside["status"] == "COMPLETED", aside
    assert (target.parent / "lcm-sd15" / target.name).read_bytes() == LCM_SD15
    forced = job(worker, "/v1/sync", {"repo_id": "latent-consistency/lcm-lora-sdv1-5", "kind": "lora",
                                      "overwrite": True})
    assert forced["status"] == "COMPLETED", forced
    assert target.read_bytes() == LCM_SD15


def test_a_download_never_replaces_a_model_from_another_source(worker: WorkerProc, volume: Path,
                                                               hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    target = volume / "models" / "Lora" / "mine.safetensors"
    target.unlink(missing_ok=True)
    first = job(worker, "/v1/download", {"source": files.url("/files/model.safetensors"), "kind": "lora",
                                         "name": "mine.safetensors"})
    assert first["status"] == "COMPLETED", first
    refused(worker, "/v1/download", {"source": files.url("/files/other.safetensors"), "kind": "lora",
                                     "name": "mine.safetensors"},
            "models/Lora/mine.safetensors already holds the model from " + files.url("/files/model.safetensors"))
    assert target.read_bytes() == MODEL
    hand = volume / "models" / "Lora" / "by-hand.safetensors"
    hand.write_bytes(b"put there by hand")
    refused(worker, "/v1/download", {"source": files.url("/files/other.safetensors"), "kind": "lora",
                                     "name": "by-hand.safetensors"}, "no record of its source")
    assert hand.read_bytes() == b"put there by hand"
    forced = job(worker, "/v1/download", {"source": files.url("/files/other.safetensors"), "kind": "lora",
                                          "name": "mine.safetensors", "overwrite": True})
    assert forced["status"] == "COMPLETED", forced
    assert target.read_bytes() == OTHER


def test_a_file_the_lock_pins_is_never_replaced_with_other_bytes(worker: WorkerProc, volume: Path,
                                                                  hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    layout = VolumeLayout(volume)
    pinned_bytes = b"the bytes the lock pins" * 50
    target = layout.model_path("vae", "pinned.safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pinned_bytes)
    saved = layout.lock.read_bytes()
    lock = read_lock(layout.lock)
    pin = LockedModel(kind="vae", name="pinned.safetensors", source="https://example.invalid/pinned.safetensors",
                      path="models/VAE/pinned.safetensors", sha256=hashlib.sha256(pinned_bytes).hexdigest(),
                      size=len(pinned_bytes))
    write_lock(layout.lock, dataclasses.replace(lock, models=[*lock.models, pin]))
    try:
        other = files.url("/files/other.safetensors")
        for payload in ({"source": other, "kind": "vae", "name": "pinned.safetensors"},
                        {"source": other, "download_path": "VAE/pinned.safetensors",
                         "sha256": hashlib.sha256(OTHER).hexdigest()}):
            refused(worker, "/v1/download", payload, "models/VAE/pinned.safetensors is pinned by the volume's lock",
                    "https://example.invalid/pinned.safetensors", '"overwrite": true')
            assert target.read_bytes() == pinned_bytes
        forced = job(worker, "/v1/download", {"source": other, "kind": "vae", "name": "pinned.safetensors",
                                              "overwrite": True})
        assert forced["status"] == "COMPLETED", forced
        assert target.read_bytes() == OTHER
    finally:
        layout.lock.write_bytes(saved)
        target.unlink()


# --- issue 11: the original worker's forms --------------------------------------------------------

@pytest.mark.parametrize("sync_path", ["/workspace/stable-diffusion-webui-forge/models",
                                       "/runpod-volume/stable-diffusion-webui-forge/models/",
                                       "/workspace/stable-diffusion-webui/models",
                                       "{volume}/models"])
def test_sync_in_the_original_form_mirrors_folders_into_kind_folders(worker: WorkerProc, volume: Path,
                                                                    sync_path: str) -> None:
    out = job(worker, "/v1/sync", {"repo_id": "orig/models", "sync_path": sync_path.format(volume=volume),
                                   "hf_token": ""})
    assert out["status"] == "COMPLETED", out
    result = out["output"]
    lora = volume / "models" / "Lora" / "orig-lora.safetensors"
    checkpoint = volume / "models" / "Stable-diffusion" / "orig-checkpoint.safetensors"
    assert lora.read_bytes() == ORIGINAL_REPO["Lora/orig-lora.safetensors"]
    assert checkpoint.read_bytes() == ORIGINAL_REPO["Stable-diffusion/orig-checkpoint.safetensors"]
    assert not (volume / "models" / "README.md").exists()  # root files are skipped, as the original did
    assert result["files"] == 2 and result["synced_count"] == result["downloaded"] == len(result["synced_files"])
    assert set(result["synced_files"]) <= {str(lora), str(checkpoint)}
    assert {"repo_id", "revision", "path", "downloaded", "skipped", "bytes"} <= set(result)
    state = json.loads(VolumeLayout(volume).state.read_text(encoding="utf-8"))
    kinds = {m["path"]: m["kind"] for m in state["models"]}
    assert kinds["models/Lora/orig-lora.safetensors"] == "lora"
    assert kinds["models/Stable-diffusion/orig-checkpoint.safetensors"] == "checkpoint"


def test_sync_in_the_original_form_refuses_a_folder_that_is_not_a_kind(worker: WorkerProc, volume: Path) -> None:
    refused(worker, "/v1/sync", {"repo_id": "orig/odd",
                                 "sync_path": "/runpod-volume/stable-diffusion-webui-forge/models"},
            "folder 'workflows' is not a model kind folder")
    assert not (volume / "models" / "Lora" / "fine.safetensors").exists()
    assert not (volume / "models" / "workflows").exists()


def test_download_in_the_original_a1111_form_answers_as_the_original(worker: WorkerProc, volume: Path,
                                                                     hosts: tuple[FakeHub, FileServer]) -> None:
    _, files = hosts
    secret = "s3cretQueryValue"
    files.add("/files/a1111.safetensors", MODEL)
    out = job(worker, "/v1/download", {
        "source_url": files.url("/files/a1111.safetensors") + f"?token={secret}",
        "download_path": "/workspace/stable-diffusion-webui/models/Lora/a1111.safetensors"})
    assert out["status"] == "COMPLETED", out
    result = out["output"]
    target = volume / "models" / "Lora" / "a1111.safetensors"
    assert target.read_bytes() == MODEL
    assert result["msg"] == "Download successful"
    assert result["download_path"] == str(target) and result["path"] == "models/Lora/a1111.safetensors"
    assert result["source_url"].startswith(files.url("/files/a1111.safetensors"))
    assert secret not in json.dumps(out) and secret not in worker.log()
