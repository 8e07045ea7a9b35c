#!/usr/bin/env python3
"""Benchmark the models half of forge-volume and print the figures (not a test; run it by hand).

1. A sha256-verified download of a 1 GiB file over loopback against `curl -o` of the same file,
   interleaved rounds in one run (median throughput of each; target: ours >= 0.9x curl).
2. `forge-volume verify` (fast mode) on a volume holding 50 GiB of sparse model files recorded in
   state.json (target: < 1 s), and `refresh-models` with nothing to do (target: < 2 s).
3. Resume after a cut at 60%: bytes the server sent again (target: <= 45% of the file).
4. `forge-volume refresh-models` SIGKILLed at 60% of the file, then run again: bytes the server sent
   to the second run (target: <= 45% of the file).

The file server runs in its own process so it does not share our interpreter's GIL.
Usage: .venv/bin/python scripts/bench_models.py [--size-mb 1024] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.errors import DownloadError  # noqa: E402
from provision.fetch.download import Download, Http, Retry, download  # noqa: E402
from provision.fetch.partials import partial_path  # noqa: E402

SERVER = """
import json, sys, time
from pathlib import Path
from tests.helpers.http_server import FileServer
src = Path(sys.argv[1])
srv = FileServer()
srv.add("/f.bin", file=src)
srv.add("/cut.bin", file=src, drop_at=0.6, drop_times=1)
srv.add("/cut-again.bin", file=src, drop_at=0.6, drop_times=2)
def stats(h, head):
    if h.path != "/_stats":
        return False
    body = {p: {"gets": r.gets, "bytes_sent": r.bytes_sent} for p, r in srv.routes.items()}
    h.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return True
srv.custom = stats
srv.start()
print(srv.port, flush=True)
sys.stdin.read()
srv.stop()
"""


def make_source(folder: Path, size: int) -> tuple[Path, str]:
    src = folder / "source.bin"
    digest = hashlib.sha256()
    if not src.exists() or src.stat().st_size != size:
        with open(src, "wb") as fh:
            left = size
            while left:
                block = os.urandom(min(left, 16 << 20))
                fh.write(block)
                left -= len(block)
    with open(src, "rb") as fh:
        while block := fh.read(16 << 20):
            digest.update(block)
    return src, digest.hexdigest()


def stats(port: int) -> dict[str, dict[str, int]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as resp:
        return json.loads(resp.read())


def bench_download(port: int, work: Path, size: int, digest: str, rounds: int) -> None:
    """Interleaved rounds (order alternating); best and median of each, plus CPU seconds per GiB.

    On a shared machine other processes steal the CPU at random, so the best round shows what each
    can do and the median what it did; CPU time is independent of that noise.
    """
    url = f"http://127.0.0.1:{port}/f.bin"
    curl_out, ours_out = work / "curl.bin", work / "out" / "ours.bin"
    rates: dict[str, list[float]] = {"curl": [], "ours": []}
    cpu: dict[str, list[float]] = {"curl": [], "ours": []}
    for i in range(rounds):
        for who in ("curl", "ours") if i % 2 == 0 else ("ours", "curl"):
            curl_out.unlink(missing_ok=True)
            ours_out.unlink(missing_ok=True)
            subprocess.run(["sync"], check=False)
            started = time.perf_counter()
            if who == "curl":
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(["curl", "-sS", "--fail", "-o", str(curl_out), url], check=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            else:
                before_cpu = time.process_time()
                got = download(Download(url, ours_out, sha256=digest, size=size))
                used = time.process_time() - before_cpu
                assert got.sha256 == digest
            rates[who].append(size / (time.perf_counter() - started) / 2**20)
            cpu[who].append(used / (size / 2**30))
        print(f"  round {i + 1}: curl -o {rates['curl'][-1]:6.0f} MiB/s   forge-volume (sha256 verified) "
              f"{rates['ours'][-1]:6.0f} MiB/s")
    best = max(rates["ours"]) / max(rates["curl"])
    ours_med, curl_med = statistics.median(rates["ours"]), statistics.median(rates["curl"])
    median = ours_med / curl_med
    verdict = f"{'PASS' if best >= 0.9 else 'FAIL'} on best, {'PASS' if median >= 0.9 else 'FAIL'} on median"
    print(f"download {size / 2**20:.0f} MiB over loopback: best {max(rates['ours']):.0f} vs curl "
          f"{max(rates['curl']):.0f} MiB/s = {best:.2f}x; median {ours_med:.0f} vs {curl_med:.0f} MiB/s = "
          f"{median:.2f}x  [target >= 0.90x: {verdict}]")
    print(f"  CPU seconds per GiB (median): curl {statistics.median(cpu['curl']):.2f}, "
          f"forge-volume {statistics.median(cpu['ours']):.2f} (includes sha256); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    curl_out.unlink(missing_ok=True)
    ours_out.unlink(missing_ok=True)


def bench_resume(port: int, work: Path, size: int, digest: str) -> None:
    url = f"http://127.0.0.1:{port}/cut.bin"
    target = work / "out" / "resume.bin"
    target.unlink(missing_ok=True)
    download(Download(url, target, sha256=digest, size=size, http=Http(retry=Retry(attempts=3, base=0.05))))
    sent = stats(port)["/cut.bin"]["bytes_sent"]
    again = (sent - int(size * 0.6)) / size
    print(f"resume in one run after a cut at 60%: server sent {sent / size:.2f}x the file in all; "
          f"{again:.0%} again after the cut  [target <= 45%: {'PASS' if again <= 0.45 else 'FAIL'}]")
    target.unlink()
    url = f"http://127.0.0.1:{port}/cut-again.bin"
    kept = 0
    try:  # the server cuts at 60%, then refuses to send more: this run gives up and keeps a partial
        download(Download(url, target, sha256=digest, size=size, http=Http(retry=Retry(attempts=1, base=0.05))))
    except DownloadError:
        kept = partial_path(target).stat().st_size
    before = stats(port)["/cut-again.bin"]["bytes_sent"]
    download(Download(url, target, sha256=digest, size=size))
    second = (stats(port)["/cut-again.bin"]["bytes_sent"] - before) / size
    print(f"resume in a second run (first run gave up at 60%, kept {kept / size:.0%} as a partial): "
          f"second run downloaded {second:.0%} of the file  [target <= 45%: {'PASS' if second <= 0.45 else 'FAIL'}]")
    target.unlink()


def bench_kill_resume(port: int, work: Path, size: int, digest: str) -> None:
    """The CLI as a user runs it: `refresh-models` killed with SIGKILL once 60% of the file is on disk."""
    from provision.records.lockfile import Lock, LockedForge, LockedModel, write_lock
    from volume_layout import VolumeLayout

    volume = work / "kill-volume"
    shutil.rmtree(volume, ignore_errors=True)
    layout = VolumeLayout(volume)
    target = layout.model_path("checkpoint", "big.safetensors")
    forge = LockedForge(repo="https://example.invalid/forge.git", ref="main", commit="0" * 40, python="3.10",
                        torch=[], torch_index_url=None, args=[], env={})
    write_lock(layout.lock, Lock(forge=forge, models=[LockedModel(
        kind="checkpoint", name=target.name, source=f"http://127.0.0.1:{port}/f.bin", path=layout.relative(target),
        sha256=digest, size=size)]))
    exe = Path(sys.executable).with_name("forge-volume")
    argv = [str(exe), "--volume", str(volume), "--quiet", "refresh-models"]
    before = stats(port)["/f.bin"]["bytes_sent"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    on_disk = 0
    deadline = time.monotonic() + 600
    while on_disk < 0.6 * size and proc.poll() is None and time.monotonic() < deadline:
        temps = [t for t in target.parent.glob(".*.part")] if target.parent.is_dir() else []
        try:
            on_disk = max((t.stat().st_size for t in temps), default=0)
        except FileNotFoundError:
            continue
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    if target.exists():
        print("kill at 60% then refresh-models: the download finished before the kill  [FAIL: no measurement]")
        return
    first = stats(port)["/f.bin"]["bytes_sent"] - before
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    second = (stats(port)["/f.bin"]["bytes_sent"] - before - first) / size
    left = [t.name for t in target.parent.glob(".*") if t.name.endswith((".part", ".partial"))]
    ok = done.returncode == 0 and second <= 0.45 and not left
    print(f"refresh-models SIGKILLed with {on_disk / size:.0%} on disk, then run again: the second run fetched "
          f"{second:.0%} of the file, exit {done.returncode}, {len(left)} temporary file(s) left  "
          f"[target <= 45%: {'PASS' if ok else 'FAIL'}]")
    if done.returncode:
        print("  " + done.stderr.strip())
    shutil.rmtree(volume)


def sparse_volume(work: Path, count: int, each: int) -> Path:
    """A volume with ``count`` sparse files of ``each`` bytes, locked and recorded as install leaves them."""
    from provision.models.files import make_record, save_records
    from provision.records.lockfile import Lock, LockedForge, LockedModel, write_lock
    from volume_layout import VolumeLayout

    volume = work / "volume"
    shutil.rmtree(volume, ignore_errors=True)
    layout = VolumeLayout(volume)
    zeros = hashlib.sha256()
    block = bytes(16 << 20)
    for _ in range(each // len(block)):
        zeros.update(block)
    digest = zeros.hexdigest()
    models, records = [], []
    for i in range(count):
        path = layout.model_path("checkpoint", f"model-{i:02d}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.truncate(each)
        models.append(LockedModel(kind="checkpoint", name=path.name, source=f"https://example.invalid/{path.name}",
                                  path=layout.relative(path), sha256=digest, size=each))
        records.append(make_record(layout, path, kind="checkpoint", source=models[-1].source, sha256=digest))
    save_records(layout, records)
    forge = LockedForge(repo="https://example.invalid/forge.git", ref="main", commit="0" * 40, python="3.10",
                        torch=[], torch_index_url=None, args=[], env={})
    write_lock(layout.lock, Lock(forge=forge, models=models))
    return volume


def timed_cli(volume: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    exe = Path(sys.executable).with_name("forge-volume")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "provision.cli"]
    started = time.perf_counter()
    done = subprocess.run([*argv, "--volume", str(volume), "--quiet", *args], capture_output=True, text=True,
                          check=False)
    return time.perf_counter() - started, done


def bench_volume(work: Path) -> None:
    from provision.commands.verify import verify_volume
    from provision.progress import QUIET
    from volume_layout import VolumeLayout

    volume = sparse_volume(work, 50, 1 << 30)
    layout = VolumeLayout(volume)
    started = time.perf_counter()
    problems = verify_volume(layout, layout.lock, deep=False, progress=QUIET)
    lib = time.perf_counter() - started
    model_problems = [p for p in problems if "models/" in p]
    seconds, done = timed_cli(volume, "verify")
    print(f"verify (fast) on 50 x 1 GiB sparse model files: {lib * 1000:.0f} ms in the library, {seconds:.2f} s for "
          f"the whole `forge-volume verify` process; {len(model_problems)} model problem(s) "
          f"[target < 1 s: {'PASS' if seconds < 1 else 'FAIL'}]")
    if model_problems:
        print("  " + "\n  ".join(model_problems[:5]))
    seconds, done = timed_cli(volume, "refresh-models")
    ok = done.returncode == 0
    print(f"refresh-models with nothing to do (50 models, 50 GiB): {seconds:.2f} s, exit {done.returncode} "
          f"[target < 2 s: {'PASS' if ok and seconds < 2 else 'FAIL'}]")
    if not ok:
        print("  " + done.stderr.strip())
    shutil.rmtree(volume)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where the test files go (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed for the comparison")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-models-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mb << 20
    print(f"workdir {work}; preparing a {args.size_mb} MiB file")
    src, digest = make_source(work, size)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(src)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        bench_download(port, work, size, digest, args.rounds)
        bench_resume(port, work, size, digest)
        bench_kill_resume(port, work, size, digest)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
    bench_volume(work)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
