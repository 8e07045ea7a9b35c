"""``forge-volume status``: what is on the volume, from state.json, plus live free space.

The dict is also the worker's ``GET /v1/volume`` answer, so it is plain JSON and carries no secret:
Forge's environment is listed by variable name only, and repository URLs lose any credentials.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from provision.errors import LockError, StateError, Surface
from provision.fetch.sources import VOLUME_SOURCE
from provision.installer.gitops import redact_url
from provision.installer.steps import STEPS
from provision.progress import human_bytes
from provision.records.state import read_state
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


def volume_status(layout: VolumeLayout, surface: Surface = "cli") -> dict[str, Any]:
    """What is installed, recorded sizes and live free space; works on any folder, provisioned or not.

    ``surface`` picks the advice a problem carries (the CLI's, or a helper job's)."""
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
        report["problem"] = exc.one_line(surface)
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
    if isinstance(state.get("adopted"), dict):
        report["adopted"] = _adopted(layout, state["adopted"])
    return report


def _adopted(layout: VolumeLayout, adopted: dict[str, Any]) -> dict[str, Any]:
    """What the original worker left that this volume no longer needs once the endpoint runs the new worker."""
    venv = adopted.get("venv")
    links = [p for p in adopted.get("links") or [] if isinstance(p, str) and (layout.root / p).is_symlink()]
    return {
        "finished": adopted.get("finished"),
        "venv": {"path": venv, "python": adopted.get("venv_python"), "bytes": adopted.get("venv_bytes"),
                 "moved_aside": venv == layout.relative(layout.original_venv)}
        if isinstance(venv, str) and (layout.root / venv).exists() else None,
        "links": links,
        "others": [o for o in adopted.get("others") or [] if isinstance(o, list) and (layout.root / o[0]).exists()],
        "unrecognised": [u for u in adopted.get("unrecognised") or []
                         if isinstance(u, list) and os.path.lexists(layout.root / u[0])],
    }


def format_adopted(adopted: dict[str, Any], root: str) -> list[str]:
    lines = [f"adopted     from runpod-worker-forge's volume at {adopted.get('finished')}; the original worker's "
             "leftovers, to remove once the endpoint runs the new worker:"]
    venv = adopted.get("venv")
    if venv:
        where = "moved aside by install" if venv["moved_aside"] else \
            "still the original worker's; `forge-volume install` moves it aside to venv-original/"
        lines.append(f"              {venv['path']}/: its venv (Python {venv['python'] or '?'}, "
                     f"{human_bytes(venv['bytes'])}), {where}: rm -rf {root}/{venv['path']}")
    if adopted["links"]:
        lines.append(f"              {len(adopted['links'])} link(s) at the old model and extension paths (the "
                     f"original worker's), e.g. {adopted['links'][0]}")
    lines += [f"              {path}: {what}" for path, what in adopted["others"]]
    if adopted["unrecognised"]:
        lines.append(f"              {len(adopted['unrecognised'])} path(s) adopt did not recognise, left as they "
                     f"were, e.g. {adopted['unrecognised'][0][0]}")
    return lines


def volume_files(layout: VolumeLayout, lock_path: Path, *, every_file: bool) -> dict[str, Any]:
    """Stray bytes under models/: download partials and temporaries, files the lock does not list, and
    what ``refresh-models --prune`` would remove; with ``every_file``, every model file and its standing."""
    from provision.models import files as mf
    from provision.models.refresh import prune_preview
    from provision.records.lockfile import read_lock

    lock_problem: str | None = None
    try:
        lock = read_lock(lock_path) if lock_path.exists() else None
    except LockError as exc:
        lock, lock_problem = None, exc.one_line()
    found = mf.inventory(layout, lock.files if lock else None)
    partials = []
    for temp in sorted(mf.temp_files(layout)):
        try:
            size = temp.lstat().st_size
        except FileNotFoundError:
            continue
        target = mf.temp_target(temp)
        partials.append({"path": layout.relative(temp), "bytes": size,
                         "for": layout.relative(target) if target is not None else None})
    files: dict[str, Any] = {
        "partials": partials,
        "extras": [f.as_dict() for f in found if f.status == "extra"],
        "prune": [{"path": p, "bytes": n} for p, n in prune_preview(layout, lock)] if lock else None,
        "lock_problem": lock_problem,
        # Adopted files no index could name: the volume holds the only copy forge-volume knows of.
        "no_source": [{"path": m.path, "kind": m.kind, "bytes": m.size} for m in (lock.models if lock else [])
                      if m.source == VOLUME_SOURCE],
    }
    if every_file:
        files["files"] = [f.as_dict() for f in found]
    return files


def format_files(files: dict[str, Any]) -> str:
    """The stray-bytes part of ``status`` (and, with ``--files``, every model file)."""
    lines = []
    partials, extras, prune = files["partials"], files["extras"], files["prune"]
    if partials:
        lines.append(f"partials    {len(partials)} unfinished download(s), "
                     f"{human_bytes(sum(p['bytes'] for p in partials))} "
                     "(resumed by the next install or refresh-models)")
        lines += [f"              {p['path']} ({human_bytes(p['bytes'])})" for p in partials]
    if extras:
        lines.append(f"extras      {len(extras)} model file(s) not in the lock, "
                     f"{human_bytes(sum(e['bytes'] for e in extras))}")
        lines += [f"              {e['path']} ({human_bytes(e['bytes'])}"
                  + (f", from {e['source']}" if e["source"] else "") + ")" for e in extras]
    if prune:
        lines.append(f"prune       `refresh-models --prune` would remove {len(prune)} file(s), "
                     f"{human_bytes(sum(p['bytes'] for p in prune))}")
        lines += [f"              {p['path']} ({human_bytes(p['bytes'])})" for p in prune]
    elif prune is not None:
        lines.append("prune       `refresh-models --prune` would remove nothing")
    no_source = files.get("no_source") or []
    if no_source:
        total = human_bytes(sum(m["bytes"] or 0 for m in no_source))
        lines.append(f"no source   {len(no_source)} model file(s), {total}, with no source: "
                     "cannot be rebuilt elsewhere (kept on this volume, checked by sha256, never "
                     "downloaded; back them up)")
        lines += [f"              {m['path']} ({human_bytes(m['bytes'])})" for m in no_source]
    if files.get("lock_problem"):
        lines.append(f"lock        {files['lock_problem']}")
    if "files" in files:
        lines.append(f"files       {len(files['files'])} model file(s):")
        lines += [f"  {f['status']:<7} {f['kind'] or '?'!s:<12} {human_bytes(f['bytes']):>9}  {f['path']}"
                  + (f"  <- {f['source']}" if f["source"] else "") for f in files["files"]]
    return "\n".join(lines)


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
    if report.get("adopted"):
        lines += format_adopted(report["adopted"], report["volume"])
    finished = [t for t in (report.get("steps") or {}).values() if t]
    if finished:
        lines.append(f"installed   last step finished {max(finished)}")
    return "\n".join(lines)
