"""Model files on the volume (issue 5, cases 18-19): changed behind the toolkit's back, and names
with Unicode, spaces and the longest lengths a filesystem allows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import copy_volume
from tests.helpers.forge_world import World

from .conftest import Fleet, ModelHosts, Streams, cli, model_toml, sha, state_models, temporaries
from .test_model_faults import error_line
from .test_worker_faults import one_line_error, result


def corrupt_in_place(path: Path, keep_mtime: bool) -> bytes:
    """Flip one byte in the middle without changing the size; optionally put the mtime back."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path.read_bytes()


def test_case18_model_changed_behind_the_toolkits_back(installed_volume: Path, provisioned_world: World,
                                                       model_hosts: ModelHosts, streams: Streams) -> None:
    """Fault: two installed model files get one byte flipped on the volume (same size): one by an
    ordinary write (its mtime moves), one with its mtime put back afterwards (bit rot, or a copy
    that keeps times), so size and mtime still match state.json's record.
    Expected: `verify` (fast: size and mtime) finds the first, not the second, as documented;
    `verify --deep` finds both, naming the path, the hash found and the locked one, and exits 1;
    `refresh-models` then repairs both.
    Checked after: both files have their locked bytes again, state.json records their new mtimes,
    `verify --deep` passes; the untouched model was not fetched again."""
    files = model_hosts.files
    datas = {name: os.urandom(200_000) for name in ("written", "rotted", "untouched")}
    routes = {name: files.add(f"/{name}.safetensors", data) for name, data in datas.items()}
    extra = "".join(model_toml("lora", files.url(f"/{n}.safetensors"), sha256=sha(d)) for n, d in datas.items())
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
    assert cli(streams, "lock").exit_code == 0
    assert cli(streams, "install").exit_code == 0
    lora = installed_volume / "models" / "Lora"
    bad = {"written": corrupt_in_place(lora / "written.safetensors", keep_mtime=False),
           "rotted": corrupt_in_place(lora / "rotted.safetensors", keep_mtime=True)}

    fast = cli(streams, "verify")
    assert fast.exit_code == 1
    assert fast.stdout.splitlines() == [
        f"wrong hash: models/Lora/written.safetensors has sha256 {sha(bad['written'])}, "
        f"the lock says {sha(datas['written'])}"], fast.output
    deep = cli(streams, "verify", "--deep")
    assert deep.exit_code == 1
    assert sorted(deep.stdout.splitlines()) == sorted(
        f"wrong hash: models/Lora/{n}.safetensors has sha256 {sha(bad[n])}, the lock says {sha(datas[n])}"
        for n in ("written", "rotted")), deep.output
    assert "error: 2 problem(s); run `forge-volume install` (or `refresh-models` for models) to repair" in deep.stderr

    sent = {n: r.bytes_sent for n, r in routes.items()}
    repaired = cli(streams, "refresh-models")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired 2 file(s)" in repaired.stdout, repaired.output
    for name, data in datas.items():
        assert (lora / f"{name}.safetensors").read_bytes() == data, name
    assert routes["untouched"].bytes_sent == sent["untouched"]
    records = state_models(installed_volume)
    for name in ("written", "rotted"):
        assert records[f"models/Lora/{name}.safetensors"]["mtime"] == (lora / f"{name}.safetensors").stat().st_mtime
    assert cli(streams, "verify", "--deep").exit_code == 0


# --- case 19 -------------------------------------------------------------------------------------

LONG = "ü" * 115 + "-long.safetensors"  # 247 bytes in UTF-8: a temporary's name would pass 255
NAMES = {
    "unicode": "ünïcødé 模型 ✓.safetensors",
    "spaces": "name with  two  spaces .safetensors",
    "quotes": "it's \"quoted\" & [odd] #1.safetensors",
    "long": LONG,
}


def test_case19_unicode_spaces_and_long_names_on_a_volume_path_with_them(
        installed_volume: Path, tmp_path: Path, provisioned_world: World, model_hosts: ModelHosts,
        streams: Streams, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: a volume mounted at a path with spaces and Unicode; models whose file names hold
    Unicode, runs of spaces, quotes and shell characters, or are 247 bytes long (their temporary and
    lock names would pass the filesystem's 255); sources with percent-encoded names and an hf://
    path with spaces; a name of 300 bytes.
    Expected: lock, install, verify --deep, plan, status --json and refresh-models --prune all work
    and name the files correctly; the 300-byte name is refused with a clear error.
    Checked after: every file has its bytes under its exact name; state.json and the lock record the
    names; nothing is left over; an unlisted Unicode file is pruned and only it."""
    volume = copy_volume(installed_volume, tmp_path / "vol ümes" / "my volume")
    monkeypatch.setenv("FORGE_VOLUME", str(volume))
    files, hub = model_hosts.files, model_hosts.hub
    datas = {key: os.urandom(50_000) for key in NAMES}
    extra = ""
    for key, name in NAMES.items():
        files.add("/files/" + quote(name), datas[key])
        extra += model_toml("lora", files.url("/files/" + quote(name)), name=name if key == "long" else None)
    hub_data = os.urandom(40_000)
    hub.add_repo("org/spaced", {"sub dir/ñame with space.safetensors": hub_data})
    extra += model_toml("vae", "hf://org/spaced/sub dir/ñame with space.safetensors")
    (volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra), encoding="utf-8")
    assert cli(streams, "lock").exit_code == 0
    planned = cli(streams, "plan")
    assert planned.exit_code == 0 and f"fetch models/Lora/{NAMES['unicode']}" in planned.stdout, planned.output
    installed = cli(streams, "install")
    assert installed.exit_code == 0, installed.output
    for key, name in NAMES.items():
        assert (volume / "models" / "Lora" / name).read_bytes() == datas[key], key
    assert (volume / "models" / "VAE" / "ñame with space.safetensors").read_bytes() == hub_data
    lock = json.loads((volume / "forge-volume.lock").read_text(encoding="utf-8"))
    assert {m["name"] for m in lock["models"]} == {*NAMES.values(), "ñame with space.safetensors"}
    assert set(state_models(volume)) == {f"models/Lora/{n}" for n in NAMES.values()} | \
        {"models/VAE/ñame with space.safetensors"}
    assert cli(streams, "verify", "--deep").exit_code == 0
    status = cli(streams, "status", "--json")
    report = json.loads(status.stdout)
    assert report["volume"] == str(volume) and report["models"]["count"] == 5, report

    stray = volume / "models" / "Lora" / "ßtray ünlisted.safetensors"
    stray.write_bytes(b"x" * 10)
    pruned = cli(streams, "refresh-models", "--prune")
    assert pruned.exit_code == 0 and "pruned models/Lora/ßtray ünlisted.safetensors" in pruned.stdout, pruned.output
    assert not stray.exists() and all((volume / "models" / "Lora" / n).exists() for n in NAMES.values())
    assert temporaries(volume) == []

    too_long = "x" * 300 + ".safetensors"
    (volume / "forge-volume.toml").write_text(
        provisioned_world.spec(extra=extra + model_toml("lora", files.url("/files/x"), name=too_long)))
    refused = cli(streams, "lock")
    assert refused.exit_code == 1 and "is longer than 255 bytes" in error_line(refused.stderr)


def test_case19_worker_downloads_unicode_names_and_forge_lists_them(fleet: Fleet, streams: Streams) -> None:
    """Fault: a download job whose URL's file name is percent-encoded Unicode with spaces, and one
    that names a 250-byte Unicode file.
    Expected: both land under their exact names in models/, are recorded in state.json, and Forge
    (refreshed by the helper) lists the checkpoint under its name.
    Checked after: the bytes on the volume; sd-models through the worker names the file."""
    files = fleet.hosts.files
    name = "ünïcødé  ckpt 模型.safetensors"
    data, long_data = os.urandom(20_000), os.urandom(20_000)
    files.add("/files/" + quote(name), data)
    files.add("/files/long", long_data)
    long_name = "é" * 118 + "-model.safetensors"  # 254 bytes
    worker = fleet["main"]
    for job in ({"source": files.url("/files/" + quote(name)), "kind": "checkpoint"},
                {"source": files.url("/files/long"), "kind": "checkpoint", "name": long_name}):
        body = result(worker.run({"api": {"method": "POST", "endpoint": "/v1/download"}, "payload": job}, 60),
                      streams)
        assert "error" not in body and body["output"]["forge_refreshed"] is True, body
    folder = fleet.volume / "models" / "Stable-diffusion"
    assert (folder / name).read_bytes() == data and (folder / long_name).read_bytes() == long_data
    recorded = set(state_models(fleet.volume))
    assert {f"models/Stable-diffusion/{name}", f"models/Stable-diffusion/{long_name}"} <= recorded
    listed = result(worker.run({"api": {"method": "GET", "endpoint": "/sdapi/v1/sd-models"}}, 30), streams)
    assert {name, long_name} <= {m["title"] for m in listed["output"]}, listed
    refused = result(worker.run({"api": {"method": "POST", "endpoint": "/v1/download"},
                                 "payload": {"source": files.url("/files/long"), "kind": "checkpoint",
                                             "name": "é" * 200 + ".safetensors"}}, 30), streams)
    assert "longer than 255 bytes" in one_line_error(refused)
