"""The example client (examples/client.py), run as a user runs it.

Against RunPod's real local API (`--rp_serve_api`) serving a small handler that answers with
Forge's recorded responses, and against a loopback stand-in for RunPod's hosted job API
(/run, /status, /cancel) for what only the hosted API does: queueing, progress, cancel, 401.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.worker.conftest import WorkerProc

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "examples" / "client.py"
RESPONSES = ROOT / "tests" / "data" / "forge" / "responses"
SECRET = "rpa_TESTKEY_must_never_be_printed_0123456789"


def recorded(name: str) -> Any:
    return json.loads((RESPONSES / name).read_text(encoding="utf-8"))["body"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_client(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="module")
def local_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """RunPod's local test API serving tests/docs/local_worker.py, on a free loopback port."""
    workdir = tmp_path_factory.mktemp("local-api")  # no test_input.json here, and uploads stay here
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUNPOD_LOG_LEVEL": "ERROR"}
    env.pop("RUNPOD_ENDPOINT_ID", None)
    log = (workdir / "api.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.docs.local_worker", "--rp_serve_api",
                             "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the local API exited with {proc.returncode}:\n{(workdir / 'api.log').read_text()}")
            try:
                if requests.get(f"{base}/docs", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the local API did not answer within 60 s:\n{(workdir / 'api.log').read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            # uvicorn waits for requests in flight (the deadline test leaves one sleeping): not for long.
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def write_job(path: Path, method: str, endpoint: str, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"input": {"api": {"method": method, "endpoint": endpoint}, "payload": payload}}))
    return path


def test_txt2img_through_run_and_status_saves_the_image(local_api: str, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.json", "POST", "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2})
    out = tmp_path / "out"
    result = run_client("--base-url", local_api, "--input", str(job), "--out", str(out))
    assert result.returncode == 0, result.stderr

    expected = recorded("POST_sdapi_v1_txt2img.json")
    saved = sorted(out.iterdir())
    assert [p.suffix for p in saved] == [".png"]
    assert saved[0].read_bytes() == base64.b64decode(expected["images"][0])
    output = json.loads(result.stdout)
    assert output["images"] == [str(saved[0])]  # the base64 is replaced by where it went
    assert output["parameters"] == expected["parameters"]
    assert output["info"] == expected["info"]
    assert "IN_PROGRESS" in result.stderr and "COMPLETED" in result.stderr


def test_inline_get_with_runsync(local_api: str, tmp_path: Path) -> None:
    result = run_client("--base-url", local_api, "--sync", "--method", "GET", "--endpoint", "/sdapi/v1/samplers",
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == recorded("GET_sdapi_v1_samplers.json")
    assert not (tmp_path / "out").exists()  # nothing to save, no folder made


def test_failed_job_exits_1_with_the_jobs_error(local_api: str, tmp_path: Path) -> None:
    result = run_client("--base-url", local_api, "--endpoint", "/test/fail", "--payload", "{}")
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert "model 'nope' not found" in result.stderr
    assert result.stdout == ""


def test_image_urls_are_printed_not_saved(local_api: str, tmp_path: Path) -> None:
    result = run_client("--base-url", local_api, "--endpoint", "/test/urls", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "image URL: https://bucket.example.invalid/job/0.png" in result.stderr
    assert json.loads(result.stdout)["images"] == ["https://bucket.example.invalid/job/0.png"]
    assert not (tmp_path / "out").exists()


def test_deadline_on_the_local_api(local_api: str) -> None:
    started = time.monotonic()
    result = run_client("--base-url", local_api, "--endpoint", "/test/sleep", "--payload", '{"seconds": 20}',
                        "--timeout", "2")
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert "no answer within" in result.stderr


def test_usage_errors() -> None:
    assert run_client().returncode == 2  # neither --endpoint-id nor --base-url
    result = run_client("--base-url", "http://127.0.0.1:9", "--payload", "{}")
    assert result.returncode == 1 and "give --input FILE, or --endpoint ROUTE" in result.stderr
    result = run_client("--base-url", "http://127.0.0.1:9", "--endpoint", "/x", "--payload", "{not json")
    assert result.returncode == 1 and "--payload is not valid JSON" in result.stderr


def test_unreachable_local_api_fails_fast() -> None:
    result = run_client("--base-url", f"http://127.0.0.1:{free_port()}", "--endpoint", "/sdapi/v1/txt2img",
                        timeout=30)
    assert result.returncode == 1
    assert "cannot connect" in result.stderr


def test_repository_test_input_is_a_valid_job_file() -> None:
    job_file = ROOT / "test_input.json"
    if not job_file.exists():
        pytest.skip("test_input.json not written yet (worker issue)")
    sys.path.insert(0, str(CLIENT.parent))
    try:
        import client
    finally:
        sys.path.remove(str(CLIENT.parent))
    body = client.build_body(job_file, "POST", None, None, None)
    assert set(body["input"]) >= {"api", "payload"}


# --- the real worker on its local API ---------------------------------------------------------------


@pytest.mark.slow
def test_readme_local_run_with_the_real_worker(docs_worker: WorkerProc, tmp_path: Path) -> None:
    """The README's local test: the worker's local API, the repository's test_input.json, images saved."""
    out = tmp_path / "out"
    result = run_client("--base-url", docs_worker.url, "--input", str(ROOT / "test_input.json"), "--out", str(out))
    assert result.returncode == 0, result.stderr + docs_worker.log()[-2000:]
    saved = sorted(out.iterdir())
    assert len(saved) == 1 and saved[0].suffix == ".png"
    assert saved[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    output = json.loads(result.stdout)
    assert output["images"] == [str(saved[0])]
    sent = json.loads((ROOT / "test_input.json").read_text(encoding="utf-8"))["input"]["payload"]
    assert output["parameters"]["prompt"] == sent["prompt"]


@pytest.mark.slow
def test_real_worker_errors_reach_the_client(docs_worker: WorkerProc) -> None:
    result = run_client("--base-url", docs_worker.url, "--sync", "--endpoint", "/sdapi/v1/txt2img",
                        "--payload", '{"prompt": "x", "steps": "many"}')
    assert result.returncode == 1
    assert "Forge answered 422 to POST /sdapi/v1/txt2img: steps: Input should be a valid integer" in result.stderr
    result = run_client("--base-url", docs_worker.url, "--method", "GET", "--endpoint", "/sdapi/v1/sd-vae")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == recorded("GET_sdapi_v1_sd-modules.json")


# --- RunPod's hosted API, stood in for on loopback ------------------------------------------------


class FakeRunPod:
    """RunPod's hosted job API for one endpoint: /run queues, /status walks the job through its states."""

    def __init__(self, states: list[dict[str, Any]], *, api_key: str = SECRET) -> None:
        self.states = states
        self.api_key = api_key
        self.requests: list[tuple[str, str, str | None, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # silence the per-request lines
                return

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((method, self.path, self.headers.get("Authorization"), body))
                if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._answer(401, {"error": "Unauthorized"})
                elif method == "POST" and self.path == "/v2/ep1/run":
                    self._answer(200, {"id": "job-1", "status": "IN_QUEUE"})
                elif method == "GET" and self.path == "/v2/ep1/status/job-1":
                    state = fake.states.pop(0) if len(fake.states) > 1 else fake.states[0]
                    self._answer(200, {"id": "job-1", **state})
                elif method == "POST" and self.path == "/v2/ep1/cancel/job-1":
                    self._answer(200, {"id": "job-1", "status": "CANCELLED"})
                else:
                    self._answer(404, {"error": "not found"})

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler

    def __enter__(self) -> FakeRunPod:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def runpod_client(fake: FakeRunPod, *args: str, key: str = SECRET) -> subprocess.CompletedProcess[str]:
    return run_client("--endpoint-id", "ep1", "--api-base", f"{fake.base}/v2", "--poll", "0.05", *args,
                      env={"RUNPOD_API_KEY": key})


def test_runpod_run_status_shows_progress_and_saves(tmp_path: Path) -> None:
    from worker.progress import summarise

    progress = recorded("GET_sdapi_v1_progress_during_generation.json")
    done = recorded("POST_sdapi_v1_txt2img.json")
    # What the worker reports (its summary of Forge's progress), and Forge's raw report, both understood.
    states = [{"status": "IN_QUEUE"}, {"status": "IN_PROGRESS"},
              {"status": "IN_PROGRESS", "output": summarise(progress)},
              {"status": "IN_PROGRESS", "output": {**progress, "progress": 0.9}},
              {"status": "COMPLETED", "output": done, "delayTime": 812, "executionTime": 1532, "workerId": "w1"}]
    job = write_job(tmp_path / "job.json", "POST", "/sdapi/v1/txt2img", {"prompt": "a cat"})
    with FakeRunPod(states) as fake:
        result = runpod_client(fake, "--input", str(job), "--out", str(tmp_path / "out"),
                               "--webhook", "https://hooks.example.invalid/done")
    assert result.returncode == 0, result.stderr
    assert "IN_PROGRESS 68% (step 20/30), about 1s left" in result.stderr
    assert "IN_PROGRESS 90% (step 20/30)" in result.stderr
    assert (tmp_path / "out" / "job-1-images-0.png").read_bytes() == base64.b64decode(done["images"][0])
    method, path, auth, body = fake.requests[0]
    assert (method, path, auth) == ("POST", "/v2/ep1/run", f"Bearer {SECRET}")
    assert body == {**json.loads(job.read_text()), "webhook": "https://hooks.example.invalid/done"}
    assert all(m == "GET" for m, p, _, _ in fake.requests[1:] if "/status/" in p)
    assert SECRET not in result.stdout + result.stderr


def test_runpod_failed_job(tmp_path: Path) -> None:
    states = [{"status": "FAILED", "error": "Forge did not become ready within 600 s; raise FORGE_BOOT_TIMEOUT"}]
    with FakeRunPod(states) as fake:
        result = runpod_client(fake, "--endpoint", "/sdapi/v1/txt2img", "--payload", '{"prompt": "x"}')
    assert result.returncode == 1
    assert "job-1 FAILED: Forge did not become ready within 600 s" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_runpod_deadline_cancels_the_job() -> None:
    with FakeRunPod([{"status": "IN_QUEUE"}]) as fake:
        result = runpod_client(fake, "--endpoint", "/sdapi/v1/txt2img", "--timeout", "1")
    assert result.returncode == 1
    assert "did not finish within 1s" in result.stderr
    assert ("POST", "/v2/ep1/cancel/job-1") in [(m, p) for m, p, _, _ in fake.requests]


def test_runpod_wrong_key_and_missing_key() -> None:
    with FakeRunPod([{"status": "IN_QUEUE"}]) as fake:
        result = runpod_client(fake, "--endpoint", "/sdapi/v1/samplers", "--method", "GET", key="wrong-key-123")
        assert result.returncode == 1
        assert "401 unauthorized; check RUNPOD_API_KEY" in result.stderr
        assert "wrong-key-123" not in result.stdout + result.stderr
        result = runpod_client(fake, "--endpoint", "/sdapi/v1/samplers", key="")
    assert result.returncode == 1
    assert "RUNPOD_API_KEY is not set" in result.stderr
