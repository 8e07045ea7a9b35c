"""With nothing to do, sync and verify read no model file and touch no network, even for 200 GiB.

Hashing 200 GiB takes minutes, so a bound of seconds tells "read nothing" from "read everything" on
however busy a machine; how fast the no-op is (target: under 2 s) is measured by
``scripts/bench_models.py``."""

from __future__ import annotations

import time
from pathlib import Path

from provision.commands.verify import verify_volume
from provision.models import plan_models, refresh_models, sync_models
from provision.models.files import make_record, save_records
from provision.progress import QUIET
from provision.records.lockfile import Lock, LockedForge, LockedModel, read_lock, write_lock
from tests.helpers.timing import PROMPT
from volume_layout import VolumeLayout

FAKE_SHA = "5" * 64  # never checked: the recorded size and mtime vouch for the file


def big_sparse_volume(volume: Path, count: int = 50, each: int = 4 << 30) -> VolumeLayout:
    layout = VolumeLayout(volume)
    models, records = [], []
    for i in range(count):
        path = layout.model_path("lora", f"lora-{i:02d}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.truncate(each)  # sparse: 4 GiB that take no space
        # Port 9 (discard) on loopback refuses connections: any network attempt would fail the test.
        source = f"http://127.0.0.1:9/{path.name}"
        models.append(LockedModel(kind="lora", name=path.name, source=source, path=layout.relative(path),
                                  sha256=FAKE_SHA, size=each))
        records.append(make_record(layout, path, kind="lora", source=source, sha256=FAKE_SHA))
    save_records(layout, records)
    forge = LockedForge(repo="https://example.invalid/forge.git", ref="main", commit="0" * 40, python="3.10",
                        torch=[], torch_index_url=None, args=[], env={})
    write_lock(layout.lock, Lock(forge=forge, models=models))
    return layout


def test_nothing_to_do_is_fast_and_offline(volume: Path) -> None:
    layout = big_sparse_volume(volume)
    lock_text = layout.lock.read_text()

    started = time.monotonic()
    report = sync_models(layout, _lock(layout), layout.lock, QUIET)
    assert time.monotonic() - started < PROMPT
    assert (report.unchanged, report.fetched, report.transferred) == (50, [], 0)

    started = time.monotonic()
    assert refresh_models(layout, layout.lock, prune=True, dry_run=False, progress=QUIET).unchanged == 50
    assert plan_models(layout, _lock(layout)) == []
    problems = verify_volume(layout, layout.lock, deep=False, progress=QUIET)
    assert time.monotonic() - started < PROMPT
    assert [p for p in problems if "models/" in p] == []
    assert layout.lock.read_text() == lock_text  # nothing pinned, nothing rewritten


def _lock(layout: VolumeLayout) -> Lock:
    return read_lock(layout.lock)
