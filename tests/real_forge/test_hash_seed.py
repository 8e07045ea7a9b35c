"""The real Forge does not re-hash the checkpoint the volume's record knows (issue 14), opt-in.

The worker seeds Forge's sha256 cache from state.json (``provision.forge.hashes``): sd-models lists the
checkpoint with the lock's sha256, and loading it (the session's first txt2img, whichever test runs it)
prints no "Calculating sha256" line. Order-free: any load of the checkpoint in the session would have
printed that line without the seed, so the whole worker log is checked after a txt2img of its own.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.real_forge.conftest import CHECKPOINT, INSTALL_TIMEOUT, SKIP, Installed, Served
from tests.real_forge.test_real_forge import FIRST_JOB_TIMEOUT, SMALL, call, ok
from volume_layout import VolumeLayout

# This may be the session's first test: its setup installs the real Forge from nothing (minutes).
pytestmark = [pytest.mark.slow, SKIP, pytest.mark.timeout(INSTALL_TIMEOUT)]


def test_the_checkpoint_the_lock_knows_is_not_hashed_by_forge(served: Served, installed: Installed) -> None:
    state = json.loads(VolumeLayout(installed.volume).state.read_text())
    known = next(m["sha256"] for m in state["models"] if m["path"].endswith(f"/{CHECKPOINT}"))
    [listed] = ok(call(served, "GET", "/sdapi/v1/sd-models", timeout=FIRST_JOB_TIMEOUT))
    assert (listed["sha256"], listed["hash"], listed["title"]) == (known, known[:10], f"{CHECKPOINT} [{known[:10]}]")
    got = ok(call(served, "POST", "/sdapi/v1/txt2img", {"prompt": "a lamp", **SMALL}))
    assert len(got["images"]) == 1
    deadline = time.monotonic() + 60  # Forge's access-log line for the answer: its output up to then is relayed
    while '"POST /sdapi/v1/txt2img HTTP/1.1" 200' not in served.worker.log():
        assert time.monotonic() < deadline, served.worker.log()[-3000:]
        time.sleep(0.2)
    assert "Calculating sha256" not in served.worker.log()
    [listed] = ok(call(served, "GET", "/sdapi/v1/sd-models"))
    assert listed["sha256"] == known
