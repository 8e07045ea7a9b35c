"""``forge-volume regions plan | apply | status``: the spec's [runpod] table made real on RunPod."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from provision.progress import Progress, StatusLine

API_URL_HELP = "RunPod's REST API. Default: $RUNPOD_API_URL, else https://api.runpod.io."


def _spec_path(obj: Any) -> Path:
    """--spec, else the volume's spec when there is one, else ./forge-volume.toml (regions runs anywhere)."""
    if getattr(obj, "spec_given", False) or obj.spec_path.exists():
        return Path(obj.spec_path)
    return Path("forge-volume.toml").absolute()


@contextmanager
def _api(api_url: str | None) -> Iterator[Any]:
    from provision.regions.api import ApiSettings, RunPodApi, api_key

    api = RunPodApi(api_key(), ApiSettings.from_env(api_url))
    try:
        yield api
    finally:
        api.close()


class _Lines:
    """One line per datacenter: a status line each on a terminal, prefixed lines otherwise."""

    def __init__(self, progress: Progress, datacenters: tuple[str, ...]) -> None:
        self.progress = progress
        self._lines: dict[str, StatusLine] = {dc: progress.status_line() for dc in datacenters} if progress.bars else {}
        self._lock = threading.Lock()

    def show(self, dc: str, text: str) -> None:
        with self._lock:
            if dc in self._lines:
                self._lines[dc].show(f"{dc}: {text}")
            else:
                self.progress.info(f"{dc}: {text}")

    def close(self) -> None:
        for line in self._lines.values():
            line.close()


@click.group()
def regions() -> None:
    """Keep one identical volume per datacenter for a multi-region serverless endpoint.

    The spec's [runpod] table names the datacenters, the volume, the pod that installs it and the
    endpoint. RUNPOD_API_KEY comes from the environment (never printed or stored). What was applied
    is recorded next to the spec in forge-volume.regions.json.
    """


@regions.command("plan")
@click.option("--check", is_flag=True, help="Plan an install in every datacenter (what apply --check does).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--api-url", default=None, help=API_URL_HELP)
@click.pass_obj
def plan_cmd(obj: Any, check: bool, as_json: bool, api_url: str | None) -> None:
    """Say per datacenter what apply would do and why; changes nothing, starts no pod."""
    from provision.regions.fleet import current_plan, read_inputs
    from provision.regions.record import read_record

    inputs = read_inputs(_spec_path(obj))
    with _api(api_url) as api:
        plan = current_plan(api, inputs, read_record(inputs.record_path), check)
    if as_json:
        click.echo(json.dumps(plan.as_dict(), indent=2))
        return
    for line in plan.lines(inputs.spec):
        click.echo(line)


@regions.command("apply")
@click.option("--check", is_flag=True, help="Run install in every datacenter (it repairs what differs from the "
              "lock), whatever the record says: for volumes changed by hand on a pod.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (exit status as without it).")
@click.option("--api-url", default=None, help=API_URL_HELP)
@click.pass_obj
def apply_cmd(obj: Any, check: bool, as_json: bool, api_url: str | None) -> None:
    """Make every datacenter's volume match the lock, then create or update the endpoint.

    Finds or creates the volume in each datacenter (by name; grown, never shrunk), starts one pod
    where work is needed (CPU by default) that runs install, or refresh-models when only models
    changed, follows them in parallel, terminates each when it ends (also on failure, Ctrl-C and
    SIGTERM), and attaches every volume that matches the lock to the endpoint. Exit 0 only when
    every datacenter matches the lock.
    """
    from provision.regions.fleet import apply, read_inputs

    spec_path = _spec_path(obj)
    progress: Progress = obj.progress
    lines = _Lines(progress, read_inputs(spec_path).spec.datacenters)
    try:
        with _api(api_url) as api:
            report = apply(api, spec_path, show=progress.info, show_dc=lines.show, check=check)
    finally:
        lines.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    if not report.ok:
        failed = ", ".join(report.not_matching) or "the endpoint"
        _fail(f"{failed} {'does' if len(report.not_matching) <= 1 else 'do'} not match the lock "
              f"({len(report.matching)} of {len(report.plan.datacenters)} datacenters do); "
              "re-run `forge-volume regions apply` once the cause above is fixed")


@regions.command("status")
@click.option("--api-url", default=None, help=API_URL_HELP)
@click.pass_obj
def status_cmd(obj: Any, api_url: str | None) -> None:
    """Per datacenter: the volume, whether its recorded state matches the lock, when it was applied.
    Exit 1 when any does not match (or is unknown)."""
    from provision.regions.fleet import status

    with _api(api_url) as api:
        lines, ok = status(api, _spec_path(obj))
    for line in lines:
        click.echo(line)
    if not ok:
        _fail("not every datacenter matches the lock; `forge-volume regions plan` says what apply would do")


@regions.command("pod-run", hidden=True)
def pod_run() -> None:
    """Run on a pod that `regions apply` started: install its volume, print the result line."""
    from provision.commands.regions_pod import main as pod_main

    sys.exit(pod_main())


def _fail(message: str, echo: Callable[..., None] = click.echo) -> None:
    echo(f"error: {message}", err=True)
    sys.exit(1)
