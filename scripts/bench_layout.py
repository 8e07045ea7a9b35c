#!/usr/bin/env python3
"""How long a worker's lay-out of the boot set takes through a simulated network volume, per number of chunks
unpacked at once, side by side in each round.

The lay-out is the one step of a fast boot that Forge waits for: it reads files.bin from the volume, checks and
unpacks its chunks and writes the code trees into a mirror under /dev/shm (``provision.boot.layout_child.build``).
Each run mounts ``scripts/netvol.py`` afresh over the volume and lays the set out into a new mirror, removed after;
it reports the seconds, the lay-out's own CPU seconds and the FUSE daemon's. Needs root, FUSE and a volume with a
recorded boot set (``forge-volume install``).

    sudo .venv/bin/python scripts/bench_layout.py --volume /work/labvol/rf/volume
    sudo .venv/bin/python scripts/bench_layout.py --volume V --settings 5,2,200 --threads 2,4,16 --runs 5
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent))

from bench_check import netvol_arguments, netvol_scratch, refusal, through_netvol  # noqa: E402
from bench_coldstart import BenchError, median  # noqa: E402

from provision.boot import boot_set, layout_child  # noqa: E402
from volume_layout import VolumeLayout  # noqa: E402

SHM = Path("/dev/shm")


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct whole numbers >= 1, comma-separated (e.g. 4,16)")
    return counts


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = netvol_arguments(__doc__)
    ap.add_argument("--threads", type=_counts, default=(layout_child.LAYOUT_THREADS, 16),
                    help=f"chunks unpacked at once, one variant each (default {layout_child.LAYOUT_THREADS},16; "
                         f"the worker's is {layout_child.LAYOUT_THREADS})")
    return ap.parse_args(list(argv))


def cpu() -> float:
    """This process's CPU seconds so far (the lay-out's threads are this process's)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def lay_out(layout: VolumeLayout, index: boot_set.Index, threads: int, mirror: Path) -> float:
    """One lay-out into ``mirror`` (which must not exist); the CPU seconds it took this process."""
    before = cpu()
    try:
        layout_child.build(layout, mirror, threads=threads, index=index)
    except layout_child.BootSetUnusable as exc:
        raise BenchError(f"the boot set cannot be laid out: {exc}") from None
    return cpu() - before


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = refusal("bench_layout", args.volume)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    mirror = Path(tempfile.mkdtemp(prefix="bench-layout-", dir=SHM if SHM.is_dir() else None)) / "mirror"
    with netvol_scratch("bench-layout-") as (cleanup, work, mnt):
        try:
            for latency in args.settings:
                seconds: dict[int, list[float]] = {t: [] for t in args.threads}
                for round_no in range(args.runs):
                    for threads in args.threads if round_no % 2 == 0 else args.threads[::-1]:  # none always first
                        took, daemon, own = through_netvol(
                            args.volume, mnt, latency, cleanup, work / "netvol.log",
                            functools.partial(lay_out, threads=threads, mirror=mirror))
                        shutil.rmtree(mirror)
                        seconds[threads].append(took)
                        print(f"[{latency.label} round {round_no + 1}] {threads} at once: {took:.2f} s, its CPU "
                              f"{own:.2f} s, FUSE daemon CPU {daemon:.2f} s", flush=True)
                first = args.threads[0]
                ratios = "".join(
                    f"; {t}/{first}, same-round median "
                    f"{median([a / b for a, b in zip(seconds[t], seconds[first], strict=True)]):.2f}"
                    for t in args.threads[1:])
                medians = ", ".join(f"{t} at once {median(seconds[t]):.2f} s" for t in args.threads)
                print(f"== {latency.label}: lay-out, medians of {args.runs}: {medians}{ratios}", flush=True)
        except (BenchError, OSError) as exc:
            print(f"bench_layout: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(mirror.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
