"""scripts/netvol.py mounted (opt-in: ``FORGE_COLDSTART=1``, root, /dev/fuse, libfuse3 and mfusepy).

A small tree is served through the real FUSE mount and a real workload (a Python process) reads it:
the counters must match what the kernel had to ask for (the page cache keeps a file's bytes, the
entry and negative caches keep repeated lookups), calls must cost at least the modelled delay, and
parallel calls must overlap (measured against sequential ones in the same test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.coldstart.conftest import SCRIPTS, load_script
from tests.helpers.timing import PROMPT

netvol = load_script("netvol")


def _fuse_ready() -> str | None:
    if os.environ.get("FORGE_COLDSTART") != "1":
        return "set FORGE_COLDSTART=1 to mount scripts/netvol.py (needs root, /dev/fuse, libfuse3, mfusepy)"
    if os.geteuid() != 0 or not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        return "needs root, /dev/fuse and fusermount3 (apt-get install -y fuse3 libfuse3-3)"
    probe = subprocess.run([sys.executable, "-c", "import os; os.environ['FUSE_LIBRARY_NAME']='fuse3'; import mfusepy"],
                           capture_output=True, timeout=60)
    return None if probe.returncode == 0 else f"needs mfusepy: {sys.executable} -m pip install mfusepy"


pytestmark = pytest.mark.skipif(bool(_fuse_ready()), reason=_fuse_ready() or "")

META_MS = 20.0
FILES = 32


def mounted(mnt: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == str(mnt) for line in f)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    src, mnt, stats = tmp_path / "src", tmp_path / "mnt", tmp_path / "stats.json"
    for i in range(FILES):
        (src / "seq").mkdir(parents=True, exist_ok=True)
        (src / "par").mkdir(parents=True, exist_ok=True)
        (src / "seq" / f"{i}.txt").write_text("x")
        (src / "par" / str(i)).mkdir(parents=True, exist_ok=True)
        (src / "par" / str(i) / "f.txt").write_text("x")
    (src / "big.bin").write_bytes(os.urandom(2_000_000))
    mnt.mkdir()
    log = tmp_path / "netvol.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "netvol.py"), "mount", str(src), str(mnt),
                                 "--meta-ms", str(META_MS), "--read-ms", "5", "--bw-mbps", "50", "--stats", str(stats)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not mounted(mnt):
            assert proc.poll() is None, f"netvol exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"not mounted within 60 s: {log.read_text()}"
            time.sleep(0.05)
        yield src, mnt, stats
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=60)
            raise


WORKLOAD = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
mnt = sys.argv[1]
out = {}
for _ in range(2):
    with open(f"{mnt}/big.bin", "rb") as f:
        out.setdefault("sizes", []).append(len(f.read()))
t = time.monotonic()
for i in range(FILES):
    os.stat(f"{mnt}/seq/{i}.txt")
out["sequential"] = time.monotonic() - t
for i in range(FILES):
    os.stat(f"{mnt}/par/{i}")  # the folders first: lookups in one folder reach netvol one at a time
t = time.monotonic()
with ThreadPoolExecutor(FILES) as pool:
    list(pool.map(lambda i: os.stat(f"{mnt}/par/{i}/f.txt"), range(FILES)))
out["parallel"] = time.monotonic() - t
t = time.monotonic()
for _ in range(50):
    os.path.exists(f"{mnt}/nope")
    os.stat(f"{mnt}/big.bin")
out["repeated"] = time.monotonic() - t
print(json.dumps(out))
""".replace("FILES", str(FILES))


def test_counters_and_delays_match_a_real_workload(mount: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _src, mnt, stats = mount
    run = subprocess.run([sys.executable, "-c", WORKLOAD, str(mnt)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    timing = json.loads(run.stdout)
    assert timing["sizes"] == [2_000_000, 2_000_000]

    # On demand while mounted, then at unmount.
    early = tmp_path / "early.json"
    netvol.dump(mnt, early)
    assert json.loads(early.read_text())["files"]["/big.bin"]["opens"] == 2
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + PROMPT
    while not stats.exists():
        assert time.monotonic() < deadline, "no counters written at unmount"
        time.sleep(0.05)
    snap = json.loads(stats.read_text())

    big = snap["files"]["/big.bin"]
    assert big["opens"] == 2 and big["bytes"] == 2_000_000  # the second read came from the page cache
    procs = [p for p in snap["procs"].values() if "-c" in p["cmd"] and p["bytes"]]
    assert len(procs) == 1 and procs[0]["bytes"] == 2_000_000 and procs[0]["opens"] == 2
    # Each of the sequential and parallel files was looked up once; the 50 repeated lookups of a missing
    # and an existing name mostly hit the negative and entry caches (1 s).
    for i in range(FILES):
        assert snap["paths"][f"/seq/{i}.txt"]["getattr"] == 1
        assert snap["paths"][f"/par/{i}/f.txt"]["getattr"] == 1
    nope = snap["paths"]["/nope"]
    assert nope["missing"] == nope["getattr"] and 1 <= nope["missing"] < 50
    assert 1 <= snap["paths"]["/big.bin"]["getattr"] < 50

    # Delays: never less than the model (a floor a loaded machine cannot lower); parallel calls (lookups in
    # different folders) overlap.
    assert timing["sequential"] >= FILES * META_MS / 1000
    assert timing["parallel"] < timing["sequential"] / 2, timing
    summary = netvol.summarize(snap)
    assert summary["bytes"] == 2_000_000 and summary["opens"] == 2
    assert summary["top_missing"][0] == ["/nope", nope["missing"]]


def test_the_lay_out_reads_files_bin_a_piece_per_call_and_the_prefetch_twice_the_readahead(
        mount: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Through a real FUSE mount: files.bin's reads around the page cache reach the volume as 1 MiB calls, and the
    prefetch's sequential reads as 256 KiB calls (the kernel's 128 KiB readahead doubled)."""
    from provision.boot import layout_child, unpack
    from volume_layout import VolumeLayout

    src, mnt, _stats = mount
    data = (src / "big.bin").read_bytes()
    regular = os.open(mnt / "big.bin", os.O_RDONLY)
    try:
        direct = unpack.open_direct(str(mnt / "big.bin"), regular)
        assert direct is not None, "the FUSE mount refused O_DIRECT"
        try:
            piece = unpack._Pieces(direct, len(data), direct=True).read(0, len(data))
            assert bytes(piece) == data[:unpack.PIECE]
        finally:
            os.close(direct)
    finally:
        os.close(regular)
    lay_out = tmp_path / "lay-out.json"
    netvol.dump(mnt, lay_out)
    sizes = {int(k): v for k, v in json.loads(lay_out.read_text())["read_sizes"].items()}
    assert sizes == {unpack.ALIGN: 1, unpack.PIECE: 1}, sizes  # open_direct's probe, then the piece in one call

    opened = layout_child.Opened()
    try:
        opened.libraries = layout_child._open_pieces(VolumeLayout(mnt), [("big.bin", None, [(0, None)])], opened.fds)
        assert layout_child._read_pieces(opened.libraries, 1) == len(data)
    finally:
        opened.close()
    prefetch = tmp_path / "prefetch.json"
    netvol.dump(mnt, prefetch)
    after = {int(k): v for k, v in json.loads(prefetch.read_text())["read_sizes"].items()}
    grown = {size: count - sizes.get(size, 0) for size, count in after.items() if count > sizes.get(size, 0)}
    assert max(grown) == 2 * 128 * 1024 and sum(size * n for size, n in grown.items()) >= len(data), grown
