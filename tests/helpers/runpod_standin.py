"""A loopback stand-in for the part of RunPod's REST API v2 that `forge-volume regions` uses.

Shaped by RunPod's OpenAPI document (``tests/data/runpod/openapi-v2-subset.json``: the paths used and
the schemas they reference): the same paths, the same fields, problem+json errors; every request body
is validated against the document's request schema (422 with ``errors`` as RunPod answers) and every
answer against its response schema (a mismatch is a bug of the stand-in, kept in ``schema_errors``).

- Network volumes are folders, ``ROOT/volumes/<datacenter>/<id>``.
- A pod runs its start command (``args``) as a local process in its own session, with a path mapping
  for its network volume: in ``args`` and in every env value, the mount path (``/workspace``) becomes
  the volume's folder. Its stdout is the pod's container log (``GET /v2/pods/{id}/logs``, Server-Sent
  Events with ``id:`` cursors and ``Last-Event-ID``). Terminating kills its process group and deletes
  the pod (as RunPod does: gone from the list, 404 after).
- Faults: ``no_capacity`` (datacenters where a pod create answers 400, as RunPod does), ``hang`` (a pod
  prints a line and never finishes), ``fail_next`` (statuses for the next requests: 429 with
  ``Retry-After: 0``, 500...), ``delay`` (seconds before every answer).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).resolve().parent.parent / "data" / "runpod" / "openapi-v2-subset.json"
_DOC = json.loads(DOCUMENT.read_text(encoding="utf-8"))
_REGISTRY = Registry().with_resource("urn:runpod", Resource.from_contents(_DOC, default_specification=DRAFT202012))
NO_CAPACITY = ("There are no longer any instances available with the requested specifications. "
               "Please refresh and try again.")


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"urn:runpod#/components/schemas/{name}"}, registry=_REGISTRY)


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class StandInPod:
    data: dict[str, Any]
    folder: Path
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: list[tuple[int, str, str]] = field(default_factory=list)  # (sequence, ts, line)

    @property
    def id(self) -> str:
        return str(self.data["id"])


class RunPodStandIn:
    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key = root, key
        self.volumes: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, StandInPod] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, faults included
        self.pod_calls: list[tuple[str, str]] = []  # (method, path) of requests made with a pod's own key
        self.pod_bodies: list[dict[str, Any]] = []  # every create-pod body, as sent
        self.terminated: list[str] = []
        self.schema_errors: list[str] = []
        self.no_capacity: set[str] = set()
        self.hang = False
        self.fail_next: list[int] = []
        self.delay = 0.0
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # a client gone
        self._server.standin = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # --- life ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> RunPodStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for pod in list(self.pods.values()):
            self._kill(pod)
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> RunPodStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests look at ----------------------------------------------------------------------
    def folder(self, volume_id: str) -> Path:
        return self.root / "volumes" / self.volumes[volume_id]["dataCenter"] / volume_id

    def running_processes(self) -> list[str]:
        return [p.id for p in self.pods.values() if p.proc is not None and p.proc.poll() is None]

    def mutating_requests(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "GET"]

    def logs_text(self) -> str:
        return "\n".join(line for pod in self.pods.values() for _, _, line in pod.log)

    def state(self) -> dict[str, Any]:
        """Volumes and endpoints (no pods): what ``clone`` carries over."""
        return {"volumes": self.volumes, "endpoints": self.endpoints}

    def pod_key(self, pod_id: str) -> str:
        return f"pod-scoped-{pod_id}"

    def authorised(self, header: str | None, method: str, path: str) -> str | None:
        """Who is calling: "user" (the account's key), "pod" (a pod's own key, on that pod only), or None."""
        if header == f"Bearer {self.key}":
            return "user"
        m = re.fullmatch(r"/v2/pods/([^/]+)(/action)?", path)
        if m and header == f"Bearer {self.pod_key(m.group(1))}" and method in ("GET", "POST", "DELETE"):
            return "pod"
        return None

    # --- pods ------------------------------------------------------------------------------------
    def _launch(self, pod: StandInPod) -> None:
        time.sleep(0.05)  # PROVISIONING, briefly
        with self._lock:
            if pod.id not in self.pods:
                return
            pod.folder.mkdir(parents=True, exist_ok=True)
            pod.proc = subprocess.Popen(pod.argv, env=pod.env, cwd=pod.folder.parent, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            pod.data.update(status="RUNNING", actions=["stop", "restart", "terminate"], startedAt=_stamp(),
                            runtime={"uptime": 0, "ports": []})
        assert pod.proc.stdout is not None
        for raw in pod.proc.stdout:
            pod.log.append((next(self._seq), _stamp(), raw.decode("utf-8", "replace").rstrip("\n")))
        pod.proc.wait()
        with self._lock:
            if pod.id in self.pods:
                pod.data.update(status="EXITED", actions=["start", "terminate"], runtime=None, cost=0.0)

    def _kill(self, pod: StandInPod) -> None:
        if pod.proc is not None and pod.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pod.proc.pid, signal.SIGKILL)
            pod.proc.wait(10)

    def create_pod(self, body: dict[str, Any]) -> tuple[int, Any]:
        if ("gpu" in body) == ("cpu" in body):
            return 400, _problem(400, "exactly one of gpu or cpu must be set")
        networks = (body.get("mounts") or {}).get("network") or []
        dcs = body.get("dataCenterIds") or []
        if not networks:
            return 400, _problem(400, "this stand-in only runs pods with a network volume")
        volume = self.volumes.get(networks[0]["volumeId"])
        if volume is None:
            return 400, _problem(400, f"network volume {networks[0]['volumeId']} not found")
        if dcs and volume["dataCenter"] not in dcs:
            return 400, _problem(400, "the network volume is in another data center than the pod")
        if volume["dataCenter"] in self.no_capacity:
            return 400, _problem(400, NO_CAPACITY)
        mount, folder = networks[0]["path"], self.folder(volume["id"])

        def mapped(text: str) -> str:
            return str(folder) + text[len(mount):] if text == mount or text.startswith(mount + "/") else text

        # The "image's" environment is this test's, minus the caller's key (RunPod gives a pod its own).
        base = {k: v for k, v in os.environ.items() if k != "RUNPOD_API_KEY"}
        env = {**base, **{k: mapped(v) for k, v in (body.get("env") or {}).items()}}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the "image": this venv
        argv = [mapped(a) for a in shlex.split(body.get("args") or "")]
        if self.hang:
            argv = [sys.executable, "-c", "import time; print('==> installing (the stand-in pod hangs here)', "
                    "flush=True); time.sleep(3600)"]
        pod_id = secrets.token_hex(5)
        # As RunPod does: every pod gets its id and a key scoped to itself.
        env.update(RUNPOD_POD_ID=pod_id, RUNPOD_API_KEY=self.pod_key(pod_id), RUNPOD_API_URL=self.url)
        data = {
            "id": pod_id, "name": body["name"], "image": body.get("image", ""), "args": body.get("args", ""),
            "disk": body.get("disk", 20), "ports": body.get("ports", []), "env": body.get("env", {}),
            "registry": None, "status": "PROVISIONING", "actions": ["stop", "terminate"], "mounts": body["mounts"],
            "cloud": body.get("cloud", "SECURE"), "dataCenterId": volume["dataCenter"], "cudaVersion": None,
            "ssh": {"proxy": None, "direct": None}, "template": None, "cost": 0.06, "locked": False,
            "globalNetworking": {"enabled": False}, "runtime": None, "createdAt": _stamp(), "startedAt": None,
        }
        if "cpu" in body:
            data["cpu"] = {**body["cpu"], "memory": 2 * int(body["cpu"]["vcpuCount"])}
        else:
            data["gpu"] = {"id": body["gpu"]["id"], "count": body["gpu"].get("count", 1)}
        pod = StandInPod(data, folder, argv, env)
        self.pods[pod_id] = pod
        self.pod_bodies.append(body)
        threading.Thread(target=self._launch, args=(pod,), daemon=True).start()
        return 201, data

    def terminate(self, pod_id: str) -> tuple[int, Any]:
        pod = self.pods.pop(pod_id, None)
        if pod is None:
            return 404, _problem(404, "pod not found")
        self._kill(pod)
        self.terminated.append(pod_id)
        return 204, None

    # --- requests ----------------------------------------------------------------------------------
    def answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any, str | None]:
        """(status, JSON body, name of the response schema to check it against)."""
        with self._lock:
            return self._route(method, path, query, body)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any, str | None]:
        m = re.fullmatch(r"/v2/(network-volumes|pods|serverless)(?:/([^/]+))?(?:/(action|logs))?", path)
        if not m:
            return 404, _problem(404, "resource not found"), None
        kind, item, sub = m.groups()
        if kind == "network-volumes":
            return self._volumes(method, item, body)
        if kind == "serverless":
            return self._endpoints(method, item, body)
        if item is None:
            if method == "GET":
                return 200, {"pods": [p.data for p in self.pods.values()]}, "ListPodsResponse"
            if method == "POST":
                errors = _invalid("CreatePodRequest", body)
                if errors:
                    return 422, _problem(422, "Request validation failed.", errors), None
                status, data = self.create_pod(body)
                return status, data, "Pod" if status == 201 else None
        elif sub == "action" and method == "POST":
            errors = _invalid("PodActionRequest", body)
            if errors:
                return 422, _problem(422, "Request validation failed.", errors), None
            if body["action"] != "terminate":
                return 409, _problem(409, "this stand-in only terminates pods"), None
            status, data = self.terminate(item)
            return status, data, None
        elif sub is None and method == "DELETE":
            status, data = self.terminate(item)
            return status, data, None
        elif sub is None and method == "GET":
            pod = self.pods.get(item)
            return (200, pod.data, "Pod") if pod else (404, _problem(404, "pod not found"), None)
        return 405, _problem(405, "The requested method is not allowed for this path."), None

    def _volumes(self, method: str, item: str | None, body: Any) -> tuple[int, Any, str | None]:
        if item is None and method == "GET":
            return 200, {"networkVolumes": list(self.volumes.values())}, "ListNetworkVolumesResponse"
        if item is None and method == "POST":
            errors = _invalid("CreateNetworkVolumeRequest", body)
            if errors:
                return 422, _problem(422, "Request validation failed.", errors), None
            volume = {"id": secrets.token_hex(5), "name": body["name"], "size": body["size"],
                      "dataCenter": body["dataCenter"], "type": body.get("type", "STANDARD")}
            self.volumes[volume["id"]] = volume
            self.folder(volume["id"]).mkdir(parents=True)
            return 201, volume, "NetworkVolume"
        volume = self.volumes.get(item or "")
        if volume is None:
            return 404, _problem(404, "network volume not found"), None
        if method == "GET":
            return 200, volume, "NetworkVolume"
        if method == "PATCH":
            errors = _invalid("UpdateNetworkVolumeRequest", body)
            if errors:
                return 422, _problem(422, "Request validation failed.", errors), None
            if body.get("size", volume["size"]) < volume["size"]:
                return 400, _problem(400, "network volume size cannot be decreased"), None
            volume.update(body)
            return 200, volume, "NetworkVolume"
        return 405, _problem(405, "The requested method is not allowed for this path."), None

    def _endpoints(self, method: str, item: str | None, body: Any) -> tuple[int, Any, str | None]:
        if item is None and method == "GET":
            return 200, {"endpoints": list(self.endpoints.values())}, "ListEndpointsResponse"
        if item is None and method == "POST":
            errors = _invalid("CreateEndpointRequest", body)
            if errors:
                return 422, _problem(422, "Request validation failed.", errors), None
            missing = [v for v in body.get("networkVolumes", []) if v not in self.volumes]
            if missing:
                return 400, _problem(400, f"network volume {missing[0]} not found"), None
            ep_id = secrets.token_hex(4)
            endpoint = {
                "id": ep_id, "name": body["name"], "type": body["type"], "image": body.get("image", ""),
                "args": "", "disk": 20, "ports": [], "env": body.get("env", {}), "registry": None,
                "gpu": {**body["gpu"], "allowedCudaVersions": [], "minCudaVersion": None},
                "workers": {"min": 0, "max": 3, "idleTimeout": 10, **body.get("workers", {})},
                "scaling": body["scaling"], "dataCenterIds": body.get("dataCenterIds", []),
                "networkVolumes": body.get("networkVolumes", []), "timeout": body.get("timeout", 300000),
                "flashboot": body.get("flashboot", "OFF"), "createdAt": _stamp(),
            }
            self.endpoints[ep_id] = endpoint
            return 201, endpoint, "Endpoint"
        endpoint = self.endpoints.get(item or "")
        if endpoint is None:
            return 404, _problem(404, "endpoint not found"), None
        if method == "GET":
            return 200, endpoint, "Endpoint"
        if method == "PATCH":
            errors = _invalid("UpdateEndpointRequest", body)
            if errors:
                return 422, _problem(422, "Request validation failed.", errors), None
            for key, value in body.items():
                endpoint[key] = {**endpoint[key], **value} if isinstance(value, dict) and key != "env" else value
            return 200, endpoint, "Endpoint"
        return 405, _problem(405, "The requested method is not allowed for this path."), None


def _invalid(schema: str, body: Any) -> list[str]:
    return [f"{'$' + ''.join(f'.{p}' for p in e.absolute_path)}: {e.message}"
            for e in _validator(schema).iter_errors(body)]


def _problem(status: int, detail: str, errors: list[str] | None = None) -> dict[str, Any]:
    titles = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
              409: "Conflict", 422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error"}
    out: dict[str, Any] = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
    if errors:
        out["errors"] = errors
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        ctype = "application/problem+json" if status >= 400 else "application/json"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("RateLimit", '"minute";r=100;t=60')
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        standin: RunPodStandIn = self.server.standin
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        standin.requests.append((self.command, url.path))
        if standin.delay:
            time.sleep(standin.delay)
        who = standin.authorised(self.headers.get("Authorization"), self.command, url.path)
        if who == "pod":
            standin.pod_calls.append((self.command, url.path))
        if who is None:
            self._send(401, _problem(401, "missing bearer token" if not self.headers.get("Authorization")
                                     else "invalid bearer token"))
            return
        with standin._lock:
            fault = standin.fail_next.pop(0) if standin.fail_next else None
        if fault is not None:
            retry_after = {"Retry-After": "0"} if fault == 429 else None
            self._send(fault, _problem(fault, "injected by the stand-in"), retry_after)
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._send(400, _problem(400, "request body is not JSON"))
            return
        m = re.fullmatch(r"/v2/pods/([^/]+)/logs", url.path)
        if m and self.command == "GET":
            self._logs(standin, m.group(1), parse_qs(url.query))
            return
        status, data, schema = standin.answer(self.command, url.path, parse_qs(url.query), body)
        if schema is not None:
            errors = _invalid(schema, data)
            if errors:
                standin.schema_errors.append(f"{self.command} {url.path}: {errors[:3]}")
        self._send(status, data)

    def _logs(self, standin: RunPodStandIn, pod_id: str, query: dict[str, list[str]]) -> None:
        """Server-Sent Events: the backlog after Last-Event-ID (or the last `tail` lines), then new lines
        as they come, while the pod exists (at most 30 s per connection)."""
        pod = standin.pods.get(pod_id)
        if pod is None:
            self._send(404, _problem(404, "pod not found"))
            return
        cursor = self.headers.get("Last-Event-ID")
        after = int(cursor.rsplit("/", 1)[-1]) if cursor and cursor.rsplit("/", 1)[-1].isdigit() else 0
        tail = int((query.get("tail") or ["100"])[0])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = after
        if not cursor and tail:
            backlog = [e for e in pod.log][-tail:]
            sent = backlog[0][0] - 1 if backlog else 0
        end = time.monotonic() + 30
        try:
            while time.monotonic() < end:
                for seq, ts, line in [e for e in pod.log if e[0] > sent]:
                    event = json.dumps({"ts": ts, "source": "container", "line": line})
                    self.wfile.write(f"id: {ts}/{seq:012d}\ndata: {event}\n\n".encode())
                    sent = seq
                self.wfile.flush()
                if pod_id not in standin.pods:
                    return
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            return
