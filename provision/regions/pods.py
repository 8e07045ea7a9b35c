"""One datacenter's work: its volume found, created or grown, one pod that installs it, followed to its
result and always terminated.

A pod runs ``forge-volume regions pod-run`` (``provision.commands.regions_pod``): the spec and the lock
travel in its environment, it installs the volume mounted at /workspace and prints one result line,
``forge-volume-result RUN_ID {json}``, which is read back from the pod's log stream.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from provision import __version__
from provision.errors import ForgeVolumeError, RunPodError
from provision.records.spec import RunPodSpec
from provision.regions.api import ApiStatusError, RunPodApi
from provision.regions.planner import MOUNT_PATH, DatacenterPlan, pod_name

RESULT_MARKER = "forge-volume-result"
POD_COMMAND = "forge-volume regions pod-run"
GONE = ("EXITED", "ERROR", "TERMINATED")


class Cancelled(Exception):
    """Ctrl-C or SIGTERM reached the command: stop following and terminate."""


@dataclass
class Timing:
    poll: float = 5.0  # seconds between looks at a pod
    log_idle: float = 1.0  # a quiet log stream for this long has been read to its end

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Timing:
        """FORGE_REGIONS_POLL: seconds between looks at a pod (5; the tests use less)."""
        try:
            poll = min(60.0, max(0.05, float(env.get("FORGE_REGIONS_POLL", "") or 5.0)))
        except ValueError:
            poll = 5.0
        return cls(poll=poll, log_idle=min(1.0, max(0.2, poll)))


@dataclass
class Outcome:
    datacenter: str
    did: str  # what was done, in the plan's words (DatacenterPlan.action)
    ok: bool
    message: str
    volume_id: str | None = None
    pod_id: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def pack(text: str) -> str:
    """Text for a pod's environment: gzip and base64 (a lock with many models stays small)."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), mtime=0)).decode("ascii")


def pod_body(spec: RunPodSpec, run_id: str, dc: str, volume_id: str, mode: str, spec_text: str,
             lock_text: str) -> dict[str, Any]:
    pod = spec.pod
    env = {**pod.env,
           "FORGE_VOLUME": MOUNT_PATH, "FORGE_VOLUME_RUN": run_id, "FORGE_VOLUME_MODE": mode,
           "FORGE_VOLUME_EXPECT_VERSION": __version__, "FORGE_VOLUME_SPEC_GZ": pack(spec_text),
           "FORGE_VOLUME_LOCK_GZ": pack(lock_text), "FORGE_VOLUME_DEADLINE": str(pod.timeout),
           "PYTHONUNBUFFERED": "1"}
    body: dict[str, Any] = {
        "name": pod_name(run_id, dc), "image": pod.image, "cloud": "SECURE", "dataCenterIds": [dc],
        "disk": pod.disk, "mounts": {"network": [{"volumeId": volume_id, "path": MOUNT_PATH}]},
        "env": env, "args": POD_COMMAND,
    }
    if pod.gpu:
        body["gpu"] = {"id": pod.gpu, "count": 1}
    else:
        body["cpu"] = {"id": pod.cpu or "cpu3c", "vcpuCount": pod.vcpus}
    return body


def parse_result(line: str, run_id: str) -> dict[str, Any] | None:
    """The pod's result line for this run, checked (anything else in a log is just text)."""
    prefix = f"{RESULT_MARKER} {run_id} "
    if not line.startswith(prefix):
        return None
    try:
        data = json.loads(line[len(prefix):])
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return None
    return data


class DatacenterRun:
    """Carries out one datacenter's plan; ``run`` never raises for a RunPod failure: it returns it."""

    def __init__(self, api: RunPodApi, spec: RunPodSpec, plan: DatacenterPlan, run_id: str, spec_text: str,
                 lock_text: str, lock_digest: str, stop: threading.Event, timing: Timing,
                 show: Callable[[str, str], None]) -> None:
        self.api, self.spec, self.plan, self.run_id = api, spec, plan, run_id
        self.spec_text, self.lock_text, self.lock_digest = spec_text, lock_text, lock_digest
        self.stop, self.timing, self.show = stop, timing, show
        self.pod_id: str | None = None
        self.last_lines: list[str] = []

    def run(self) -> Outcome:
        started = time.monotonic()
        dc = self.plan.datacenter
        outcome = Outcome(dc, self.plan.action(), ok=False, message="")
        try:
            volume_id = self._volume()
            outcome.volume_id = volume_id
            if self.plan.work == "none":
                outcome.ok, outcome.message = True, "volume grown; it already matched the lock"
            else:
                result = self._pod(volume_id)
                outcome.pod_id, outcome.result = self.pod_id, result
                outcome.ok = bool(result.get("ok")) and result.get("lock_digest") == self.lock_digest
                outcome.message = (str(result.get("summary") or "done") if outcome.ok else
                                   str(result.get("error") or "the pod reported another lock than this one"))
        except Cancelled:
            outcome.message = "stopped (Ctrl-C or SIGTERM)"
        except ForgeVolumeError as exc:
            outcome.message = exc.one_line()
        except Exception as exc:  # a bug or an answer of an unexpected shape: this datacenter fails, the rest go on
            outcome.message = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            self._terminate()
        outcome.pod_id = outcome.pod_id or self.pod_id
        outcome.seconds = time.monotonic() - started
        return outcome

    def _volume(self) -> str:
        plan, spec = self.plan, self.spec
        if plan.volume is None:
            self.show(plan.datacenter, f"creating volume {spec.volume_name} ({spec.volume_size} GB)")
            volume = self._create_once(
                lambda: self.api.create_volume(spec.volume_name, spec.volume_size, plan.datacenter),
                lambda: next((v for v in self.api.volumes() if v.get("dataCenter") == plan.datacenter
                              and v.get("name") == spec.volume_name), None))
            return str(volume["id"])
        volume_id = str(plan.volume["id"])
        if plan.volume_action == "grow":
            self.show(plan.datacenter, f"growing volume {volume_id} to {spec.volume_size} GB")
            self.api.grow_volume(volume_id, spec.volume_size)
        return volume_id

    def _create_once(self, create: Callable[[], dict[str, Any]],
                     find: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """POST is not retried on 5xx by the client: the thing may exist. Look for it, then try again."""
        for attempt in range(3):
            self._check_stop()
            try:
                return create()
            except ApiStatusError as exc:
                if exc.status < 500 or attempt == 2:
                    raise
                found = find()
                if found is not None:
                    return found
                self.stop.wait(2 ** attempt)
        raise AssertionError("unreachable")

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Cancelled()

    def _pod(self, volume_id: str) -> dict[str, Any]:
        dc = self.plan.datacenter
        mode = "models" if self.plan.work == "models" else "install"
        body = pod_body(self.spec, self.run_id, dc, volume_id, mode, self.spec_text, self.lock_text)
        self.show(dc, f"starting a pod ({'refresh models' if mode == 'models' else 'install'})")
        try:
            pod = self._create_once(lambda: self.api.create_pod(body),
                                    lambda: next((p for p in self.api.pods() if p.get("name") == body["name"]), None))
        except ApiStatusError as exc:
            if exc.status == 400:  # RunPod's answer when a datacenter has no capacity (no machine-readable code)
                raise RunPodError(f"no pod could start in {dc}: {exc.detail}",
                                  "re-run `forge-volume regions apply` later (the other datacenters are done), "
                                  "or set [runpod.pod] cpu/gpu to a type this datacenter has") from None
            raise
        self.pod_id = str(pod["id"])
        self.show(dc, f"pod {self.pod_id} {pod.get('status', '')}".strip())
        deadline = time.monotonic() + self.spec.pod.timeout
        cursor: str | None = None
        status = ""
        while True:
            self._check_stop()
            for event_id, line in self.api.pod_log_events(self.pod_id, cursor, self.timing.log_idle):
                cursor = event_id or cursor
                result = parse_result(line, self.run_id)
                if result is not None:
                    return result
                self._saw(line)
            current = self.api.pod(self.pod_id)
            if current is None or current.get("status") in GONE:
                state = "gone" if current is None else current.get("status")
                tail = f"; its last lines: {' | '.join(self.last_lines[-3:])}" if self.last_lines else ""
                raise RunPodError(f"the pod {self.pod_id} in {dc} ended ({state}) without a result{tail}",
                                  "see the pod's log in RunPod's console, then re-run apply")
            if current.get("status") != status:
                status = str(current.get("status"))
                self.show(dc, f"pod {self.pod_id} {status}")
            if time.monotonic() > deadline:
                raise RunPodError(f"the pod {self.pod_id} in {dc} did not finish within [runpod.pod] timeout = "
                                  f"{self.spec.pod.timeout} s"
                                  + (f"; its last line: {self.last_lines[-1]}" if self.last_lines else ""),
                                  "raise the timeout, or look at the pod's log in RunPod's console; re-run apply")
            if self.stop.wait(self.timing.poll):
                raise Cancelled()

    def _saw(self, line: str) -> None:
        text = " ".join(line.split())
        if text:
            self.last_lines = [*self.last_lines[-9:], text[:300]]
            self.show(self.plan.datacenter, text)

    def _terminate(self) -> None:
        """Terminate this datacenter's pod, whatever happened; retried, since a pod left running bills."""
        if self.pod_id is None:
            return
        for attempt in range(5):
            try:
                self.api.terminate_pod(self.pod_id)
                self.show(self.plan.datacenter, f"pod {self.pod_id} terminated")
                return
            except RunPodError as exc:
                self.show(self.plan.datacenter, f"terminating pod {self.pod_id} failed ({exc.message}); retrying")
                time.sleep(min(2 ** attempt, 10))
