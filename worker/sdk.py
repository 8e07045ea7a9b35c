"""Import RunPod's SDK without its 1.2 s CPU probe, so jobs are taken sooner after a cold start.

``runpod.serverless.utils.rp_debugger`` calls ``cpuinfo.get_cpu_info()`` at import time, which runs
py-cpuinfo's probe in a subprocess (1.2 s of the SDK's 1.7 s import here), only to name the CPU in
``--rp_debugger`` output. While the SDK imports, a small stand-in answers with the CPU's name from
/proc/cpuinfo; the real py-cpuinfo stays importable for anyone else afterwards.
"""

from __future__ import annotations

import platform
import sys
import types
from pathlib import Path
from typing import Any


def _cpu_info() -> dict[str, Any]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""  # no /proc (not Linux): platform's answer below
    for line in text.splitlines():
        if line.startswith("model name"):
            return {"brand_raw": line.split(":", 1)[1].strip()}
    return {"brand_raw": platform.processor() or platform.machine()}


def import_runpod() -> types.ModuleType:
    if "runpod" in sys.modules or "cpuinfo" in sys.modules:
        import runpod

        return runpod
    shim = types.ModuleType("cpuinfo")
    shim.get_cpu_info = _cpu_info  # type: ignore[attr-defined]
    sys.modules["cpuinfo"] = shim
    try:
        import runpod
    finally:
        del sys.modules["cpuinfo"]
    return runpod
