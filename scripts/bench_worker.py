"""Benchmark the worker's relay against the Forge stand-in, on a volume installed by forge-volume.

Prints: the worker's start (to its start of Forge, after the fast boot's lay-out; to its local API; to a
/v1/volume answer); added latency of a small GET through the handler over a direct aiohttp call (median);
a 16 MB-of-base64 txt2img through the handler vs direct (time ratio); peak extra memory while
relaying it (the handler alone, by tracemalloc, and the whole worker process behind RunPod's
local API, by its peak RSS) vs the payload; time from worker start to a /v1/volume answer while
Forge still boots; and the delay between Forge's API answering and the worker noticing.

With ``--baseline REV``, the worker's start is also timed as it was at git revision REV (its packages from
``git archive``, ahead of the editable install on PYTHONPATH), interleaved start by start with today's on
the same volume, so a change is measured before and after in one run. ``--start-only`` skips the relay
measurements.

Run from the repository root: ``.venv/bin/python scripts/bench_worker.py [--rounds N] [--starts N]
[--baseline REV] [--start-only]``. Offline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_coldstart import compile_bytecode  # noqa: E402
from tests.helpers.forge_world import build_world, make_wheelhouse, offline_pip_env  # noqa: E402
from tests.worker.conftest import module_volume, start_worker, worker_env  # noqa: E402
from worker.boot import build_worker  # noqa: E402
from worker.handler import Worker, make_handler  # noqa: E402

BIG = 16_000_000
SMALL_JOB = {"api": {"method": "GET", "endpoint": "/sdapi/v1/samplers"}}
BIG_PAYLOAD = {"prompt": "a cat", "steps": 1}
BIG_JOB = {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": BIG_PAYLOAD}


@contextmanager
def installed_volume(tmp: Path) -> Iterator[Path]:
    from provision.commands.install import install
    from provision.progress import QUIET
    from volume_layout import VolumeLayout

    world = build_world(tmp / "world")
    volume = world.root / "volume"
    volume.mkdir()
    (volume / "forge-volume.toml").write_text(world.spec(), encoding="utf-8")
    saved = dict(os.environ)
    os.environ.update(offline_pip_env(make_wheelhouse(tmp / "wheels")))
    try:
        install(VolumeLayout(volume), volume / "forge-volume.toml", progress=QUIET, wait=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield module_volume(world, tmp / "bench")


def ready_worker(volume: Path, scratch: Path, **env: str) -> Worker:
    worker = build_worker(worker_env(volume, scratch, **env))
    assert worker.forge is not None
    deadline = time.monotonic() + 30
    while worker.forge.phase != "ready":
        if time.monotonic() > deadline or worker.forge.phase not in ("booting", "ready"):
            raise SystemExit(f"Forge did not start: {worker.forge.failure()}\n" + "\n".join(worker.forge.tail()))
        time.sleep(0.01)
    return worker


async def timed(coro: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = await coro
    return time.perf_counter() - started, out


async def direct(session: aiohttp.ClientSession, method: str, url: str, payload: Any = None) -> Any:
    # identity, as the worker asks: Forge (and the stand-in) would gzip the answer for aiohttp's default.
    async with session.request(method, url, json=payload, headers={"Accept-Encoding": "identity"}) as resp:
        return json.loads(await resp.read())


async def latency(worker: Worker, rounds: int) -> tuple[float, float]:
    handler = make_handler(worker)
    url = worker.settings.forge_url + "/sdapi/v1/samplers"
    async with aiohttp.ClientSession() as session:
        through, straight = [], []
        for i in range(rounds + 20):
            t_direct, _ = await timed(direct(session, "GET", url))
            t_handler, _ = await timed(handler({"id": f"small-{i}", "input": SMALL_JOB}))
            if i >= 20:  # warm-up: connections, caches
                straight.append(t_direct)
                through.append(t_handler)
    assert worker.proxy is not None
    await worker.proxy.close()
    return statistics.median(straight) * 1000, statistics.median(through) * 1000


async def big(worker: Worker, rounds: int) -> tuple[float, float, int]:
    handler = make_handler(worker)
    url = worker.settings.forge_url + "/sdapi/v1/txt2img"
    async with aiohttp.ClientSession() as session:
        through, straight = [], []
        size = 0
        for i in range(rounds + 1):
            t_direct, out = await timed(direct(session, "POST", url, BIG_PAYLOAD))
            t_handler, relayed = await timed(handler({"id": f"big-{i}", "input": BIG_JOB}))
            assert relayed["images"][0] == out["images"][0], relayed.get("error")
            size = len(out["images"][0])
            if i:
                straight.append(t_direct)
                through.append(t_handler)
    return statistics.median(straight) * 1000, statistics.median(through) * 1000, size


async def handler_memory(worker: Worker) -> int:
    handler = make_handler(worker)
    await handler({"id": "warm", "input": BIG_JOB})
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = await handler({"id": "mem", "input": BIG_JOB})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "images" in out
    del out
    return peak - base


def status_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def process_memory(volume: Path, tmp: Path) -> int:
    """Peak RSS growth of a whole worker (RunPod's local API) while it relays one big result."""
    env = worker_env(volume, tmp / "scratch-mem", FORGE_STANDIN_IMAGE_BYTES=str(BIG), FORGE_PROGRESS_INTERVAL="1")
    proc = start_worker(env, tmp / "logs")
    try:
        for _ in range(3):  # warm-up with small jobs: imports, connection; the big one's memory stays unseen
            assert proc.runsync(SMALL_JOB, timeout=120)["status"] == "COMPLETED"
        base = status_kb(proc.proc.pid, "VmRSS")
        Path(f"/proc/{proc.proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
        assert proc.runsync(BIG_JOB, timeout=120)["status"] == "COMPLETED"
        return (status_kb(proc.proc.pid, "VmHWM") - base) * 1024
    finally:
        proc.stop()


def helper_while_booting(volume: Path, tmp: Path) -> tuple[float, bool]:
    """Seconds from launching ``python -m worker`` to a /v1/volume answer, with Forge taking 15 s to boot."""
    env = worker_env(volume, tmp / "scratch-boot", FORGE_STANDIN_BOOT_SECONDS="15")
    started = time.monotonic()
    proc = start_worker(env, tmp / "logs", wait=False)
    try:
        proc.wait_api(30)
        out = proc.runsync({"api": {"method": "GET", "endpoint": "/v1/volume"}})
        seconds = time.monotonic() - started
        return seconds, out["status"] == "COMPLETED" and "Forge ready" not in proc.log()
    finally:
        proc.stop()


def worker_sources(rev: str, into: Path) -> Path:
    """The worker's packages at git revision ``rev``, for PYTHONPATH (ahead of the editable install)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "worker", "provision", "volume_layout"],
                             capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def worker_start(volume: Path, scratch: Path, logs: Path, source: Path | None) -> tuple[float, float, float]:
    """Seconds from launching ``python -m worker --rp_serve_api`` to its start of Forge (its log's ``starting Forge``:
    after the fast boot's lay-out of the volume's boot set), to its local API accepting a connection, and to a
    /v1/volume answer, while Forge boots (15 s); ``source``: the worker's packages from another revision."""
    extra = {"PYTHONPATH": str(source)} if source is not None else {}
    env = worker_env(volume, scratch, FORGE_STANDIN_BOOT_SECONDS="15", **extra)
    started = time.monotonic()
    proc = start_worker(env, logs, wait=False)
    try:
        launched = listening = None
        deadline = started + 60
        while launched is None or listening is None:  # both watched at once: either may come first
            now = time.monotonic()
            if now > deadline or proc.proc.poll() is not None:
                raise SystemExit(f"the worker did not start Forge and its API within 60 s:\n{proc.log()[-3000:]}")
            if launched is None and "[worker] starting Forge: " in proc.log():
                launched = now - started
            if listening is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proc.port), timeout=0.2):
                    listening = now - started
            time.sleep(0.005)
        out = proc.runsync({"api": {"method": "GET", "endpoint": "/v1/volume"}})
        if out.get("status") != "COMPLETED":
            raise SystemExit(f"/v1/volume failed: {out}\n{proc.log()[-3000:]}")
        return launched, listening, time.monotonic() - started
    finally:
        proc.stop()


def starts(volume: Path, tmp: Path, rounds: int, baseline: str | None) -> dict[str, list[tuple[float, float, float]]]:
    """``worker_start`` ``rounds`` times for today's worker (and the baseline's), alternating which goes first."""
    ways: dict[str, Path | None] = {"today": None}
    if baseline:
        ways[f"@{baseline}"] = worker_sources(baseline, tmp / "baseline")
    compile_bytecode(*(ROOT / name for name in ("worker", "provision", "volume_layout")),
                     *(tree for tree in ways.values() if tree is not None))
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    for i in range(rounds):
        order = list(ways) if i % 2 == 0 else list(reversed(ways))
        for name in order:
            times[name].append(worker_start(volume, tmp / f"scratch-start-{name}-{i}", tmp / "logs", ways[name]))
    return times


def readiness_delay(volume: Path, tmp: Path, rounds: int) -> list[float]:
    delays = []
    for i in range(rounds):
        worker = ready_worker(volume, tmp / f"scratch-ready-{i}", FORGE_STANDIN_BOOT_SECONDS="0.5")
        assert worker.forge is not None and worker.forge.ready_wall is not None
        listening = next(float(m.group(1)) for line in worker.forge.tail(50)
                         if (m := re.search(r"API listening at ([\d.]+)", line)))
        delays.append((worker.forge.ready_wall - listening) * 1000)
        worker.forge.stop()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="small-GET rounds (the big relay runs rounds/20)")
    parser.add_argument("--starts", type=int, default=5, help="worker starts timed (each way, with --baseline)")
    parser.add_argument("--baseline", metavar="REV", help="also time the worker's start as it was at this git revision")
    parser.add_argument("--start-only", action="store_true", help="time the worker's start only (no relay measures)")
    args = parser.parse_args()
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as name:
        tmp = Path(name)
        print("installing a test volume ...", file=sys.stderr)
        with installed_volume(tmp) as volume:
            start_times = starts(volume, tmp, args.starts, args.baseline)
            for way, runs in start_times.items():
                columns = zip(*runs, strict=True)
                spans = [f"-> {what}: median {statistics.median(seconds):.3f} s (min {min(seconds):.3f}, "
                         f"max {max(seconds):.3f})" for what, seconds in
                         zip(("Forge started", "local API accepting", "/v1/volume answered"), columns, strict=True)]
                print(f"worker {way}: start {'; '.join(spans)}, {len(runs)} starts", flush=True)
            if args.start_only:
                return
            quiet = {"FORGE_STANDIN_STEP_SECONDS": "0.001", "FORGE_PROGRESS_INTERVAL": "1"}
            small = ready_worker(volume, tmp / "scratch-small", **quiet)

            d_small, h_small = asyncio.run(latency(small, args.rounds))
            small.forge.stop()  # type: ignore[union-attr]
            large = ready_worker(volume, tmp / "scratch-big", FORGE_STANDIN_IMAGE_BYTES=str(BIG), **quiet)
            d_big, h_big, size = asyncio.run(big(large, max(5, args.rounds // 20)))
            mem_handler = asyncio.run(handler_memory(large))
            large.forge.stop()  # type: ignore[union-attr]
            mem_process = process_memory(volume, tmp)
            boot_seconds, booting = helper_while_booting(volume, tmp)
            delays = readiness_delay(volume, tmp, 5)
    mb = size / 1e6
    print(f"small GET /sdapi/v1/samplers: direct {d_small:.3f} ms, through the handler {h_small:.3f} ms, "
          f"added {h_small - d_small:.3f} ms (median of {args.rounds}; target <= 1 ms)")
    print(f"{mb:.1f} MB base64 txt2img: direct {d_big:.1f} ms, through the handler {h_big:.1f} ms, "
          f"ratio {h_big / d_big:.3f} (target <= 1.05)")
    print(f"peak extra memory relaying it: handler {mem_handler / 1e6:.1f} MB = {mem_handler / size:.2f}x the payload; "
          f"whole worker process behind RunPod's local API {mem_process / 1e6:.1f} MB = {mem_process / size:.2f}x "
          "(target <= 3x)")
    print(f"worker start -> /v1/volume answered: {boot_seconds:.2f} s, Forge still booting: {booting} (target <= 2 s)")
    print(f"Forge API answering -> readiness noticed: median {statistics.median(delays):.1f} ms, "
          f"max {max(delays):.1f} ms over {len(delays)} boots (target <= 50 ms)")


if __name__ == "__main__":
    main()
