"""Progress of a running generation: poll Forge's /sdapi/v1/progress and report what changed.

On RunPod the report goes through ``runpod.serverless.progress_update`` (visible on /status);
RunPod's local API cannot show it, so there it is a log line.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from worker.proxy import Proxy

Reporter = Callable[[dict[str, Any], dict[str, Any]], None]


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of Forge's progress report a caller can use (no preview image)."""
    raw = report.get("state")
    state: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return {
        "progress": round(float(report.get("progress") or 0.0), 4),
        "eta_relative": round(float(report.get("eta_relative") or 0.0), 2),
        "sampling_step": state.get("sampling_step"),
        "sampling_steps": state.get("sampling_steps"),
        "job": state.get("job"),
    }


def log_reporter(job: dict[str, Any], update: dict[str, Any]) -> None:
    step = f"step {update.get('sampling_step')}/{update.get('sampling_steps')}"
    sys.stdout.write(f"[worker] {job.get('id')} progress {update['progress']:.0%} ({step})\n")
    sys.stdout.flush()


async def report_progress(proxy: Proxy, job: dict[str, Any], report: Reporter, interval: float) -> None:
    """Until cancelled: every ``interval`` seconds, report Forge's progress when it moved."""
    last: dict[str, Any] | None = None
    while True:
        await asyncio.sleep(interval)
        raw = await proxy.progress()
        if raw is None:
            continue
        update = summarise(raw)
        if update != last and update["job"]:
            report(job, update)
            last = update
