"""Models through the real CLI: lock, refresh-models (missing, repair, --prune, --dry-run), verify.

The volume is a copy of the session's installed volume; the model hosts are loopback servers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.fetch.cancel import CONNECT_ENV
from tests.helpers.black_hole import connects_pending
from tests.helpers.cli import cli
from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.helpers.timing import PROMPT
from tests.models.conftest import CIVITAI_TOKEN, Hosts, lock_models, sha, state_models
from volume_layout import VolumeLayout


@pytest.fixture
def locked(installed_volume: Path, provisioned_world: World, hosts: Hosts) -> Path:
    """The installed volume with a spec naming one model of every source kind, locked through the CLI."""
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=hosts.models_toml()))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 0, result.output
    return installed_volume


def test_lock_pins_every_source(locked: Path, hosts: Hosts) -> None:
    models = lock_models(locked)
    assert set(models) == set(hosts.sources)
    hub = models["models/Stable-diffusion/model.safetensors"]
    blob = hosts.blobs["models/Stable-diffusion/model.safetensors"]
    assert (hub["revision"], hub["sha256"], hub["size"]) == (hosts.commit, sha(blob), len(blob))
    assert hub["pinned_by"] == "hub"
    readme = models["models/text_encoder/config.json"]  # kept in git on the hub: no sha256 there
    assert (readme["sha256"], readme["revision"], readme["pinned_by"]) == (None, hosts.commit, "first-download")
    tofu = models["models/embeddings/tofu.pt"]
    assert (tofu["sha256"], tofu["size"], tofu["pinned_by"]) == (None, 50_000, "first-download")  # size from HEAD
    assert models["models/ESRGAN/upscaler.pth"]["pinned_by"] == "spec"
    civ = models["models/Lora/civitai-lora.safetensors"]
    lora = hosts.blobs["models/Lora/civitai-lora.safetensors"]
    assert (civ["name"], civ["sha256"], civ["size"]) == ("civitai-lora.safetensors", sha(lora), len(lora))
    assert not list((locked / "models").rglob("*.safetensors"))  # locking downloads nothing


def test_refresh_fetches_everything_then_does_nothing_offline(locked: Path, hosts: Hosts) -> None:
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 0, result.output
    assert "fetched 6 file(s)" in result.output
    assert "trust on first use" in result.output
    for path, data in hosts.blobs.items():
        assert (locked / path).read_bytes() == data, path
    records = state_models(locked)
    for path, data in hosts.blobs.items():
        rec = records[path]
        assert (rec["sha256"], rec["size"], rec["mtime"]) == (sha(data), len(data), (locked / path).stat().st_mtime)
        assert rec["source"] == hosts.sources[path]
    pinned = lock_models(locked)
    assert pinned["models/embeddings/tofu.pt"]["sha256"] == sha(hosts.blobs["models/embeddings/tofu.pt"])
    assert pinned["models/text_encoder/config.json"]["sha256"] == sha(hosts.blobs["models/text_encoder/config.json"])
    # civitai got the token; its storage host (reached by redirect) did not
    assert hosts.files.requests_to("/api/download/models/4242")[0].headers["authorization"] == f"Bearer {CIVITAI_TOKEN}"
    assert "authorization" not in hosts.cdn.requests_to("/civitai-blob")[0].headers
    assert CIVITAI_TOKEN not in result.output
    assert not [p for p in (locked / "models").rglob(".*")]  # no temporaries left behind

    before = hosts.total_requests()
    started = time.monotonic()
    again = cli("refresh-models", volume=locked)
    assert again.exit_code == 0, again.output
    assert time.monotonic() - started < PROMPT  # a hang only: the 2 s target is in scripts/bench_models.py
    assert "fetched 0 file(s)" in again.output and "6 already correct" in again.output
    assert hosts.total_requests() == before  # nothing to do means no network I/O
    ok = cli("verify", volume=locked)
    assert ok.exit_code == 0, ok.output


def test_lock_pins_the_hub_revision(locked: Path, hosts: Hosts) -> None:
    hosts.hub.commit("org/sd", {"model.safetensors": b"a newer upload", "vae/vae.safetensors": b"x",
                                "config.json": b"{}"})
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 0, result.output
    path = "models/Stable-diffusion/model.safetensors"
    assert (locked / path).read_bytes() == hosts.blobs[path]
    assert all(f"/resolve/{hosts.commit}/" in p for p in hosts.hub.resolve_requests()[-3:])


def test_missing_and_broken_files_are_fetched_and_repaired(locked: Path, hosts: Hosts) -> None:
    assert cli("refresh-models", volume=locked).exit_code == 0
    missing, broken = "models/VAE/sd-vae.safetensors", "models/ESRGAN/upscaler.pth"
    (locked / missing).unlink()
    (locked / broken).write_bytes(b"truncated")
    dry = cli("refresh-models", "--dry-run", volume=locked)
    assert dry.exit_code == 0, dry.output
    assert f"would fetch {missing}" in dry.output and f"would repair {broken}" in dry.output
    assert not (locked / missing).exists() and (locked / broken).read_bytes() == b"truncated"
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 0, result.output
    assert "fetched 1 file(s)" in result.output and "repaired 1 file(s)" in result.output
    assert (locked / missing).read_bytes() == hosts.blobs[missing]
    assert (locked / broken).read_bytes() == hosts.blobs[broken]


def test_broken_file_is_replaced_only_by_a_good_one(locked: Path, hosts: Hosts) -> None:
    assert cli("refresh-models", volume=locked).exit_code == 0
    path = "models/ESRGAN/upscaler.pth"
    good = hosts.blobs[path]
    changed = bytes([good[0] ^ 1]) + good[1:]  # same size, other content: changed behind our back
    (locked / path).write_bytes(changed)
    hosts.files.routes["/files/upscaler.pth"].wrong_bytes = True  # and the server now sends wrong bytes
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 1
    served = bytearray(good)
    served[len(good) // 2] ^= 0xFF
    assert sha(bytes(served)) in result.output and sha(good) in result.output
    assert (locked / path).read_bytes() == changed  # kept: nothing complete and verified replaced it
    assert not [p for p in (locked / "models").rglob(".*")]


def test_verify_fast_and_deep(locked: Path, hosts: Hosts) -> None:
    assert cli("refresh-models", volume=locked).exit_code == 0
    assert cli("verify", volume=locked).exit_code == 0
    path = "models/Lora/civitai-lora.safetensors"
    target = locked / path
    st = target.stat()
    good = target.read_bytes()
    target.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only a re-hash can tell
    assert cli("verify", volume=locked).exit_code == 0  # fast mode trusts the record, by design
    deep = cli("verify", "--deep", volume=locked)
    assert deep.exit_code == 1
    assert f"wrong hash: {path}" in deep.output and sha(good) in deep.output
    os.utime(target)  # an ordinary edit moves the mtime: now fast mode re-hashes it
    fast = cli("verify", volume=locked)
    assert fast.exit_code == 1 and f"wrong hash: {path}" in fast.output
    (locked / "models" / "VAE" / "sd-vae.safetensors").unlink()
    (locked / "models" / "Lora" / "stray.safetensors").write_bytes(b"stray")
    fast = cli("verify", volume=locked)
    assert "missing: models/VAE/sd-vae.safetensors" in fast.output
    assert "extra: models/Lora/stray.safetensors (5 bytes)" in fast.output
    assert cli("refresh-models", volume=locked).exit_code == 0
    assert target.read_bytes() == good
    after = cli("verify", volume=locked)  # an extra file is mentioned, not a failure
    assert after.exit_code == 0 and "extra: models/Lora/stray.safetensors" in after.output


def test_prune_removes_only_unlisted_files_and_abandoned_temporaries(locked: Path, hosts: Hosts) -> None:
    assert cli("refresh-models", volume=locked).exit_code == 0
    lora = locked / "models" / "Lora"
    stray = lora / "stray.safetensors"
    stray.write_bytes(b"s" * 1000)
    (locked / "models" / "ControlNet").mkdir(parents=True, exist_ok=True)  # Forge's first start made it
    (locked / "models" / "ControlNet" / "old.pth").write_bytes(b"o" * 10)
    abandoned = lora / ".gone.safetensors.0a1b2c3d.part"
    abandoned.write_bytes(b"a")
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    fresh = lora / ".new.safetensors.1a2b3c4d.part"  # another process is writing this right now
    fresh.write_bytes(b"f")
    busy = lora / ".busy.safetensors.partial"  # old, but its target lock is held by another process
    busy.write_bytes(b"b")
    os.utime(busy, (time.time() - 7200, time.time() - 7200))
    lock_file = locked / ".forge-volume" / "locks" / "model-models_Lora_busy.safetensors.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
                               "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
                               str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        dry = cli("refresh-models", "--prune", "--dry-run", volume=locked)
        assert dry.exit_code == 0, dry.output
        assert "would prune 3 file(s)" in dry.output and stray.exists() and abandoned.exists()
        result = cli("refresh-models", "--prune", volume=locked)
        assert result.exit_code == 0, result.output
    finally:
        holder.kill()
        holder.wait()
    assert "pruned 3 file(s)" in result.output
    assert not stray.exists() and not abandoned.exists()
    assert not (locked / "models" / "ControlNet" / "old.pth").exists()
    assert fresh.exists() and busy.exists()
    for path, data in hosts.blobs.items():
        assert (locked / path).read_bytes() == data
    assert "models/Lora/stray.safetensors" not in state_models(locked)
    assert cli("verify", volume=locked).exit_code == 0


def test_status_shows_strays_extras_and_what_prune_would_remove(locked: Path, hosts: Hosts) -> None:
    assert cli("refresh-models", volume=locked).exit_code == 0
    lora = locked / "models" / "Lora"
    (lora / "stray.safetensors").write_bytes(b"s" * 2048)
    partial = locked / "models" / "VAE" / ".sd-vae.safetensors.partial"  # a listed model's: kept for resume
    partial.write_bytes(b"p" * 3000)
    abandoned = lora / ".gone.safetensors.0a1b2c3d.part"
    abandoned.write_bytes(b"a" * 100)
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))

    text = cli("status", volume=locked)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert "partials    2 unfinished download(s), 3.0 KiB (resumed by the next install or refresh-models)" in lines
    # One convention for sizes everywhere: powers of 1024, labelled KiB, MiB, GiB (status said "GB" for GiB).
    [disk] = [line for line in lines if line.startswith("disk ")]
    assert re.fullmatch(r"disk +\d+\.\d [KMGT]iB free of \d+\.\d [KMGT]iB", disk), disk
    assert "              models/VAE/.sd-vae.safetensors.partial (2.9 KiB)" in lines
    assert "extras      1 model file(s) not in the lock, 2.0 KiB" in lines
    assert "              models/Lora/stray.safetensors (2.0 KiB)" in lines
    assert "prune       `refresh-models --prune` would remove 2 file(s), 2.1 KiB" in lines
    assert "              models/Lora/.gone.safetensors.0a1b2c3d.part (100 B)" in lines

    report = json.loads(cli("status", "--json", "--files", volume=locked).stdout)["model_files"]
    assert {p["path"]: p["bytes"] for p in report["prune"]} == {
        "models/Lora/stray.safetensors": 2048, "models/Lora/.gone.safetensors.0a1b2c3d.part": 100}
    assert {p["path"]: p["for"] for p in report["partials"]} == {
        "models/VAE/.sd-vae.safetensors.partial": "models/VAE/sd-vae.safetensors",
        "models/Lora/.gone.safetensors.0a1b2c3d.part": "models/Lora/gone.safetensors"}
    files = {f["path"]: f for f in report["files"]}
    assert set(files) == {*hosts.sources, "models/Lora/stray.safetensors"}
    hub = files["models/Stable-diffusion/model.safetensors"]
    assert (hub["kind"], hub["bytes"], hub["status"]) == (
        "checkpoint", len(hosts.blobs["models/Stable-diffusion/model.safetensors"]), "pinned")
    assert hub["source"] == hosts.sources["models/Stable-diffusion/model.safetensors"]
    assert files["models/Lora/stray.safetensors"] == {"path": "models/Lora/stray.safetensors", "kind": "lora",
                                                      "bytes": 2048, "source": None, "status": "extra"}
    listed = cli("status", "--files", volume=locked).stdout
    assert "  extra   lora           2.0 KiB  models/Lora/stray.safetensors" in listed.splitlines(), listed
    assert "  pinned  checkpoint" in listed

    # status changed nothing: prune removes exactly what status announced.
    pruned = cli("refresh-models", "--prune", volume=locked)
    assert pruned.exit_code == 0 and "pruned 2 file(s)" in pruned.output
    assert not partial.exists()  # its model is good already: a stale partial, removed by the refresh (issue 10)


def test_verify_and_plan_as_json(locked: Path, hosts: Hosts) -> None:
    assert cli("refresh-models", volume=locked).exit_code == 0
    (locked / "models" / "Lora" / "stray.safetensors").write_bytes(b"s" * 10)
    ok = cli("verify", "--json", volume=locked)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout) == {"ok": True, "problems": [], "extras": [
        {"path": "models/Lora/stray.safetensors", "kind": "lora", "bytes": 10, "source": None, "status": "extra"}]}
    (locked / "models" / "VAE" / "sd-vae.safetensors").unlink()
    bad = cli("verify", "--json", volume=locked)
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["problems"] == [
        f"missing: models/VAE/sd-vae.safetensors (vae from {hosts.sources['models/VAE/sd-vae.safetensors']})"]
    plan = cli("plan", "--json", volume=locked)
    assert plan.exit_code == 0, plan.output
    steps = json.loads(plan.stdout)["steps"]
    assert [s["step"] for s in steps] == ["models"]
    assert any(a.startswith("fetch models/VAE/sd-vae.safetensors") for a in steps[0]["actions"])


def test_token_errors_name_the_variable(installed_volume: Path, provisioned_world: World, hosts: Hosts,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hosts.hub.add_repo("org/private", {"p.safetensors": b"p" * 100}, token="hf_right")
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(provisioned_world.spec(extra='\n[[models]]\nkind = "lora"\nsource = "hf://org/private/p.safetensors"\n'))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1 and "HF_TOKEN" in result.output
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_value")
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1 and "HF_TOKEN" in result.output and "hf_wrong_value" not in result.output
    # Issue 10, hole 3: a pasted newline is stripped; a control character inside is refused unseen.
    monkeypatch.setenv("HF_TOKEN", "hf_right\n")
    assert cli("lock", volume=installed_volume).exit_code == 0
    monkeypatch.setenv("HF_TOKEN", "hf_ri\nght_secret")
    spec.write_text(provisioned_world.spec(extra='\n[[models]]\nkind = "lora"\nsource = "hf://org/private/p.safetensors"'
                                                 '\nname = "again.safetensors"\n'))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1 and "HF_TOKEN holds a space or a control character" in result.output
    assert "hf_ri" not in result.output and "ght_secret" not in result.output
    monkeypatch.setenv("CIVITAI_TOKEN", "civ-wrong")
    spec.write_text(provisioned_world.spec(extra='\n[[models]]\nkind = "lora"\nsource = "civitai://4242"\n'))
    assert cli("lock", volume=installed_volume).exit_code == 0
    result = cli("refresh-models", volume=installed_volume)
    assert result.exit_code == 1 and "CIVITAI_TOKEN" in result.output and "civ-wrong" not in result.output
    monkeypatch.setenv("CIVITAI_TOKEN", f" {CIVITAI_TOKEN}\r\n")
    result = cli("refresh-models", volume=installed_volume)
    assert result.exit_code == 0, result.output


def test_missing_files_are_clear_errors(installed_volume: Path, provisioned_world: World, hosts: Hosts) -> None:
    spec = installed_volume / "forge-volume.toml"
    for source, words in ((hosts.files.url("/files/gone.pth"), "404"),
                          ("hf://org/sd/gone.safetensors", "no such file"),
                          ("hf://org/nothere/x.safetensors", "repository not found")):
        spec.write_text(provisioned_world.spec(extra=f'\n[[models]]\nkind = "lora"\nsource = "{source}"\n'))
        result = cli("lock", volume=installed_volume)
        assert result.exit_code == 1 and words in result.output, result.output
        assert "Traceback" not in result.output


def test_transient_500_is_retried(locked: Path, hosts: Hosts) -> None:
    route = hosts.files.routes["/files/upscaler.pth"]
    route.fail_first = route.gets + 1
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 0, result.output
    assert (locked / "models/ESRGAN/upscaler.pth").read_bytes() == hosts.blobs["models/ESRGAN/upscaler.pth"]


def test_plan_lists_what_install_would_fetch(locked: Path, hosts: Hosts) -> None:
    from provision.models import plan_models
    from provision.records.lockfile import read_lock

    lock = read_lock(locked / "forge-volume.lock")
    before = hosts.total_requests()
    lines = plan_models(VolumeLayout(locked), lock)
    assert len([line for line in lines if line.startswith("fetch ")]) == 6
    assert hosts.total_requests() == before
    assert cli("refresh-models", volume=locked).exit_code == 0
    assert plan_models(VolumeLayout(locked), read_lock(locked / "forge-volume.lock")) == []
    (locked / "models/ESRGAN/upscaler.pth").write_bytes(b"x")
    assert plan_models(VolumeLayout(locked), read_lock(locked / "forge-volume.lock")) == [
        "repair models/ESRGAN/upscaler.pth (195.3 KiB): wrong size"]


def test_refresh_report_is_json(locked: Path, hosts: Hosts) -> None:
    from provision.models import refresh_models
    from provision.progress import QUIET

    report = refresh_models(VolumeLayout(locked), locked / "forge-volume.lock", prune=False, dry_run=False,
                            progress=QUIET)
    data = json.loads(json.dumps(report.as_dict()))
    assert len(data["fetched"]) == 6 and data["transferred"] == sum(len(b) for b in hosts.blobs.values())
    assert {p["path"] for p in data["pinned"]} == {"models/embeddings/tofu.pt", "models/text_encoder/config.json"}


def test_files_already_there_are_hashed_once_and_adopted(locked: Path, hosts: Hosts) -> None:
    hub_path, url_path = "models/Stable-diffusion/model.safetensors", "models/embeddings/tofu.pt"
    for path in (hub_path, url_path):  # put there by hand (or by an older tool): no state.json record
        (locked / path).parent.mkdir(parents=True, exist_ok=True)
        (locked / path).write_bytes(hosts.blobs[path])
    routes = (hosts.hub.blob(hosts.blobs[hub_path]), hosts.files.routes["/files/tofu.pt"])
    gets = [r.gets for r in routes]  # the lock asked the URL's size: a GET of its first byte
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 0, result.output
    assert "fetched 4 file(s)" in result.output and "adopted 2 already present" in result.output
    assert [r.gets for r in routes] == gets
    assert state_models(locked)[hub_path]["sha256"] == sha(hosts.blobs[hub_path])
    assert lock_models(locked)[url_path]["sha256"] == sha(hosts.blobs[url_path])  # pinned from the adopted file


def test_spec_checksum_that_contradicts_the_host_is_refused(installed_volume: Path, provisioned_world: World,
                                                            hosts: Hosts) -> None:
    wrong = "ab" * 32
    extra = f'\n[[models]]\nkind = "checkpoint"\nsource = "hf://org/sd/model.safetensors"\nsha256 = "{wrong}"\n'
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1
    assert wrong in result.output and sha(hosts.blobs["models/Stable-diffusion/model.safetensors"]) in result.output


def test_refresh_without_a_lock_says_how_to_make_one(volume: Path) -> None:
    result = cli("refresh-models", volume=volume)
    assert result.exit_code == 1 and "forge-volume lock" in result.output


def test_interrupted_refresh_stops_promptly_and_resumes(installed_volume: Path, provisioned_world: World,
                                                        cli_env: dict[str, str]) -> None:
    data = os.urandom(4 << 20)
    with FileServer() as server:
        # 64 chunks of 64 KiB; the ETag lets the resume prove the file unchanged (no sha256 is known)
        route = server.add("/slow.safetensors", data, delay_per_chunk=0.02, headers={"ETag": '"slow-v1"'})
        extra = f'\n[[models]]\nkind = "checkpoint"\nsource = "{server.url("/slow.safetensors")}"\n'
        (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
        assert cli("lock", volume=installed_volume).exit_code == 0
        proc = subprocess.Popen([sys.executable, "-m", "provision.cli", "--volume", str(installed_volume),
                                 "refresh-models"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            partial = installed_volume / "models" / "Stable-diffusion" / ".slow.safetensors.partial"
            deadline = time.monotonic() + 60
            while route.bytes_sent < len(data) // 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert route.bytes_sent >= len(data) // 4, "the download did not get going"
            # From here the rest would take about 24 s: stopping "at the next chunk" is told apart from
            # finishing the download however busy the machine is.
            route.delay_per_chunk = 0.5
            proc.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            _, err = proc.communicate(timeout=60)
            assert time.monotonic() - interrupted < PROMPT, "the downloads must stop at their next chunk"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1 and "interrupted" in err
        kept = partial.stat().st_size
        assert 0 < kept < len(data)
        sent = route.settled_bytes()
        route.delay_per_chunk = 0
        result = cli("refresh-models", volume=installed_volume)
        assert result.exit_code == 0, result.output
    target = installed_volume / "models" / "Stable-diffusion" / "slow.safetensors"
    assert target.read_bytes() == data and not partial.exists()
    # The second run only asked for what was missing (the server may still have been writing one chunk
    # to the interrupted process when `sent` was read, so the byte count allows that chunk).
    assert server.requests_to("/slow.safetensors")[-1].headers["range"] == f"bytes={kept}-"
    assert len(data) - kept <= route.bytes_sent - sent <= len(data) - kept + (64 << 10)


def test_a_credential_in_a_url_source_stays_in_the_spec_and_lock(installed_volume: Path, provisioned_world: World,
                                                                  hosts: Hosts) -> None:
    """A URL source carrying its own credentials (user:password@, ?token=): the lock keeps the source as
    written (the download needs it), but no message, state.json record or helper result shows them."""
    password, token, access, signature = "pw-4f1c9e2a", "tok-7d3b0a56", "acc-19be77d0", "sig-0c5e3f12"
    # Every query value is masked, whatever its parameter's name (issue 10, hole 14).
    url = (hosts.files.url("/files/tofu.pt").replace("://", f"://me:{password}@")
           + f"?type=Model&token={token}&access={access}&X-Amz-Signature={signature}")
    shown = hosts.files.url("/files/tofu.pt") + "?type=***&token=***&access=***&X-Amz-Signature=***"
    (installed_volume / "forge-volume.toml").write_text(
        provisioned_world.spec(extra=f'\n[[models]]\nkind = "embedding"\nsource = "{url}"\n'))
    outputs = [cli("lock", volume=installed_volume), cli("plan", volume=installed_volume)]
    outputs.append(cli("refresh-models", volume=installed_volume))
    (installed_volume / "models" / "embeddings" / "tofu.pt").unlink()
    outputs.append(cli("verify", volume=installed_volume))
    assert [r.exit_code for r in outputs] == [0, 0, 0, 1], [r.output for r in outputs]
    assert "fetch models/embeddings/tofu.pt" in outputs[1].output
    assert "missing: models/embeddings/tofu.pt" in outputs[3].output
    from provision.models import ModelRequest, fetch_model
    from provision.progress import QUIET

    result = fetch_model(VolumeLayout(installed_volume), ModelRequest(url, kind="embedding"), QUIET)
    assert result["downloaded"] is True and result["source"] == shown
    texts = [r.output for r in outputs] + [json.dumps(result),
                                           VolumeLayout(installed_volume).state.read_text()]
    for text in texts:
        for secret in (password, token, access, signature):
            assert secret not in text, text
    assert state_models(installed_volume)["models/embeddings/tofu.pt"]["source"] == shown
    assert url in (installed_volume / "forge-volume.lock").read_text()


def test_ctrl_c_stops_a_refresh_blocked_on_a_silent_server(installed_volume: Path, provisioned_world: World,
                                                           cli_env: dict[str, str]) -> None:
    """Issue 10, hole 7: the server sends one chunk, then nothing (each worker's read is blocked for the
    60 s read timeout). Ctrl-C ends the command at once all the same, keeping the bytes to resume."""
    data = os.urandom(2 << 20)
    with FileServer() as server:
        route = server.add("/silent.safetensors", data, delay_per_chunk=120)
        extra = f'\n[[models]]\nkind = "checkpoint"\nsource = "{server.url("/silent.safetensors")}"\n'
        (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
        assert cli("lock", volume=installed_volume).exit_code == 0
        gets = route.gets
        proc = subprocess.Popen([sys.executable, "-m", "provision.cli", "--volume", str(installed_volume),
                                 "refresh-models"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        partial = installed_volume / "models" / "Stable-diffusion" / ".silent.safetensors.partial"
        try:
            deadline = time.monotonic() + 60
            while route.gets == gets or not any(p.name.startswith(".silent") for p in partial.parent.iterdir()):
                assert time.monotonic() < deadline, "the refresh never started its download"
                time.sleep(0.02)
            time.sleep(0.5)  # the first chunk is in; the read blocks now
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)  # far below the read timeout: only catches a hang
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1 and "interrupted" in err, err
    assert partial.stat().st_size > 0


def test_ctrl_c_stops_a_refresh_waiting_for_a_connect(installed_volume: Path, provisioned_world: World,
                                                     cli_env: dict[str, str]) -> None:
    """Issue 10, hole 7: the model's host answered `lock`, then went dark: a connect to it never completes
    (its SYNs are dropped). With FORGE_DOWNLOAD_CONNECT_TIMEOUT=600 only Ctrl-C can end the refresh
    before the deadline here; it does, and leaves no lock held: once the host is back, the next
    refresh-models fetches the model."""
    data = os.urandom(1 << 20)
    with FileServer() as server:
        server.add("/dark.safetensors", data)
        extra = f'\n[[models]]\nkind = "checkpoint"\nsource = "{server.url("/dark.safetensors")}"\n'
        (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
        assert cli("lock", volume=installed_volume).exit_code == 0
        server.go_dark()
        proc = subprocess.Popen([sys.executable, "-m", "provision.cli", "--volume", str(installed_volume),
                                 "refresh-models"], env={**cli_env, CONNECT_ENV: "600"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while connects_pending(server.port) == 0:
                assert time.monotonic() < deadline and proc.poll() is None, "the refresh never started connecting"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)  # far below the connect timeout: only catches a hang
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1 and "interrupted" in err, err
        server.come_back()
        result = cli("refresh-models", volume=installed_volume)
        assert result.exit_code == 0, result.output
    target = installed_volume / "models" / "Stable-diffusion" / "dark.safetensors"
    assert target.read_bytes() == data
    assert not any(p.name.startswith(".dark") for p in target.parent.iterdir())


def test_a_trickling_server_fails_the_refresh_as_stalled(installed_volume: Path, provisioned_world: World,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10, hole 7: a server sending a byte every 0.2 s never trips a per-read timeout; with
    FORGE_DOWNLOAD_STALL_TIMEOUT=1.5 the refresh fails as stalled, naming the variable."""
    monkeypatch.setenv("FORGE_DOWNLOAD_STALL_TIMEOUT", "1.5")
    with FileServer() as server:
        server.add("/trickle.safetensors", os.urandom(1 << 20), chunk=1, delay_per_chunk=0.2)
        extra = f'\n[[models]]\nkind = "checkpoint"\nsource = "{server.url("/trickle.safetensors")}"\n'
        (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
        assert cli("lock", volume=installed_volume).exit_code == 0
        result = cli("refresh-models", volume=installed_volume)
    assert result.exit_code == 1
    assert "stalled: less than 64 KiB arrived in 1.5 s" in result.output, result.output
    assert "FORGE_DOWNLOAD_STALL_TIMEOUT" in result.output


def test_refresh_removes_stale_partials_of_good_files(locked: Path, hosts: Hosts) -> None:
    """Issue 10, hole 12: a partial left beside a file that is already good (a killed run's) is removed by
    the next refresh-models; files.partials lists strays with their sizes for status and verify."""
    from provision.models.files import partials

    assert cli("refresh-models", volume=locked).exit_code == 0
    stale = locked / "models" / "Stable-diffusion" / ".model.safetensors.partial"
    stale.write_bytes(b"x" * 1234)
    assert partials(VolumeLayout(locked)) == [("models/Stable-diffusion/.model.safetensors.partial", 1234)]
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and partials(VolumeLayout(locked)) == []


def test_a_lock_edited_by_hand_is_checked_when_read(locked: Path, hosts: Hosts) -> None:
    """Issue 19 hole 8: a sha256 in capitals (as Civitai shows them) is the same digest; a quoted size or
    a digest that is not one is one line naming the entry and the field, before anything is fetched."""
    assert cli("refresh-models", volume=locked).exit_code == 0
    lock_file = locked / "forge-volume.lock"
    good = json.loads(lock_file.read_text())

    def edited(**fields: object) -> None:
        data = json.loads(json.dumps(good))
        for model in data["models"]:
            if model["path"] == "models/ESRGAN/upscaler.pth":
                model.update(fields)
        lock_file.write_text(json.dumps(data, indent=2))

    upper = sha(hosts.blobs["models/ESRGAN/upscaler.pth"]).upper()
    edited(sha256=upper)
    before = hosts.total_requests()
    assert cli("verify", volume=locked).exit_code == 0
    again = cli("refresh-models", volume=locked)
    assert again.exit_code == 0 and "repaired 0 file(s)" in again.output and "6 already correct" in again.output, \
        again.output
    assert hosts.total_requests() == before

    for fields, needle in [
        ({"size": "190"}, "model upscaler/upscaler.pth: size must be a whole number of bytes (not quoted) or null, "
                          "not '190'"),
        ({"sha256": "x"}, "model upscaler/upscaler.pth: sha256 must be 64 hexadecimal digits"),
        ({"sha256": 5, "colour": "red"}, "model upscaler/upscaler.pth: colour is not a field of a lock entry"),
    ]:
        edited(**fields)
        for args in (("refresh-models",), ("verify",), ("install",), ("plan",)):
            result = cli(*args, volume=locked)
            assert result.exit_code == 1, (args, result.output)
            line = result.stderr.strip()
            assert "\n" not in line and needle in line and "unexpected" not in line, (args, line)
            assert "correct the fields named in forge-volume.lock" in line
    assert hosts.total_requests() == before
