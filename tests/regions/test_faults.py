"""Nothing left billing: Ctrl-C, SIGTERM, a crash, a hanging pod; and RunPod's API failing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.procs import kill_group
from tests.helpers.runpod_standin import RunPodStandIn
from tests.regions.conftest import DCS, KEY, api_env, plan_actions, regions, runpod_table


def _project(locked: Path, tmp_path: Path, **table: int) -> Path:
    """The fleet's spec and lock without its record: a fresh account in a fresh stand-in."""
    spec = tmp_path / "project" / "forge-volume.toml"
    spec.parent.mkdir()
    text = locked.read_text()
    spec.write_text(text[:text.index("\n[runpod]")] + runpod_table(**table))
    shutil.copy(locked.with_suffix(".lock"), spec.with_suffix(".lock"))
    return spec


def _start(spec: Path, standin: RunPodStandIn) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "provision.cli", "--spec", str(spec), "regions", "apply"],
                            env={**os.environ, **api_env(standin)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_running(standin: RunPodStandIn, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(standin.running_processes()) < count:
        assert time.monotonic() < deadline, "the pods did not start"
        time.sleep(0.1)
    time.sleep(0.5)  # the command is following them now


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_install_leaves_no_pod(locked_spec: Path, tmp_path: Path, sig: int) -> None:
    spec = _project(locked_spec, tmp_path)
    with RunPodStandIn(tmp_path / "runpod", KEY) as standin:
        standin.hang = True
        proc = _start(spec, standin)
        try:
            _wait_running(standin, len(DCS))
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
        finally:
            kill_group(proc)
        assert proc.returncode == 1, err
        assert ("interrupted" if sig == signal.SIGINT else "stopped by SIGTERM") in err
        assert standin.pods == {} and standin.running_processes() == []
        assert len(standin.terminated) == len(DCS)
        assert '"runs": {}' in spec.with_suffix(".regions.json").read_text()  # nothing left to clean up
        assert KEY not in out + err


def test_a_rerun_after_a_crash_terminates_the_pods_it_left(locked_spec: Path, tmp_path: Path) -> None:
    spec = _project(locked_spec, tmp_path)
    with RunPodStandIn(tmp_path / "runpod", KEY) as standin:
        standin.hang = True
        proc = _start(spec, standin)
        try:
            _wait_running(standin, len(DCS))
            os.killpg(proc.pid, signal.SIGKILL)  # no cleanup at all: the machine died
            proc.wait(10)
        finally:
            kill_group(proc)
        left = sorted(standin.pods)
        assert len(left) == len(DCS)

        standin.hang = False
        standin.no_capacity = set(DCS)  # the re-run cannot start pods: it must still clean up first
        plan = regions(spec, standin, "plan")
        assert all(f"terminate pod {p}" in plan.stdout for p in left), plan.output
        rerun = regions(spec, standin, "apply")
        assert rerun.exit_code == 1
        assert all(f"terminated pod {p} left running by an earlier apply" in rerun.stdout for p in left)
        assert standin.pods == {} and standin.running_processes() == []
        assert rerun.stdout.count("no pod could start") == len(DCS)


def test_a_hanging_pod_is_terminated_at_its_timeout(locked_spec: Path, tmp_path: Path) -> None:
    spec = _project(locked_spec, tmp_path, pod_timeout=2)
    with RunPodStandIn(tmp_path / "runpod", KEY) as standin:
        standin.hang = True
        result = regions(spec, standin, "apply")
        assert result.exit_code == 1
        assert result.stdout.count("did not finish within [runpod.pod] timeout = 2 s") == len(DCS), result.output
        assert "stand-in pod hangs here" in result.stdout  # the last line it printed
        assert standin.pods == {} and standin.running_processes() == []
        assert standin.endpoints == {}  # no volume matches the lock: no endpoint yet


def test_rate_limits_and_server_errors_are_retried(locked_spec: Path, tmp_path: Path) -> None:
    spec = _project(locked_spec, tmp_path)
    with RunPodStandIn(tmp_path / "runpod", KEY) as standin:
        standin.fail_next = [429, 500, 503]
        standin.delay = 0.05
        assert plan_actions(spec, standin) == {**dict.fromkeys(DCS, "create volume + install"), "endpoint": "create"}
        assert standin.requests[:4] == [("GET", "/v2/network-volumes")] * 4  # 3 retried, then answered

        standin.fail_next = [500] * 50
        failed = regions(spec, standin, "plan", env={"RUNPOD_API_RETRIES": "3"})
        assert failed.exit_code == 1
        assert failed.stderr.strip().splitlines() == [
            "error: RunPod API GET /v2/network-volumes answered 500: injected by the stand-in "
            "(RunPod failed after the retries; re-run later (apply resumes))"], failed.stderr
        assert standin.requests.count(("GET", "/v2/network-volumes")) == 4 + 4  # the 3 retries, each time
        assert "Traceback" not in failed.output

        standin.fail_next = []
        standin.delay = 1.0
        slow = regions(spec, standin, "plan", env={"RUNPOD_API_TIMEOUT": "0.2", "RUNPOD_API_RETRIES": "1"})
        assert slow.exit_code == 1 and "GET /v2/network-volumes failed" in slow.stderr, slow.stderr
        assert len(slow.stderr.strip().splitlines()) == 1


def test_spec_table_errors_are_one_line(locked_spec: Path, tmp_path: Path) -> None:
    spec = _project(locked_spec, tmp_path)
    with RunPodStandIn(tmp_path / "runpod", KEY) as standin:
        spec.write_text(spec.read_text().replace("volume_size = 50", "volume_size = 50\nregion = \"EU\""))
        bad = regions(spec, standin, "plan")
        assert bad.exit_code == 1 and "`runpod.region` is not a known key" in bad.stderr
        spec.write_text(spec.read_text().replace('region = "EU"', "").replace('"EU-RO-1"', '"europe"'))
        bad = regions(spec, standin, "plan")
        assert bad.exit_code == 1 and "not a RunPod datacenter id" in bad.stderr
        assert standin.requests == []  # a bad spec sends nothing


def test_a_model_without_sha256_is_refused(locked_spec: Path, tmp_path: Path) -> None:
    spec = _project(locked_spec, tmp_path)
    lock_text = spec.with_suffix(".lock").read_text()
    data = json.loads(lock_text)
    data["models"] = [{"kind": "lora", "name": "x.safetensors", "source": "https://example.invalid/x.safetensors",
                       "path": "models/Lora/x.safetensors", "sha256": None, "size": None}]
    spec.with_suffix(".lock").write_text(json.dumps(data))
    spec.write_text(spec.read_text().replace(
        "\n[runpod]", '\n[[models]]\nkind = "lora"\nsource = "https://example.invalid/x.safetensors"\n\n[runpod]', 1))
    with RunPodStandIn(tmp_path / "runpod", KEY) as standin:
        result = regions(spec, standin, "plan")
        assert result.exit_code == 1 and "has no sha256 for models/Lora/x.safetensors" in result.stderr, result.output
        assert standin.requests == []
