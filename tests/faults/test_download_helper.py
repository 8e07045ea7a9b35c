"""The worker's download helper under attack (issue 5, case 9), through the production job loop.

Helper jobs never wait for Forge, so they are spread over every worker that shares the suite's
volume (see ``fan_out``); whichever runs one, the volume outside models/ must stay untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    state = json.loads((volume / ".forge-volume" / "state.json").read_text(encoding="utf-8"))
    streams.add_file(volume / ".forge-volume" / "state.json")
    recorded = {m["path"] for m in state["models"]}
    assert {"models/Lora/good.safetensors", "models/Lora/payload.safetensors",
            "models/Lora/private.safetensors"} <= recorded
    assert all(p.startswith("models/") and ".." not in p and "escape" not in p for p in recorded), recorded
    for name in ("main", "crash"):
        still_serving(fleet, name, streams)
