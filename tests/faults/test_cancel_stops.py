"""A cancel stops the work in every phase and frees every lock within CANCEL_GRACE (issue 19, hole 11).

RunPod's cancel (also how a job's timeout ends it) through the production job loop, and Ctrl-C to the
CLI, while: hashing a large file on the volume (`/v1/refresh-models`), a `/v1/sync` between its files,
and a `forge-volume refresh-models` download from an https source that trickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from provision.models.files import target_lock
from provision.records.lockfile import LockedModel, read_lock, write_lock
from provision.records.model_records import records
from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.helpers.procs import interrupt
from tests.helpers.tls import make_cert
from volume_layout import VolumeLayout
from worker.helpers import CANCEL_GRACE

from .conftest import Fleet, ModelHosts, Streams, cli, model_toml, sha
from .test_worker_faults import result

HUGE = 6 << 30  # a sparse file: no disk, but seconds of sha256 (about 1 GB/s on one core)


def refresh() -> dict[str, object]:
    return {"api": {"method": "POST", "endpoint": "/v1/refresh-models"}, "payload": {}}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


def read_position(pid: int, path: Path) -> int | None:
    """How far process ``pid`` has read ``path`` (None: it has no descriptor open on it)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                return int(info.split("pos:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return None


def seconds_until_free(path: Path, since: float) -> float:
    """Seconds from ``since`` until the flock at ``path`` could be taken (fails after CANCEL_GRACE)."""
    lock = FileLock(str(path), timeout=max(CANCEL_GRACE - (time.monotonic() - since), 0.01))
    try:
        lock.acquire()
    except Timeout:
        raise AssertionError(f"{path.name} still held {CANCEL_GRACE:g} s (CANCEL_GRACE) after the cancel") from None
    freed = time.monotonic() - since
    lock.release()
    return freed


def test_a_cancel_stops_refresh_models_while_it_hashes_a_large_file(fleet: Fleet, streams: Streams) -> None:
    """A 6 GiB model file the lock lists without a record on the volume: refresh-models hashes it before
    anything else. RunPod cancels the job while it hashes. Expected: the hashing stops at once (the file
    is closed, read only part way), the volume's writer lock is free within CANCEL_GRACE, nothing was
    adopted or pinned; the worker posts nothing for the cancelled job and then serves the next one."""
    layout = VolumeLayout(fleet.volume)
    worker = fleet["main"]
    big = layout.kind_dir("lora") / "huge-unrecorded.safetensors"
    source = fleet.hosts.files.url("/files/huge-never-fetched.safetensors")
    saved_spec, saved_lock = layout.spec.read_bytes(), layout.lock.read_bytes()
    try:
        with open(big, "wb") as fh:
            fh.truncate(HUGE)
        layout.spec.write_text(saved_spec.decode() + model_toml("lora", source, name=big.name))
        lock = read_lock(layout.lock)
        entry = LockedModel(kind="lora", name=big.name, source=source, path=layout.relative(big), sha256=None,
                            size=HUGE)
        write_lock(layout.lock, dataclasses.replace(lock, models=[*lock.models, entry]))
        written_lock = layout.lock.read_bytes()
        record = worker.submit(refresh())
        pid = worker.proc.pid
        wait_until(lambda: (read_position(pid, big) or 0) > 0, 60, "the refresh started hashing the file")
        fleet.platform.cancel(record.job_id)
        cancelled = time.monotonic()
        freed = seconds_until_free(layout.lock_file("volume"), cancelled)
        position = read_position(pid, big)
        assert position is None, f"the file is still open {freed:.1f} s after the cancel (read to {position:,})"
        assert freed < CANCEL_GRACE
        assert layout.relative(big) not in records(layout), "the cancelled refresh finished hashing and adopted it"
        assert layout.lock.read_bytes() == written_lock  # nothing pinned
        assert record.result is None
    finally:
        big.unlink(missing_ok=True)
        layout.spec.write_bytes(saved_spec)
        layout.lock.write_bytes(saved_lock)
    after = result(worker.run(refresh(), 120), streams)
    assert "error" not in after, after


def test_a_cancelled_sync_starts_no_file_after_the_cancel(fleet: Fleet, streams: Streams) -> None:
    """A /v1/sync of a repo of 16 files, four fetched at a time, each slowly; RunPod cancels the job once
    the first files arrived. Expected: no file is asked for after the cancel (before, each queued file
    still opened a connection, one after another, past CANCEL_GRACE while the job had ended), every
    target lock is free within CANCEL_GRACE, and no file arrives after the cancel.
    Over plain http: the fleet's workers reach the stand-in hub by its HF_ENDPOINT, fixed at their start,
    and the stand-in hub has no TLS; the download under it is the same one the https tests cut."""
    hub, worker = fleet.hosts.hub, fleet["main"]
    layout = VolumeLayout(fleet.volume)
    files = {f"part-{i:02d}.safetensors": os.urandom(64 << 10) for i in range(16)}
    hub.add_repo("org/many-parts", files)
    blobs = [hub.blob(data) for data in files.values()]
    for blob in blobs:
        blob.chunk, blob.delay_per_chunk = 8 << 10, 0.1  # about 0.8 s a file
    folder = layout.kind_dir("lora") / "many-parts"
    record = worker.submit({"api": {"method": "POST", "endpoint": "/v1/sync"},
                            "payload": {"repo_id": "org/many-parts", "kind": "lora", "sync_path": "Lora/many-parts"}})
    try:
        wait_until(lambda: sum(b.bytes_sent == len(next(iter(files.values()))) for b in blobs) >= 2, 60,
                   "the first files arrived")
        fleet.platform.cancel(record.job_id)
        cancelled = time.monotonic()
        asked = sum(b.gets for b in blobs)
        time.sleep(0.5)  # a request already on its way when the cancel came may still arrive
        asked_soon = sum(b.gets for b in blobs)
        for name in files:
            seconds_until_free(Path(target_lock(layout, folder / name, timeout=0).lock_file), cancelled)
        arrived = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        time.sleep(CANCEL_GRACE)
        assert sum(b.gets for b in blobs) == asked_soon, "files were asked for after the cancel"
        # The cancel reaches the worker on its next poll of the platform: until then, a fetch that ends may
        # start the next one, at most one per slot of the four (before the fix: the 12 still queued).
        assert asked_soon - asked <= 4, (asked, asked_soon)
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == arrived
        assert len(arrived) < len(files) and record.result is None
    finally:
        for blob in blobs:
            blob.delay_per_chunk = 0
        # The cancelled files' partials are kept to resume, as they should be; they are this test's own, and
        # the fleet's volume is shared with tests that count leftover temporaries.
        for partial in folder.glob(".*.partial"):
            partial.unlink()
    streams.add("sync", str(record))


def test_ctrl_c_stops_refresh_models_downloading_from_a_trickling_https_source(
        installed_volume: Path, provisioned_world: World, model_hosts: ModelHosts, streams: Streams,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`forge-volume refresh-models` fetching from an https server that trickles (1 KiB every 50 ms: never a
    stall); the user presses Ctrl-C. Expected: the process exits at once with "interrupted", the bytes so
    far kept as the partial; `forge-volume refresh-models` right after is not "busy" and resumes."""
    cert = make_cert(tmp_path / "tls")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert.cert))
    data = os.urandom(2 << 20)
    with FileServer(tls=cert) as server:
        route = server.add("/slow.safetensors", data, chunk=1 << 10, delay_per_chunk=0.05)
        (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(
            extra=model_toml("lora", server.url("/slow.safetensors"), sha256=sha(data))))
        assert cli(streams, "lock").exit_code == 0
        final = installed_volume / "models" / "Lora" / "slow.safetensors"
        proc = subprocess.Popen([sys.executable, "-m", "provision.cli", "refresh-models"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: route.bytes_sent > (64 << 10), 30, "the download started")
        except BaseException:
            proc.kill()
            raise
        out, err, stopped = interrupt(proc)
        streams.add("interrupted refresh-models", out + err)
        assert proc.returncode == 1 and "interrupted; re-run the same command to resume" in err, err
        assert stopped < CANCEL_GRACE, f"refresh-models took {stopped:.1f} s to exit after Ctrl-C"
        partial = final.with_name(f".{final.name}.partial")
        kept = partial.stat().st_size
        assert 0 < kept < len(data) and not final.exists()
        sent = route.settled_bytes()
        route.delay_per_chunk, route.chunk = 0, 1 << 16
        again = cli(streams, "refresh-models")
        assert again.exit_code == 0, again.output
        assert "busy" not in again.output
        assert final.read_bytes() == data
        assert route.bytes_sent - sent == len(data) - kept  # resumed: only the rest was fetched
        assert hashlib.sha256(final.read_bytes()).hexdigest() == sha(data)
