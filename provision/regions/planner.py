"""What `regions apply` will do, per datacenter and for the endpoint, from read calls only.

``make_plan`` is the one place that decides: `regions plan` prints it and `regions apply` carries it
out, so the prediction is what apply does (unless RunPod fails it: no capacity, a failed install).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from provision.records.spec import EndpointSpec, RunPodSpec
from provision.regions.record import Record

MOUNT_PATH = "/workspace"  # where a pod mounts the network volume, as on every RunPod pod
POD_PREFIX = "forge-volume-"


def pod_name(run_id: str, datacenter: str) -> str:
    return f"{POD_PREFIX}{run_id}-{datacenter.lower()}"


@dataclass
class DatacenterPlan:
    datacenter: str
    volume: dict[str, Any] | None  # the volume found by name, None when it is to be created
    volume_action: str  # create | grow | keep
    work: str  # install | models | none (what a pod does there)
    why: str
    problem: str | None = None  # a reason nothing can be done here (two volumes of one name)
    notes: list[str] = field(default_factory=list)

    @property
    def needs_pod(self) -> bool:
        return self.problem is None and self.work != "none"

    def action(self) -> str:
        """What apply does here, as one word-ish phrase (what the tests compare with what apply did)."""
        if self.problem:
            return "blocked"
        parts = [{"create": "create volume", "grow": "grow volume"}.get(self.volume_action, "")]
        parts.append({"install": "install", "models": "refresh models"}.get(self.work, ""))
        return " + ".join(p for p in parts if p) or "nothing"

    def line(self, size: int) -> str:
        if self.problem:
            return f"{self.datacenter}: cannot apply: {self.problem}"
        volume = "a new volume" if self.volume is None else f"volume {self.volume['id']} ({self.volume['size']} GB)"
        if self.volume_action == "grow" and self.volume is not None:
            volume += f", grown to {size} GB"
        text = f"{self.datacenter}: {self.action()} on {volume}: {self.why}"
        return text + "".join(f"; {n}" for n in self.notes)

    def as_dict(self) -> dict[str, Any]:
        return {"datacenter": self.datacenter, "volume_id": self.volume["id"] if self.volume else None,
                "volume_action": self.volume_action, "work": self.work, "action": self.action(), "why": self.why,
                "problem": self.problem, "notes": self.notes}


@dataclass
class Plan:
    datacenters: list[DatacenterPlan]
    leftovers: list[dict[str, Any]]  # pods of earlier runs to terminate first
    endpoint: dict[str, Any] | None  # the endpoint found by name
    endpoint_action: str  # create | update | none | blocked
    endpoint_changes: list[str]

    @property
    def changes_anything(self) -> bool:
        return bool(self.leftovers) or self.endpoint_action != "none" or any(
            d.needs_pod or d.volume_action != "keep" for d in self.datacenters)

    def lines(self, spec: RunPodSpec) -> list[str]:
        out = [f"terminate pod {p['id']} ({p['name']}), left running by an earlier apply" for p in self.leftovers]
        out += [d.line(spec.volume_size) for d in self.datacenters]
        name = spec.endpoint.name
        if self.endpoint_action == "create":
            out.append(f"endpoint {name}: create, with the volume of every datacenter once it matches the lock")
        elif self.endpoint_action == "update":
            out.append(f"endpoint {name} ({self.endpoint['id'] if self.endpoint else '?'}): update "
                       f"{', '.join(self.endpoint_changes)}")
        elif self.endpoint_action == "blocked":
            out.append(f"endpoint {name}: cannot apply: {'; '.join(self.endpoint_changes)}")
        else:
            out.append(f"endpoint {name} ({self.endpoint['id'] if self.endpoint else '?'}): nothing to change")
        if any(d.needs_pod for d in self.datacenters):
            out.append("  (a datacenter whose work fails is left out of the endpoint until a re-run brings it "
                       "to the lock)")
        pods = sum(d.needs_pod for d in self.datacenters)
        out.append(f"{pods} pod(s) would run" + (" (each only while it installs)" if pods else
                                                 "; apply would make no change" if not self.changes_anything else ""))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"datacenters": [d.as_dict() for d in self.datacenters],
                "leftover_pods": [{"id": p["id"], "name": p["name"]} for p in self.leftovers],
                "endpoint": {"action": self.endpoint_action, "changes": self.endpoint_changes,
                             "id": self.endpoint["id"] if self.endpoint else None},
                "pods": sum(d.needs_pod for d in self.datacenters)}


def _work(dc: str, volume: dict[str, Any] | None, record: Record, digests: tuple[str, str], version: str,
          check: bool) -> tuple[str, str]:
    if volume is None:
        return "install", "no volume of that name in this datacenter yet: install from nothing"
    if check:
        return "install", "--check: install checks everything against the lock and repairs what differs"
    applied = record.applied.get(dc)
    if applied is None:
        return "install", ("no record of what this volume holds: a pod checks and completes it "
                           "(an install with nothing to do takes seconds)")
    if applied.volume_id != volume["id"]:
        return "install", (f"the record is of volume {applied.volume_id}, not this one: a pod checks and "
                           "completes it")
    if applied.forge_volume != version:
        return "install", f"applied by forge-volume {applied.forge_volume}; this is {version}"
    if applied.lock_digest == digests[0]:
        return "none", f"matches the lock (applied {applied.applied_at}, run {applied.run_id})"
    if applied.base_digest == digests[1]:
        return "models", f"only models changed since {applied.applied_at}: models only, no Forge or venv work"
    return "install", f"Forge, extensions or their settings changed since {applied.applied_at}"


def plan_datacenter(dc: str, spec: RunPodSpec, volumes: list[dict[str, Any]], record: Record,
                    digests: tuple[str, str], version: str, check: bool) -> DatacenterPlan:
    named = [v for v in volumes if v.get("dataCenter") == dc and v.get("name") == spec.volume_name]
    if len(named) > 1:
        ids = ", ".join(str(v.get("id")) for v in named)
        return DatacenterPlan(dc, None, "keep", "none", "", problem=(
            f"{len(named)} volumes are named {spec.volume_name!r} here ({ids}); rename or delete all but one "
            "in RunPod's console (apply never guesses which holds your data)"))
    volume = named[0] if named else None
    work, why = _work(dc, volume, record, digests, version, check)
    notes: list[str] = []
    action = "create" if volume is None else "keep"
    if volume is not None:
        size = int(volume.get("size") or 0)
        if size < spec.volume_size:
            action = "grow"
        elif size > spec.volume_size:
            notes.append(f"kept at {size} GB: the spec says {spec.volume_size} GB, and volumes are never shrunk")
    return DatacenterPlan(dc, volume, action, work, why, notes=notes)


def endpoint_body(spec: EndpointSpec, volumes: dict[str, str]) -> dict[str, Any]:
    """The endpoint apply wants, as a create request: ``volumes`` is datacenter -> volume id."""
    return {
        "name": spec.name, "type": "QUEUE", "image": spec.image, "env": dict(spec.env),
        "gpu": {"pools": list(spec.gpus), "count": 1},
        "workers": {"min": spec.min_workers, "max": spec.workers, "idleTimeout": spec.idle_timeout},
        "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
        # Workers run only where a volume is: each mounts its own datacenter's at /runpod-volume.
        "dataCenterIds": sorted(volumes), "networkVolumes": [volumes[dc] for dc in sorted(volumes)],
        "timeout": spec.execution_timeout * 1000,
    }


def endpoint_update(current: dict[str, Any], wanted: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The PATCH body that makes ``current`` what ``wanted`` says, and one phrase per change."""
    body: dict[str, Any] = {}
    changes: list[str] = []

    def differs(key: str, have: Any, want: Any, what: str) -> None:
        if have != want:
            body[key] = wanted[key]
            changes.append(what)

    differs("image", current.get("image"), wanted["image"], f"image to {wanted['image']}")
    differs("env", current.get("env") or {}, wanted["env"], f"env ({', '.join(sorted(wanted['env'])) or 'none'})")
    gpu = current.get("gpu") or {}
    differs("gpu", (gpu.get("pools"), gpu.get("count", 1)), (wanted["gpu"]["pools"], 1),
            f"GPU pools to {', '.join(wanted['gpu']['pools'])}")
    workers = current.get("workers") or {}
    differs("workers", {k: workers.get(k) for k in ("min", "max", "idleTimeout")}, wanted["workers"],
            "workers {min}..{max}, idle timeout {idleTimeout} s".format(**wanted["workers"]))
    differs("networkVolumes", sorted(current.get("networkVolumes") or []), sorted(wanted["networkVolumes"]),
            f"network volumes to {', '.join(wanted['networkVolumes']) or 'none'}")
    differs("dataCenterIds", sorted(current.get("dataCenterIds") or []), sorted(wanted["dataCenterIds"]),
            f"datacenters to {', '.join(wanted['dataCenterIds']) or 'any'}")
    differs("timeout", current.get("timeout"), wanted["timeout"], f"execution timeout {wanted['timeout'] // 1000} s")
    return body, changes


def make_plan(spec: RunPodSpec, volumes: list[dict[str, Any]], pods: list[dict[str, Any]],
              endpoints: list[dict[str, Any]], record: Record, digests: tuple[str, str], version: str,
              check: bool = False) -> Plan:
    dcs = [plan_datacenter(dc, spec, volumes, record, digests, version, check) for dc in spec.datacenters]
    prefixes = tuple(pod_name(run, "") for run in record.runs)
    leftovers = [p for p in pods if prefixes and str(p.get("name", "")).startswith(prefixes)]
    named = [e for e in endpoints if e.get("name") == spec.endpoint.name]
    if len(named) > 1:
        ids = ", ".join(str(e.get("id")) for e in named)
        return Plan(dcs, leftovers, None, "blocked",
                    [f"{len(named)} endpoints are named {spec.endpoint.name!r} ({ids}); rename or delete all but one"])
    endpoint = named[0] if named else None
    # Assuming every datacenter's work succeeds: those it cannot touch keep what they have.
    volume_ids = {d.datacenter: str(d.volume["id"]) if d.volume else f"<new volume in {d.datacenter}>"
                  for d in dcs if d.problem is None}
    wanted = endpoint_body(spec.endpoint, volume_ids)
    if endpoint is None:
        return Plan(dcs, leftovers, None, "create", ["create"])
    _, changes = endpoint_update(endpoint, wanted)
    return Plan(dcs, leftovers, endpoint, "update" if changes else "none", changes)
