"""`regions plan | apply | status`: one lock made into identical volumes in every datacenter the spec
names, attached to one serverless endpoint.

``apply`` reads (volumes, pods, endpoints), plans (``planner.make_plan``), terminates pods an earlier
run left, then works on every datacenter that needs it in parallel (``pods.DatacenterRun``), records
what each pod applied, creates or updates the endpoint with the volumes that match the lock, and
finally sweeps: every pod named with this run's id is terminated, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision import __version__
from provision.errors import ForgeVolumeError, LockError, SpecError
from provision.records.lockfile import check_matches, lock_from_json, lock_path_for
from provision.records.spec import RunPodSpec, load_spec
from provision.regions.api import RunPodApi
from provision.regions.planner import Plan, endpoint_body, endpoint_update, make_plan, pod_name
from provision.regions.pods import DatacenterRun, Outcome, Timing
from provision.regions.record import Applied, Record, hold_record, lock_digests, now, read_record, record_path_for


@dataclass
class Inputs:
    spec: RunPodSpec
    spec_text: str
    lock_text: str
    digests: tuple[str, str]
    record_path: Path


def read_inputs(spec_path: Path) -> Inputs:
    """The spec's [runpod] table and the lock, which must match the spec and pin every model's sha256
    (each datacenter must get the same bytes: nothing may be pinned at a first download there)."""
    spec = load_spec(spec_path)
    if spec.runpod is None:
        raise SpecError(f"{spec_path} has no [runpod] table", "add one naming the datacenters, the volume and the "
                        "endpoint (README: Multi-region endpoints)")
    lock_path = lock_path_for(spec_path)
    try:
        lock_text = lock_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(f"{lock_path} does not exist", "run `forge-volume --spec "
                        f"{spec_path} lock` first: every datacenter installs exactly that lock") from None
    lock = lock_from_json(lock_text, lock_path)
    check_matches(spec, lock, lock_path)
    unpinned = [m.path for m in lock.models if not m.sha256]
    if unpinned:
        raise LockError(f"{lock_path} has no sha256 for {', '.join(unpinned)}, so each datacenter could get "
                        "other bytes", "add `sha256 = \"...\"` to those [[models]] entries and run "
                        "`forge-volume lock`")
    return Inputs(spec.runpod, spec_path.read_text(encoding="utf-8"), lock_text, lock_digests(lock_text),
                  record_path_for(spec_path))


def current_plan(api: RunPodApi, inputs: Inputs, record: Record, check: bool = False) -> Plan:
    """The plan from read calls only: volumes, pods, endpoints."""
    return make_plan(inputs.spec, api.volumes(), api.pods(), api.endpoints(), record, inputs.digests, __version__,
                     check)


@dataclass
class ApplyReport:
    plan: Plan
    outcomes: list[Outcome] = field(default_factory=list)
    endpoint_line: str = ""
    endpoint_did: str = "none"  # create | update | none | skipped (in the plan's words)
    endpoint_ok: bool = True
    terminated_leftovers: list[str] = field(default_factory=list)
    matching: list[str] = field(default_factory=list)  # datacenters whose volume matches the lock now
    not_matching: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.not_matching and self.endpoint_ok

    def lines(self) -> list[str]:
        out = [f"terminated pod {p} left running by an earlier apply" for p in self.terminated_leftovers]
        done = {o.datacenter: o for o in self.outcomes}
        for d in self.plan.datacenters:
            o = done.get(d.datacenter)
            if o is None:
                out.append(d.line(0) if d.problem else f"{d.datacenter}: nothing to do ({d.why})")
            elif o.ok:
                out.append(f"{d.datacenter}: {o.did}: done in {o.seconds:.0f} s on volume {o.volume_id}: {o.message}")
            else:
                out.append(f"{d.datacenter}: {o.did}: FAILED: {o.message}")
        out.append(self.endpoint_line)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "plan": self.plan.as_dict(), "terminated_leftovers": self.terminated_leftovers,
                "done": [{"datacenter": o.datacenter, "action": o.did, "ok": o.ok, "message": o.message,
                          "volume_id": o.volume_id, "pod_id": o.pod_id, "result": o.result} for o in self.outcomes],
                "endpoint": self.endpoint_line, "endpoint_action": self.endpoint_did,
                "matching": self.matching, "not_matching": self.not_matching}


def new_run_id() -> str:
    return time.strftime("%m%d%H%M", time.gmtime()) + secrets.token_hex(3)


@contextlib.contextmanager
def _signals_wait_for(cleanup_note: Callable[[], None]) -> Iterator[None]:
    """While pods are being terminated, a second Ctrl-C or SIGTERM only says so: stopping half way would
    leave pods billing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def note(signum: int, frame: object) -> None:
        cleanup_note()

    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, note) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def apply(api: RunPodApi, spec_path: Path, *, show: Callable[[str], None], show_dc: Callable[[str, str], None],
          check: bool = False) -> ApplyReport:
    started = time.monotonic()
    inputs = read_inputs(spec_path)
    with hold_record(inputs.record_path):
        record = read_record(inputs.record_path)
        plan = current_plan(api, inputs, record, check)
        report = ApplyReport(plan)
        _terminate_leftovers(api, plan, record, report, show)
        todo = [d for d in plan.datacenters if d.problem is None and (d.needs_pod or d.volume_action != "keep")]
        run_id = new_run_id()
        stop = threading.Event()
        if any(d.needs_pod for d in todo):
            record.runs[run_id] = now()  # before the first pod exists: a crash after it leaves a trail
            record.save()
        try:
            if todo:
                runs = [DatacenterRun(api, inputs.spec, d, run_id, inputs.spec_text, inputs.lock_text,
                                      inputs.digests[0], stop, Timing.from_env(dict(os.environ)), show_dc)
                        for d in todo]
                pool = ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="datacenter")
                futures = [pool.submit(r.run) for r in runs]
                try:
                    for future in futures:
                        while True:  # waits in short slices, so Ctrl-C and SIGTERM reach this thread
                            with contextlib.suppress(FutureTimeout):
                                report.outcomes.append(future.result(timeout=0.2))
                                break
                finally:
                    stop.set()
                    with _signals_wait_for(lambda: show("still terminating pods; they would go on billing")):
                        pool.shutdown(wait=True)
                        report.outcomes = [f.result() for f in futures if f.done() and not f.cancelled()]
            _remember(record, report, inputs, run_id)
        finally:
            stop.set()
            if run_id in record.runs:
                with _signals_wait_for(lambda: show("still terminating pods; they would go on billing")):
                    if _sweep(api, run_id, show):
                        record.runs.pop(run_id, None)
                    record.save()
        _endpoint(api, inputs, plan, record, report, show)
    report.seconds = time.monotonic() - started
    return report


def _terminate_leftovers(api: RunPodApi, plan: Plan, record: Record, report: ApplyReport,
                         show: Callable[[str], None]) -> None:
    for pod in plan.leftovers:
        show(f"terminating pod {pod['id']} ({pod['name']}), left running by an earlier apply")
        api.terminate_pod(str(pod["id"]))
        report.terminated_leftovers.append(str(pod["id"]))
    if record.runs:
        alive = [p for p in (api.pods() if plan.leftovers else [])
                 if str(p.get("name", "")).startswith(tuple(pod_name(r, "") for r in record.runs))]
        if not alive:
            record.runs.clear()
            record.save()


def _sweep(api: RunPodApi, run_id: str, show: Callable[[str], None]) -> bool:
    """Terminate every pod named with this run's id (one whose create answered 5xx, one a crash left);
    True when none is left."""
    try:
        for pod in api.pods():
            if str(pod.get("name", "")).startswith(pod_name(run_id, "")) and pod.get("status") != "TERMINATED":
                show(f"terminating pod {pod['id']} ({pod['name']})")
                api.terminate_pod(str(pod["id"]))
        return not [p for p in api.pods() if str(p.get("name", "")).startswith(pod_name(run_id, ""))]
    except ForgeVolumeError as exc:
        show(f"warning: could not check that every pod of run {run_id} is terminated ({exc.message}); "
             "the next apply terminates any that is left")
        return False


def _remember(record: Record, report: ApplyReport, inputs: Inputs, run_id: str) -> None:
    """What each pod applied, from its result; a failed datacenter keeps its earlier record."""
    changed = False
    for outcome in report.outcomes:
        if outcome.ok and outcome.volume_id and outcome.result:
            result = outcome.result
            record.applied[outcome.datacenter] = Applied(
                volume_id=outcome.volume_id, lock_digest=inputs.digests[0], base_digest=inputs.digests[1],
                forge_volume=str(result.get("forge_volume") or __version__), applied_at=now(), run_id=run_id,
                mode=str(result.get("mode") or ""), volume_state=dict(result.get("state") or {}))
            changed = True
    if changed:
        record.save()
    done = {o.datacenter: o for o in report.outcomes}
    for d in report.plan.datacenters:
        o = done.get(d.datacenter)
        applied = record.applied.get(d.datacenter)
        volume_id = o.volume_id if o else (d.volume["id"] if d.volume else None)
        matches = applied is not None and applied.volume_id == volume_id and applied.lock_digest == inputs.digests[0]
        if o is not None and not o.ok:
            matches = False
        (report.matching if matches else report.not_matching).append(d.datacenter)


def _endpoint(api: RunPodApi, inputs: Inputs, plan: Plan, record: Record, report: ApplyReport,
              show: Callable[[str], None]) -> None:
    """The endpoint with every volume that matches the lock (a volume that does not would serve other
    images, or none)."""
    name = inputs.spec.endpoint.name
    if plan.endpoint_action == "blocked":
        report.endpoint_ok, report.endpoint_did = False, "blocked"
        report.endpoint_line = f"endpoint {name}: not changed: {plan.endpoint_changes[0]}"
        return
    volumes = {dc: record.applied[dc].volume_id for dc in report.matching}
    missing = [dc for dc in inputs.spec.datacenters if dc not in volumes]
    tail = f"; not attached (not at the lock): {', '.join(missing)}" if missing else ""
    if not volumes:
        report.endpoint_ok, report.endpoint_did = False, "skipped"
        report.endpoint_line = f"endpoint {name}: not created or changed: no volume matches the lock yet"
        return
    wanted = endpoint_body(inputs.spec.endpoint, volumes)
    current = plan.endpoint
    if current is None:
        show(f"creating endpoint {name}")
        made = api.create_endpoint(wanted)
        report.endpoint_did = "create"
        report.endpoint_line = f"endpoint {name}: created ({made.get('id')}) with {len(volumes)} volume(s){tail}"
        return
    body, changes = endpoint_update(current, wanted)
    if not body:
        report.endpoint_line = f"endpoint {name} ({current['id']}): up to date, {len(volumes)} volume(s){tail}"
        return
    show(f"updating endpoint {name}: {', '.join(changes)}")
    api.update_endpoint(str(current["id"]), body)
    report.endpoint_did = "update"
    report.endpoint_line = f"endpoint {name} ({current['id']}): updated {', '.join(changes)}{tail}"


def status(api: RunPodApi, spec_path: Path) -> tuple[list[str], bool]:
    """Per datacenter: the volume, whether its recorded state matches the lock, when it was applied."""
    inputs = read_inputs(spec_path)
    record = read_record(inputs.record_path)
    plan = current_plan(api, inputs, record)
    lines: list[str] = []
    ok = True
    for d in plan.datacenters:
        applied = record.applied.get(d.datacenter)
        if d.problem:
            lines.append(f"{d.datacenter}: {d.problem}")
            ok = False
            continue
        if d.volume is None:
            lines.append(f"{d.datacenter}: no volume named {inputs.spec.volume_name!r} yet (apply creates it)")
            ok = False
            continue
        volume = f"volume {d.volume['id']} ({d.volume['size']} GB)"
        if d.work == "none":
            state = applied.volume_state if applied else {}
            when = f"applied {applied.applied_at} by run {applied.run_id}" if applied else "applied"
            forge = str(state.get("forge_commit", "?"))[:12]
            lines.append(f"{d.datacenter}: {volume}: matches the lock ({when}; Forge {forge}, "
                         f"{state.get('models', '?')} model file(s))")
        elif applied is None or applied.volume_id != d.volume["id"]:
            lines.append(f"{d.datacenter}: {volume}: unknown: no record of what it holds; RunPod shows a volume's "
                         "files only to a pod, so `regions apply` checks it with one")
            ok = False
        else:
            lines.append(f"{d.datacenter}: {volume}: differs from the lock: {d.why} (apply: {d.action()})")
            ok = False
        ok = ok and d.volume_action != "grow"
    lines.append(_endpoint_status(plan, inputs, record))
    ok = ok and plan.endpoint_action == "none"
    if record.runs:
        lines.append(f"runs that may have left pods: {', '.join(record.runs)} (apply terminates their pods)")
    return lines, ok


def _endpoint_status(plan: Plan, inputs: Inputs, record: Record) -> str:
    name = inputs.spec.endpoint.name
    if plan.endpoint is None:
        return f"endpoint {name}: does not exist yet"
    attached = set(plan.endpoint.get("networkVolumes") or [])
    by_volume = {a.volume_id: dc for dc, a in record.applied.items()}
    names = sorted(by_volume.get(v, v) for v in attached)
    text = f"endpoint {plan.endpoint['id']} ({name}): volumes of {', '.join(names) or 'no datacenter'}"
    return text + (f"; apply would update {', '.join(plan.endpoint_changes)}" if plan.endpoint_changes else "")


