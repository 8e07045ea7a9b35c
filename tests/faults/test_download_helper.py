"""The worker's download helper under attack (issue 5, case 9), through the production job loop.

Helper jobs never wait for Forge, so they are spread over every worker that shares the suite's
volume (see ``fan_out``); whichever runs one, the volume outside models/ must stay untouched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import Timeout

from provision.models.files import target_lock
from tests.helpers.black_hole import BlackHole
from tests.helpers.http_server import PRIVATE_MODEL_HOST
from tests.helpers.internal_addresses import internal_spellings
from volume_layout import VolumeLayout
from worker.helpers import CANCEL_GRACE

from .conftest import PAYLOAD_LORA, PAYLOAD_SECRET, PRIVATE_LORA, Fleet, Streams
from .test_worker_faults import fan_out, one_line_error, result, still_serving

# Not ``slow``: its job loop is busy with a job waiting for Forge's boot deadline when this runs.
HELPER_WORKERS = ("main", "bucket", "hang", "exit", "crash")
MODEL = os.urandom(30_000)


def download(payload: dict[str, Any]) -> dict[str, Any]:
    return {"api": {"method": "POST", "endpoint": "/v1/download"}, "payload": payload}


def sync(payload: dict[str, Any]) -> dict[str, Any]:
    return {"api": {"method": "POST", "endpoint": "/v1/sync"}, "payload": payload}


def tree(root: Path) -> set[str]:
    """Every path under ``root`` outside models/ and the toolkit's own folder (lock files, state)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] in (("models",), (".forge-volume",), ("venv",)):
            dirnames.clear()
            continue
        out |= {str(rel / n) for n in dirnames + filenames}
    return out


def test_case09_download_helper_refuses_paths_and_hosts_it_must_not_touch(fleet: Fleet, streams: Streams) -> None:
    """Fault: download jobs that aim outside the volume's models folder (an absolute path elsewhere,
    '..', a symlink inside models/ pointing out, a file name with '..'), that name file:// or ftp://
    sources, or an http source that redirects to file:// or to another loopback service (the
    canary, by IP and by the name localhost); a token sent in the payload.
    Expected: each is refused with a one-line error naming the problem; no stopPod; a legitimate
    download and a private-repo sync with the payload's token (and one with the endpoint's HF_TOKEN)
    complete.
    Checked after: nothing changed on the volume outside models/ and nothing appeared in the folder
    the symlink points to; the canary saw no request; state.json records only the good downloads;
    the payload token appears in no job output and no log line (leak guard); workers still serve."""
    volume = fleet.volume
    files, canary = fleet.hosts.files, fleet.hosts.canary
    outside = volume.parent / "outside-models"
    outside.mkdir(exist_ok=True)
    escape = volume / "models" / "Lora" / "escape"
    escape.parent.mkdir(parents=True, exist_ok=True)
    if not escape.is_symlink():
        escape.symlink_to(outside, target_is_directory=True)
    files.add("/files/good.safetensors", MODEL)
    files.add("/files/to-file.safetensors", redirect="file:///etc/passwd")
    files.add("/files/to-canary.safetensors", redirect=canary.url("/x.bin"))
    files.add("/files/to-canary-by-name.safetensors", redirect=canary.url("/x.bin", host="localhost"))
    good = files.url("/files/good.safetensors")
    before = tree(volume)

    refused: list[tuple[dict[str, Any], str]] = [
        (download({"source_url": good, "download_path": "/etc/cron.d"}), "outside the volume's models folder"),
        (download({"source_url": good, "download_path": "../../outside.safetensors"}),
         "outside the volume's models folder"),
        (download({"source_url": good, "download_path": "Lora/../../outside.safetensors"}),
         "outside the volume's models folder"),
        (download({"source": good, "download_path": "Lora/escape/", "name": "x.safetensors"}),
         "outside the volume's models folder"),
        (download({"source": good, "download_path": "Lora/escape/x.safetensors"}),
         "outside the volume's models folder"),
        (download({"source": good, "kind": "lora", "name": "../../x.safetensors"}), "is not a plain file name"),
        (download({"source": "file:///etc/passwd", "kind": "lora"}), "unsupported scheme 'file'"),
        (download({"source": "ftp://127.0.0.1/x.safetensors", "kind": "lora"}), "unsupported scheme 'ftp'"),
        (download({"source": files.url("/files/to-file.safetensors"), "kind": "lora", "token": PAYLOAD_SECRET}),
         "only http and https are allowed, not 'file'"),
        (download({"source": files.url("/files/to-canary.safetensors"), "kind": "lora", "token": PAYLOAD_SECRET}),
         "redirect"),
        (download({"source": files.url("/files/to-canary-by-name.safetensors"), "kind": "lora"}), "redirect"),
        (sync({"repo_id": "org/payload", "sync_path": "../../elsewhere", "hf_token": PAYLOAD_SECRET}),
         "outside the volume's models folder"),
    ]
    allowed = [
        download({"source": good, "kind": "lora", "name": "good.safetensors"}),
        sync({"repo_id": "org/payload", "kind": "lora", "hf_token": PAYLOAD_SECRET}),
        sync({"repo_id": "org/private", "kind": "lora"}),  # the endpoint's HF_TOKEN
    ]
    records = fan_out(fleet, [job for job, _ in refused] + allowed, HELPER_WORKERS)
    for record, (job, message) in zip(records[:len(refused)], refused, strict=True):
        body = result(record, streams)
        assert message in one_line_error(body), (job, body)
        assert "stopPod" not in body, body
    for record, job in zip(records[len(refused):], allowed, strict=True):
        body = result(record, streams)
        assert "error" not in body, (job, body)
    lora = volume / "models" / "Lora"
    assert (lora / "good.safetensors").read_bytes() == MODEL
    assert (lora / "payload.safetensors").read_bytes() == PAYLOAD_LORA
    assert (lora / "private.safetensors").read_bytes() == PRIVATE_LORA

    assert canary.requests == []
    assert list(outside.iterdir()) == []
    assert tree(volume) == before
    assert not (volume.parent / "outside.safetensors").exists() and not Path("/etc/cron.d/x.safetensors").exists()
    state = json.loads(VolumeLayout(volume).state.read_text(encoding="utf-8"))
    streams.add_file(VolumeLayout(volume).state)
    recorded = {m["path"] for m in state["models"]}
    assert {"models/Lora/good.safetensors", "models/Lora/payload.safetensors",
            "models/Lora/private.safetensors"} <= recorded
    assert all(p.startswith("models/") and ".." not in p and "escape" not in p for p in recorded), recorded
    for name in ("main", "crash"):
        still_serving(fleet, name, streams)


def internal_sources(canary_port: int, forge_port: int) -> list[tuple[str, str]]:
    """Forge's unlisted routes on loopback, then every other spelling of an internal address."""
    return [(f"http://127.0.0.1:{forge_port}/sdapi/v1/options", "loopback"), *internal_spellings(canary_port)]


def test_download_helper_refuses_internal_addresses(fleet: Fleet, streams: Streams) -> None:
    """Fault (issue 10, holes 1 and 2): /v1/download jobs naming the worker's own machine (Forge's API on
    loopback, in every spelling), the cloud's metadata service and the private ranges, and a model
    server on the endpoint's opted-in private network whose file redirects to another port of it.
    Expected: each is refused with a one-line error naming the rule (loopback, private, link-local,
    unspecified) and the opt-in variable; the opted-in server's own file downloads.
    Checked after: the canary (listening on every local address) and Forge saw no request from a
    download; nothing was written under models/ for the refused jobs."""
    files, canary = fleet.hosts.files, fleet.hosts.canary
    forge_port = int(fleet["main"].env["FORGE_PORT"])
    files.add("/files/allowed.safetensors", MODEL)
    files.add("/files/to-private-neighbour.safetensors", redirect=f"http://{files.host}:{canary.port}/x.bin")
    refused = [(download({"source": url, "kind": "lora", "name": f"internal-{i}.safetensors"}), rule)
               for i, (url, rule) in enumerate(internal_sources(canary.port, forge_port))]
    refused.append((download({"source": files.url("/files/to-private-neighbour.safetensors"), "kind": "lora"}),
                    "only the host and port the job named"))
    allowed = download({"source": files.url("/files/allowed.safetensors"), "kind": "lora"})
    records = fan_out(fleet, [job for job, _ in refused] + [allowed], HELPER_WORKERS)
    for record, (job, rule) in zip(records[:-1], refused, strict=True):
        error = one_line_error(result(record, streams))
        assert "refusing to" in error and rule in error and "FORGE_DOWNLOAD_ALLOW_NETWORKS" in error, (job, error)
    assert "error" not in result(records[-1], streams)
    lora = fleet.volume / "models" / "Lora"
    assert (lora / "allowed.safetensors").read_bytes() == MODEL
    assert not any(p.name.startswith(("internal-", "to-private", ".internal-")) for p in lora.iterdir())
    assert canary.requests == []
    assert not [r for r in fleet.forge_requests("main") if r["method"] == "GET" and "options" in r["path"]]


def test_sources_carrying_credentials_are_never_echoed(fleet: Fleet, streams: Streams) -> None:
    """Fault (issue 10, hole 14): malformed sources with a credential (``ftp://user:TOKEN@``, a URL with no
    host but a ``?token=``, a port out of range) and a good URL whose query holds secrets under names no
    pattern knows (``?access=``, ``?X-Amz-Signature=``).
    Expected: the malformed ones fail with a one-line caller error; the good one downloads.
    Checked after: the secret is in no job result, no log line and not in state.json (leak guard), and
    the recorded source masks every query value."""
    files = fleet.hosts.files
    files.add("/files/signed.safetensors", MODEL)
    secret = PAYLOAD_SECRET
    refused = [
        (download({"source": f"ftp://user:{secret}@{files.host}/x.safetensors", "kind": "lora"}),
         "unsupported scheme 'ftp'"),
        (download({"source": f"https://?token={secret}", "kind": "lora"}), "has no host"),
        (download({"source": f"https://user:{secret}@{files.host}:99999/x?access={secret}", "kind": "lora"}),
         "port is not a number from 1 to 65535"),
        (download({"source": f"{secret}@{files.host}/x.safetensors", "kind": "lora"}), "has no scheme"),
    ]
    signed = files.url("/files/signed.safetensors") + f"?access={secret}&X-Amz-Signature={secret}"
    records = fan_out(fleet, [job for job, _ in refused] + [download({"source": signed, "kind": "lora"})],
                      HELPER_WORKERS)
    for record, (job, message) in zip(records[:-1], refused, strict=True):
        assert message in one_line_error(result(record, streams)), job
    body = result(records[-1], streams)
    assert body["output"]["source"] == files.url("/files/signed.safetensors") + "?access=***&X-Amz-Signature=***"
    streams.add_file(VolumeLayout(fleet.volume).state)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_cancelled_download_job_stops_and_frees_its_lock(fleet: Fleet, streams: Streams, scheme: str) -> None:
    """Fault (issue 10, hole 7; over https, issue 19 hole 11): RunPod cancels a /v1/download job whose
    server sent one chunk and then went silent (a read blocked for the 60 s read timeout).
    Expected: the download stops and lets go of its target's lock within CANCEL_GRACE of the cancel (the
    old worker held it until the read timed out, then went on retrying); the bytes so far are kept as the
    target's partial; the worker posts nothing for the cancelled job.
    Checked after: the same target then downloads from a good source on the same worker."""
    files = fleet.hosts.tls_files if scheme == "https" else fleet.hosts.files
    worker = fleet["main"]
    silent = files.add("/files/silent.safetensors", os.urandom(4 << 20), delay_per_chunk=120)
    files.add("/files/cancel-target.safetensors", MODEL)
    layout = VolumeLayout(fleet.volume)
    target = fleet.volume / "models" / "Lora" / f"cancel-target-{scheme}.safetensors"
    record = worker.submit(download({"source": files.url("/files/silent.safetensors"), "kind": "lora",
                                     "name": target.name}))
    deadline = time.monotonic() + 60
    while silent.bytes_sent == 0:
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    time.sleep(0.3)  # the first chunk is in; the read now blocks
    fleet.platform.cancel(record.job_id)
    cancelled = time.monotonic()
    lock = target_lock(layout, target, timeout=CANCEL_GRACE)
    try:
        lock.acquire()
    except Timeout:
        raise AssertionError(f"the cancelled download still holds its target's lock {CANCEL_GRACE:g} s "
                             "(CANCEL_GRACE) after the cancel") from None
    freed = time.monotonic() - cancelled
    lock.release()
    partial = target.with_name(f".{target.name}.partial")
    deadline = time.monotonic() + 20
    while not partial.exists():
        assert time.monotonic() < deadline, "the cancelled download kept no partial"
        time.sleep(0.05)
    assert freed < CANCEL_GRACE and not target.exists()
    again = result(worker.run(download({"source": files.url("/files/cancel-target.safetensors"), "kind": "lora",
                                        "name": target.name}), 60), streams)
    assert "error" not in again, again
    assert target.read_bytes() == MODEL and record.result is None


def test_a_cancelled_download_job_stops_while_connecting(fleet: Fleet, streams: Streams) -> None:
    """Fault (issue 10, hole 7): RunPod cancels (as it does at the job's timeout) a /v1/download job
    whose server never completes the TCP connect: its SYNs are dropped, as by a firewall. The main
    worker waits up to FORGE_DOWNLOAD_CONNECT_TIMEOUT=600 s for a connect, so only the cancel can end
    this one before the deadlines here (which only catch a hang).
    Expected: the pending connect is abandoned and the job lets go of its target's lock; no partial
    (nothing arrived); the worker posts nothing for the cancelled job.
    Checked after: a refresh-models job on the same worker runs (no lock left held, nothing "busy"),
    and the same target then downloads from a good source."""
    files, worker = fleet.hosts.files, fleet["main"]
    files.add("/files/connect-target.safetensors", MODEL)
    layout = VolumeLayout(fleet.volume)
    target = fleet.volume / "models" / "Lora" / "connect-target.safetensors"
    with BlackHole(PRIVATE_MODEL_HOST) as hole:  # an address the fleet's workers opt in to
        record = worker.submit(download({"source": hole.url("/m.safetensors"), "kind": "lora",
                                         "name": target.name}))
        deadline = time.monotonic() + 60
        while hole.pending() == 0:
            assert time.monotonic() < deadline, "the download never started connecting"
            time.sleep(0.05)
        fleet.platform.cancel(record.job_id)
        lock = target_lock(layout, target, timeout=60)
        try:
            lock.acquire()
        except Timeout:
            raise AssertionError("the cancelled download still holds its target's lock after 60 s") from None
        lock.release()
        deadline = time.monotonic() + 60
        while hole.pending():
            assert time.monotonic() < deadline, "the cancelled download's connect is still pending"
            time.sleep(0.05)
    refreshed = result(worker.run({"api": {"method": "POST", "endpoint": "/v1/refresh-models"}, "payload": {}}, 120),
                       streams)
    assert "error" not in refreshed, refreshed
    assert not any(p.name.startswith(f".{target.name}") for p in target.parent.iterdir())
    again = result(worker.run(download({"source": files.url("/files/connect-target.safetensors"), "kind": "lora",
                                        "name": target.name}), 60), streams)
    assert "error" not in again, again
    assert target.read_bytes() == MODEL and record.result is None


def test_tokens_with_stray_whitespace_or_control_characters(fleet: Fleet, streams: Streams) -> None:
    """Fault (issue 10, hole 3): a payload token pasted with a trailing newline, and one with a control
    character inside (which an HTTP library would refuse, quoting it in its error).
    Expected: the first is stripped and works; the second fails with a one-line error naming the field,
    never the token, in the answer or the log (leak guard: neither half of it appears anywhere)."""
    half = len(PAYLOAD_SECRET) // 2
    ok, bad = fan_out(fleet, [
        sync({"repo_id": "org/payload", "kind": "lora", "hf_token": f"  {PAYLOAD_SECRET}\r\n"}),
        sync({"repo_id": "org/payload", "kind": "lora",
              "hf_token": f"{PAYLOAD_SECRET[:half]}\n{PAYLOAD_SECRET[half:]}"}),
    ], HELPER_WORKERS)
    assert "error" not in result(ok, streams)
    error = one_line_error(result(bad, streams))
    assert "hf_token holds a space or a control character" in error, error
    texts = [error] + [w.log() for w in fleet.workers.values()]
    assert not any(PAYLOAD_SECRET[:half] in t or PAYLOAD_SECRET[half:] in t for t in texts)
