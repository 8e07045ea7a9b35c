"""Worker fixtures: installed test volumes and real workers on RunPod's local API, one per module.

A worker is ``python -m worker --rp_serve_api`` as a subprocess, booting the fixture Forge
(``forge_standin.py`` through the volume's ``launch.py``) from a volume installed by the real
installer. Ports are picked free per worker so modules can run side by side.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import copy_volume
from tests.helpers.forge_world import World
from tests.helpers.procs import stop_group

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = "tiny-sd15.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def module_volume(world: World, folder: Path, *, checkpoint: bool = True) -> Path:
    """A copy of the installed test volume with one (fake) checkpoint, as a worker finds it."""
    volume = copy_volume(world.root / "volume", folder / "volume")
    if checkpoint:
        models = volume / "models" / "Stable-diffusion"
        models.mkdir(parents=True, exist_ok=True)
        (models / CHECKPOINT).write_bytes(b"not really a checkpoint\n")
    return volume


# The stand-in's switches reach Forge the way a user's own settings do: named in FORGE_ENV_PASSTHROUGH
# (Forge's environment is allow-listed).
STANDIN_SWITCHES = ("FORGE_STANDIN_MODE", "FORGE_STANDIN_BOOT_SECONDS", "FORGE_STANDIN_STEP_SECONDS",
                    "FORGE_STANDIN_IMAGE_BYTES", "FORGE_STANDIN_RECORD", "FORGE_STANDIN_BOOT_GATE", "FAULT_FORGE_LOG")


def worker_env(volume: Path, scratch: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_", "BUCKET_", "RUNPOD_"))}
    # FORGE_FAST_BOOT=1: test volumes sit on local disk, where the default (auto) would skip the boot set's
    # lay-out; the workers under test take the path a worker on a network volume takes.
    env.update(FORGE_VOLUME=str(volume), FORGE_PORT=str(free_port()), FORGE_SCRATCH=str(scratch), FORGE_FAST_BOOT="1",
               FORGE_BOOT_TIMEOUT="60", FORGE_PROGRESS_INTERVAL="0.2", UVICORN_LOG_LEVEL="warning",
               FORGE_ENV_PASSTHROUGH=",".join(STANDIN_SWITCHES))
    env.update(extra)
    return env


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def forge_port(self) -> int:
        return int(self.env["FORGE_PORT"])

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def post(self, path: str, body: Any, timeout: float = 60) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return {"http_status": exc.code, "body": exc.read().decode(errors="replace")}

    def runsync(self, job_input: Any, timeout: float = 60) -> dict[str, Any]:
        return self.post("/runsync", {"input": job_input}, timeout)

    def run_and_status(self, job_input: Any, timeout: float = 60) -> dict[str, Any]:
        queued = self.post("/run", {"input": job_input}, timeout)
        assert queued["status"] == "IN_PROGRESS", queued
        return self.post(f"/status/{queued['id']}", {}, timeout)

    def wait_api(self, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"worker API did not start within {deadline} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGINT (the SDK's graceful shutdown), then nothing of the worker's left: its Forge included."""
        stop_group(self.proc)


def run_once(env: dict[str, str], log_dir: Path, job: Any) -> dict[str, Any]:
    """A worker started for one job (through RunPod's local API) and stopped: the job's answer."""
    worker = start_worker(env, log_dir)
    try:
        return worker.runsync(job)
    finally:
        worker.stop()


def start_worker(env: dict[str, str], log_dir: Path, python: str = sys.executable, wait: bool = True,
                 wrap: Sequence[str] = ()) -> WorkerProc:
    """``wrap``: a command the worker runs under (it execs the worker: ``tests.helpers.read_only``)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*wrap, python, "-m", "worker", "--rp_serve_api", "--rp_api_port", str(port)],
                                cwd=log_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    worker = WorkerProc(proc, port, log_path, env)
    if wait:
        try:
            worker.wait_api(60)
        except BaseException:
            worker.stop()
            raise
    return worker


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker")


@pytest.fixture(scope="module")
def worker_volume(provisioned_world: World, module_tmp: Path) -> Path:
    return module_volume(provisioned_world, module_tmp)


@pytest.fixture(scope="module")
def worker(worker_volume: Path, module_tmp: Path) -> Iterator[WorkerProc]:
    """One worker for the module, on a volume with one checkpoint, Forge stand-in in normal mode."""
    proc = start_worker(worker_env(worker_volume, module_tmp / "scratch"), module_tmp / "logs")
    yield proc
    proc.stop()
