#!/usr/bin/env python3
"""Benchmark issue 10's costs on the downloader (not a test; run it by hand, figures printed).

1. A refused internal address: each spelling of loopback, private and link-local addresses through
   ``download(Download(..., http=Http(guard=...)))``; the time per refusal (target: < 100 ms) and the
   connections a canary listening on every local address accepted (target: 0: no network traffic).
2. Loopback throughput of this tree against another checkout (default: the commit before issue 10),
   in interleaved rounds in one run, each download in its own process (target: within 5 %).

Usage: .venv/bin/python scripts/bench_download_guard.py --base /tmp/base [--size-mb 512] [--rounds 5]
(make the base with `git worktree add /tmp/base c20c1a7`).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.fetch.download import Download, Http, Retry, download  # noqa: E402
from provision.fetch.netguard import AddressGuard, AddressRefused  # noqa: E402

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.helpers.http_server import FileServer
srv = FileServer().start()
srv.add("/big.bin", file=Path(sys.argv[2]))
print(srv.url("/big.bin"), flush=True)
time.sleep(3600)
"""

CLIENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from provision.fetch.download import Download, download
started = time.perf_counter()
got = download(Download(sys.argv[2], Path(sys.argv[3])))
print(got.size / (time.perf_counter() - started) / 2**20)
"""


def refusals() -> None:
    canary = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    canary.bind(("0.0.0.0", 0))
    canary.listen(16)
    canary.settimeout(0.05)
    port = canary.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(canary.accept())
            except TimeoutError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    urls = [f"http://{h}:{port}/x" for h in ("127.0.0.1", "localhost", "127.1", "0x7f.1", "2130706433", "0.0.0.0",
                                             "[::1]", "[::ffff:127.0.0.1]", "user@127.0.0.1")]
    urls += ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x", "http://172.16.0.1/x",
             "http://192.168.1.1/x", "http://[fc00::1]/x", "http://[fe80::1]/x"]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(5):
            for url in urls:
                started = time.perf_counter()
                try:
                    download(Download(url, Path(tmp) / "x.bin",
                                      http=Http(retry=Retry(attempts=1), guard=AddressGuard.for_url(url))))
                except AddressRefused:
                    times.append(time.perf_counter() - started)
                else:
                    raise SystemExit(f"{url} was not refused")
    stop.set()
    print(f"refusals: {len(times)} over {len(urls)} spellings; median {statistics.median(times) * 1000:.2f} ms, "
          f"max {max(times) * 1000:.2f} ms (target < 100 ms); canary accepted {len(accepted)} connections "
          "(target 0)")


def throughput(base: Path, size_mb: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.bin"
        with open(big, "wb") as fh:
            for _ in range(size_mb):
                fh.write(os.urandom(1 << 20))
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT), str(big)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            url = server.stdout.readline().strip()  # type: ignore[union-attr]
            speeds: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(rounds):
                for name, tree in (("before", base), ("after", ROOT)):
                    target = Path(tmp) / f"{name}.bin"
                    out = subprocess.run([sys.executable, "-c", CLIENT, str(tree), url, str(target)],
                                         capture_output=True, text=True, check=True, cwd=tree)
                    speeds[name].append(float(out.stdout.strip()))
                    target.unlink()
        finally:
            server.kill()
            server.wait()
    before, after = (statistics.median(speeds[k]) for k in ("before", "after"))
    print(f"throughput ({size_mb} MiB, {rounds} interleaved rounds): before {before:.0f} MiB/s "
          f"{[round(s) for s in speeds['before']]}, after {after:.0f} MiB/s {[round(s) for s in speeds['after']]}; "
          f"after/before = {after / before:.3f} (target >= 0.95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the code to compare with")
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    refusals()
    throughput(args.base, args.size_mb, args.rounds)


if __name__ == "__main__":
    main()
