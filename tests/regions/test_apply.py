"""`forge-volume regions plan | apply | status` through the CLI, against the RunPod stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.procs import kill_group
from tests.regions.conftest import (
    DCS,
    KEY,
    MORE_WEIGHTS,
    WEIGHTS,
    Copy,
    Fleet,
    api_env,
    done_actions,
    folder_of,
    lock,
    model_entry,
    plan_actions,
    read_json,
    regions,
    volume_digest,
)
from volume_layout import VolumeLayout

NOTHING = {**dict.fromkeys(DCS, "nothing"), "endpoint": "none"}


def test_three_datacenters_from_nothing(fleet: Fleet) -> None:
    standin, first = fleet.standin, fleet.first
    assert first.exit_code == 0, first.output
    assert fleet.planned == {**dict.fromkeys(DCS, "create volume + install"), "endpoint": "create"}
    assert done_actions(first) == fleet.planned  # plan said what apply did
    for done in json.loads(first.stdout)["done"]:  # each pod's own report of its install, read from its log
        assert done["ok"] and done["message"].startswith("installed in") and "ran python, venv" in done["message"]
        assert done["result"]["state"]["forge_commit"] == fleet.world.forge.head()

    # One volume per datacenter, named as the spec says; one CPU pod each, the volume at /workspace.
    assert sorted((v["dataCenter"], v["name"], v["size"]) for v in standin.volumes.values()) == sorted(
        (dc, "forge", 50) for dc in DCS)
    assert len(standin.pod_bodies) == 3
    for body in standin.pod_bodies:
        assert "cpu" in body and "gpu" not in body
        assert body["mounts"]["network"][0]["path"] == "/workspace"
        assert body["args"] == "forge-volume regions pod-run" and body["env"]["FORGE_VOLUME_MODE"] == "install"
    assert standin.pods == {} and standin.running_processes() == []  # every pod terminated
    assert len(standin.terminated) == 3

    # Identical volumes: the same lock, the same files with the same sha256, installed from it.
    lock_text = fleet.spec.with_suffix(".lock").read_text()
    digests = {}
    for dc in DCS:
        folder = folder_of(standin, dc)
        assert (folder / "forge-volume.lock").read_text() == lock_text
        assert (folder / "models" / "Lora" / "tiny.safetensors").read_bytes() == WEIGHTS
        state = read_json(VolumeLayout(folder).state)
        assert state["forge"]["commit"] == fleet.world.forge.head() and "boot" in state["steps"]
        digests[dc] = volume_digest(folder)
    assert len(digests[DCS[0]]) > 100
    assert digests[DCS[0]] == digests[DCS[1]] == digests[DCS[2]]

    # The endpoint, with the three volumes and only their datacenters.
    (endpoint,) = standin.endpoints.values()
    assert sorted(endpoint["networkVolumes"]) == sorted(standin.volumes)
    assert sorted(endpoint["dataCenterIds"]) == sorted(DCS)
    assert endpoint["gpu"]["pools"] == ["ADA_24", "AMPERE_24"] and endpoint["image"].endswith("worker:0.1.0")
    assert endpoint["env"] == {"FORGE_DEFAULTS": "original"}

    # The record says what each datacenter holds; status reads it without a pod.
    record = read_json(fleet.spec.with_suffix(".regions.json"))
    assert sorted(record["applied"]) == sorted(DCS) and record["runs"] == {}
    assert standin.schema_errors == []
    print(f"apply from nothing: {fleet.seconds:.1f} s for {len(DCS)} datacenters")


def test_second_apply_reads_only(fleet_copy: Copy) -> None:
    standin, spec = fleet_copy.standin, fleet_copy.spec
    assert plan_actions(spec, standin) == NOTHING
    before = len(standin.requests)
    started = time.monotonic()
    again = regions(spec, standin, "apply", "--json")
    seconds = time.monotonic() - started

    assert again.exit_code == 0, again.output
    assert done_actions(again) == NOTHING
    assert standin.pod_bodies == []  # no pod
    assert [r for r in standin.requests[before:] if r[0] != "GET"] == []  # read calls only
    assert seconds <= 2.0, f"a no-change apply took {seconds:.2f} s"

    status = regions(spec, standin, "status")
    assert status.exit_code == 0, status.output
    assert status.stdout.count("matches the lock") == 3 and "volumes of" in status.stdout


def test_model_added_refreshes_models_only_everywhere(fleet_copy: Copy) -> None:
    standin, spec, server = fleet_copy.standin, fleet_copy.spec, fleet_copy.server
    steps_before = {dc: read_json(VolumeLayout(folder_of(standin, dc)).state)["steps"] for dc in DCS}
    spec.write_text(spec.read_text().replace("\n[runpod]", model_entry(server, "/files/more.safetensors",
                                                                       MORE_WEIGHTS) + "\n[runpod]", 1))
    lock(spec)
    status = regions(spec, standin, "status")
    assert status.exit_code == 1 and status.stdout.count("only models changed") == 3, status.output
    planned = plan_actions(spec, standin)
    assert planned == {**dict.fromkeys(DCS, "refresh models"), "endpoint": "none"}

    result = regions(spec, standin, "apply", "--json")

    assert result.exit_code == 0, result.output
    assert done_actions(result) == planned
    assert [b["env"]["FORGE_VOLUME_MODE"] for b in standin.pod_bodies] == ["models"] * 3
    for dc in DCS:
        folder = folder_of(standin, dc)
        assert (folder / "models" / "Lora" / "more.safetensors").read_bytes() == MORE_WEIGHTS
        steps = read_json(VolumeLayout(folder).state)["steps"]
        for step in ("venv", "forge", "extensions", "boot"):  # no Forge or venv work
            assert steps[step] == steps_before[dc][step], step
        assert (folder / "forge-volume.lock").read_text() == spec.with_suffix(".lock").read_text()
    assert not [r for r in standin.requests if r[0] == "PATCH"]  # the endpoint was already right
    assert plan_actions(spec, standin) == NOTHING


def test_one_datacenter_without_capacity(fleet_copy: Copy) -> None:
    standin, spec, server = fleet_copy.standin, fleet_copy.spec, fleet_copy.server
    spec.write_text(spec.read_text().replace("\n[runpod]", model_entry(server, "/files/more.safetensors",
                                                                       MORE_WEIGHTS) + "\n[runpod]", 1))
    lock(spec)
    standin.no_capacity = {"US-KS-2"}
    planned = plan_actions(spec, standin)

    result = regions(spec, standin, "apply", "--json")

    assert result.exit_code == 1
    did = done_actions(result)
    # Per datacenter, what plan said; the endpoint drops the datacenter RunPod had no pod for, which
    # no plan can foresee (plan says so: "a datacenter whose work fails is left out of the endpoint").
    assert {dc: did[dc] for dc in DCS} == {dc: planned[dc] for dc in DCS}
    assert (planned["endpoint"], did["endpoint"]) == ("none", "update")
    failed = [d for d in json.loads(result.stdout)["done"] if not d["ok"]]
    assert [d["datacenter"] for d in failed] == ["US-KS-2"]
    assert "no pod could start in US-KS-2" in failed[0]["message"] and "no longer any instances" in failed[0]["message"]
    assert "US-KS-2 does not match the lock" in result.stderr
    for dc in ("EU-RO-1", "EUR-IS-1"):
        assert (folder_of(standin, dc) / "models" / "Lora" / "more.safetensors").is_file()
    assert not (folder_of(standin, "US-KS-2") / "models" / "Lora" / "more.safetensors").exists()
    (endpoint,) = standin.endpoints.values()
    assert sorted(endpoint["dataCenterIds"]) == ["EU-RO-1", "EUR-IS-1"]  # a volume behind the lock serves no job

    standin.no_capacity = set()
    planned = plan_actions(spec, standin)
    assert planned == {"EU-RO-1": "nothing", "US-KS-2": "refresh models", "EUR-IS-1": "nothing", "endpoint": "update"}
    rerun = regions(spec, standin, "apply", "--json")
    assert rerun.exit_code == 0, rerun.output
    assert done_actions(rerun) == planned
    assert (folder_of(standin, "US-KS-2") / "models" / "Lora" / "more.safetensors").is_file()
    assert sorted(endpoint["dataCenterIds"]) == sorted(DCS)


def test_a_failing_install_is_named_and_the_rest_go_on(fleet_copy: Copy) -> None:
    standin, spec, server = fleet_copy.standin, fleet_copy.spec, fleet_copy.server
    blocked = folder_of(standin, "EUR-IS-1") / "models" / "Lora" / "more.safetensors"
    blocked.mkdir(parents=True)  # a folder where the model file must go: the refresh there fails
    spec.write_text(spec.read_text().replace("\n[runpod]", model_entry(server, "/files/more.safetensors",
                                                                       MORE_WEIGHTS) + "\n[runpod]", 1))
    lock(spec)

    result = regions(spec, standin, "apply")

    assert result.exit_code == 1
    line = next(x for x in result.stdout.splitlines() if x.startswith("EUR-IS-1"))
    assert "FAILED" in line and "more.safetensors" in line, line
    assert sum("refresh models: done" in x for x in result.stdout.splitlines()) == 2
    assert "Traceback" not in result.output


def test_key_never_shown(fleet: Fleet, tmp_path: Path) -> None:
    standin = fleet.standin
    texts = [fleet.first.output, standin.logs_text(), fleet.spec.with_suffix(".regions.json").read_text()]
    texts += [str(b) for b in standin.pod_bodies]
    assert all(KEY not in t for t in texts)
    for dc in DCS:
        for path in folder_of(standin, dc).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 5_000_000:
                assert KEY.encode() not in path.read_bytes(), path
    # The header carried it, and a wrong key is one line that does not echo it.
    wrong = regions(fleet.spec, standin, "status", env={"RUNPOD_API_KEY": "rpa_WRONGKEY"})
    assert wrong.exit_code == 1 and "answered 401" in wrong.stderr and "rpa_WRONGKEY" not in wrong.output
    missing = regions(fleet.spec, standin, "plan", env={"RUNPOD_API_KEY": ""})
    assert missing.exit_code == 1 and "RUNPOD_API_KEY is not set" in missing.stderr


def test_a_pod_whose_caller_died_ends_itself(fleet_copy: Copy) -> None:
    standin, spec, server = fleet_copy.standin, fleet_copy.spec, fleet_copy.server
    text = spec.read_text().replace("\n[runpod]", model_entry(server, "/files/more.safetensors", MORE_WEIGHTS)
                                    + "\n[runpod]", 1)
    spec.write_text(text.replace("\n[runpod.endpoint]", 'env = { FORGE_VOLUME_LINGER = "1" }\n\n[runpod.endpoint]'))
    lock(spec)
    proc = subprocess.Popen([sys.executable, "-m", "provision.cli", "--spec", str(spec), "regions", "apply"],
                            env={**os.environ, **api_env(standin)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(standin.pods) < len(DCS):
            assert time.monotonic() < deadline, "the pods did not start"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the caller's machine went away before any pod finished
        proc.wait(10)
    finally:
        kill_group(proc)
    pods = sorted(standin.pods)
    deadline = time.monotonic() + 120
    while standin.pods:
        assert time.monotonic() < deadline, f"pods left running: {sorted(standin.pods)}"
        time.sleep(0.2)
    # Each finished its refresh, then ended itself with its own pod-scoped key.
    assert sorted(path.split("/")[3] for method, path in standin.pod_calls if path.endswith("/action")) == pods
    for dc in DCS:
        assert (folder_of(standin, dc) / "models" / "Lora" / "more.safetensors").read_bytes() == MORE_WEIGHTS


def test_volumes_grow_and_never_shrink(fleet_copy: Copy) -> None:
    standin, spec = fleet_copy.standin, fleet_copy.spec
    small = next(v for v in standin.volumes.values() if v["dataCenter"] == "US-KS-2")
    small["size"] = 20  # made smaller than the spec by hand in the console
    big = next(v for v in standin.volumes.values() if v["dataCenter"] == "EU-RO-1")
    big["size"] = 80
    planned = plan_actions(spec, standin)
    assert planned == {**NOTHING, "US-KS-2": "grow volume"}
    shown = regions(spec, standin, "plan").stdout
    assert "kept at 80 GB: the spec says 50 GB, and volumes are never shrunk" in shown

    result = regions(spec, standin, "apply", "--json")

    assert result.exit_code == 0, result.output
    assert done_actions(result) == planned
    assert (small["size"], big["size"]) == (50, 80)
    assert standin.mutating_requests() == [("PATCH", f"/v2/network-volumes/{small['id']}")]
    assert standin.pod_bodies == []


def test_two_volumes_of_one_name_are_never_guessed_between(fleet_copy: Copy) -> None:
    standin, spec = fleet_copy.standin, fleet_copy.spec
    twin = {"id": "twin000001", "name": "forge", "size": 50, "dataCenter": "EUR-IS-1", "type": "STANDARD"}
    standin.volumes[twin["id"]] = twin
    plan = regions(spec, standin, "plan")
    assert "EUR-IS-1: cannot apply: 2 volumes are named 'forge' here" in plan.stdout, plan.output

    result = regions(spec, standin, "apply")

    assert result.exit_code == 1 and "EUR-IS-1 does not match the lock" in result.stderr
    assert standin.pod_bodies == [] and [r for r in standin.mutating_requests() if "network-volumes" in r[1]] == []
    (endpoint,) = standin.endpoints.values()
    assert sorted(endpoint["dataCenterIds"]) == ["EU-RO-1", "US-KS-2"]


def test_check_installs_everywhere_and_finds_nothing_to_do(fleet_copy: Copy) -> None:
    standin, spec = fleet_copy.standin, fleet_copy.spec
    spec.with_suffix(".regions.json").unlink()  # another machine: no record of what the volumes hold
    status = regions(spec, standin, "status")
    assert status.exit_code == 1 and status.stdout.count("unknown: no record of what it holds") == 3, status.output
    planned = plan_actions(spec, standin)
    assert planned == {**dict.fromkeys(DCS, "install"), "endpoint": "none"}

    result = regions(spec, standin, "apply", "--json")

    assert result.exit_code == 0, result.output
    assert done_actions(result) == planned
    assert [d["message"].split(":")[0] for d in json.loads(result.stdout)["done"]] == ["nothing to do"] * 3
    assert regions(spec, standin, "status").exit_code == 0  # recorded again
    forced = regions(spec, standin, "plan", "--check")
    assert forced.stdout.count("--check: install checks everything") == 3
