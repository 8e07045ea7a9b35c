#!/usr/bin/env python3
"""How long ``forge-volume adopt`` takes on a volume of stand-in model files, against ``sha256sum`` on the same
files in the same run: adopt's time should be its hashing, with the moves costing nothing.

It lays out a volume as runpod-worker-forge's install script leaves it (a depth-1 clone of a local stand-in
Forge, a venv folder, model files of several kinds in the checkout's models/), runs ``sha256sum`` over the
model files twice (the first run also brings them into the page cache, so both tools read warm files), runs
``forge-volume adopt --no-lookup`` and reports MB/s for each, adopt's hashing and everything else it did (the
survey, the moves, the spec and lock), and the volume's disk use before and after (moves copy nothing). The
files are deleted at the end.

    .venv/bin/python scripts/bench_adopt.py                       # 4 GiB of models (default)
    .venv/bin/python scripts/bench_adopt.py --gib 8 --work /work/tmp-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("forge-volume"))
CHECKOUT = "stable-diffusion-webui-forge"
# (kind folder, share of the total): a few big checkpoints and many small files, like a real volume.
MIX = (("Stable-diffusion", 0.70, 3), ("VAE", 0.05, 2), ("ControlNet", 0.15, 6), ("Lora", 0.07, 20),
       ("ESRGAN", 0.03, 3))
GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.invalid", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@example.invalid"}


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=cwd, env={**os.environ, **GIT_ENV},
                   check=True, capture_output=True)


def write_file(path: Path, size: int, block: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
        fh.write(path.name.encode())  # files differ even when their sizes match


def lay_out(work: Path, total: int) -> tuple[Path, list[Path]]:
    forge = work / "forge-src"
    forge.mkdir(parents=True)
    git(forge, "init", "-q")
    (forge / "launch.py").write_text("# stand-in\n")
    (forge / "webui-user.sh").write_text("#!/usr/bin/env bash\n")
    git(forge, "add", "-A")
    git(forge, "commit", "-q", "-m", "forge")
    volume = work / "volume"
    volume.mkdir()
    git(volume, "clone", "-q", "--depth=1", f"file://{forge}", CHECKOUT)
    (volume / "venv").mkdir()
    (volume / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.10.12\n")
    block = os.urandom(64 << 20)
    files = []
    for folder, share, count in MIX:
        for i in range(count):
            path = volume / CHECKOUT / "models" / folder / f"{folder.lower()}-{i:02d}.safetensors"
            write_file(path, int(total * share / count), block)
            files.append(path)
    return volume, files


def disk_used(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sha256sum(files: list[Path]) -> tuple[float, float]:
    """Wall and CPU seconds of ``sha256sum`` over the files."""
    started, cpu = time.monotonic(), child_cpu()
    subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
    return time.monotonic() - started, child_cpu() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="total size of the stand-in models (default 4)")
    parser.add_argument("--work", type=Path, default=None, help="where to lay the volume out (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-adopt-", dir=args.work))
    try:
        total = int(args.gib * 2**30)
        print(f"laying out {args.gib:g} GiB of stand-in models in {work} ...", flush=True)
        volume, files = lay_out(work, total)
        size = sum(f.stat().st_size for f in files)
        mb = size / 1e6
        sha256sum(files)  # warms the page cache for both tools
        sum_seconds, sum_cpu = sha256sum(files)
        used_before = disk_used(volume)
        env = {**os.environ, "FORGE_VOLUME": str(volume)}
        started, cpu = time.monotonic(), child_cpu()
        result = subprocess.run([CLI, "adopt", "--no-lookup"], env=env, capture_output=True, text=True)
        adopt_seconds, adopt_cpu = time.monotonic() - started, child_cpu() - cpu
        if result.returncode != 0:
            print(result.stdout + result.stderr)
            return 1
        hashed = re.search(r"hashed .* in ([0-9.]+) s", result.stdout)
        hash_seconds = float(hashed.group(1)) if hashed else float("nan")
        used_after = disk_used(volume)
        moved = len(list((volume / "models").rglob("*.safetensors")))
        again_started = time.monotonic()
        again = subprocess.run([CLI, "adopt"], env=env, capture_output=True, text=True)
        again_seconds = time.monotonic() - again_started
        results = {
            "files": len(files), "bytes": size, "cpus": os.cpu_count(),
            "sha256sum_seconds": round(sum_seconds, 2), "sha256sum_cpu_seconds": round(sum_cpu, 2),
            "adopt_cpu_seconds": round(adopt_cpu, 2), "load_average": os.getloadavg()[0],
            "sha256sum_mb_s": round(mb / sum_seconds, 1),
            "adopt_seconds": round(adopt_seconds, 2), "adopt_mb_s": round(mb / adopt_seconds, 1),
            "adopt_hash_seconds": hash_seconds, "adopt_hash_mb_s": round(mb / hash_seconds, 1),
            "adopt_rest_seconds": round(adopt_seconds - hash_seconds, 2),
            "moved_files": moved, "disk_used_before": used_before, "disk_used_after": used_after,
            "second_adopt_seconds": round(again_seconds, 2), "second_adopt": again.stdout.strip(),
            "hours_for_100_gb_at_adopt_rate": round(100e3 / (mb / adopt_seconds) / 3600, 2),
        }
        print(f"{len(files)} model files, {size / 2**30:.2f} GiB, {os.cpu_count()} cpus, warm page cache, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"  sha256sum            {sum_seconds:7.2f} s  {mb / sum_seconds:7.1f} MB/s  ({sum_cpu:.2f} s of CPU)")
        print(f"  forge-volume adopt   {adopt_seconds:7.2f} s  {mb / adopt_seconds:7.1f} MB/s  "
              f"({adopt_cpu:.2f} s of CPU; hashing "
              f"{hash_seconds:.2f} s = {mb / hash_seconds:.1f} MB/s; everything else "
              f"{adopt_seconds - hash_seconds:.2f} s: process start, survey, moves, spec, lock)")
        print(f"  moved {moved} files into models/; disk used {used_before / 2**30:.3f} GiB before, "
              f"{used_after / 2**30:.3f} GiB after (no copy)")
        print(f"  a second adopt: {again_seconds:.2f} s ({again.stdout.strip()[:60]}...)")
        print(f"  100 GB at adopt's rate: {results['hours_for_100_gb_at_adopt_rate']} h")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
