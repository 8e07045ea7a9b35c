"""Adopt's plan: the checks that refuse a volume as it is, the lines printed before anything changes, and
the journal (``.forge-volume/adopt/journal.json``) that a resumed adopt finishes from."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from provision.adopt.moves import Move
from provision.adopt.survey import SCRIPT_REPLACED, FoundRepo, Survey
from provision.errors import AdoptError
from provision.fetch.sources import VOLUME_SOURCE, shown_source
from provision.installer import gitops
from provision.models.pool import human
from provision.records.atomic import write_atomic
from provision.records.state import now
from volume_layout import VolumeLayout

JOURNAL_VERSION = 1
Journal = dict[str, Any]
FORGE_REMOTE = "https://github.com/lllyasviel/stable-diffusion-webui-forge.git"


def journal_path(layout: VolumeLayout) -> Path:
    return layout.adopt_dir / "journal.json"


def read_journal(layout: VolumeLayout) -> Journal | None:
    try:
        data = json.loads(journal_path(layout).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AdoptError(f"adopt's journal {journal_path(layout)} is unreadable ({exc})",
                         "it lists the moves an interrupted adopt made; keep it and report this") from None
    if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION:
        raise AdoptError(f"{journal_path(layout)} is not a journal this forge-volume reads",
                         "finish the adopt with the forge-volume release that started it")
    return data


def check(layout: VolumeLayout, survey: Survey, keep_local_changes: bool) -> None:
    """Refuse, in one line with the fix, what adopt cannot take over as it is. Reads only."""
    if survey.forge.remote is None:
        raise AdoptError(f"the Forge checkout {survey.checkout} has no remote `origin` to record as its source",
                         f"add it: `git -C {layout.root / survey.checkout} remote add origin {FORGE_REMOTE}`")
    if not keep_local_changes:
        for repo in [survey.forge, *survey.extensions]:
            if repo.unexpected_changes:
                files = ", ".join(repo.unexpected_changes[:8]) + (" ..." if len(repo.unexpected_changes) > 8 else "")
                raise AdoptError(
                    f"{repo.path} has local changes to tracked files: {files}",
                    "commit or undo them, or pass --keep-local-changes to adopt the checkout as it is (the changes "
                    "are saved as a patch under .forge-volume/adopt/; another volume installed from the lock gets "
                    "the commit without them)")
    claims: dict[str, list[str]] = {}
    for m in survey.models:
        claims.setdefault(m.dest.lower(), []).append(f"{m.src} ({m.kind})")
    for dest, srcs in claims.items():
        if len(srcs) > 1:
            raise AdoptError(f"{' and '.join(srcs)} would both become {dest}",
                             "rename or move one of them (Forge would list only one), then run adopt again")
    for m in survey.models:
        target = layout.root / m.dest
        if os.path.lexists(target) and not _same(layout.root / m.src, target):
            raise AdoptError(f"{m.dest} already exists, and {m.src} would move there",
                             "move one of them out of the way (they are different files), then run adopt again")
    for ext in survey.extensions:
        target = layout.extensions_dir / ext.name
        if os.path.lexists(target):
            raise AdoptError(f"{layout.relative(target)} already exists, and the extension {ext.path} would move "
                             "there", "move one of them out of the way, then run adopt again")


def _same(a: Any, b: Any) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _repo_line(repo: FoundRepo) -> str:
    at = repo.commit[:12] + (f" ({repo.ref})" if repo.ref != repo.commit else "")
    return f"{repo.path} at {at} from {gitops.redact_url(repo.remote or '(no remote)')}"


def _changes_line(repo: FoundRepo) -> list[str]:
    expected = [c for c in repo.changes if c in SCRIPT_REPLACED]
    out = [f"            {c}: replaced by the original's install script (launch settings for webui.sh, which the "
           "new worker does not run); kept as it is" for c in expected]
    if repo.unexpected_changes:
        changed = ", ".join(repo.unexpected_changes)
        out.append(f"            local changes kept as they are, saved as a patch: {changed}")
    return out


def plan_lines(layout: VolumeLayout, survey: Survey) -> list[str]:
    """What adopt found and what it will do with each part, before it does anything."""
    lines = [f"adopting {layout.root}: the volume of runpod-worker-forge's install script",
             f"forge       {_repo_line(survey.forge)}: kept in place as this volume's Forge checkout, locked at "
             "that commit", *_changes_line(survey.forge)]
    if survey.extensions:
        lines.append(f"extensions  {len(survey.extensions)}, each moved to extensions/<name> (a link stays at its "
                     "old path) and locked at its commit:")
        for ext in survey.extensions:
            lines.append(f"              {_repo_line(ext)}")
            lines += _changes_line(ext)
    else:
        lines.append("extensions  none")
    by_kind = Counter(m.kind for m in survey.models)
    sizes = Counter[str]()
    for m in survey.models:
        sizes[m.kind] += m.size
    lines.append(f"models      {len(survey.models)} file(s), {human(survey.model_bytes)}"
                 + (": " + ", ".join(f"{k} {n} ({human(sizes[k])})" for k, n in sorted(by_kind.items()))
                    if by_kind else ""))
    if survey.models:
        lines.append("            each hashed (sha256), moved by rename into models/<Kind>/ (no copy; a link stays "
                     "at the old path, so a running original worker keeps finding it) and pinned in the lock:")
        lines += [f"              {m.src} -> {m.dest} ({human(m.size)})" for m in survey.models]
    lines.append("settings    " + (", ".join(os.path.basename(s) for s in survey.settings)
                                   + " copied into config/ (the new worker's settings seed; the originals stay)"
                                   if survey.settings else "none found (config/ gets forge-volume's defaults)"))
    if survey.unrecognised:
        lines.append(f"not recognised ({len(survey.unrecognised)}), left where they are:")
        lines += [f"              {path}: {what}" for path, what in survey.unrecognised]
    kept = [(f"{survey.venv}/", f"the original's venv (Python {survey.venv_python or '?'}): kept; `forge-volume "
             "install` moves it aside to venv-original/ before it builds the new venv")] if survey.venv else []
    kept += survey.others
    if kept:
        lines.append("kept as they are:")
        lines += [f"              {path}: {what}" for path, what in kept]
    return lines


def _tree_bytes(path: Any) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def make_journal(layout: VolumeLayout, survey: Survey, hashes: dict[str, str], sources: dict[str, str],
                 settings_forge: dict[str, Any]) -> Journal:
    models = [{**asdict(m), "dest": m.dest, "sha256": hashes[m.src],
               "source": sources.get(hashes[m.src], VOLUME_SOURCE)} for m in survey.models]
    moves = [Move(m.src, m.dest) for m in survey.models]
    moves += [Move(e.path, layout.relative(layout.extensions_dir / e.name)) for e in survey.extensions]
    return {
        "version": JOURNAL_VERSION, "started": now(), "checkout": survey.checkout,
        "forge": asdict(survey.forge), "extensions": [asdict(e) for e in survey.extensions], "models": models,
        "moves": [mv.as_dict() for mv in moves], "settings": survey.settings, "settings_forge": settings_forge,
        "venv": survey.venv, "venv_python": survey.venv_python, "packages": survey.packages,
        "venv_bytes": _tree_bytes(layout.root / survey.venv) if survey.venv else None,
        "unrecognised": survey.unrecognised, "others": survey.others,
        "local_changes": {r.path: list(r.changes) for r in [survey.forge, *survey.extensions] if r.changes},
    }


def write_journal(layout: VolumeLayout, journal: Journal) -> None:
    write_atomic(journal_path(layout), json.dumps(journal, indent=1, sort_keys=True) + "\n")


def save_patches(layout: VolumeLayout, survey: Survey) -> list[str]:
    """Each checkout's local changes as a patch under .forge-volume/adopt/ (the record of them as they are)."""
    saved = []
    for repo in [survey.forge, *survey.extensions]:
        if repo.unexpected_changes:
            patch = gitops.git("diff", "--binary", "HEAD", cwd=layout.root / repo.path)
            target = layout.adopt_dir / f"{repo.name}.patch"
            write_atomic(target, patch + "\n")
            saved.append(layout.relative(target))
    return saved


def shown_sources(journal: Journal) -> Counter[str]:
    """How many models got a source and how many have none."""
    return Counter("no source" if m["source"] == VOLUME_SOURCE else shown_source(m["source"]).split("://")[0]
                   for m in journal["models"])
