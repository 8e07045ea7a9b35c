"""Run the forge-volume CLI for the benchmarks: timed, and optionally under an audit hook that
reports every subprocess it starts (so a benchmark can count processes and git remote calls)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# Runs the CLI in a fresh interpreter with an audit hook; the argv of every Popen goes to stderr as JSON.
AUDITED = (
    "import sys\n"
    "spawned = []\n"
    "sys.addaudithook(lambda e, a: spawned.append([str(x) for x in a[1]]) if e == 'subprocess.Popen' else None)\n"
    "from provision.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    import json\n"
    "    sys.stderr.write('SPAWNED ' + json.dumps(spawned) + '\\n')\n"
)


def audited(*args: str) -> list[str]:
    """The argv that runs ``forge-volume ARGS`` under the audit hook."""
    return [sys.executable, "-c", AUDITED, *args]


def cli_path() -> str:
    script = Path(sys.executable).with_name("forge-volume")
    if not script.exists():
        raise SystemExit(f"{script} not found: install the package first (pip install -e .)")
    return str(script)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``argv``; its wall time and result. A failure ends the benchmark with the command's output."""
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=600, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return elapsed, result


def spawned(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The argv of every subprocess an audited run started."""
    line = next(line for line in result.stderr.splitlines() if line.startswith("SPAWNED "))
    calls: list[list[str]] = json.loads(line[len("SPAWNED "):])
    return calls
