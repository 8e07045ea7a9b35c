"""``forge-volume plan``: what ``install`` would do, computed from the lock and the volume's files.

Writes nothing and, once a lock exists, needs no network: it asks the same step checks the
installer asks, and describes each step that would run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.commands.install import require_volume
from provision.installer.steps import STEPS, Ctx, step_keys, why_pending
from provision.progress import QUIET
from provision.records.lockfile import check_matches, lock_path_for, read_lock
from provision.records.spec import load_spec
from provision.records.state import read_state
from volume_layout import VolumeLayout


@dataclass
class Plan:
    actions: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (step, reason, what it would do)
    preamble: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.actions and not self.preamble

    def as_dict(self) -> dict[str, Any]:
        return {"nothing_to_do": self.empty, "preamble": self.preamble,
                "steps": [{"step": step, "reason": reason, "actions": details}
                          for step, reason, details in self.actions]}

    def lines(self) -> list[str]:
        if self.empty:
            return ["nothing to do: the volume matches the lock"]
        out = list(self.preamble)
        for step, reason, details in self.actions:
            out.append(f"{step} ({reason}):")
            out += [f"  {line}" for line in details]
        return out


def make_plan(layout: VolumeLayout, spec_path: Path) -> Plan:
    spec = load_spec(spec_path)
    require_volume(layout)
    lock_path = lock_path_for(spec_path)
    state = read_state(layout)
    plan = Plan()
    if not lock_path.exists():
        plan.preamble.append(f"no lock at {lock_path}: install would first resolve the spec "
                             "(git refs to commits, models to revisions and checksums) and write it")
        plan.preamble.append("then install every step that the new lock changes" if state else
                             "then install everything: python, venv, torch, Forge, extensions, prepare, "
                             "models, config, bytecode")
        return plan
    lock = read_lock(lock_path)
    check_matches(spec, lock, lock_path)  # install would refuse: so does plan, with the same message
    ctx = Ctx(layout=layout, lock=lock, lock_path=lock_path, progress=QUIET, state=state or {})
    keys = step_keys(lock)
    pending: set[str] = set()
    for step in STEPS:
        reason = why_pending(step, ctx, keys, pending)
        if reason is not None:
            pending.add(step.name)
            plan.actions.append((step.name, reason, step.describe(ctx)))
    return plan
