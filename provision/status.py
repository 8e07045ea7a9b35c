"""``forge-volume status``: what is on the volume, from state.json, plus live free space.

The dict is also the worker's ``GET /v1/volume`` answer, so it is plain JSON and carries no secret:
Forge's environment is listed by variable name only, and repository URLs lose any credentials.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from provision.errors import StateError
from provision.gitops import redact_url
from provision.state import read_state
from provision.steps import STEPS
from volume_layout import LAYOUT_VERSION, VolumeLayout


def _disk(path: Path) -> dict[str, int] | None:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return {"total": usage.total, "used": usage.used, "free": usage.free}


def _models(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for m in records:
        entry = by_kind.setdefault(str(m.get("kind", "unknown")), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(m.get("size") or 0)
    return {"count": len(records), "bytes": sum(k["bytes"] for k in by_kind.values()), "by_kind": by_kind}


def volume_status(layout: VolumeLayout) -> dict[str, Any]:
    """What is installed, recorded sizes and live free space; works on any folder, provisioned or not."""
    report: dict[str, Any] = {
        "volume": str(layout.root), "exists": layout.root.is_dir(), "provisioned": False,
        "layout_version": None, "supported_layout_version": LAYOUT_VERSION,
        "disk": _disk(layout.root) if layout.root.is_dir() else None,
        "spec": str(layout.spec) if layout.spec.is_file() else None,
        "lock": str(layout.lock) if layout.lock.is_file() else None,
    }
    try:
        state = read_state(layout) if report["exists"] else None
    except StateError as exc:
        report["problem"] = exc.one_line()
        return report
    if state is None:
        return report
    steps = state.get("steps") or {}
    python = state.get("python") or None
    forge = state.get("forge") or None
    report.update({
        "provisioned": all(s.name in steps for s in STEPS),
        "unfinished_steps": [s.name for s in STEPS if s.name not in steps],
        "layout_version": state.get("layout_version"),
        "mount_point": state.get("mount_point"),
        "python": {"version": python.get("version"), "path": python.get("path")} if python else None,
        "forge": {"repo": redact_url(str(forge.get("repo"))), "commit": forge.get("commit")} if forge else None,
        "extensions": [{"name": e.get("name"), "repo": redact_url(str(e.get("repo"))), "commit": e.get("commit")}
                       for e in state.get("extensions") or []],
        "forge_args": list(state.get("forge_args") or []),
        "forge_env_names": sorted(state.get("forge_env") or {}),
        "models": _models(list(state.get("models") or [])),
        "sizes": dict(state.get("sizes") or {}),
        "steps": {name: rec.get("finished_at") for name, rec in steps.items()},
    })
    return report


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable: the loop returns at TB


def format_status(report: dict[str, Any]) -> str:
    """The status dict as a short human report."""
    lines = [f"volume      {report['volume']}"]
    disk = report.get("disk")
    disk_line = f"disk        {human_bytes(disk['free'])} free of {human_bytes(disk['total'])}" if disk else None
    if not report["exists"]:
        return "\n".join([*lines, "state       the folder does not exist (is the network volume attached?)"])
    if report.get("problem"):
        return "\n".join([*lines, f"state       {report['problem']}", *([disk_line] if disk_line else [])])
    if report["layout_version"] is None:
        return "\n".join([*lines, "state       not provisioned (no state.json); run `forge-volume install`",
                          *([disk_line] if disk_line else [])])
    state = "provisioned" if report["provisioned"] else \
        f"install unfinished ({', '.join(report['unfinished_steps'])} still to run)"
    lines.append(f"state       {state}; layout version {report['layout_version']}, "
                 f"provisioned at {report.get('mount_point')}")
    python = report.get("python")
    lines.append(f"python      {python['version']} ({python['path']})" if python else "python      not installed")
    forge = report.get("forge")
    lines.append(f"forge       {forge['commit'][:12]} from {forge['repo']}" if forge else "forge       not installed")
    exts = report.get("extensions") or []
    lines.append(f"extensions  {len(exts)}" + (": " + ", ".join(f"{e['name']} {str(e['commit'])[:12]}"
                                                                  for e in exts) if exts else ""))
    models = report["models"]
    kinds = ", ".join(f"{k} {v['count']} ({human_bytes(v['bytes'])})" for k, v in sorted(models["by_kind"].items()))
    lines.append(f"models      {models['count']} file(s), {human_bytes(models['bytes'])}"
                 + (f": {kinds}" if kinds else ""))
    sizes = report.get("sizes") or {}
    if sizes:
        lines.append("sizes       " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(sizes.items())))
    if report.get("forge_args") or report.get("forge_env_names"):
        lines.append(f"forge args  {' '.join(report['forge_args']) or '(none)'}; "
                     f"env: {', '.join(report['forge_env_names']) or '(none)'}")
    if disk_line:
        lines.append(disk_line)
    finished = [t for t in (report.get("steps") or {}).values() if t]
    if finished:
        lines.append(f"installed   last step finished {max(finished)}")
    return "\n".join(lines)
