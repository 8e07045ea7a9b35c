#!/usr/bin/env python3
"""How long a worker's check of the volume takes through a simulated network volume: the stats of every folder
of the boot set in ``changed``'s order (``spread_key``: each folder's entries scattered over the whole check)
against the same stats in the index's order (a folder's entries together), side by side in each round.

The check runs beside Forge's start on every cold worker (Forge's first answer waits for it). Some clients of a
network volume serve the lookups of names in one folder one at a time, as the FUSE client ``scripts/netvol.py``
measures with does; this measures what the order costs there. Each run mounts netvol afresh (no cached entries)
and reports the check's seconds and the FUSE daemon's CPU seconds. Needs root, FUSE and a volume with a recorded
boot set (``forge-volume install``).

    sudo .venv/bin/python scripts/bench_check.py --volume /work/labvol/rf/volume
    sudo .venv/bin/python scripts/bench_check.py --volume V --settings 5,2,200 --runs 5 --threads 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent))

from bench_coldstart import (  # noqa: E402
    BenchError,
    Cleanup,
    _latency,
    _positive,
    cpu_seconds,
    ensure_fuse,
    median,
    mounted,
    tail,
    wait_until,
)
from netvol import Latency  # noqa: E402

from provision.boot import boot_set, layout_child  # noqa: E402
from volume_layout import VolumeLayout  # noqa: E402

ORDERS = ("index", "spread")
T = TypeVar("T")


def index_order(layout: VolumeLayout, index: boot_set.Index, threads: int) -> None:
    """The worker's check with its stats in the index's order (as before ``spread_key``)."""
    rels = [*index.dirs, layout.relative(layout.boot_set_archive)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda rel: os.stat(layout.absolute(rel), follow_symlinks=False), rels))


def spread_order(layout: VolumeLayout, index: boot_set.Index, threads: int) -> None:
    """The worker's check itself."""
    problem = boot_set.changed(layout, index, threads, files=False)
    if problem is not None:
        raise BenchError(f"the volume does not match its boot set: {problem}")


CHECKS: dict[str, Callable[[VolumeLayout, boot_set.Index, int], None]] = {"index": index_order,
                                                                           "spread": spread_order}


def timed_check(volume: Path, mnt: Path, latency: Latency, order: str, threads: int, cleanup: Cleanup,
                log: Path) -> tuple[float, float]:
    """One check through a fresh netvol mount of ``volume``: its seconds and the daemon's CPU seconds."""
    seconds, daemon, _ = through_netvol(volume, mnt, latency, cleanup, log,
                                        lambda layout, index: CHECKS[order](layout, index, threads))
    return seconds, daemon


def through_netvol(volume: Path, mnt: Path, latency: Latency, cleanup: Cleanup, log: Path,
                   work: Callable[[VolumeLayout, boot_set.Index], T]) -> tuple[float, float, T]:
    """``work`` on a fresh netvol mount of ``volume`` (its boot set's index read before the clock, as the worker's
    lay-out child holds it already): its seconds, the daemon's CPU seconds meanwhile, and what ``work`` returned."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "netvol.py"), "mount", str(volume), str(mnt), "--meta-ms",
             f"{latency.meta_ms:g}", "--read-ms", f"{latency.read_ms:g}", "--bw-mbps", f"{latency.bw_mbps:g}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    cleanup.procs.append(proc)
    cleanup.mounts.append(mnt)
    try:
        wait_until("netvol mount", lambda: mounted(mnt), 60.0,
                   lambda: None if proc.poll() is None else f"netvol exited with {proc.returncode}:\n{tail(log)}")
        layout = VolumeLayout(mnt)
        index = boot_set.load_index(layout)
        before = cpu_seconds(proc.pid)
        began = time.monotonic()
        value = work(layout, index)
        seconds = time.monotonic() - began
        daemon = cpu_seconds(proc.pid)
        if before is None or daemon is None:
            raise BenchError(f"netvol exited during the run:\n{tail(log)}")
        return seconds, daemon - before, value
    finally:
        cleanup.unmount(mnt)
        cleanup.stop(proc, grace=30.0)


def netvol_arguments(doc: str) -> argparse.ArgumentParser:
    """A parser with the arguments of every bench through netvol: the volume, the settings, the rounds."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--volume", type=Path, required=True, help="a volume with a recorded boot set")
    ap.add_argument("--settings", nargs="+", type=_latency, default=[_latency("1,1,400"), _latency("5,2,200")],
                    help="netvol settings META_MS,READ_MS,BW_MBPS (default: 1,1,400 5,2,200)")
    ap.add_argument("--runs", type=_positive, default=3, help="rounds per setting (default 3)")
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = netvol_arguments(__doc__)
    ap.add_argument("--threads", type=_positive, default=layout_child.CHECK_THREADS,
                    help=f"stats in flight (default {layout_child.CHECK_THREADS}, as the worker's lay-out child)")
    return ap.parse_args(list(argv))


def refusal(name: str, volume: Path) -> str | None:
    """Why a bench through netvol cannot run on ``volume`` here (it needs root, FUSE and a recorded boot set)."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        return f"{name}: needs root and /dev/fuse (FUSE mounts): run it with sudo"
    try:
        boot_set.load_index(VolumeLayout(volume))
    except boot_set.BootSetError as exc:
        return f"{name}: {volume}: {exc}"
    return None


@contextlib.contextmanager
def netvol_scratch(prefix: str) -> Iterator[tuple[Cleanup, Path, Path]]:
    """FUSE and mfusepy installed, a scratch folder with an empty mount point in it, and the Cleanup that unmounts
    and stops whatever a run left behind; the folder is removed after, unless something is still mounted on it."""
    ensure_fuse()
    cleanup = Cleanup()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        yield cleanup, work, mnt
    finally:
        cleanup.close()
        if not mounted(mnt):  # never a removal through a mount that is still there
            shutil.rmtree(work)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = refusal("bench_check", args.volume)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    with netvol_scratch("bench-check-") as (cleanup, work, mnt):
        try:
            for latency in args.settings:
                seconds: dict[str, list[float]] = {order: [] for order in ORDERS}
                cpu: dict[str, list[float]] = {order: [] for order in ORDERS}
                for round_no in range(args.runs):
                    for order in ORDERS if round_no % 2 == 0 else ORDERS[::-1]:  # neither always first
                        took, daemon = timed_check(args.volume, mnt, latency, order, args.threads, cleanup,
                                                   work / "netvol.log")
                        seconds[order].append(took)
                        cpu[order].append(daemon)
                        print(f"[{latency.label} round {round_no + 1}] {order}: {took:.2f} s, FUSE daemon CPU "
                              f"{daemon:.2f} s", flush=True)
                ratios = [s / i for s, i in zip(seconds["spread"], seconds["index"], strict=True)]
                print(f"== {latency.label}: check of the volume, medians of {args.runs}: index order "
                      f"{median(seconds['index']):.2f} s (daemon CPU {median(cpu['index']):.2f} s), spread "
                      f"{median(seconds['spread']):.2f} s (daemon CPU {median(cpu['spread']):.2f} s); spread/index, "
                      f"same-round median {median(ratios):.2f}", flush=True)
        except (BenchError, OSError) as exc:
            print(f"bench_check: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
