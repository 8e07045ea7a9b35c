"""The ``forge-volume`` command line: thin commands over the provisioning library.

Each command checks its arguments, calls one library function and prints what it returns.
Library errors (``ForgeVolumeError``) become one line and exit 1 here, once; usage errors exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from provision import __version__
from provision.errors import ForgeVolumeError
from provision.installer.preflight import mount_note, not_a_folder, require_usable
from provision.progress import Progress
from volume_layout import MODEL_KIND_DIRS, VolumeLayout, provisioning_volume


@dataclass
class Context:
    layout: VolumeLayout
    spec_path: Path
    progress: Progress
    debug: bool
    spec_given: bool = False  # --spec was given (`regions` falls back to ./forge-volume.toml otherwise)

    @property
    def lock_path(self) -> Path:
        from provision.records.lockfile import lock_path_for

        return lock_path_for(self.spec_path)


GLOBAL_VALUED = frozenset({"--volume", "--spec"})
GLOBAL_FLAGS = frozenset({"--quiet", "-q", "--debug"})
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed web terminal): stop as cleanly as on Ctrl-C, keeping partial downloads."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise in the main thread, as SIGINT does, for the duration of one command."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def hoist_global_options(args: list[str], commands: Iterable[str]) -> list[str]:
    """``install --volume X`` means ``--volume X install``: global options after the command move before it."""
    names = set(commands)
    i = 0
    while i < len(args) and args[i] not in names:
        if args[i] == "--":
            return args
        i += 2 if args[i] in GLOBAL_VALUED else 1
    if i >= len(args):
        return args
    moved: list[str] = []
    kept = args[:i + 1]
    rest = iter(range(i + 1, len(args)))
    for j in rest:
        arg = args[j]
        if arg == "--":
            kept += args[j:]
            break
        if (arg.split("=", 1)[0] in GLOBAL_VALUED and "=" in arg) or arg in GLOBAL_FLAGS:
            moved.append(arg)
        elif arg in GLOBAL_VALUED and j + 1 < len(args):
            moved += [arg, args[j + 1]]
            next(rest)
        else:
            kept.append(arg)
    return moved + kept


class Group(click.Group):
    """Turns library errors into ``error: <cause> (<hint>)`` and exit 1; a traceback only with --debug."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["forge_volume.argv"] = list(args)  # for the interrupt message: the command that finishes the job
        return super().parse_args(ctx, hoist_global_options(args, self.commands))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _stop_on_signals():
                return super().invoke(ctx)
        except ForgeVolumeError as exc:
            _fail(ctx, exc.one_line(), exc)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Stopped as exc:
            _fail(ctx, f"stopped by {exc.name}; re-run the same command to resume ({_again(ctx)}; finished "
                       "downloads and steps are kept, partial downloads resume)", None)
        except KeyboardInterrupt:
            _fail(ctx, f"interrupted; re-run the same command to resume ({_again(ctx)}; finished downloads "
                       "and steps are kept, partial downloads resume)", None)
        except BrokenPipeError:
            # The reader went away (`forge-volume verify | head -1`): nothing left to say to it.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except (NotADirectoryError, FileExistsError) as exc:
            _fail(ctx, not_a_folder(exc).one_line(), exc)
        except Exception as exc:
            _fail(ctx, f"unexpected {type(exc).__name__}: {exc} (re-run with --debug for the traceback)", exc)


def _again(ctx: click.Context) -> str:
    """The command line that was interrupted, to run again (a URL shown without its secrets)."""
    from provision.fetch.sources import shown_source

    argv = [shown_source(a) if "://" in a else a for a in ctx.meta.get("forge_volume.argv") or []]
    return f"`{shlex.join(['forge-volume', *argv])}`"


def _fail(ctx: click.Context, message: str, exc: BaseException | None) -> NoReturn:
    obj = ctx.find_object(Context)
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        if exc is not None and obj is not None and obj.debug:
            traceback.print_exception(exc, file=sys.stderr)
        click.echo(f"error: {message}", err=True)
    ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--volume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The volume's mount point. Default: $FORGE_VOLUME, else /workspace.")
@click.option("--spec", "spec", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The spec file. Default: forge-volume.toml on the volume. The lock sits next to it.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bars, step lines or command output on stderr: errors only. Results still go to stdout.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.version_option(__version__, prog_name="forge-volume")
@click.pass_context
def main(ctx: click.Context, volume: Path | None, spec: Path | None, quiet: bool, debug: bool) -> None:
    """Provision Stable Diffusion WebUI Forge onto a RunPod network volume.

    Typical use on a pod with the volume at /workspace:
    init --preset sdxl, edit the spec, lock, install; later refresh-models.
    The global options may also be given after the command (install --volume PATH).
    """
    layout = VolumeLayout((volume or provisioning_volume()).absolute())
    ctx.obj = Context(layout=layout, spec_path=(spec or layout.spec).absolute(),
                      progress=Progress(quiet=quiet), debug=debug, spec_given=spec is not None)
    if ctx.invoked_subcommand != "verify":  # verify lists these among its problems instead
        require_usable(layout, ctx.obj.spec_path)


pass_ctx = click.make_pass_decorator(Context)


@main.command()
@click.option("--preset", type=click.Choice(["minimal", "sdxl", "seed"]), default="sdxl", show_default=True,
              help="Which bundled spec to start from.")
@click.option("--force", is_flag=True, help="Overwrite an existing spec file.")
@click.option("--create", is_flag=True, help="Create the spec's folder (the volume) if it does not exist.")
@pass_ctx
def init(obj: Context, preset: str, force: bool, create: bool) -> None:
    """Write a spec file to edit (forge-volume.toml on the volume, or --spec)."""
    from provision.records.spec import preset_text

    if obj.spec_path.exists() and not force:
        raise click.ClickException(f"{obj.spec_path} already exists; edit it, or pass --force to overwrite it")
    folder = obj.spec_path.parent
    if not folder.exists() and not create:
        raise click.ClickException(f"{folder} does not exist ({mount_note(folder)}); check --volume or "
                                   "FORGE_VOLUME, or pass --create to create the folder")
    folder.mkdir(parents=True, exist_ok=True)
    obj.spec_path.write_text(preset_text(preset), encoding="utf-8")
    click.echo(f"wrote {obj.spec_path} (preset {preset}); edit it, then run `forge-volume lock`")


@main.command()
@click.option("--upgrade", "upgrade", is_flag=False, flag_value="*", multiple=True, metavar="[NAME]",
              help="Move branches and tags to their current commits and re-resolve models: all entries, or "
                   "only NAME (`forge`, an extension, a model's file name or KIND/NAME, or `features`: "
                   "the features' first-use files). Repeatable.")
@pass_ctx
def lock(obj: Context, upgrade: tuple[str, ...]) -> None:
    """Lock the spec: resolve what changed since the last lock; keep every other pin.

    An entry whose spec text is unchanged keeps its commit, revision, sha256 and size, so with
    nothing changed this needs no network. Prints each change (added, removed, moved, pinned).

    The spec's `[forge] features` also lock the files Forge would otherwise download at first use
    (a worker never downloads). What each fetches, and the names: README, "Features".

    \b
    features: previews, taesd-encode, face-restore[:gfpgan,codeformer],
              upscale:NAME[,NAME...], interrogate, deepbooru,
              controlnet-preprocessors:NAME[,NAME...], ip-adapter[:sd15,sdxl], instantid
    """
    from provision.installer.resolve import UnknownEntryError, update_lock
    from provision.records.spec import load_spec

    try:
        update = update_lock(load_spec(obj.spec_path), obj.lock_path, obj.progress, upgrade)
    except UnknownEntryError as exc:
        raise click.BadParameter(exc.message, param_hint="'--upgrade'") from None
    for warning in update.warnings:
        click.echo(warning, err=True)
    for line in update.lines():
        click.echo(line)


@main.command()
@click.argument("kind", type=click.Choice(list(MODEL_KIND_DIRS)), metavar="KIND")
@click.argument("source")
@click.option("--name", help="The file name on the volume. Default: from the source (or the server, for a URL "
              "whose path names no file).")
@click.option("--sha256", help="The file's sha256, checked at download. Default: the host's, else measured at the "
              "first download and pinned.")
@click.option("--no-install", is_flag=True, help="Only add it to the spec and the lock; fetch it later with "
              "refresh-models.")
@pass_ctx
def add(obj: Context, kind: str, source: str, name: str | None, sha256: str | None, no_install: bool) -> None:
    """Add a model to the spec, lock only it, and fetch it (models only: nothing else is installed).

    KIND is one of: checkpoint, lora, vae, controlnet, upscaler, embedding, hypernetwork,
    text_encoder, insightface, adetailer, clip_vision. SOURCE is hf://OWNER/REPO/PATH[@REVISION],
    https://... or civitai://MODEL_VERSION_ID. The spec keeps its comments and layout.
    """
    from provision.commands.add_remove import add_model

    added = add_model(obj.layout, obj.spec_path, kind=kind, source=source, name=name, sha256=sha256,
                      progress=obj.progress, install=not no_install)
    for warning in added.warnings:
        click.echo(warning, err=True)
    for line in added.lines():
        click.echo(line)


@main.command()
@click.argument("name")
@click.option("--delete", is_flag=True, help="Also delete the model's file from the volume.")
@pass_ctx
def remove(obj: Context, name: str, delete: bool) -> None:
    """Take a model out of the spec and the lock (NAME: its file name, or KIND/NAME); its file stays unless --delete."""
    from provision.commands.add_remove import remove_model
    from provision.installer.resolve import UnknownEntryError

    try:
        removed = remove_model(obj.layout, obj.spec_path, name, delete=delete)
    except UnknownEntryError as exc:
        raise click.BadParameter(exc.one_line(), param_hint="'NAME'") from None
    for line in removed.lines():
        click.echo(line)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@pass_ctx
def plan(obj: Context, as_json: bool) -> None:
    """Print what `install` would change. Writes nothing; works offline once a lock exists."""
    from provision.commands.plan import make_plan

    result = make_plan(obj.layout, obj.spec_path)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    for line in result.lines():
        click.echo(line)


@main.command()
@click.option("--wait", is_flag=True,
              help="If another install holds the volume, wait for it (saying which one) instead of refusing.")
@pass_ctx
def install(obj: Context, wait: bool) -> None:
    """Make the volume match the lock (writing the lock first if there is none). Idempotent and resumable."""
    from provision.commands.install import install as run_install

    report = run_install(obj.layout, obj.spec_path, progress=obj.progress, wait=wait)
    click.echo(report.summary())


@main.command("refresh-models")
@click.option("--prune", is_flag=True, help="Also delete model files under models/ that the lock does not list.")
@click.option("--dry-run", is_flag=True, help="Only print what would be fetched, repaired or pruned.")
@pass_ctx
def refresh_models(obj: Context, prune: bool, dry_run: bool) -> None:
    """Models only: fetch what is missing, repair what fails its checksum, optionally prune."""
    from provision.models import refresh_models as run_refresh

    report = run_refresh(obj.layout, obj.lock_path, prune=prune, dry_run=dry_run, progress=obj.progress,
                         spec_path=obj.spec_path)
    click.echo(report.summary())


@main.command()
@click.option("--deep", is_flag=True, help="Re-hash every model file instead of trusting recorded size and mtime; "
              "a file that fails is forgotten in state.json, so refresh-models repairs it.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (exit status as without it).")
@pass_ctx
def verify(obj: Context, deep: bool, as_json: bool) -> None:
    """Check the volume against the lock; exit 1 and list every problem.

    Model files the lock does not list (fetched by the worker's /v1/download or /v1/sync helper
    jobs, or copied by hand) are listed as extras; they do not make verify fail.
    """
    from provision.commands.verify import verify_report

    report = verify_report(obj.layout, obj.lock_path, obj.spec_path, deep=deep, progress=obj.progress)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        if not report.ok:
            sys.exit(1)
        return
    for line in [*report.problems, *report.extra_lines()]:
        click.echo(line)
    if not report.ok:
        click.echo(f"error: {len(report.problems)} problem(s); run `forge-volume install` "
                   "(or `refresh-models` for models) to repair", err=True)
        sys.exit(1)
    extras = f"; {len(report.extras)} extra model file(s) not in the lock" if report.extras else ""
    click.echo(f"ok: the volume matches the lock{extras}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Only print what adopt found and what it would do; change nothing.")
@click.option("--keep-local-changes", is_flag=True,
              help="Adopt checkouts whose tracked files were changed, as they are (the changes are saved as a "
                   "patch under .forge-volume/adopt/; the lock pins the commit without them).")
@click.option("--python", metavar="VERSION|PATH",
              help="The spec's [forge] python. Default: the original venv's Python line (3.10).")
@click.option("--hf-repo", "hf_repos", multiple=True, metavar="OWNER/REPO",
              help="A Hugging Face repository the models may come from: its files are matched by sha256 (one "
                   "listing per repository). Repeatable.")
@click.option("--no-lookup", is_flag=True,
              help="Do not ask Civitai's by-hash API for the models' sources (all are recorded with no source, "
                   "unless an --hf-repo has them).")
@pass_ctx
def adopt(obj: Context, dry_run: bool, keep_local_changes: bool, python: str | None, hf_repos: tuple[str, ...],
          no_lookup: bool) -> None:
    """Take over a volume runpod-worker-forge's install script filled: keep every model, download none.

    Prints a plan first (--dry-run stops there). Then hashes every model, moves each into models/<Kind>/
    by rename (a link stays at its old path, so the original worker keeps working), and writes the spec
    and the lock: Forge and extensions at the commits found, models pinned by sha256, their source found
    by hash or none ("volume": kept, verified, never downloaded). Interrupted, it finishes when run
    again. Then run `forge-volume install`.
    """
    from provision.adopt.lookup import Civitai, HashIndex, HfRepos
    from provision.commands.adopt import adopt as run_adopt
    from provision.errors import SourceError
    from provision.fetch.sources import check_repo_id

    try:
        repos = tuple(check_repo_id(r) for r in hf_repos)
    except SourceError as exc:
        raise click.BadParameter(exc.one_line(), param_hint="'--hf-repo'") from None
    indexes: list[HashIndex] = [HfRepos(repos)] if repos else []
    if not no_lookup:
        indexes.append(Civitai())
    report = run_adopt(obj.layout, obj.spec_path, dry_run=dry_run, keep_local_changes=keep_local_changes,
                       python=python, indexes=indexes, progress=obj.progress, say=click.echo)
    for line in report.lines:
        click.echo(line)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--files", "every_file", is_flag=True,
              help="Also list every model file: kind, size, source, and whether the lock pins it, lists it "
              "(no sha256 yet) or it is an extra.")
@pass_ctx
def status(obj: Context, as_json: bool, every_file: bool) -> None:
    """What is installed, sizes, free space; partial downloads, files the lock does not list, what
    `refresh-models --prune` would remove."""
    from provision.commands.status import format_files, format_status, volume_files, volume_status

    report = volume_status(obj.layout)
    if report["exists"] and not report.get("problem"):  # a corrupt state.json: status says so, and no more
        report["model_files"] = volume_files(obj.layout, obj.lock_path, every_file=every_file)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    click.echo(format_status(report))
    if report.get("model_files"):
        text = format_files(report["model_files"])
        if text:
            click.echo(text)


def _add_regions() -> None:
    from provision.commands.regions import regions

    main.add_command(regions)


_add_regions()

if __name__ == "__main__":  # pragma: no cover
    main()
