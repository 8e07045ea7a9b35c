"""Forge's process environment, read from /proc: the endpoint's secrets never reach it.

A real worker on RunPod's local API, with tokens, bucket keys, cloud credentials and RunPod's
variables in its environment, boots the Forge stand-in; the test reads ``/proc/<forge pid>/environ``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.conftest import WorkerProc, start_worker, worker_env

pytestmark = pytest.mark.slow

SECRETS = {"HF_TOKEN": "hf_secret_value", "CIVITAI_TOKEN": "civitai_secret_value",
           "AWS_ACCESS_KEY_ID": "AKIASECRETVALUE", "AWS_SECRET_ACCESS_KEY": "aws_secret_value",
           "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9/bucket", "BUCKET_ACCESS_KEY_ID": "bucket_key_value",
           "BUCKET_SECRET_ACCESS_KEY": "bucket_secret_value", "RUNPOD_API_KEY": "runpod_secret_value",
           "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job?token=webhook_secret", "GITHUB_TOKEN": "gh_secret_value",
           "SOME_SERVICE_PASSWORD": "password_value",
           # Issue 19 hole 10: names an allowed prefix would let through, that a word of marks as a secret.
           "NVIDIA_NGC_KEY": "ngc_secret_value", "CUDA_DB_PASS": "db_pass_value", "TORCH_HUB_KEYS": "hub_keys_value",
           "NVIDIA_CREDS": "creds_value"}
SAMPLERS = {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}}


@pytest.fixture(scope="module")
def secret_worker(worker_volume: Path, module_tmp: Path) -> Iterator[WorkerProc]:
    env = worker_env(worker_volume, module_tmp / "scratch", **SECRETS, CUDA_VISIBLE_DEVICES="0",
                     MY_FORGE_SETTING="visible", FORGE_ENV_PASSTHROUGH="MY_FORGE_SETTING")
    # The local API answers jobs itself; RUNPOD_WEBHOOK_GET_JOB would make the SDK poll a queue.
    env.pop("RUNPOD_WEBHOOK_GET_JOB")
    proc = start_worker(env, module_tmp / "logs")
    yield proc
    proc.stop()


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_forge_runs_with_an_allow_listed_environment_and_no_secret(secret_worker: WorkerProc) -> None:
    out = secret_worker.runsync(SAMPLERS)
    assert out["status"] == "COMPLETED", out  # Forge is up: its environment is final
    [forge] = [pid for pid in children(secret_worker.proc.pid)
               if b"launch.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    env = environ(forge)
    raw = Path(f"/proc/{forge}/environ").read_bytes()
    assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
    for value in SECRETS.values():
        assert value.encode() not in raw
    assert env["GIT_PYTHON_REFRESH"] == "quiet"  # the image has no git; Forge imports GitPython at start
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["MY_FORGE_SETTING"] == "visible"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PATH"].split(":")[0].endswith("/venv/bin")
    # The worker itself still has its secrets (its helpers use the tokens).
    assert environ(secret_worker.proc.pid)["HF_TOKEN"] == SECRETS["HF_TOKEN"]
