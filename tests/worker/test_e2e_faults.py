"""Failure cases end to end: Forge crashing, hanging, wedging or dying mid-job, and bad volumes.

Every scenario gets its own worker (RunPod's local API), all started together at module start
so their boots overlap. A job never waits past its deadline, the message says what failed and
what to do, and the worker itself keeps serving (no crash loop).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.bad_volumes import bad_volumes
from tests.helpers.timing import PROMPT
from tests.worker.conftest import WorkerProc, start_worker, worker_env

SAMPLERS = {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}}
TXT2IMG = {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": {"prompt": "a cat", "steps": 40}}
VOLUME = {"api": {"method": "GET", "endpoint": "/v1/volume"}}
BAD_VOLUMES = ("missing", "empty", "future", "corrupt")  # the whole set runs in tests/faults


@pytest.fixture(scope="module")
def workers(worker_volume: Path, module_tmp: Path) -> Iterator[dict[str, WorkerProc]]:
    scratch, logs = module_tmp / "scratch", module_tmp / "logs"
    envs = {
        "crash": worker_env(worker_volume, scratch, FORGE_STANDIN_MODE="crash_at_boot"),
        "no_gpu": worker_env(worker_volume, scratch, FORGE_STANDIN_MODE="no_gpu"),
        "hang": worker_env(worker_volume, scratch, FORGE_STANDIN_MODE="hang", FORGE_BOOT_TIMEOUT="4"),
        # Forge boots when the test opens the gate (or after 50 s, inside the boot deadline of 60 s).
        "slow": worker_env(worker_volume, scratch, FORGE_STANDIN_BOOT_SECONDS="50",
                           FORGE_STANDIN_BOOT_GATE=str(module_tmp / "slow-boot-gate")),
        "exit": worker_env(worker_volume, scratch, FORGE_STANDIN_MODE="exit_mid_generation"),
        "wedge": worker_env(worker_volume, scratch, FORGE_STANDIN_MODE="wedge_generation",
                            FORGE_REQUEST_TIMEOUT="1.5"),
        "bad_port": worker_env(worker_volume, scratch, FORGE_PORT="eighty"),
    }
    envs.update({name: worker_env(path, scratch) for name, (path, _) in bad_volumes(module_tmp / "volumes").items()
                 if name in BAD_VOLUMES})
    procs: dict[str, WorkerProc] = {}
    try:
        for name, env in envs.items():
            procs[name] = start_worker(env, logs, wait=False)
        for proc in procs.values():
            proc.wait_api(60)
        yield procs
    finally:
        for proc in procs.values():  # all at once: each takes a moment to wind its job loop down
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGINT)
        for proc in procs.values():
            proc.stop()


def timed(worker: WorkerProc, job: dict[str, object], timeout: float = 60) -> tuple[dict[str, object], float]:
    started = time.monotonic()
    out = worker.runsync(job, timeout)
    return out, time.monotonic() - started


def test_helpers_answer_while_forge_boots_and_forge_jobs_wait_for_it(workers: dict[str, WorkerProc]) -> None:
    worker = workers["slow"]
    status, _ = timed(worker, VOLUME)
    assert status["status"] == "COMPLETED", status
    assert "Forge ready" not in worker.log()  # Forge boots until the gate opens
    Path(worker.env["FORGE_STANDIN_BOOT_GATE"]).write_text("go")
    out, _ = timed(worker, SAMPLERS)
    assert out["status"] == "COMPLETED" and out["output"]  # it waited for the boot


def test_forge_crashing_at_boot_fails_jobs_with_its_last_lines(workers: dict[str, WorkerProc]) -> None:
    out, seconds = timed(workers["crash"], SAMPLERS)
    assert out["status"] == "FAILED", out
    assert "Forge exited with code 1 while booting" in str(out["error"]) and "CUDA error" in str(out["error"])
    assert seconds < PROMPT  # not at the boot deadline of 60 s
    assert workers["crash"].proc.poll() is None  # the worker stays up: no crash loop
    assert "RuntimeError: CUDA error" in workers["crash"].log()  # Forge's output is in the worker's log


def test_no_gpu_on_a_local_test_names_the_fix_and_the_local_api_shows_forges_log(
        workers: dict[str, WorkerProc]) -> None:
    """A day-one local test on a machine without a GPU: the error says how to run Forge on the CPU, and
    RunPod's local API (which answers a failure with its `error` alone) shows the end of Forge's log."""
    out, _ = timed(workers["no_gpu"], SAMPLERS)
    assert out["status"] == "FAILED", out
    error = str(out["error"])
    assert "Found no NVIDIA driver" in error and "set FORGE_ARGS=--always-cpu" in error
    assert "forge_log (last " in error and "forge-standin: booting" in error  # a line the 3-line cause leaves out


def test_a_hung_boot_fails_at_forge_boot_timeout(workers: dict[str, WorkerProc]) -> None:
    worker = workers["hang"]
    out, seconds = timed(worker, SAMPLERS)
    assert out["status"] == "FAILED" and "did not become ready within FORGE_BOOT_TIMEOUT=4 s" in str(out["error"])
    assert seconds < 4 + PROMPT  # at most the boot deadline (which may have passed while other workers started)
    again, seconds = timed(worker, SAMPLERS)
    assert again["status"] == "FAILED" and seconds < PROMPT
    assert worker.log().count("forge-standin: booting") == 1  # failed at once: no second boot


def test_forge_dying_mid_generation_fails_the_job_and_the_next(workers: dict[str, WorkerProc]) -> None:
    worker = workers["exit"]
    out, _ = timed(worker, TXT2IMG)
    assert out["status"] == "FAILED" and "Forge exited with code 3 after it was ready" in str(out["error"]), out
    assert "simulated crash" in str(out["error"])
    again, seconds = timed(worker, SAMPLERS)
    assert again["status"] == "FAILED" and "exited with code 3" in str(again["error"]) and seconds < PROMPT
    assert worker.log().count("forge-standin: booting") == 1  # failed at once: no second boot


def test_a_wedged_forge_fails_at_the_request_timeout(workers: dict[str, WorkerProc]) -> None:
    out, seconds = timed(workers["wedge"], TXT2IMG)
    assert out["status"] == "FAILED" and "within 1.5 s" in str(out["error"]) and "wedged" in str(out["error"])
    assert seconds < 1.5 + PROMPT  # the wedged generation never ends


@pytest.mark.parametrize(("name", "message"), [
    ("missing", "no volume at .*no-such-volume.*attach the network volume"),
    ("empty", "is not provisioned .*run `forge-volume install`"),
    ("future", "layout version 2"),
    ("corrupt", "is corrupt"),
    ("bad_port", "FORGE_PORT='eighty' is not a TCP port"),
])
def test_a_bad_volume_or_setting_fails_every_job_at_once(workers: dict[str, WorkerProc], name: str,
                                                        message: str) -> None:
    import re

    for job in (SAMPLERS, TXT2IMG):
        out, seconds = timed(workers[name], job)
        assert out["status"] == "FAILED" and re.search(message, str(out["error"])), out
        assert seconds < PROMPT
    assert workers[name].proc.poll() is None and "forge-standin: booting" not in workers[name].log()
