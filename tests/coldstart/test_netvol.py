"""scripts/netvol.py without FUSE: the latency model, the operations on a real tree, the counters and their summary.

The operations class is what FUSE calls; here the test calls it as FUSE would (paths led by ``/``)
on real files, with the sleeps recorded instead of slept, so every count and every delay is exact.
The mounted file system is checked by the opt-in ``test_netvol_mount.py``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from provision.boot.boot_set import resident_ranges
from tests.coldstart.conftest import SCRIPTS, load_script

netvol = load_script("netvol")


def test_latency_model_is_a_round_trip_per_call_plus_transfer() -> None:
    lat = netvol.Latency.parse("1, 2, 400")
    assert (lat.meta_ms, lat.read_ms, lat.bw_mbps) == (1.0, 2.0, 400.0)
    assert lat.label == "1,2,400"
    assert lat.meta_delay() == pytest.approx(0.001)
    assert lat.read_delay(0) == pytest.approx(0.002)
    assert lat.read_delay(4_000_000) == pytest.approx(0.002 + 0.01)  # 4 MB at 400 MB/s
    assert netvol.Latency.parse("0,0,0").read_delay(10**9) == 0.0  # bandwidth 0: unlimited
    assert netvol.Latency(0, 1, 0).read_delay(10**9) == pytest.approx(0.001)


@pytest.mark.parametrize("text", ["1,1", "1,1,400,5", "1,1,400,shared,x", "shared", "a,b,c", "-1,0,0", "inf,0,0",
                                  "nan,1,1"])
def test_latency_rejects_what_is_not_three_finite_numbers(text: str) -> None:
    with pytest.raises(ValueError, match=r"META_MS|finite"):
        netvol.Latency.parse(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.bin").write_bytes(os.urandom(300_000))
    (src / "x.txt").write_text("hi\n")
    (src / "l").symlink_to("x.txt")
    return src


def test_operations_count_every_call_and_ask_for_the_modelled_delay(tree: Path) -> None:
    slept: list[float] = []
    lat = netvol.Latency(2, 1, 100)
    counters = netvol.Counters(lat)
    ops = netvol.NetVolOps(tree, lat, counters, context=threading.get_native_id, sleep=slept.append,
                           clock=lambda: 0.0)

    assert ops.getattr("/")["st_mode"] == os.stat(tree).st_mode
    assert ops.getattr("/a/b/f.bin")["st_size"] == 300_000
    with pytest.raises(FileNotFoundError):
        ops.getattr("/nope")
    assert ops.readlink("/l") == "x.txt"
    assert ops.opendir("/a") == 0
    assert set(ops.readdir("/a", 0)) == {".", "..", "b"}
    with pytest.raises(OSError) as not_dir:
        ops.opendir("/x.txt")
    assert not_dir.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as read_only:
        ops.open("/x.txt", os.O_WRONLY)
    assert read_only.value.errno == errno.EROFS
    fh = ops.open("/a/b/f.bin", os.O_RDONLY)
    got = b"".join(ops.read("/a/b/f.bin", 131072, off, fh) for off in (0, 131072, 262144))
    ops.release("/a/b/f.bin", fh)
    assert got == (tree / "a" / "b" / "f.bin").read_bytes()
    assert ops.statfs("/")["f_bsize"] > 0

    # 8 metadata calls at 2 ms (the refused write-open is not one: the kernel never sends it to a ro mount),
    # then 3 reads at 1 ms + size / 100 MB/s.
    meta = [s for s in slept if s == pytest.approx(0.002)]
    assert len(meta) == 9  # getattr x3, readlink, opendir x2, readdir, open, statfs
    reads = slept[-4:-1]  # the statfs comes last
    assert reads == pytest.approx([0.001 + 131072 / 1e8, 0.001 + 131072 / 1e8, 0.001 + (300_000 - 262144) / 1e8])

    snap = json.loads(json.dumps(counters.snapshot()))  # plain JSON
    assert snap["ops"]["getattr"] == 3 and snap["ops"]["missing"] == 1
    assert snap["paths"]["/nope"] == {"getattr": 1, "missing": 1}
    f = snap["files"]["/a/b/f.bin"]
    assert (f["opens"], f["reads"], f["bytes"], f["size"], f["pid"]) == (1, 3, 300_000, 300_000, os.getpid())
    me = snap["procs"][str(os.getpid())]  # the calling thread resolved to this process, with its command line
    assert (me["meta"], me["opens"], me["reads"], me["bytes"]) == (9, 1, 3, 300_000)
    assert "python" in me["cmd"] or "pytest" in me["cmd"]
    assert snap["latency"] == {"meta_ms": 2.0, "read_ms": 1.0, "bw_mbps": 100.0}

    summary = netvol.summarize(snap)
    assert summary["meta"] == 9 and summary["missing"] == 1
    assert summary["meta_by_kind"] == {"getattr": 3, "open": 1, "opendir": 2, "readdir": 1, "readlink": 1,
                                       "statfs": 1}
    assert (summary["opens"], summary["files_opened"], summary["reads"], summary["bytes"]) == (1, 1, 3, 300_000)
    assert summary["top_missing"] == [["/nope", 1]]


def test_a_thread_is_counted_under_its_process() -> None:
    procs = netvol.Processes()
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(procs.tgid(threading.get_native_id())))
    worker.start()
    worker.join()
    assert seen == [os.getpid()]
    assert procs.tgid(2**22 + 12345) == 2**22 + 12345  # no such thread: counted under its own id


def test_summary_ranks_sources_folders_and_paths() -> None:
    sp = "/venv/lib/python3.11/site-packages"
    snap = {
        "ops": {"getattr": 9, "opendir": 1, "readdir": 1, "open": 2, "read": 4, "read_bytes": 1000, "missing": 3},
        "paths": {
            f"{sp}/torch/__init__.py": {"getattr": 2, "open": 1},
            f"{sp}/torch/nn/x.py": {"getattr": 4, "missing": 4},
            f"{sp}/numpy": {"getattr": 1, "opendir": 1},
            "/stable-diffusion-webui-forge/modules/a.py": {"getattr": 4, "open": 1},
        },
        "files": {f"{sp}/torch/__init__.py": {}, "/stable-diffusion-webui-forge/modules/a.py": {}},
    }
    s = netvol.summarize(snap, top=2)
    assert s["top_sources"] == [[f"{sp}/torch", 7], ["/stable-diffusion-webui-forge/modules", 5]]
    assert s["top_dirs"] == [["/stable-diffusion-webui-forge/modules", 5], [f"{sp}/torch/nn", 4]]
    assert s["top_paths"][0] == ["/stable-diffusion-webui-forge/modules/a.py", 5]
    assert s["top_missing"] == [[f"{sp}/torch/nn/x.py", 4]]
    assert (s["meta"], s["opens"], s["files_opened"], s["bytes"]) == (13, 2, 2, 1000)
    before = netvol.summarize({"ops": {"getattr": 4, "open": 1, "read_bytes": 400}, "files": {"x": {}}})
    assert netvol.subtract(s, before) == {"meta": 8, "missing": 3, "opens": 1, "reads": 4, "bytes": 600,
                                          "files_opened": 1}
    assert netvol.source_of("/") == "/" and netvol.source_of(f"{sp}") == sp


def test_dump_writes_the_counters_through_the_control_socket(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    counters = netvol.Counters(netvol.Latency())
    counters.meta("getattr", "/x", os.getpid(), lambda pid: "cmd")
    server = netvol.serve_control(counters, netvol.control_path(mnt))
    try:
        out = tmp_path / "dump.json"
        netvol.dump(mnt, out)
        assert json.loads(out.read_text())["paths"] == {"/x": {"getattr": 1}}
        # The command line does the same; a bad request gets an error and the loop keeps serving.
        cli = subprocess.run([sys.executable, str(SCRIPTS / "netvol.py"), "dump", str(mnt), str(tmp_path / "2.json")],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert json.loads((tmp_path / "2.json").read_text())["ops"] == {"getattr": 1}
    finally:
        server.close()
        netvol.control_path(mnt).unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match="no netvol mount answers"):
        netvol.dump(mnt, tmp_path / "3.json")


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SCRIPTS / "netvol.py"), *args], capture_output=True, text=True,
                              timeout=60)

    missing = run("mount", str(tmp_path / "nope"), str(tmp_path))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr.splitlines()[-1]
    bad = run("mount", str(tmp_path), str(tmp_path), "--meta-ms", "-1")
    assert bad.returncode == 2 and "meta_ms must be a finite number >= 0" in bad.stderr
    nobody = run("dump", str(tmp_path), str(tmp_path / "x.json"))
    assert nobody.returncode == 1 and nobody.stderr.strip().count("\n") == 0
    assert "no netvol mount answers" in nobody.stderr


def _resident_pages(path: Path) -> int:
    """How many of ``path``'s pages are in the page cache (the boot set's own mincore reader)."""
    return sum(-(-length // mmap.PAGESIZE) for _, length in resident_ranges(path))


def test_reads_leave_no_second_copy_of_the_source_in_the_page_cache(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:  # tmpfs alone refuses direct I/O: a way to tell it from a disk's file system
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} is on tmpfs: its pages are the file, nothing can drop them")
    src = tmp_path / "src"
    src.mkdir()
    source = src / "big.bin"
    source.write_bytes(os.urandom(6 << 20))
    with open(source, "rb") as f:
        os.fsync(f.fileno())  # clean pages: only those can be dropped
    lat = netvol.Latency(0, 0, 0)
    ops = netvol.NetVolOps(src, lat, netvol.Counters(lat), context=threading.get_native_id, sleep=lambda s: None)
    fh = ops.open("/big.bin", os.O_RDONLY)
    try:
        got = b"".join(ops.read("/big.bin", 131072, offset, fh) for offset in range(0, 6 << 20, 131072))
        assert got == source.read_bytes()
        os.posix_fadvise(fh, 0, 0, os.POSIX_FADV_DONTNEED)  # what the check's own read_bytes cached
        assert _resident_pages(source) == 0
        for offset in range(0, 6 << 20, 131072):
            ops.read("/big.bin", 131072, offset, fh)
        # Behind the last read, whole folios are dropped as it goes: at most the last one or two stay.
        assert _resident_pages(source) <= (2 * netvol.FOLIO) // mmap.PAGESIZE
    finally:
        ops.release("/big.bin", fh)
    assert _resident_pages(source) == 0  # and what stayed, once the file is closed


def test_a_reads_own_time_counts_toward_its_modelled_delay(tree: Path) -> None:
    """A read costs what the model says, not that plus the source's own time (a disk read after a cache drop)."""
    slept: list[float] = []
    ticks = iter([10.0, 10.0004, 20.0, 20.5])  # the first read took 0.4 ms of the source's time, the second 0.5 s
    lat = netvol.Latency(0, 1, 100)
    ops = netvol.NetVolOps(tree, lat, netvol.Counters(lat), context=threading.get_native_id, sleep=slept.append,
                           clock=lambda: next(ticks))
    fh = ops.open("/a/b/f.bin", os.O_RDONLY)
    try:
        ops.read("/a/b/f.bin", 131072, 0, fh)
        ops.read("/a/b/f.bin", 131072, 131072, fh)  # slower than the model: no sleep on top
    finally:
        ops.release("/a/b/f.bin", fh)
    assert slept == pytest.approx([0.001 + 131072 / 1e8 - 0.0004])


def test_a_shared_bandwidth_is_the_volumes_not_each_reads() -> None:
    """``5,2,200,shared``: reads in flight together get the 200 MB/s; each read still pays its round trip."""
    lat = netvol.Latency.parse("5,2,200,shared")
    assert lat.shared and lat.label == "5,2,200,shared" and not netvol.Latency.parse("5,2,200").shared
    link = netvol.Link(lat.bw_mbps)
    # Four reads of 2 MB asked at once: each 10 ms on the link, one after another (per read: all at 10 ms).
    assert [link.through(1.0, 2_000_000) for _ in range(4)] == pytest.approx([1.01, 1.02, 1.03, 1.04])
    assert link.through(5.0, 200_000) == pytest.approx(5.001)  # an idle link: from when it was asked


def test_a_read_on_a_shared_link_waits_for_the_reads_before_it(tree: Path) -> None:
    slept: list[float] = []
    lat = netvol.Latency(0, 1, 100, shared=True)
    ops = netvol.NetVolOps(tree, lat, netvol.Counters(lat), context=threading.get_native_id, sleep=slept.append,
                           clock=lambda: 10.0)  # both reads asked at the same instant, in flight together
    fh = ops.open("/a/b/f.bin", os.O_RDONLY)
    try:
        ops.read("/a/b/f.bin", 100_000, 0, fh)
        ops.read("/a/b/f.bin", 100_000, 100_000, fh)
    finally:
        ops.release("/a/b/f.bin", fh)
    assert slept == pytest.approx([0.001 + 0.001, 0.002 + 0.001])  # 1 ms each on the link, then the round trip
