"""The install steps, in order, each with its inputs, a cheap "already done" check and its work.

A step's key hashes its inputs from the lock together with the keys of the steps it depends on,
so a change upstream changes every key downstream. A step is skipped when its recorded key
matches and its check passes; checks read files only, so a no-op install starts no process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provision.boot import boot_set
from provision.errors import CommandError, SpecError, VolumeError
from provision.installer import checkout_links, forge_reqs, gitops, hf_cache, pyenv, venv_record
from provision.proc import log_line, run, tail
from provision.progress import Progress
from provision.records.atomic import write_atomic
from provision.records.lockfile import Lock
from provision.records.state import State
from volume_layout import VolumeLayout

# Bump when a step's recipe changes, so volumes installed by older code redo that work.
RECIPE = 1
# Bump when the worker's command line or environment for Forge changes (provision.forge.launch), so the
# boot proof runs again with it: 2 is Forge without network and with --clip-models-path.
LAUNCH_RECIPE = 2
PREPARE_TIMEOUT = 3 * 3600.0
COMPILE_TIMEOUT = 3600.0
CONFIG_SEED: dict[str, Any] = {
    # API callers get images in the response; a serverless worker should not also write them out.
    "samples_save": False,
    "grid_save": False,
    # Previews cost a VAE decode every few steps and need a decoder Forge would download: on only with
    # the spec's "previews" feature (config_seed), which puts the decoders on the volume.
    "live_previews_enable": False,
}
# Settings the spec decides (through its features) even in a config.json the user edited.
SPEC_SETTINGS = ("live_previews_enable",)
STYLES_SEED = "name,prompt,negative_prompt\n"

Change = Callable[[State], None]


@dataclass
class Ctx:
    layout: VolumeLayout
    lock: Lock
    lock_path: Path
    progress: Progress
    state: State
    notes: list[str] = field(default_factory=list)

    def recorded(self, key: str) -> Any:
        return self.state.get(key)


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    deps: tuple[str, ...]
    inputs: Callable[[Lock], Any]
    done: Callable[[Ctx], bool]
    run: Callable[[Ctx], Change | None]
    describe: Callable[[Ctx], list[str]]


# --- python -------------------------------------------------------------------------------------

def _python_done(ctx: Ctx) -> bool:
    rec = ctx.recorded("python") or {}
    path = rec.get("path")
    if not path or not Path(path).exists():
        return False
    want = ctx.lock.forge.python
    return path == want if "/" in want else str(rec.get("version", "")).startswith(want)


def _python_run(ctx: Ctx) -> Change:
    want = ctx.lock.forge.python
    if "/" in want:
        python = Path(want)
        if not python.exists():
            raise SpecError(f"forge.python = {want!r}: no such interpreter",
                            "point it at an existing python3, or give a version like \"3.10\" to install one")
    else:
        python = pyenv.find_standalone(want, ctx.layout.python_dir) or \
            pyenv.install_standalone(want, ctx.layout.python_dir)
    version = pyenv.interpreter_version(python)
    ctx.notes.append(f"python {version} at {python}")

    def change(state: State) -> None:
        state["python"] = {"version": version, "path": str(python)}

    return change


def _python_describe(ctx: Ctx) -> list[str]:
    want = ctx.lock.forge.python
    if "/" in want:
        return [f"use the interpreter {want}"]
    return [f"install CPython {want} into {ctx.layout.python_dir} with uv"]


# --- venv ---------------------------------------------------------------------------------------

def _original_venv_aside(ctx: Ctx) -> str | None:
    """An adopted volume's venv/ is the original worker's: move it aside (never clear it) before building ours.

    A rename, and only while venv-original/ is free: after a kill between the rename and the new venv,
    venv/ is a half-built venv of ours, which ``--clear`` may rebuild."""
    adopted = ctx.recorded("adopted") or {}
    layout = ctx.layout
    if adopted.get("venv") != layout.relative(layout.venv):
        return None
    if layout.venv.exists() and not os.path.lexists(layout.original_venv):
        os.rename(layout.venv, layout.original_venv)
        ctx.notes.append(f"moved the original worker's venv aside to {layout.relative(layout.original_venv)}/ "
                         "(remove it once the endpoint runs the new worker)")
    return layout.relative(layout.original_venv) if layout.original_venv.exists() else None


def _refuse_foreign_venv(ctx: Ctx, python: Path) -> None:
    """A venv forge-volume never built here (no venv step ever recorded, built on another interpreter) is
    someone's: the original worker's, say, on a volume not adopted. ``--clear`` would wipe it."""
    layout = ctx.layout
    home = pyenv.venv_home(layout.venv)
    if home is None or "venv" in (ctx.state.get("steps") or {}):
        return
    if Path(home) == python.parent or Path(home).resolve() in (python.parent.resolve(), python.resolve().parent):
        return
    raise VolumeError(f"{layout.venv} holds a venv forge-volume did not build (on the interpreter in {home})",
                      "if this volume was filled by runpod-worker-forge's install script, run `forge-volume adopt` "
                      "first (it keeps that venv); otherwise move the folder away, then run install again")


def _venv_run(ctx: Ctx) -> Change:
    python = Path((ctx.recorded("python") or {})["path"])
    aside = _original_venv_aside(ctx)
    if aside is None:
        _refuse_foreign_venv(ctx, python)
    pyenv.create_venv(python, ctx.layout.venv)
    root = str(ctx.layout.root)

    def change(state: State) -> None:
        # The venv's absolute paths are those of this mount point; the worker links it back here.
        state["mount_point"] = root
        if aside is not None:
            state.setdefault("adopted", {})["venv"] = aside

    return change


# --- torch --------------------------------------------------------------------------------------

def _torch_run(ctx: Ctx) -> None:
    f = ctx.lock.forge
    pyenv.pip_install(ctx.layout.venv_python, f.torch, extra_index_url=f.torch_index_url,
                      what=f"pip install {' '.join(f.torch)}")


def _torch_done(ctx: Ctx) -> bool:
    torch = ctx.lock.forge.torch
    if not torch:
        return True
    # Versions, not only names: a torch moved by hand (or by a failed install) is not the locked one.
    return not pyenv.missing_packages(ctx.layout.venv, torch) and \
        not venv_record.torch_off(torch, venv_record.distributions(ctx.layout.venv))


def _torch_describe(ctx: Ctx) -> list[str]:
    torch = ctx.lock.forge.torch
    if not torch:
        return ["no torch packages in the spec"]
    off = venv_record.torch_off(torch, venv_record.distributions(ctx.layout.venv))
    return [f"pip install {' '.join(torch)} into the venv"] + \
        [f"  {req.name} is {have}, the lock pins {req}" for req, have in off if have is not None]


# --- forge checkout -----------------------------------------------------------------------------

def _forge_run(ctx: Ctx) -> Change:
    f = ctx.lock.forge
    how = gitops.sync_checkout(ctx.layout.forge_dir, f.repo, f.commit, ctx.layout.tmp_dir, "the Forge checkout")
    ctx.notes.append(f"Forge {how} at {f.commit[:12]}")

    def change(state: State) -> None:
        state["forge"] = {"repo": gitops.redact_url(f.repo), "commit": f.commit}

    return change


def _forge_describe(ctx: Ctx) -> list[str]:
    f = ctx.lock.forge
    head = gitops.head_commit(ctx.layout.forge_dir)
    if head is None:
        return [f"clone {gitops.redact_url(f.repo)} at {f.commit[:12]} into {ctx.layout.forge_dir}"]
    if head != f.commit:
        return [f"update the Forge checkout from {head[:12]} to {f.commit[:12]}"]
    return ["the Forge checkout is already at the locked commit"]


# --- extensions ---------------------------------------------------------------------------------

def _stale_extensions(ctx: Ctx) -> list[str]:
    """Extensions forge-volume installed earlier that the lock no longer lists and that are still there."""
    wanted = {e.name for e in ctx.lock.extensions}
    recorded = [e["name"] for e in ctx.recorded("extensions") or []]
    return [n for n in recorded if n not in wanted and ctx.layout.extension_dir(n).exists()]


def _ext_pip(ctx: Ctx) -> list[str]:
    return list(dict.fromkeys(p for e in ctx.lock.extensions for p in e.pip))  # once each, in order


def _extensions_done(ctx: Ctx) -> bool:
    at_commit = all(gitops.head_commit(ctx.layout.extension_dir(e.name)) == e.commit for e in ctx.lock.extensions)
    return at_commit and not _stale_extensions(ctx) and not pyenv.missing_packages(ctx.layout.venv, _ext_pip(ctx))


def _extensions_run(ctx: Ctx) -> Change:
    layout = ctx.layout
    for name in _stale_extensions(ctx):
        _remove_tree(layout.extension_dir(name), layout.tmp_dir)
        ctx.notes.append(f"removed extension {name} (no longer in the lock)")
    layout.extensions_dir.mkdir(parents=True, exist_ok=True)
    for ext in ctx.lock.extensions:
        how = gitops.sync_checkout(layout.extension_dir(ext.name), ext.repo, ext.commit, layout.tmp_dir,
                                   f"extension {ext.name}")
        if how != "unchanged":
            ctx.notes.append(f"extension {ext.name} {how} at {ext.commit[:12]}")
    pyenv.pip_install(layout.venv_python, _ext_pip(ctx), what="pip install the extensions' packages")
    records = [{"name": e.name, "repo": gitops.redact_url(e.repo), "commit": e.commit} for e in ctx.lock.extensions]

    def change(state: State) -> None:
        state["extensions"] = records

    return change


def _extensions_describe(ctx: Ctx) -> list[str]:
    lines = [f"remove extension {n} (no longer in the lock)" for n in _stale_extensions(ctx)]
    for ext in ctx.lock.extensions:
        head = gitops.head_commit(ctx.layout.extension_dir(ext.name))
        if head is None:
            lines.append(f"clone extension {ext.name} at {ext.commit[:12]}")
        elif head != ext.commit:
            lines.append(f"update extension {ext.name} from {head[:12]} to {ext.commit[:12]}")
    missing = pyenv.missing_packages(ctx.layout.venv, _ext_pip(ctx))
    if missing:
        lines.append(f"pip install {' '.join(missing)} for the extensions")
    return lines or ["the extensions are at their locked commits"]


def _remove_tree(path: Path, scratch: Path) -> None:
    # Rename first so the extension vanishes in one step; then delete at leisure.
    scratch.mkdir(parents=True, exist_ok=True)
    doomed = scratch / f"{path.name}.{os.getpid()}.removing"
    os.replace(path, doomed)
    shutil.rmtree(doomed)


# --- Forge's environment preparation ------------------------------------------------------------

def torch_command(lock: Lock) -> str:
    """TORCH_COMMAND for Forge's launcher (it runs ``python -m $TORCH_COMMAND`` when torch is missing).

    It installs exactly the locked torch (already in the venv, so pip has nothing to do); with no
    torch in the spec it is a harmless ``pip --version`` instead of Forge's default download.
    """
    f = lock.forge
    if not f.torch:
        return "pip --version"
    index = ["--extra-index-url", f.torch_index_url] if f.torch_index_url else []
    return shlex.join(["pip", "install", *f.torch, *index])


def prepare_argv(layout: VolumeLayout, forge_args: list[str]) -> list[str]:
    """launch.py --exit with the spec's args first: Forge's preparation acts on some of them
    (``--xformers`` installs XFORMERS_PACKAGE), so the venv gets what the worker will boot with."""
    return [str(layout.venv_python), str(layout.launch_py), *forge_args, "--exit", "--skip-torch-cuda-test",
            "--data-dir", str(layout.prepare_data_dir)]


def _prepare_done(ctx: Ctx) -> bool:
    link = ctx.layout.prepare_data_dir / "extensions"
    return (ctx.layout.forge_dir / "repositories").is_dir() and link.is_symlink() and \
        link.resolve() == ctx.layout.extensions_dir.resolve()


def _prepare_run(ctx: Ctx) -> None:
    layout = ctx.layout
    layout.extensions_dir.mkdir(parents=True, exist_ok=True)
    layout.prepare_data_dir.mkdir(parents=True, exist_ok=True)
    link = layout.prepare_data_dir / "extensions"
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            raise CommandError(f"{link} is a folder, not the link to {layout.extensions_dir} forge-volume made",
                               f"remove {link} and re-run")
        link.unlink()
    # Forge's launcher runs the installers of <data-dir>/extensions: point it at the volume's extensions.
    # Relative, so the link still holds when the volume is mounted somewhere else.
    link.symlink_to(os.path.relpath(layout.extensions_dir, layout.prepare_data_dir))
    env = {**forge_reqs.launcher_environ(os.environ, ctx.lock.forge.env), "TORCH_COMMAND": torch_command(ctx.lock)}
    run(prepare_argv(layout, ctx.lock.forge.args), cwd=layout.forge_dir, env=env, timeout=PREPARE_TIMEOUT,
        what="Forge's environment preparation (launch.py --exit)", stream=True)


def _prepare_describe(ctx: Ctx) -> list[str]:
    return ["run Forge's launch.py --exit in the venv (requirements, helper repositories, extension installers)"]


# --- Forge's pinned requirements ----------------------------------------------------------------

def _recorded_drift(ctx: Ctx) -> list[venv_record.Change]:
    """How the venv differs from its record, when the record was taken for this very lock (a venv
    changed by hand since); [] when there is none, or when it is older than the lock (it is re-taken)."""
    rec = ctx.recorded("venv") or {}
    if rec.get("requirements_key") != step_keys(ctx.lock)["requirements"]:
        return []
    return venv_record.drift(ctx.layout.venv, rec)


def _requirements_done(ctx: Ctx) -> bool:
    try:
        off = forge_reqs.drift(ctx.layout.venv, forge_reqs.requirements_file(ctx.layout.forge_dir, ctx.lock.forge.env))
    except CommandError:  # the requirements file is gone with the checkout: redo
        return False
    return not off and not _recorded_drift(ctx)


def _requirements_run(ctx: Ctx) -> Change:
    restored = forge_reqs.restore(ctx.layout.venv_python, ctx.layout.forge_dir, ctx.lock.forge.env)
    if restored:
        ctx.notes.append("restored Forge's pinned requirements over what extension installers installed: "
                         + ", ".join(map(str, restored)))
    moved = _recorded_drift(ctx)
    if moved:
        # The venv was installed for this lock and recorded; what still differs was changed since: put it back.
        venv_record.put_back(ctx.layout.venv_python, moved, extra_index_url=ctx.lock.forge.torch_index_url)
        ctx.notes.append("put the venv back as install recorded it: " + ", ".join(
            f"{c.name} {c.after} -> {c.before}" if c.before and c.after else
            (f"removed {c.name} {c.after}" if c.before is None else f"reinstalled {c.name} {c.before}")
            for c in moved))
    taken = venv_record.record(ctx.layout.venv, step_keys(ctx.lock)["requirements"])

    def change(state: State) -> None:
        state["venv"] = taken

    return change


def _requirements_describe(ctx: Ctx) -> list[str]:
    path = forge_reqs.requirements_file(ctx.layout.forge_dir, ctx.lock.forge.env)
    try:
        off = forge_reqs.drift(ctx.layout.venv, path)
    except CommandError:
        off = []  # no checkout yet: prepare runs first
    what = f"check the venv against Forge's pins in {path.name}"
    pinned = {d.name for d in off}  # restored by Forge's rule, named once
    moved = [f"put back {c.name} {c.before} (now {c.after or 'missing'})" if c.before else
             f"remove {c.name} {c.after} (not in the venv's record)" for c in _recorded_drift(ctx)
             if c.name not in pinned]
    return [what] + ([f"restore {', '.join(map(str, off))}"] if off else []) + moved


# --- models -------------------------------------------------------------------------------------

def _models_done(ctx: Ctx) -> bool:
    if not ctx.lock.files:
        return True
    from provision.models import plan_models  # stats files only: still no process, no network

    return not plan_models(ctx.layout, ctx.lock)


def _models_run(ctx: Ctx) -> None:
    if not ctx.lock.files:
        return
    from provision.models import sync_models  # pulls in huggingface_hub and requests: only when needed

    sync_models(ctx.layout, ctx.lock, ctx.lock_path, ctx.progress)


def _models_describe(ctx: Ctx) -> list[str]:
    if not ctx.lock.files:
        return ["no models in the lock"]
    from provision.models import plan_models

    return plan_models(ctx.layout, ctx.lock) or [f"{len(ctx.lock.files)} model(s) and file(s) already match the lock"]


# --- config seed --------------------------------------------------------------------------------

def config_seed(lock: Lock) -> dict[str, Any]:
    """Forge's settings seed: live previews on when the spec's features include "previews"."""
    return {**CONFIG_SEED, "live_previews_enable": "previews" in lock.forge.features}


def _config_files(layout: VolumeLayout, lock: Lock) -> dict[Path, str]:
    return {layout.config_dir / "config.json": json.dumps(config_seed(lock), indent=2) + "\n",
            layout.config_dir / "styles.csv": STYLES_SEED}


def _spec_settings(ctx: Ctx) -> str | None:
    """config.json with the settings the spec decides put right, when the volume's file differs in one
    (None: it agrees, or it is missing or not a settings object, which the seed handles)."""
    path = ctx.layout.config_dir / "config.json"
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    seed = config_seed(ctx.lock)
    if not isinstance(current, dict) or all(current.get(k) == seed[k] for k in SPEC_SETTINGS):
        return None
    return json.dumps({**current, **{k: seed[k] for k in SPEC_SETTINGS}}, indent=2) + "\n"


def _extension_files(ctx: Ctx) -> dict[Path, str]:
    """Extensions' settings files from the lock (``files`` in the spec) whose content on the volume differs.

    Unlike Forge's seed these are the spec's to decide, so a file edited on the volume is put back.
    """
    out = {}
    for ext in ctx.lock.extensions:
        for rel, content in ext.files.items():
            path = ctx.layout.extension_dir(ext.name) / rel
            try:
                current: str | None = path.read_text(encoding="utf-8")
            except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
                current = None
            if current != content:
                out[path] = content
    return out


def _config_done(ctx: Ctx) -> bool:
    return all(p.is_file() for p in _config_files(ctx.layout, ctx.lock)) and not _extension_files(ctx) \
        and _spec_settings(ctx) is None


def _config_run(ctx: Ctx) -> None:
    for path, text in _config_files(ctx.layout, ctx.lock).items():
        if not path.exists():  # a user's edited settings are theirs: never overwritten (but SPEC_SETTINGS)
            write_atomic(path, text)
            ctx.notes.append(f"seeded {ctx.layout.relative(path)}")
    fixed = _spec_settings(ctx)
    if fixed is not None:
        write_atomic(ctx.layout.config_dir / "config.json", fixed)
        ctx.notes.append(f"set {', '.join(SPEC_SETTINGS)} in {ctx.layout.relative(ctx.layout.config_dir)}/config.json "
                         "as the spec's features say")
    for path, text in _extension_files(ctx).items():
        write_atomic(path, text)
        ctx.notes.append(f"wrote {ctx.layout.relative(path)}")


def _config_describe(ctx: Ctx) -> list[str]:
    lines = [f"write {ctx.layout.relative(p)}" for p in [*(p for p in _config_files(ctx.layout, ctx.lock)
                                                          if not p.exists()), *_extension_files(ctx)]]
    if _spec_settings(ctx) is not None:
        lines.append(f"set {', '.join(SPEC_SETTINGS)} in config/config.json as the spec's features say")
    return lines


# --- bytecode -----------------------------------------------------------------------------------

def _bytecode_done(ctx: Ctx) -> bool:
    return any((ctx.layout.forge_dir / "__pycache__").glob("launch.*.pyc"))


def _bytecode_run(ctx: Ctx) -> None:
    layout = ctx.layout
    targets = [*pyenv.site_packages(layout.venv), layout.forge_dir]
    if layout.extensions_dir.is_dir():
        targets.append(layout.extensions_dir)
    result = run([layout.venv_python, "-m", "compileall", "-q", "-j0", *targets], timeout=COMPILE_TIMEOUT,
                 what="compileall", stream=True, check=False)
    if result.returncode == 0:
        return
    # Packages ship the odd file that does not compile on this Python (Python 2 leftovers in aenum and
    # torch, templates): Python never imports those. They are counted in the log, not shown; any other
    # failure (a full disk, a folder it cannot write) is a warning.
    never, other = _compile_failures(result.stdout)
    if never:
        log_line(f"compileall: {len(never)} file(s) do not compile on this Python (SyntaxError: it never imports "
                 f"them, so they need no bytecode): {', '.join(never)}")
    if other or not never:
        ctx.notes.append(f"warning: compileall failed for {len(other) or 'some'} file(s) (exit code "
                         f"{result.returncode}): {tail(result.stdout, 6)[:300]}")


_NEVER_IMPORTED = ("SyntaxError", "IndentationError", "TabError", "source code string cannot contain null bytes")


def _compile_failures(output: str) -> tuple[list[str], list[str]]:
    """compileall's failures: (files with a syntax this Python cannot read, files that failed otherwise)."""
    never: list[str] = []
    other: list[str] = []
    blocks = output.split("*** Error compiling ")[1:]
    for block in blocks:
        name = block.split("...", 1)[0].strip("'\"")
        (never if any(word in block for word in _NEVER_IMPORTED) else other).append(name)
    return never, other


# --- links from the checkout's models/ (the original worker's model paths) ----------------------

def _links_done(ctx: Ctx) -> bool:
    return not checkout_links.problems(ctx.layout) and not hf_cache.problems(ctx.layout, ctx.lock)


def _links_run(ctx: Ctx) -> None:
    for link in checkout_links.make(ctx.layout):
        ctx.notes.append(f"linked {ctx.layout.relative(link)} -> {os.readlink(link)}")
    # The HF cache's refs and markers for first-use files there (provision.installer.hf_cache).
    for path in hf_cache.make(ctx.layout, ctx.lock):
        ctx.notes.append(f"wrote {ctx.layout.relative(path)}")


def _links_describe(ctx: Ctx) -> list[str]:
    if not ctx.layout.forge_dir.is_dir():
        return ["link the Forge checkout's models/<Kind> folders to the volume's models/<Kind>"]
    return [f"link {ctx.layout.relative(p)} -> {t}" for p, t in checkout_links.wanted(ctx.layout).items()
            if not (p.is_symlink() and os.readlink(p) == t)] + hf_cache.problems(ctx.layout, ctx.lock)


# --- boot proof ---------------------------------------------------------------------------------

def lock_checkpoints(lock: Lock) -> list[str]:
    """The lock's checkpoints, relative to the volume, in lock order: the only ones the toolkit picks for Forge."""
    return [m.path for m in lock.models if m.kind == "checkpoint"]


def boot_checkpoint_problem(layout: VolumeLayout, lock: Lock, index: boot_set.Index | None) -> str | None:
    """Why the boot set's checkpoint (the one workers prefetch) is wrong: gone, or no longer in the lock."""
    if index is None or index.checkpoint is None:
        return None
    if not layout.absolute(index.checkpoint).is_file():
        return f"the boot set names the checkpoint {index.checkpoint} to prefetch, which is no longer on the volume"
    if index.checkpoint not in lock_checkpoints(lock):
        return f"the boot set names the checkpoint {index.checkpoint} to prefetch, which the lock no longer lists"
    return None


def _boot_done(ctx: Ctx) -> bool:
    boot = ctx.recorded("boot") or {}
    if not boot.get("ok") or not all(os.path.lexists(ctx.layout.absolute(p)) for p in boot.get("forge_files") or []):
        return False
    # The boot set must still describe the volume (a `pip install` by hand on a pod changes the venv).
    index = boot_set.read_index(ctx.layout)
    key = ((ctx.state.get("steps") or {}).get("boot") or {}).get("key")
    # An index an older forge-volume traced or wrote is recorded again: the worker gains what the tracer now sees,
    # and a files.bin of zstd frames.
    return index is not None and index.key == key and index.trace >= boot_set.TRACE and \
        index.version >= boot_set.VERSION and \
        boot_set.changed(ctx.layout, index) is None and boot_checkpoint_problem(ctx.layout, ctx.lock, index) is None


def _boot_run(ctx: Ctx) -> Change:
    from provision.boot import proof  # starts Forge: only when the step runs

    record = proof.prove_boot(ctx.layout, ctx.lock.forge.args, ctx.lock.forge.env,
                              timeout=proof.boot_timeout(os.environ), key=step_keys(ctx.lock)["boot"],
                              checkpoints=lock_checkpoints(ctx.lock))
    made = record["forge_files"]
    ctx.notes.append(f"Forge booted from the volume in {record['seconds']:.1f} s"
                     + (f"; its first start made {len(made)} folder(s)/file(s) under models/, recorded as Forge's own"
                        if made else ""))
    if record.get("warm_up"):
        ctx.notes.append(f"warm-up txt2img skipped or failed: {record['warm_up']}")
    ctx.notes.append(record["boot_set"])
    previous = [p for p in (ctx.recorded("boot") or {}).get("forge_files") or []
                if os.path.lexists(ctx.layout.absolute(p))]
    record["forge_files"] = sorted({*previous, *made})

    def change(state: State) -> None:
        state["boot"] = record

    return change


def _boot_describe(ctx: Ctx) -> list[str]:
    from provision.boot import proof
    from provision.forge.launch import has_gpu

    cpu = "" if has_gpu() else ", --always-cpu: no GPU on this machine"
    return [f"start Forge from the volume as a worker will (API only on 127.0.0.1{cpu}), wait up to "
            f"{proof.boot_timeout(os.environ):g} s for its API, stop it"]


# --- the list -----------------------------------------------------------------------------------

def _nothing(ctx: Ctx) -> list[str]:
    return []


STEPS: tuple[Step, ...] = (
    Step("python", "Python interpreter", (), lambda lock: {"python": lock.forge.python},
         _python_done, _python_run, _python_describe),
    Step("venv", "virtual environment", ("python",), lambda lock: {},
         lambda ctx: pyenv.venv_ready(ctx.layout.venv_python), _venv_run,
         lambda ctx: [f"create the venv at {ctx.layout.venv}"]),
    Step("torch", "torch", ("venv",), lambda lock: {"torch": lock.forge.torch, "index": lock.forge.torch_index_url},
         _torch_done, _torch_run, _torch_describe),
    Step("forge", "Forge checkout", (), lambda lock: {"repo": lock.forge.repo, "commit": lock.forge.commit},
         lambda ctx: gitops.head_commit(ctx.layout.forge_dir) == ctx.lock.forge.commit, _forge_run, _forge_describe),
    # Not their `files`: the config step writes those, and keys on them; here they would re-run prepare.
    # Blanked rather than dropped, so volumes installed before keep their key.
    Step("extensions", "extensions", ("torch",), lambda lock: [{**asdict(e), "files": {}} for e in lock.extensions],
         _extensions_done, _extensions_run, _extensions_describe),
    Step("prepare", "Forge's environment preparation", ("torch", "forge", "extensions"),
         lambda lock: {"env": lock.forge.env, "args": lock.forge.args, "torch_command": torch_command(lock)},
         _prepare_done, _prepare_run, _prepare_describe),
    # Extension installers lift packages over Forge's pins during prepare; Forge would put them back
    # at every boot, but the worker boots with --skip-prepare-environment, so the venv must be right.
    Step("requirements", "Forge's pinned requirements", ("prepare",),
         lambda lock: {"reqs_file": lock.forge.env.get("REQS_FILE") or forge_reqs.DEFAULT_REQS_FILE},
         _requirements_done, _requirements_run, _requirements_describe),
    # The first-use files only when there are some, so volumes installed before keep their key.
    Step("models", "models", (), lambda lock: [asdict(m) for m in lock.files],
         _models_done, _models_run, _models_describe),
    Step("config", "settings", (), lambda lock: {"seed": config_seed(lock), "styles": STYLES_SEED,
                                                 "files": {e.name: e.files for e in lock.extensions if e.files}},
         _config_done, _config_run, _config_describe),
    Step("links", "model links in the checkout", (), lambda lock: {},
         _links_done, _links_run, _links_describe),
    Step("bytecode", "bytecode", ("requirements",), lambda lock: {},
         _bytecode_done, _bytecode_run,
         lambda ctx: ["compile bytecode for the venv, the checkout and the extensions"]),
    # Last: Forge's first start makes its own files on the volume here, not in every worker.
    Step("boot", "boot proof", ("requirements", "config", "links", "bytecode"),
         lambda lock: {"args": lock.forge.args, "env": lock.forge.env, "launch": LAUNCH_RECIPE},
         _boot_done, _boot_run, _boot_describe),
)
BY_NAME = {s.name: s for s in STEPS}


def step_keys(lock: Lock) -> dict[str, str]:
    """Each step's key: its inputs and its dependencies' keys, hashed."""
    keys: dict[str, str] = {}
    for step in STEPS:
        payload = {"step": step.name, "recipe": RECIPE, "inputs": step.inputs(lock),
                   "deps": [keys[d] for d in step.deps]}
        keys[step.name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return keys


def dependents(name: str) -> list[str]:
    """Every step downstream of ``name`` (directly or through others)."""
    out: list[str] = []
    for step in STEPS:
        if any(d == name or d in out for d in step.deps):
            out.append(step.name)
    return out


def why_pending(step: Step, ctx: Ctx, keys: dict[str, str], pending: set[str]) -> str | None:
    """Why ``step`` must run, or None when it can be skipped. ``pending``: steps that run before it."""
    upstream = [d for d in step.deps if d in pending]
    if upstream:
        return f"{upstream[0]} changes"
    record = (ctx.state.get("steps") or {}).get(step.name)
    if record is None:
        return "not done yet"
    if record.get("key") != keys[step.name]:
        return "the lock changed"
    if not step.done(ctx):
        return "its result is missing or out of date on the volume"
    return None
