"""``forge-volume install``: make the volume match the lock, step by step, resumably.

Each finished step is recorded in state.json with its key; a re-run skips what is recorded and
still in place, and redoes a step (and everything downstream of it) whose inputs changed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from provision.boot import boot_set
from provision.errors import CommandError, CorruptLockError, CorruptStateError, VolumeError
from provision.installer import checkout_links, forge_reqs, gitops, hf_cache, pyenv, recover, venv_record
from provision.installer.steplog import StepLog
from provision.installer.steps import (
    STEPS,
    Change,
    Ctx,
    Step,
    boot_checkpoint_problem,
    dependents,
    step_keys,
    why_pending,
)
from provision.proc import output_to
from provision.progress import Progress
from provision.records.atomic import write_atomic
from provision.records.lockfile import Lock, check_matches, lock_path_for, read_lock, write_lock
from provision.records.spec import load_spec
from provision.records.state import State, now, read_state, update_state
from provision.records.volume_lock import hold_volume
from volume_layout import VolumeLayout


@dataclass
class InstallReport:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lock_written: Path | None = None
    log: Path | None = None  # the install's log on the volume, when a step ran
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"wrote the lock {self.lock_written}"] if self.lock_written else []
        lines += [f"  {note}" for note in self.notes]
        if self.ran:
            lines.append(f"installed in {self.seconds:.1f} s: ran {', '.join(self.ran)}"
                         + (f"; already done: {', '.join(self.skipped)}" if self.skipped else ""))
            if self.log is not None:
                lines.append(f"  the steps' whole output: {self.log}")
        else:
            lines.append(f"nothing to do: the volume already matches the lock ({self.seconds:.2f} s)")
        return "\n".join(lines)


def require_volume(layout: VolumeLayout) -> None:
    if not layout.root.is_dir():
        raise VolumeError(f"the volume {layout.root} does not exist",
                          "attach the network volume, or pass --volume PATH / set FORGE_VOLUME")


def install(layout: VolumeLayout, spec_path: Path, *, progress: Progress, wait: bool) -> InstallReport:
    """Install the spec at ``spec_path`` onto the volume (resolving it into a lock first if there is none)."""
    started = time.monotonic()
    spec = load_spec(spec_path)  # before anything touches the volume: a bad spec writes nothing
    require_volume(layout)
    lock_path = lock_path_for(spec_path)
    report = InstallReport()
    with hold_volume(layout, "install", wait=wait, on_wait=progress.info):
        # Leftovers of an install killed mid-clone; only install uses this folder, under the lock.
        shutil.rmtree(layout.tmp_dir, ignore_errors=True)
        lock = _read_lock_or_set_aside(lock_path, report)
        if lock is not None:
            check_matches(spec, lock, lock_path)
        else:
            from provision.installer.resolve import lock_spec  # network: only when there is no lock yet

            lock = lock_spec(spec, progress)
            write_lock(lock_path, lock)
            report.lock_written = lock_path
        _recover_state(layout, lock, lock_path, progress, report)
        lock = _run_steps(layout, lock, lock_path, progress, report)
        _record_run(layout, lock, report)
        keep_copies(layout, spec_path, lock_path)
    report.seconds = time.monotonic() - started
    return report


def _read_lock_or_set_aside(lock_path: Path, report: InstallReport) -> Lock | None:
    """The lock; None when there is none, or when it is corrupt (then it is kept aside, and resolved anew)."""
    if not lock_path.exists():
        return None
    try:
        return read_lock(lock_path)
    except CorruptLockError as exc:
        kept = recover.set_aside(lock_path)
        report.notes.append(f"the lock was unreadable ({exc.message}); kept it as {kept.name} "
                            "and resolved the spec into a new one")
        return None


def _recover_state(layout: VolumeLayout, lock: Lock, lock_path: Path, progress: Progress,
                   report: InstallReport) -> None:
    """A corrupt state.json is set aside and rebuilt from what is on the volume (``provision.installer.recover``)."""
    try:
        read_state(layout)
    except CorruptStateError as exc:
        kept = recover.set_aside(layout.state)
        progress.info(f"==> rebuilding {layout.relative(layout.state)} from the volume ({exc.message})")
        found = recover.rebuild_state(layout, lock, lock_path, progress)
        report.notes.append(f"{layout.relative(layout.state)} was unreadable; kept it as {kept.name} and rebuilt "
                            f"the record from the volume: found in place {', '.join(found) or 'nothing'}; "
                            "model files are re-checked by size and sha256, and kept when they match")


def _run_steps(layout: VolumeLayout, lock: Lock, lock_path: Path, progress: Progress,
               report: InstallReport) -> Lock:
    ctx = Ctx(layout=layout, lock=lock, lock_path=lock_path, progress=progress, state=read_state(layout) or {})
    _warn_if_moved(ctx, report)
    reqs_warning = forge_reqs.reqs_file_warning(os.environ, lock.forge.env)
    if reqs_warning:
        progress.info(reqs_warning)
        report.notes.append(reqs_warning)
    keys = step_keys(lock)
    ran: set[str] = set()
    bar = progress.bar(len(STEPS), "install", unit="step", leave=False)
    log: StepLog | None = None  # made by the first step that runs: a no-op install writes nothing
    try:
        for step in STEPS:
            reason = why_pending(step, ctx, keys, ran)
            if reason is None:
                report.skipped.append(step.name)
                bar.update(1)
                continue
            if log is None:
                log = StepLog(layout, progress)
                report.log = log.path
                progress.info(f"(the whole output of each step goes to {log.path})")
            progress.info(f"==> {step.title} ({reason})")
            for line in step.describe(ctx):
                progress.info(f"    {line}")
            log.step(step.title)
            downstream = dependents(step.name)

            def forget(state: State, names: list[str] = downstream) -> None:
                for name in names:
                    state.setdefault("steps", {}).pop(name, None)

            # Forget downstream records first: if this step fails half way, they must not look done.
            ctx.state = update_state(layout, forget)
            before = venv_record.distributions(layout.venv)
            with output_to(log):
                change = step.run(ctx)
            _guard_pins(ctx, step, before)
            if step.name == "models" and lock.files:
                # Downloads may pin first-seen checksums into the lock: key on what is locked now.
                ctx.lock = lock = read_lock(lock_path)
                keys = step_keys(lock)
            ctx.state = _record(layout, step.name, keys[step.name], change)
            ran.add(step.name)
            report.ran.append(step.name)
            bar.update(1)
    finally:
        if log is not None:
            log.close()
        bar.close()
    report.notes += ctx.notes
    if ran:
        ctx.state = update_state(layout, lambda s: s.__setitem__("sizes", _sizes(layout)))
    if pyenv.venv_ready(layout.venv_python) and (ran or "venv" not in ctx.state):
        # Every step is done for this lock: what the venv holds now is what it proved to boot with.
        taken = venv_record.record(layout.venv, keys["requirements"])
        ctx.state = update_state(layout, lambda s: s.__setitem__("venv", taken))
        dists = taken["distributions"]
        assert isinstance(dists, dict)
        report.notes.append(f"recorded the venv: {venv_record.headline(dists)}")
    return lock


def _guard_pins(ctx: Ctx, step: Step, before: dict[str, str]) -> None:
    """Fail when ``step`` moved a package the lock pins: the spec's torch (after the torch step), Forge's
    pinned requirements (after the requirements step)."""
    names = [s.name for s in STEPS]
    position = names.index(step.name)
    if position <= names.index("torch"):
        return
    forge_pins: dict[str, str] = {}
    path = forge_reqs.requirements_file(ctx.layout.forge_dir, ctx.lock.forge.env)
    if position > names.index("requirements"):
        with contextlib.suppress(CommandError):
            forge_pins = forge_reqs.pins(path)
    pinned = venv_record.pinned_by(ctx.lock.forge.torch, forge_pins)
    if not pinned:
        return
    fix = (f"make the spec's forge.torch and what this step installs agree (Forge's requirements file: {path.name}, "
           "set by REQS_FILE in the spec's [forge] env; the extensions' installers and pip lists), then run "
           "`forge-volume lock` and `forge-volume install`")
    venv_record.guard(step.title, before, venv_record.distributions(ctx.layout.venv), pinned, fix)


def _record(layout: VolumeLayout, name: str, key: str, change: Change | None) -> State:
    def record(state: State) -> None:
        if change is not None:
            change(state)
        state.setdefault("steps", {})[name] = {"key": key, "finished_at": now()}

    return update_state(layout, record)


def record_models_step(layout: VolumeLayout, lock: Lock, *, done_before: Lock | None) -> None:
    """Record the models step as done for ``lock``, after ``add`` made all its models present (``done_before``
    None), or after ``remove`` took one out of a lock whose models step was done (``done_before``): a later
    install or plan then has nothing to do for models."""
    if done_before is not None:
        recorded = ((read_state(layout) or {}).get("steps") or {}).get("models") or {}
        if recorded.get("key") != step_keys(done_before)["models"]:
            return
    _record(layout, "models", step_keys(lock)["models"], None)


def _warn_if_moved(ctx: Ctx, report: InstallReport) -> None:
    recorded = ctx.state.get("mount_point")
    if recorded and recorded != str(ctx.layout.root) and pyenv.venv_ready(ctx.layout.venv_python):
        report.notes.append(
            f"warning: this volume was provisioned at {recorded}; its venv's scripts name that path. "
            f"Mount it there (or link {recorded} to {ctx.layout.root}) when you run Forge from a pod")


def _record_run(layout: VolumeLayout, lock: Lock, report: InstallReport) -> None:
    """Forge's launch args and env, which the worker reads at boot; written only when they changed."""
    wanted = {"forge_args": list(lock.forge.args), "forge_env": dict(lock.forge.env)}
    state = read_state(layout) or {}
    if any(state.get(k) != v for k, v in wanted.items()):
        update_state(layout, lambda s: s.update(wanted))
        report.notes.append("recorded Forge's launch args and environment for the worker")


def keep_copies(layout: VolumeLayout, spec_path: Path, lock_path: Path) -> None:
    """The volume keeps the spec and lock it was installed from (when they came from elsewhere)."""
    for source, target in ((spec_path, layout.spec), (lock_path, layout.lock)):
        text = source.read_text(encoding="utf-8")
        if source.resolve() != target.resolve() and \
                (not target.exists() or target.read_text(encoding="utf-8") != text):
            write_atomic(target, text)


def _sizes(layout: VolumeLayout) -> dict[str, int]:
    return {name: _tree_size(path) for name, path in (
        ("python", layout.python_dir), ("venv", layout.venv), ("forge", layout.forge_dir),
        ("extensions", layout.extensions_dir)) if path.exists()}


def _tree_size(path: Path) -> int:
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def installation_problems(layout: VolumeLayout, lock: Lock) -> list[str]:
    """One line per way python, the venv, Forge or the extensions differ from ``lock``. Reads files only."""
    state = read_state(layout)
    if state is None:
        return [f"the volume {layout.root} is not provisioned (no {layout.relative(layout.state)})"]
    problems: list[str] = []
    python = (state.get("python") or {}).get("path")
    want = lock.forge.python
    if not python or not Path(python).exists():
        problems.append(f"python: the interpreter {python or '(none recorded)'} is missing")
    elif ("/" in want and python != want) or ("/" not in want and
                                              not str(state["python"].get("version", "")).startswith(want)):
        problems.append(f"python: the venv is built on {python} "
                        f"({state['python'].get('version')}), the lock asks for {want}")
    if not pyenv.venv_ready(layout.venv_python):
        problems.append(f"venv: {layout.venv_python} is missing or broken")
    head = gitops.head_commit(layout.forge_dir)
    if head is None:
        problems.append(f"forge: no checkout at {layout.forge_dir}")
    elif head != lock.forge.commit:
        problems.append(f"forge: the checkout is at {head[:12]}, the lock says {lock.forge.commit[:12]}")
    wanted = {e.name for e in lock.extensions}
    for ext in lock.extensions:
        ext_head = gitops.head_commit(layout.extension_dir(ext.name))
        if ext_head is None:
            problems.append(f"extension {ext.name}: missing from {layout.extensions_dir}")
        elif ext_head != ext.commit:
            problems.append(f"extension {ext.name}: at {ext_head[:12]}, the lock says {ext.commit[:12]}")
    if layout.extensions_dir.is_dir():
        extra = sorted(e.name for e in os.scandir(layout.extensions_dir)
                       if e.is_dir() and not e.name.startswith(".") and e.name not in wanted)
        problems += [f"extension {name}: on the volume but not in the lock" for name in extra]
    problems += checkout_links.problems(layout)
    problems += hf_cache.problems(layout, lock)
    problems += venv_record.problems(layout.venv, state.get("venv"))
    keys = step_keys(lock)
    recorded = state.get("steps") or {}
    unfinished = [s.name for s in STEPS if s.name != "models" and recorded.get(s.name, {}).get("key") != keys[s.name]]
    if unfinished:
        problems.append(f"install has not finished for this lock: {', '.join(unfinished)} still to run")
    boot = state.get("boot") or {}
    if boot.get("ok") is False:
        problems.append(f"boot: Forge did not boot from the volume at the last install ({boot.get('error')})")
    elif boot.get("ok") and "boot" not in unfinished:
        try:
            index = boot_set.load_index(layout)
            why = boot_set.changed(layout, index) or boot_checkpoint_problem(layout, lock, index)
        except boot_set.BootSetError as exc:
            why = exc.problem
        if why:
            problems.append(f"boot set: {why}; workers boot Forge straight from the volume, slowly, until "
                            "`forge-volume install` records it again")
    return problems
