"""A loopback stand-in for RunPod's hosted job API, so the worker runs its real production job loop.

``python -m worker`` without ``--rp_serve_api`` takes jobs from ``RUNPOD_WEBHOOK_GET_JOB``
(``/job-take/``), long-polls ``/job-stop/`` for jobs to cancel and posts progress and results to
``RUNPOD_WEBHOOK_POST_OUTPUT``, exactly as on RunPod (runpod 1.12). Unlike RunPod's local test API
this shows what only production does: ``stopPod`` (the handler's ``refresh_worker``), per-job
cancellation, and progress updates. Every posted body is kept for the secrets check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.helpers.procs import stop_group

HOLD = 0.5  # seconds a job-take or job-stop poll is held open, as RunPod's long-poll does


@dataclass
class JobRecord:
    job_id: str
    worker: str
    job_input: Any
    queued: float = field(default_factory=time.monotonic)
    taken: float | None = None
    done: float | None = None
    result: dict[str, Any] | None = None  # the final body the worker posted
    progress: list[Any] = field(default_factory=list)  # outputs of IN_PROGRESS posts, in order

    @property
    def seconds(self) -> float:
        """From the moment the worker took the job to its posted result."""
        assert self.taken is not None and self.done is not None, self
        return self.done - self.taken


class FakePlatform:
    """One endpoint's job queues, one per worker id (``RUNPOD_POD_ID``)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queues: dict[str, deque[JobRecord]] = {}
        self.stops: dict[str, list[str]] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.posts: list[str] = []  # every raw body posted, for the secrets check
        self.polled: set[str] = set()  # workers whose job loop has asked for a job
        self._count = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self, worker: str) -> dict[str, str]:
        """What RunPod sets in a worker's environment (minus the API key: no heartbeat process)."""
        return {
            "RUNPOD_POD_ID": worker,
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/v2/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/v2/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            # The SDK's start-up checks need the internet (8.8.8.8) and a GPU; neither exists here.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # -- the test's side ---------------------------------------------------------------------
    def submit(self, worker: str, job_input: Any) -> JobRecord:
        with self.cond:
            self._count += 1
            record = JobRecord(f"{worker}-job-{self._count}", worker, job_input)
            self.jobs[record.job_id] = record
            self.queues.setdefault(worker, deque()).append(record)
            self.cond.notify_all()
        return record

    def cancel(self, job_id: str) -> None:
        with self.cond:
            self.stops.setdefault(self.jobs[job_id].worker, []).append(job_id)
            self.cond.notify_all()

    def wait(self, record: JobRecord, timeout: float) -> JobRecord:
        """Wait for the job's final result; raise if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while record.result is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"job {record.job_id} got no result within {timeout} s: {record}")
                self.cond.wait(left)
        return record

    def wait_for(self, record: JobRecord, what: str, timeout: float) -> None:
        """Wait until the job was taken ("taken") or reported progress ("progress")."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (record.taken if what == "taken" else record.progress):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"job {record.job_id}: no {what} within {timeout} s")
                self.cond.wait(left)

    def wait_polled(self, worker: str, timeout: float) -> None:
        """Wait until the worker's job loop runs (its first job-take poll)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while worker not in self.polled:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"worker {worker} did not ask for a job within {timeout} s")
                self.cond.wait(left)

    # -- the worker's side -------------------------------------------------------------------
    def _take(self, worker: str) -> JobRecord | None:
        deadline = time.monotonic() + HOLD
        with self.cond:
            if worker not in self.polled:
                self.polled.add(worker)
                self.cond.notify_all()
            queue = self.queues.setdefault(worker, deque())
            while not queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            record = queue.popleft()
            record.taken = time.monotonic()
            self.cond.notify_all()
            return record

    def _stop_ids(self, worker: str) -> list[str]:
        deadline = time.monotonic() + HOLD
        with self.cond:
            while not self.stops.get(worker):
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self.cond.wait(left)
            ids, self.stops[worker] = self.stops[worker], []
            return ids

    def _done(self, job_id: str, raw: str) -> None:
        body = json.loads(raw)
        with self.cond:
            self.posts.append(raw)
            record = self.jobs.get(job_id)
            if record is None:
                return
            if body.get("status") == "IN_PROGRESS":
                record.progress.append(body.get("output"))
            else:
                record.result, record.done = body, time.monotonic()
            self.cond.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        platform = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                return

            def _reply(self, status: int, body: Any = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path).path.strip("/").split("/")
                if len(parts) == 3 and parts[1] == "job-take":
                    record = platform._take(parts[2])
                    if record is None:
                        self._reply(204)
                    else:
                        self._reply(200, {"id": record.job_id, "input": record.job_input})
                elif len(parts) == 3 and parts[1] == "job-stop":
                    ids = platform._stop_ids(parts[2])
                    self._reply(200, {"jobsToStop": ids}) if ids else self._reply(204)
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                parts = urlsplit(self.path).path.strip("/").split("/")
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
                if len(parts) == 4 and parts[1] == "job-done":
                    platform._done(parts[3], raw)
                    self._reply(200, {})
                else:
                    self._reply(404, {"error": "not found"})

        return Handler

    def __enter__(self) -> FakePlatform:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class FleetWorker:
    """``python -m worker`` in production mode against the fake platform."""

    name: str
    platform: FakePlatform
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    proc_started: float = field(default_factory=time.monotonic)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def run(self, job_input: Any, timeout: float = 60) -> JobRecord:
        """Submit a job to this worker and wait for its result."""
        return self.platform.wait(self.platform.submit(self.name, job_input), timeout)

    def submit(self, job_input: Any) -> JobRecord:
        return self.platform.submit(self.name, job_input)

    def children(self) -> list[int]:
        """Process ids of the worker's direct children (Forge)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            text = (task / "children").read_text()
            pids += [int(p) for p in text.split()]
        return pids

    def forge_pid(self) -> int:
        pids = [p for p in self.children() if "launch.py" in cmdline(p)]
        assert len(pids) == 1, f"expected one Forge child of the worker, found {pids}"
        return pids[0]

    def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name}: {text!r} not in its log within {timeout} s:\n"
                                     f"{self.log()[-3000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGINT (the SDK's graceful shutdown, as on a scale-down), then nothing of it left, Forge included."""
        stop_group(self.proc)


def cmdline(pid: int) -> str:
    """A process's command line, words joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_fleet_worker(platform: FakePlatform, name: str, env: dict[str, str], log_dir: Path) -> FleetWorker:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full = {**env, **platform.env(name)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=log_dir, env=full, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return FleetWorker(name, platform, proc, log_path, full)


def descendants(pid: int) -> Iterator[int]:
    """Every process below ``pid`` (children first), read from /proc."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return
    for task in tasks:
        try:
            kids = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            yield kid
            yield from descendants(kid)


