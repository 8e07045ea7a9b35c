"""The ``forge-volume`` command line: thin commands over the provisioning library.

Each command checks its arguments, calls one library function and prints what it returns.
Library errors (``ForgeVolumeError``) become one line and exit 1 here, once; usage errors exit 2.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from provision import __version__
from provision.errors import ForgeVolumeError
from provision.progress import Progress
from volume_layout import VolumeLayout, provisioning_volume


@dataclass
class Context:
    layout: VolumeLayout
    spec_path: Path
    progress: Progress
    debug: bool

    @property
    def lock_path(self) -> Path:
        from provision.lockfile import lock_path_for

        return lock_path_for(self.spec_path)


class Group(click.Group):
    """Turns library errors into ``error: <cause> (<hint>)`` and exit 1; a traceback only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ForgeVolumeError as exc:
            _fail(ctx, exc.one_line(), exc)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail(ctx, "interrupted; re-run the same command to resume", None)
        except Exception as exc:
            _fail(ctx, f"unexpected {type(exc).__name__}: {exc} (re-run with --debug for the traceback)", exc)


def _fail(ctx: click.Context, message: str, exc: BaseException | None) -> NoReturn:
    obj = ctx.find_object(Context)
    if exc is not None and obj is not None and obj.debug:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {message}", err=True)
    ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--volume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The volume's mount point. Default: $FORGE_VOLUME, else /workspace.")
@click.option("--spec", "spec", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The spec file. Default: forge-volume.toml on the volume. The lock sits next to it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or step lines; errors only.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.version_option(__version__, prog_name="forge-volume")
@click.pass_context
def main(ctx: click.Context, volume: Path | None, spec: Path | None, quiet: bool, debug: bool) -> None:
    """Provision Stable Diffusion WebUI Forge onto a RunPod network volume.

    Typical use on a pod with the volume at /workspace:
    init --preset sdxl, edit the spec, lock, install; later refresh-models.
    """
    layout = VolumeLayout((volume or provisioning_volume()).absolute())
    ctx.obj = Context(layout=layout, spec_path=(spec or layout.spec).absolute(),
                      progress=Progress(quiet=quiet), debug=debug)


pass_ctx = click.make_pass_decorator(Context)


@main.command()
@click.option("--preset", type=click.Choice(["minimal", "sdxl", "seed"]), default="sdxl", show_default=True,
              help="Which bundled spec to start from.")
@click.option("--force", is_flag=True, help="Overwrite an existing spec file.")
@pass_ctx
def init(obj: Context, preset: str, force: bool) -> None:
    """Write a spec file to edit (forge-volume.toml on the volume, or --spec)."""
    from provision.spec import preset_text

    if obj.spec_path.exists() and not force:
        raise click.ClickException(f"{obj.spec_path} already exists; edit it, or pass --force to overwrite it")
    obj.spec_path.parent.mkdir(parents=True, exist_ok=True)
    obj.spec_path.write_text(preset_text(preset), encoding="utf-8")
    click.echo(f"wrote {obj.spec_path} (preset {preset}); edit it, then run `forge-volume lock`")


@main.command()
@pass_ctx
def lock(obj: Context) -> None:
    """Resolve the spec into the lock: git refs to commits, models to revisions, sha256 and sizes."""
    from provision.lockfile import write_lock
    from provision.resolve import lock_spec
    from provision.spec import load_spec

    result = lock_spec(load_spec(obj.spec_path), obj.progress)
    write_lock(obj.lock_path, result)
    click.echo(f"wrote {obj.lock_path}: Forge {result.forge.commit[:12]}, "
               f"{len(result.extensions)} extension(s), {len(result.models)} model(s)")


@main.command()
@pass_ctx
def plan(obj: Context) -> None:
    """Print what `install` would change. Writes nothing; works offline once a lock exists."""
    from provision.plan import make_plan

    result = make_plan(obj.layout, obj.spec_path)
    for line in result.lines():
        click.echo(line)


@main.command()
@click.option("--wait", is_flag=True, help="If another install holds the volume, wait for it instead of refusing.")
@pass_ctx
def install(obj: Context, wait: bool) -> None:
    """Make the volume match the lock (writing the lock first if there is none). Idempotent and resumable."""
    from provision.install import install as run_install

    report = run_install(obj.layout, obj.spec_path, progress=obj.progress, wait=wait)
    click.echo(report.summary())


@main.command("refresh-models")
@click.option("--prune", is_flag=True, help="Also delete model files under models/ that the lock does not list.")
@click.option("--dry-run", is_flag=True, help="Only print what would be fetched, repaired or pruned.")
@pass_ctx
def refresh_models(obj: Context, prune: bool, dry_run: bool) -> None:
    """Models only: fetch what is missing, repair what fails its checksum, optionally prune."""
    from provision.models import refresh_models as run_refresh

    report = run_refresh(obj.layout, obj.lock_path, prune=prune, dry_run=dry_run, progress=obj.progress)
    click.echo(report.summary())


@main.command()
@click.option("--deep", is_flag=True, help="Re-hash every model file instead of trusting recorded size and mtime; "
              "a file that fails is forgotten in state.json, so refresh-models repairs it.")
@pass_ctx
def verify(obj: Context, deep: bool) -> None:
    """Check the volume against the lock; exit 1 and list every problem."""
    from provision.verify import verify_volume

    problems = verify_volume(obj.layout, obj.lock_path, deep=deep, progress=obj.progress)
    if problems:
        for problem in problems:
            click.echo(problem)
        click.echo(f"error: {len(problems)} problem(s); run `forge-volume install` "
                   "(or `refresh-models` for models) to repair", err=True)
        sys.exit(1)
    click.echo("ok: the volume matches the lock")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@pass_ctx
def status(obj: Context, as_json: bool) -> None:
    """What is installed, sizes, free space."""
    from provision.status import format_status, volume_status

    report = volume_status(obj.layout)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_status(report))


if __name__ == "__main__":  # pragma: no cover
    main()
