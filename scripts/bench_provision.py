#!/usr/bin/env python3
"""Benchmark: a no-op re-install and `plan` on an installed test volume.

Builds the same offline world the tests use (fixture Forge, helper repos, two extensions, local
wheels), installs it once with the real CLI, then measures with the real console script:

- no-op `forge-volume install`: wall time (must be < 2 s) and processes started (must be none:
  no git clone, no pip install), counted by Python's audit hook inside the CLI process;
- `forge-volume plan`: wall time (must be < 1 s).

Usage: python scripts/bench_provision.py [--runs N] [--keep]   (exit 1 if a target is missed)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.audited_cli import audited, cli_path, spawned, timed  # noqa: E402
from tests.helpers.forge_world import build_world, make_wheelhouse, offline_pip_env  # noqa: E402

NOOP_TARGET_S = 2.0
PLAN_TARGET_S = 1.0
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the test volume and print its path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="forge-volume-bench-"))
    try:
        world = build_world(work)
        wheelhouse = make_wheelhouse(work / "wheelhouse")
        volume = work / "volume"
        volume.mkdir()
        (volume / "forge-volume.toml").write_text(world.spec(), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "FORGE_"))}
        env.update(offline_pip_env(wheelhouse), FORGE_VOLUME=str(volume))
        cli = cli_path()

        # The fresh install runs audited too: its count shows the counter sees git and pip.
        first, fresh = timed(audited("--quiet", "install"), env)
        fresh_spawned = len(spawned(fresh))
        noop = [timed([cli, "install"], env)[0] for _ in range(args.runs)]
        _, audited_run = timed(audited("install"), env)
        noop_spawned = len(spawned(audited_run))
        plan_times = []
        for _ in range(args.runs):
            elapsed, result = timed([cli, "plan"], env)
            plan_times.append(elapsed)
        plan_output = result.stdout.strip()

        print(f"fresh install of the test volume:     {first:.2f} s, {fresh_spawned} processes started")
        print(f"no-op re-install, {args.runs} runs:           median {statistics.median(noop):.3f} s, "
              f"max {max(noop):.3f} s (target < {NOOP_TARGET_S} s)")
        print(f"processes started by a no-op install: {noop_spawned} (target 0: no git clone, no pip install)")
        print(f"plan on the installed volume, {args.runs} runs: median {statistics.median(plan_times):.3f} s, "
              f"max {max(plan_times):.3f} s (target < {PLAN_TARGET_S} s)")
        print(f"plan said: {plan_output}")
        ok = max(noop) < NOOP_TARGET_S and noop_spawned == 0 and max(plan_times) < PLAN_TARGET_S
        print("PASS" if ok else "FAIL")
        if args.keep:
            print(f"volume kept at {volume}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
