"""What adopt writes once the files are in place: the spec, the lock, state.json's records, the config seed.

All of it is computed from the journal alone, and each write replaces its file whole, so running this
again after a kill writes the same files: ``forge-volume adopt`` finishes an interrupted run by
calling it again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from provision.fetch.sources import VOLUME_SOURCE, HfSource, parse_source
from provision.models.files import make_record
from provision.records.atomic import write_atomic
from provision.records.lockfile import Lock, LockedExtension, LockedForge, LockedModel, write_lock
from provision.records.spec import DEFAULT_TORCH, DEFAULT_TORCH_INDEX, load_spec
from provision.records.state import State, now, record_model, update_state
from volume_layout import VolumeLayout

Journal = dict[str, Any]
# The original worker's launch flags that change images (its others are about memory, logging or safety).
IMAGE_ARGS = ("--no-half-vae",)
_TORCH_INDEX = "https://download.pytorch.org/whl/{}"


def forge_settings(journal: Journal, python: str | None) -> dict[str, Any]:
    """[forge]'s settings: the original venv's Python line, torch and xformers (so the new venv matches it)."""
    packages: dict[str, str] = journal.get("packages") or {}
    found_python = journal.get("venv_python") or ""
    version = python or (".".join(found_python.split(".")[:2]) if re.match(r"^\d+\.\d+", found_python) else "3.10")
    torch, index = list(DEFAULT_TORCH), DEFAULT_TORCH_INDEX
    if "torch" in packages:
        base, _, local = packages["torch"].partition("+")
        torch = [f"torch=={base}"] + ([f"torchvision=={packages['torchvision'].partition('+')[0]}"]
                                      if "torchvision" in packages else [])
        index = _TORCH_INDEX.format(local) if re.fullmatch(r"cu\d+|rocm[\d.]+|cpu", local) else DEFAULT_TORCH_INDEX
    args = list(IMAGE_ARGS)
    env: dict[str, str] = {}
    if "xformers" in packages:
        args.insert(0, "--xformers")
        env["XFORMERS_PACKAGE"] = f"xformers=={packages['xformers']}"
    return {"python": version, "torch": torch, "torch_index_url": index, "args": args, "env": env}


def make_lock(journal: Journal) -> Lock:
    forge, settings = journal["forge"], journal["settings_forge"]
    return Lock(
        forge=LockedForge(repo=forge["remote"], ref=forge["ref"], commit=forge["commit"], **settings),
        extensions=[LockedExtension(name=e["name"], repo=e["remote"], ref=e["ref"], commit=e["commit"])
                    for e in journal["extensions"]],
        models=[LockedModel(kind=m["kind"], name=m["name"], source=m["source"], path=m["dest"], sha256=m["sha256"],
                            size=m["size"], revision=_revision(m["source"]),
                            pinned_by=_pinned_by(m["source"]))
                for m in journal["models"]],
    )


def _pinned_by(source: str) -> str:
    return "volume" if source == VOLUME_SOURCE else "hub" if source.startswith("hf://") else "server"


def _revision(source: str) -> str | None:
    parsed = parse_source(source)
    return parsed.revision if isinstance(parsed, HfSource) else None


def _q(value: Any) -> str:
    """A TOML value (JSON's strings, lists and numbers are TOML's)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_q(v)}" for k, v in value.items()) + " }" if value else "{}"
    return json.dumps(value)


def spec_text(journal: Journal) -> str:
    forge, settings = journal["forge"], journal["settings_forge"]
    lines = [
        "# forge-volume spec, written by `forge-volume adopt` from what runpod-worker-forge's install script left",
        f"# on this volume ({journal['started']}). Forge and the extensions are locked at the commits found, the",
        "# models at the sha256 measured. A model whose `source` is \"volume\" has no known source: it is kept on",
        "# this volume and checked by its sha256, never downloaded, and cannot be rebuilt elsewhere.",
        "# Edit, then: forge-volume lock && forge-volume install",
        "",
        "[forge]",
        f"repo = {_q(forge['remote'])}",
        f"ref = {_q(forge['ref'])}  # found at {forge['commit'][:12]}; `forge-volume lock --upgrade forge` moves it",
        f"python = {_q(settings['python'])}  # the original venv's Python line",
        f"torch = {_q(settings['torch'])}",
        f"torch_index_url = {_q(settings['torch_index_url'] or '')}",
        f"args = {_q(settings['args'])}  # the original worker's flags that change images",
        f"env = {_q(settings['env'])}",
    ]
    for ext in journal["extensions"]:
        lines += ["", "[[extensions]]", f"name = {_q(ext['name'])}", f"repo = {_q(ext['remote'])}",
                  f"ref = {_q(ext['ref'])}  # found at {ext['commit'][:12]}"]
    for m in journal["models"]:
        note = "  # no known source: kept on this volume only" if m["source"] == VOLUME_SOURCE else ""
        lines += ["", "[[models]]", f"kind = {_q(m['kind'])}", f"name = {_q(m['name'])}",
                  f"source = {_q(m['source'])}{note}", f"sha256 = {_q(m['sha256'])}", f"size = {m['size']}"]
    return "\n".join(lines) + "\n"


def _copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.adopt-tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def seed_config(layout: VolumeLayout, journal: Journal) -> list[str]:
    """Forge's settings from the original checkout into config/ (the worker's settings seed); a file already
    in config/ with other content is the user's and stays."""
    kept = []
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    for rel in journal["settings"]:
        src = layout.root / rel
        dest = layout.config_dir / src.name
        if not src.is_file():
            continue
        if not dest.exists():
            _copy(src, dest)
        if dest.read_bytes() == src.read_bytes():
            kept.append(src.name)
    return kept


def finish(layout: VolumeLayout, journal: Journal, spec_path: Path, lock_path: Path) -> dict[str, Any]:
    """Write config, lock, spec and state.json's records from the journal; returns state's ``adopted`` record."""
    config = seed_config(layout, journal)
    lock = make_lock(journal)
    write_lock(lock_path, lock)
    write_atomic(spec_path, spec_text(journal))
    load_spec(spec_path)  # what adopt writes, the CLI must read back (a bad name would fail here, not later)
    records = [make_record(layout, layout.root / m["dest"], kind=m["kind"], source=m["source"], sha256=m["sha256"])
               for m in journal["models"]]
    adopted = {
        "from": "runpod-worker-forge", "started": journal["started"], "finished": now(),
        "checkout": journal["checkout"], "venv": journal.get("venv"), "venv_python": journal.get("venv_python"),
        "venv_bytes": journal.get("venv_bytes"), "links": [mv["src"] for mv in journal["moves"]],
        "config": config, "unrecognised": journal["unrecognised"], "others": journal["others"],
        "local_changes": journal["local_changes"],
    }

    def change(state: State) -> None:
        for record in records:
            record_model(state, record)
        state["adopted"] = adopted

    update_state(layout, change)
    return adopted
