"""``forge-volume adopt``: take over a volume runpod-worker-forge's install script filled, downloading nothing.

Survey and plan first (``--dry-run`` stops there, having written nothing), then: hash every model (a
cache makes a repeat fast), ask a public index for each hash's source, write the journal, move the
models and extensions into this layout (links at the old paths), and write the config seed, the lock,
the spec and state.json. A kill at any point leaves the journal: ``adopt`` again finishes from it.
``forge-volume install`` then builds the new worker's Python, venv and boot proof around what is there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provision.adopt import hashcache, lookup, moves, records
from provision.adopt import plan as adopt_plan
from provision.adopt.survey import survey
from provision.errors import AdoptError
from provision.models.pool import human, require_volume
from provision.progress import Progress
from provision.records.lockfile import lock_path_for
from provision.records.state import read_state
from provision.records.volume_lock import hold_volume
from volume_layout import VolumeLayout

Say = Callable[[str], None]


@dataclass
class AdoptReport:
    lines: list[str] = field(default_factory=list)


def _refuse_provisioned(layout: VolumeLayout, spec_path: Path, state: dict[str, object] | None) -> None:
    """A forge-volume volume (installed, or with a spec or lock) is not the original's to adopt."""
    found = [p for p in (spec_path, lock_path_for(spec_path)) if p.exists()]
    if state is not None:
        found.insert(0, layout.state)
    if found:
        raise AdoptError(f"{layout.root} is already a forge-volume volume ({', '.join(str(p) for p in found)} exist)",
                         "adopt takes over a volume of the original worker; on this one use `forge-volume install`, "
                         "`refresh-models` or `add`")


def adopt(layout: VolumeLayout, spec_path: Path, *, dry_run: bool, keep_local_changes: bool, python: str | None,
          indexes: list[lookup.HashIndex], progress: Progress, say: Say) -> AdoptReport:
    require_volume(layout)
    state = read_state(layout)
    adopted = (state or {}).get("adopted") or {}
    if adopted.get("finished"):
        return AdoptReport([f"nothing to do: this volume was adopted at {adopted['finished']}; "
                            "`forge-volume install` completes it, `forge-volume status` shows what is left"])
    journal = adopt_plan.read_journal(layout)
    if journal is not None:
        left = sum(not moves.done(layout, moves.Move(**m)) for m in journal["moves"])
        if dry_run:
            return AdoptReport([f"an adopt started at {journal['started']} was interrupted with {left} of "
                                f"{len(journal['moves'])} move(s) to go; `forge-volume adopt` finishes it",
                                "dry run: nothing was changed"])
        say(f"finishing the adopt started at {journal['started']}: {left} of {len(journal['moves'])} move(s) to go")
        with hold_volume(layout, "adopt"):
            return _finish(layout, spec_path, journal, progress)
    _refuse_provisioned(layout, spec_path, state)
    found = survey(layout)
    adopt_plan.check(layout, found, keep_local_changes)
    for line in adopt_plan.plan_lines(layout, found):
        say(line)
    if dry_run:
        return AdoptReport(["dry run: nothing was changed"])
    with hold_volume(layout, "adopt"):
        started = time.monotonic()
        hashes = hashcache.hash_models(layout, found.models, progress)
        seconds = time.monotonic() - started
        if found.models:
            say(f"hashed {human(found.model_bytes)} in {seconds:.1f} s")
        if indexes and found.models:
            progress.info(f"looking up {len(set(hashes.values()))} sha256 in {' and '.join(i.name for i in indexes)}")
        sources = lookup.look_up(hashes.values(), indexes)
        for note in sources.notes:
            say(note)
        patches = adopt_plan.save_patches(layout, found) if keep_local_changes else []
        for patch in patches:
            say(f"saved local changes as {patch}")
        journal = adopt_plan.make_journal(layout, found, hashes, sources.sources,
                                          records.forge_settings({"packages": found.packages,
                                                                  "venv_python": found.venv_python}, python))
        adopt_plan.write_journal(layout, journal)
        return _finish(layout, spec_path, journal, progress)


def _finish(layout: VolumeLayout, spec_path: Path, journal: adopt_plan.Journal, progress: Progress) -> AdoptReport:
    todo = [moves.Move(**m) for m in journal["moves"]]
    moved = moves.apply_all(layout, todo)
    adopted = records.finish(layout, journal, spec_path, lock_path_for(spec_path))
    models = journal["models"]
    total = sum(m["size"] for m in models)
    counts = adopt_plan.shown_sources(journal)
    lines = [f"moved {moved} of {len(todo)} path(s) now ({len(todo) - moved} done before): "
             f"{len(models)} model file(s), {human(total)}, and {len(journal['extensions'])} extension(s); "
             "a link stays at each old path",
             f"wrote {spec_path} and {lock_path_for(spec_path)}: Forge {journal['forge']['commit'][:12]}, "
             f"{len(journal['extensions'])} extension(s), {len(models)} model(s) ("
             + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) + ")"]
    if adopted["config"]:
        lines.append(f"seeded {layout.relative(layout.config_dir)}/ with {', '.join(adopted['config'])}")
    if counts.get("no source"):
        lines.append(f"{counts['no source']} model(s) have no known source: kept on this volume and checked by sha256, "
                     "never downloaded; they cannot be rebuilt elsewhere (`forge-volume status` lists them)")
    lines.append("next: `forge-volume install` (Python and venv for the new worker, Forge's preparation, the boot "
                 "proof; no model is downloaded)")
    return AdoptReport(lines)
