"""Benchmark the relay end to end through RunPod's local API, against the SDK's floor and the original worker.

Four ways to get the same answer from the same backend (the Forge stand-in our worker boots from a
volume installed by forge-volume), timed in one run, interleaved round by round (the order rotates
each round), over keep-alive HTTP connections from this process:

- direct: the backend itself (``Accept-Encoding: identity``);
- floor: ``/runsync`` of RunPod's local API with a handler that returns a prebuilt result
  (``scripts/bench_relay_floor.py``): what the SDK costs with no work in the handler;
- original: ``/runsync`` of the original runpod-worker-forge's handler (``scripts/bench_relay_original.py``,
  a reconstruction, with requests and RunPod's validator);
- ours: ``/runsync`` of ``python -m worker --rp_serve_api``;
- with ``--baseline REV``, also ``ours@REV``: the worker's packages as they were at git revision REV,
  the same way (on its own, identical stand-in: a worker always boots its own Forge), so a change is
  measured before and after in one run.

Two sizes: a small GET (``/sdapi/v1/samplers``, about 2 KB) and a txt2img whose answer is 16 MiB of
base64. Every answer is parsed, as a caller would. Prints per way the median time, the time added
over the direct call (the median of each round's difference, with its 25th-75th percentiles), and
for the large answer the ratio to floor + direct. Every SDK process runs at ``RUNPOD_LOG_LEVEL=INFO``
(our worker's default), so the SDK's own per-job logging is the same for all.

Reading it: "added over direct" includes the SDK's own round trip, which no handler avoids (the floor
row: about 0.8 ms on this 2-core machine, 0.25 ms of it FastAPI's ``jsonable_encoder`` walking the
answer); "over floor + direct" is what a relay itself costs beyond the SDK and the backend call.

Run from the repository root: ``.venv/bin/python scripts/bench_relay.py [--rounds N] [--big-rounds N]
[--baseline REV]``.
Offline; takes about a minute plus the test volume's install.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_worker import installed_volume  # noqa: E402
from tests.worker.conftest import WorkerProc, free_port, start_worker, worker_env  # noqa: E402

BIG = 16 * 1024 * 1024
SMALL_PATH = "/sdapi/v1/samplers"
BIG_PATH = "/sdapi/v1/txt2img"
BIG_PAYLOAD = {"prompt": "a cat", "steps": 1}
JOBS = {
    "small": {"api": {"method": "GET", "endpoint": SMALL_PATH}, "payload": {}},
    "big": {"api": {"method": "POST", "endpoint": BIG_PATH}, "payload": BIG_PAYLOAD},
}
WAYS = ("direct", "floor", "original", "ours")  # and "ours@REV" with --baseline
Call = Callable[[], Any]


class Client:
    """One keep-alive connection to one server; a call returns the parsed answer."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept-Encoding": "identity"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):  # the server closed an idle keep-alive
            self.conn.close()
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def runsync(self, job: dict[str, Any]) -> Any:
        status, out = self.call("POST", "/runsync", {"input": job})
        if status != 200 or out.get("status") != "COMPLETED":
            raise SystemExit(f"job failed: HTTP {status}: {str(out)[:500]}")
        return out["output"]

    def close(self) -> None:
        self.conn.close()


def spawn_fixture(script: str, env: dict[str, str], logs: Path) -> WorkerProc:
    """``python scripts/<script> --rp_serve_api`` as RunPod's local API, like tests' start_worker."""
    port = free_port()
    log_path = logs / f"{Path(script).stem}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), "--rp_serve_api", "--rp_api_port",
                                 str(port)], cwd=logs, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = WorkerProc(proc, port, log_path, env)
    try:
        server.wait_api(120)
    except BaseException:
        server.stop()
        raise
    return server


def worker_sources(rev: str, into: Path) -> Path:
    """The worker's packages at git revision ``rev``, for PYTHONPATH (ahead of the editable install)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "worker", "provision", "volume_layout"],
                             capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def relaying_worker(env: dict[str, str], logs: Path) -> tuple[WorkerProc, Client]:
    """``python -m worker --rp_serve_api`` once it relays (its API answers at once; jobs wait for Forge)."""
    proc = start_worker(env, logs)
    client = Client(proc.port)
    deadline = time.monotonic() + 60
    while True:
        status, out = client.call("POST", "/runsync", {"input": JOBS["small"]})
        if status == 200 and out.get("status") == "COMPLETED":
            return proc, client
        if time.monotonic() > deadline:
            proc.stop()
            raise SystemExit(f"the worker did not relay: {out}\n{proc.log()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def servers(volume: Path, tmp: Path, baseline: str | None) -> Iterator[dict[str, Client]]:
    """Our worker (booting the stand-in), then the floor and the original on the same backend; their clients."""
    logs = tmp / "logs"
    logs.mkdir()
    env = worker_env(volume, tmp / "scratch", FORGE_STANDIN_IMAGE_BYTES=str(BIG), FORGE_STANDIN_STEP_SECONDS="0.001",
                     FORGE_PROGRESS_INTERVAL="1", RUNPOD_LOG_LEVEL="INFO")
    backend = f"http://127.0.0.1:{env['FORGE_PORT']}"
    clients: dict[str, Client] = {"direct": Client(int(env["FORGE_PORT"]))}
    with ExitStack() as stack:
        stack.callback(lambda: [c.close() for c in clients.values()])
        ours, clients["ours"] = relaying_worker(env, logs)
        stack.callback(ours.stop)
        fixture_env = {**env, "ORIGINAL_FORGE_URL": backend, "FLOOR_FORGE_URL": backend,
                       "FLOOR_ENDPOINTS": f"GET {SMALL_PATH},POST {BIG_PATH}",
                       "FLOOR_POST_BODY": json.dumps(BIG_PAYLOAD)}
        for way, script in (("floor", "bench_relay_floor.py"), ("original", "bench_relay_original.py")):
            fixture = spawn_fixture(script, fixture_env, logs)
            stack.callback(fixture.stop)
            clients[way] = Client(fixture.port)
        if baseline:
            source = worker_sources(baseline, tmp / "baseline")
            then = worker_env(volume, tmp / "scratch-baseline", **{k: v for k, v in env.items() if k.startswith(
                ("FORGE_STANDIN", "FORGE_PROGRESS", "RUNPOD_"))}, PYTHONPATH=str(source))
            old, clients[f"ours@{baseline}"] = relaying_worker(then, logs)
            stack.callback(old.stop)
        yield {w: clients[w] for w in sorted(clients, key=lambda w: WAYS.index(w) if w in WAYS else len(WAYS))}


def calls(clients: dict[str, Client], size: str) -> dict[str, Call]:
    job = JOBS[size]
    method, path = job["api"]["method"], job["api"]["endpoint"]
    body = job["payload"] if method == "POST" else None

    def direct() -> Any:
        status, out = clients["direct"].call(method, path, body)
        assert status == 200, out
        return out

    made: dict[str, Call] = {"direct": direct}
    for way, client in clients.items():
        if way != "direct":
            made[way] = (lambda c: lambda: c.runsync(job))(client)
    return made


def check_same(answers: dict[str, Any], size: str) -> None:
    """Every way returned the backend's answer (the image's text for the large one)."""
    if size == "small":
        wrong = [w for w, a in answers.items() if a != answers["direct"]]
    else:
        image = answers["direct"]["images"][0]
        wrong = [w for w, a in answers.items() if a["images"][0] != image]
    if wrong:
        raise SystemExit(f"{size}: {', '.join(wrong)} answered differently from the backend")


def measure(ways: dict[str, Call], size: str, rounds: int, warmup: int) -> dict[str, list[float]]:
    names = list(ways)
    times: dict[str, list[float]] = {w: [] for w in names}
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        answers = {}
        for way in order:
            started = time.perf_counter()
            answers[way] = ways[way]()
            elapsed = time.perf_counter() - started
            if i >= warmup:
                times[way].append(elapsed * 1000)
        if i == 0:
            check_same(answers, size)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def spread(values: list[float], fmt: str) -> str:
    lo, mid, hi = quartiles(values)
    return f"{mid:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def report(times: dict[str, list[float]], title: str, rounds: int, big: bool) -> None:
    """Per way: median and quartiles; per round differences (paired), as medians [p25, p75]."""
    direct, floor = times["direct"], times["floor"]
    digits = 1 if big else 3
    plain, signed = f".{digits}f", f"+.{digits}f"
    median = {w: statistics.median(v) for w, v in times.items()}
    print(f"\n{title} ({rounds} rounds; ms; differences are per round, median [p25, p75])")
    columns = ["median [p25, p75]", "added over direct", "over floor + direct"]
    print(f"  {'way':<14}" + "".join(f" {c:<28}" for c in columns) + ("  x (floor + direct)" if big else ""))
    for way in times:
        cells = [spread(times[way], plain)]
        if way != "direct":
            cells.append(spread([t - d for t, d in zip(times[way], direct, strict=True)], signed))
        if way not in ("direct", "floor"):
            cells.append(spread([t - f - d for t, f, d in zip(times[way], floor, direct, strict=True)], signed))
        line = f"  {way:<14}" + "".join(f" {c:<28}" for c in cells)
        if big and way not in ("direct", "floor"):
            line += f"  {median[way] / (median['floor'] + median['direct']):.2f}x"
        print(line)
    for other in (w for w in times if w not in WAYS[:2] and w != "ours"):
        diff = [o - r for o, r in zip(times["ours"], times[other], strict=True)]
        ratio = median["ours"] / median[other]
        print(f"  ours - {other}: {spread(diff, signed)}; ours / {other} (medians) {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="small-GET rounds (default 1000)")
    parser.add_argument("--big-rounds", type=int, default=30, help="16 MiB rounds (default 30)")
    parser.add_argument("--baseline", metavar="REV", help="also measure the worker as it was at this git revision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as name:
        tmp = Path(name)
        print("installing a test volume ...", file=sys.stderr)
        with installed_volume(tmp) as volume, servers(volume, tmp, args.baseline) as clients:
            print("measuring ...", file=sys.stderr)
            small = measure(calls(clients, "small"), "small", args.rounds, warmup=50)
            big = measure(calls(clients, "big"), "big", args.big_rounds, warmup=3)
    report(small, f"small GET {SMALL_PATH}", args.rounds, big=False)
    report(big, f"{BIG // 2**20} MiB base64 answer, POST {BIG_PATH}", args.big_rounds, big=True)
    print("\nover floor + direct: what the relay itself costs beyond the SDK's floor and the backend call")
    print("targets: small GET, ours adds <= 0.5 ms; ours no slower than the original on either size")


if __name__ == "__main__":
    main()
