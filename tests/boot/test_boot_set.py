"""The boot set and its mirror, on a volume made of real files, links and folders (no Forge needed).

The mirror must be indistinguishable from the volume's code trees for every path a program can name:
same bytes for every file, folders where there are folders, links that lead where the volume's lead
(into the mirror when they stay in the code trees, to the volume when they leave them), and the venv's
``home`` moved with it. It must refuse to be used once the volume changed, and never write to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from provision.boot import boot_set, layout_child, layout_driver
from provision.boot.tracer import RECORD_ENV
from provision.records.state import read_state, write_state
from tests.coldstart.conftest import load_script
from tests.conftest import snapshot
from volume_layout import LAYOUT_VERSION, VolumeLayout

KEY = "k1"


def _write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture
def volume(tmp_path: Path) -> VolumeLayout:
    layout = VolumeLayout(tmp_path / "vol")
    root = layout.root
    _write(layout.python_dir / "bin" / "python3", b"#!interpreter\n")
    _write(layout.python_dir / "lib" / "os.py", "import sys\n")
    _write(layout.venv / "pyvenv.cfg", f"home = {layout.python_dir / 'bin'}\nversion = 3.11.7\n")
    (layout.venv / "bin").mkdir(parents=True)
    (layout.venv / "bin" / "python").symlink_to(layout.python_dir / "bin" / "python3")  # absolute, into the trees
    site = layout.venv / "lib" / "site-packages"
    _write(site / "pkg" / "__init__.py", "VALUE = 1\n")
    _write(site / "pkg" / "__pycache__" / "__init__.cpython-311.pyc", b"\x00pyc")
    _write(site / "pkg" / "data.txt", "not read at boot\n")
    _write(site / "pkg" / "sub" / "deep.py", "never imported\n")
    with open(site / "pkg" / "big.so", "wb") as big:  # a large mapped library: prefetched, never copied
        big.truncate(boot_set.BIG + 4096)
    (site / "elsewhere").symlink_to("/etc")  # absolute, out of the volume
    (layout.venv / "lib64").symlink_to("lib")  # relative, inside the trees
    _write(layout.forge_dir / "launch.py", "print('forge')\n")
    _write(layout.forge_dir / "modules" / "paths.py", "X = 1\n")
    _write(layout.forge_dir / ".git" / "HEAD", "ref: refs/heads/main\n")
    _write(layout.models_dir / "Lora" / "a.safetensors", b"lora")
    (layout.forge_dir / "models").mkdir()
    (layout.forge_dir / "models" / "Lora").symlink_to("../../models/Lora")  # relative, out of the trees
    _write(layout.extensions_dir / "ext" / "scripts" / "s.py", "print('ext')\n")
    checkpoint = _write(layout.models_dir / "Stable-diffusion" / "m.safetensors", b"weights")
    layout.meta_dir.mkdir(parents=True)
    write_state(layout, {"layout_version": LAYOUT_VERSION, "steps": {"boot": {"key": KEY}}})
    scratch_link = root.parent / "scratch-extensions"  # Forge sees extensions through its data dir's link
    scratch_link.symlink_to(layout.extensions_dir)
    trace = {
        "opened": [str(layout.python_dir / "lib" / "os.py"),
                   str(site / "pkg" / "__pycache__" / "__init__.cpython-311.pyc"), str(layout.launch_py),
                   str(layout.forge_dir / "modules" / "paths.py"), str(scratch_link / "ext" / "scripts" / "s.py"),
                   str(layout.forge_dir / "nothing-here.py"), str(checkpoint), "/etc/hostname"],
        "listed": [str(site), str(layout.forge_dir / "models")],
        "mapped": [str(site / "pkg" / "big.so"), str(checkpoint)],
    }
    index, files = boot_set.build_index(layout, trace, KEY)
    boot_set.write(layout, index, files)
    return layout


def test_the_index_holds_what_forge_read_and_the_sources_of_its_bytecode(volume: VolumeLayout) -> None:
    index = boot_set.read_index(volume)
    assert index is not None and index.key == KEY
    copied = {rel for rel, *_ in index.files}
    assert copied == {"python/lib/os.py", "venv/lib/site-packages/pkg/__pycache__/__init__.cpython-311.pyc",
                      "venv/lib/site-packages/pkg/__init__.py", "stable-diffusion-webui-forge/launch.py",
                      "stable-diffusion-webui-forge/modules/paths.py", "extensions/ext/scripts/s.py"}
    assert [rel for rel, *_ in index.ranges] == ["venv/lib/site-packages/pkg/big.so"]
    assert index.checkpoint == "models/Stable-diffusion/m.safetensors"
    assert "venv/bin" in index.dirs and "venv/lib/site-packages" in index.dirs
    assert "venv/lib/site-packages/pkg/sub" not in index.dirs  # never looked into: a link to the volume
    assert volume.boot_set_archive.stat().st_size == index.archive_size
    assert "6 files" in boot_set.summary(index)


def test_every_path_of_the_code_trees_reads_the_same_through_the_mirror(volume: VolumeLayout, tmp_path: Path) -> None:
    before = snapshot(volume.root)
    mirror = tmp_path / "mirror"

    result = layout_child.build(volume, mirror)

    assert result["ok"] and result["files"] == 6
    assert snapshot(volume.root) == before  # nothing written to the volume
    compared = 0
    for tree in volume.code_trees:
        for folder, dirs, files in os.walk(tree, followlinks=False):
            for name in dirs + files:
                path = Path(folder) / name
                seen = mirror / volume.relative(path)
                assert os.path.lexists(seen), seen
                if path == volume.venv / "pyvenv.cfg":
                    continue  # rewritten (below): its home moves with the mirror
                if path.is_file():
                    assert seen.read_bytes() == path.read_bytes(), seen
                elif path.is_dir():
                    assert seen.is_dir() and sorted(os.listdir(seen)) == sorted(os.listdir(path)), seen
                compared += 1
    assert compared > 20
    site = mirror / "venv" / "lib" / "site-packages"
    for rel, *_ in boot_set.read_index(volume).files:  # type: ignore[union-attr]
        local = mirror / rel
        assert not local.is_symlink() and local.stat().st_mtime_ns == volume.absolute(rel).stat().st_mtime_ns
    assert (site / "pkg" / "data.txt").is_symlink()  # not read at boot: still the volume's file
    assert os.readlink(mirror / "venv" / "bin" / "python") == str(mirror / "python" / "bin" / "python3")
    assert (mirror / "venv" / "pyvenv.cfg").read_text().startswith(f"home = {mirror / 'python' / 'bin'}\n")
    assert os.readlink(mirror / "venv" / "lib64") == "lib"
    assert os.readlink(site / "elsewhere") == "/etc"
    assert os.readlink(mirror / "stable-diffusion-webui-forge" / "models" / "Lora") == str(volume.models_dir / "Lora")
    assert (mirror / "stable-diffusion-webui-forge" / "models" / "Lora" / "a.safetensors").read_bytes() == b"lora"


@pytest.mark.parametrize("change", ["none", "new file", "install key", "no index", "short archive"])
def test_a_changed_volume_or_a_broken_boot_set_is_refused_with_the_fix(
        volume: VolumeLayout, tmp_path: Path, change: str) -> None:
    if change == "new file":
        _write(volume.venv / "lib" / "site-packages" / "pkg" / "new.py", "added by hand\n")
    elif change == "install key":
        write_state(volume, {**(read_state(volume) or {}), "steps": {"boot": {"key": "other"}}})
    elif change == "no index":
        volume.boot_set_index.unlink()
    elif change == "short archive":
        with open(volume.boot_set_archive, "r+b") as archive:
            archive.truncate(10)

    said: list[str] = []
    # As the worker runs it: the child lays the set out (Forge may start), then checks every folder.
    check = layout_driver.lay_out(volume, tmp_path / "mirror", 120, said.append)

    if change == "none":
        assert check is not None and check.problem(120) is None
        return
    if change == "new file":  # found by the check beside Forge's start: the worker restarts Forge from the volume
        assert check is not None and said[0].startswith("fast boot: 6 files")
        message = check.problem(120)
        assert message is not None and "venv/lib/site-packages/pkg was modified" in message
    else:  # found before Forge starts: it boots from the volume
        assert check is None and len(said) == 1 and said[0].startswith("fast boot off: ")
        message = said[0]
        assert message.endswith("; booting from the volume")
        if change == "short archive":
            assert ".forge-volume/boot-set/files.bin changed size" in message
    assert "forge-volume install" in message and "\n" not in message


def test_install_side_check_also_sees_a_file_edited_in_place(volume: VolumeLayout) -> None:
    index = boot_set.read_index(volume)
    assert index is not None and boot_set.changed(volume, index) is None
    launch = volume.launch_py
    folder_mtime = launch.parent.stat().st_mtime_ns
    with open(launch, "a") as edit:  # in place: the folder's mtime does not move
        edit.write("# edited\n")
    os.utime(launch.parent, ns=(folder_mtime, folder_mtime))

    assert boot_set.changed(volume, index, files=False) is None  # a worker's cheap check cannot see it
    assert boot_set.changed(volume, index) == "stable-diffusion-webui-forge/launch.py changed size"


def test_the_check_spreads_each_folder_s_entries_over_the_whole_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some clients of a network volume look up the names of one folder one at a time: the check's threads must
    not all wait on one folder (site-packages holds hundreds of recorded folders, listed together in the index)."""
    layout = VolumeLayout(tmp_path / "vol")
    site = layout.venv / "lib" / "site-packages"
    crowded = [f"{layout.relative(site)}/pkg{i:03}" for i in range(200)]
    others = [f"{layout.relative(layout.forge_dir)}/m{i:03}" for i in range(200)]
    dirs = {}
    for rel in [*crowded, *others]:  # the index's order: a folder's entries together
        (layout.root / rel).mkdir(parents=True)
        dirs[rel] = ((layout.root / rel).stat().st_mtime_ns, [])
    _write(layout.boot_set_archive, b"")
    index = boot_set.Index(key=KEY, root=str(layout.root), dirs=dirs)
    paths: list[Any] = []
    real_stat = os.stat

    def recording_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        paths.append(path)
        return real_stat(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(boot_set.os, "stat", recording_stat)  # the real stat, its order recorded
        found = boot_set.changed(layout, index, threads=1, files=False)
    assert found is None
    stated = [layout.relative(Path(path)) for path in paths]
    assert sorted(stated) == sorted([*dirs, layout.relative(layout.boot_set_archive)])
    crowded_set = set(crowded)
    in_crowded = [rel in crowded_set for rel in stated]
    assert 60 <= sum(in_crowded[:200]) <= 140  # in the index's order: all 200
    longest = run = 0
    for crowded_one in in_crowded:  # the longest run of stats in the crowded folder, one after another
        run = run + 1 if crowded_one else 0
        longest = max(longest, run)
    assert longest < 16  # never a thread pool's worth of lookups queued on the one folder


def test_a_corrupt_index_counts_as_none(volume: VolumeLayout) -> None:
    volume.boot_set_index.write_text(json.dumps({"version": 99}))
    assert boot_set.read_index(volume) is None
    volume.boot_set_index.write_text("{not json")
    assert boot_set.read_index(volume) is None
    escaping = boot_set.Index(key=KEY, root=str(volume.root), files=[("venv/../../escape", 0, 1, 0, 0o644)])
    volume.boot_set_index.write_text(json.dumps(escaping.to_json()))
    assert boot_set.read_index(volume) is None  # a path out of the volume: never written to, never trusted


def test_the_prefetch_reads_the_touched_ranges_and_the_checkpoint(volume: VolumeLayout) -> None:
    index = boot_set.read_index(volume)
    assert index is not None
    spans = sum(length for _, _, _, ranges in index.ranges for _, length in ranges)
    assert layout_child.prefetch(volume, index) == spans + len(b"weights")


def test_the_check_and_the_prefetch_yield_the_cpu_to_forge_and_the_lay_out_does_not(
        volume: VolumeLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Forge's start is one thread bound by the CPU: what the child does beside it runs nicer; the lay-out, which
    Forge waits for, does not. Each of the child's steps runs as it would (the spies only note their priority)."""
    seen: dict[str, int] = {}

    def noting(name: str, step: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            seen[name] = os.getpriority(os.PRIO_PROCESS, 0)  # on Linux: the calling thread's
            return step(*args, **kwargs)
        return run

    for name in ("build", "changed", "prefetch"):
        monkeypatch.setattr(layout_child, name, noting(name, getattr(layout_child, name)))
    before: list[int] = []

    def child() -> None:  # a thread of its own: a thread's nice value cannot be lowered again
        before.append(os.getpriority(os.PRIO_PROCESS, 0))
        layout_child.main([str(volume.root), str(tmp_path / "mirror")])

    thread = threading.Thread(target=child)
    thread.start()
    thread.join(60)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["ok"] and [line["changed"] for line in lines if "changed" in line] == [None]
    nicer = min(19, before[0] + layout_child.BACKGROUND_NICE)
    assert seen == {"build": before[0], "changed": nicer, "prefetch": nicer}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before[0]  # the caller's thread kept its own


def test_the_prefetch_s_files_are_open_before_the_check_begins_and_read_through_what_was_opened(
        volume: VolumeLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Forge maps the first of the prefetched libraries within a second of its start: their files are opened
    before the check's thousands of lookups can queue ahead of them, and the prefetch reads through those
    descriptors (each file opened once)."""
    opened_all = threading.Event()
    check_after_opening: list[bool] = []
    opened_files: list[str] = []
    real_open, real_changed, real_open_regular = (layout_child.open_prefetch, layout_child.changed,
                                                  layout_child._open_regular)

    def open_prefetch(layout: VolumeLayout, index: boot_set.Index) -> layout_child.Opened:
        opened = real_open(layout, index)
        opened_all.set()
        return opened

    def changed(*args: Any, **kwargs: Any) -> str | None:
        check_after_opening.append(opened_all.is_set())
        return real_changed(*args, **kwargs)

    def open_regular(path: Path) -> int | None:
        opened_files.append(volume.relative(path))
        return real_open_regular(path)

    monkeypatch.setattr(layout_child, "open_prefetch", open_prefetch)
    monkeypatch.setattr(layout_child, "changed", changed)
    monkeypatch.setattr(layout_child, "_open_regular", open_regular)
    ended: list[int] = []  # a thread of its own: the child raises its nice value for good
    thread = threading.Thread(target=lambda: ended.append(layout_child.main([str(volume.root), str(tmp_path / "m")])))
    thread.start()
    thread.join(60)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ended == [0] and lines[0]["ok"] and [line["changed"] for line in lines if "changed" in line] == [None]
    assert check_after_opening == [True]
    index = boot_set.read_index(volume)
    assert index is not None
    spans = sum(length for _, _, _, ranges in index.ranges for _, length in ranges)
    assert [line["prefetched"] for line in lines if "prefetched" in line] == [spans + len(b"weights")]
    assert index.checkpoint is not None
    prefetched = list(dict.fromkeys([rel for rel, _, _, _ in index.ranges] + [index.checkpoint]))
    assert sorted(rel for rel in opened_files if rel in prefetched) == sorted(prefetched)  # each once


def test_the_prefetch_opens_its_files_many_at_once_and_reads_them_in_their_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a slow volume each open is a few round trips: 45 files one after another took 0.74 s at 5 ms per call,
    many at once 0.26 s. The pieces still come in the files' order (the first library Forge maps, first)."""
    layout = VolumeLayout(tmp_path / "vol")
    names = [f"venv/lib/lib{i}.so" for i in range(6)]
    for i, name in enumerate(names):
        _write(layout.absolute(name), bytes([i]) * (i + 1))
    in_flight, most = [0], [0]
    lock = threading.Lock()
    real_open_regular = layout_child._open_regular

    def open_regular(path: Path) -> int | None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.1)  # a round trip
        with lock:
            in_flight[0] -= 1
        return real_open_regular(path)

    monkeypatch.setattr(layout_child, "_open_regular", open_regular)
    fds: list[int] = []
    try:
        pieces = layout_child._open_pieces(layout, [(name, None, [(0, None)]) for name in names], fds)
        assert most[0] > 1
        assert [os.pread(fd, length, offset) for fd, offset, length in pieces] == \
            [bytes([i]) * (i + 1) for i in range(6)]
    finally:
        for fd in fds:
            os.close(fd)


TOUCHING = """
import mmap, os, sys, time
page = mmap.PAGESIZE
with open(sys.argv[1], "rb") as f:
    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
view[3 * page], view[5000 * page + 7]  # touch two pages of 8192
print(os.environ.get("FORGE_VOLUME_BOOT_TRACE", "removed"), sys.argv[1:] == [sys.argv[1], sys.argv[2]])
open(sys.argv[2] + ".request", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
"""


def test_the_tracer_records_the_pages_the_boot_touched_not_what_readahead_cached(tmp_path: Path) -> None:
    """The whole file is in the page cache (just written), as after a boot from a disk with a large readahead;
    the record holds the two touched pages and at most their neighbours in the same folio, nothing far off.

    How many neighbours a fault maps depends on the folios the page cache holds the file in: 16 pages of
    fault-around with small ones, the whole folio with a large one (up to a PMD, 2 MiB: a 1 MiB file written
    on a machine with contiguous free memory was mapped whole, once in a full run)."""
    page = os.sysconf("SC_PAGE_SIZE")
    folio = (2 << 20) // page  # the largest page-cache folio (a PMD)
    library = tmp_path / "lib.so"
    library.write_bytes(os.urandom(8192 * page))
    launch = _write(tmp_path / "launch.py", TOUCHING)
    record = tmp_path / "trace.json"
    env = {**os.environ, RECORD_ENV: str(record)}
    run = subprocess.run([sys.executable, str(boot_set.TRACER), str(launch), str(library), str(record)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["removed", "True"]  # Forge sees its own argv, not the tracer's variable
    touched = {offset // page for offset, length in json.loads(record.read_text())["touched"][str(library)]
               for offset in range(offset, offset + length, page)}
    assert {3, 5000} <= touched
    around = {p for p in touched if p // folio in (3 // folio, 5000 // folio)}
    assert touched == around and len(touched) <= 2 * folio  # 1024 of the 8192 cached pages at most


def test_the_prefetch_line_gives_the_libraries_and_the_checkpoint_apart() -> None:
    from provision.boot.layout_driver import _prefetched

    line = _prefetched({"prefetched": 3 << 30, "seconds": 9.5, "libraries": 1 << 30, "libraries_seconds": 2.25})
    assert line == ("fast boot: prefetched 3.0 GiB in 9.50 s: the libraries' pages (1.0 GiB) in 2.25 s, "
                    "then the checkpoint (2.0 GiB) in 7.25 s")
    assert _prefetched({"prefetched": "many"}) == "fast boot: prefetched (the helper's report is unreadable)"


PROBING = """
import importlib.util, os, sys, time
sys.path.insert(0, sys.argv[1])
assert importlib.util.find_spec("optional_pkg") is not None  # a library checking what is installed
import extmod  # an extension module beside a folder of stubs: the import system probes stubs/__init__.*
os.path.exists(os.path.join(sys.argv[1], "configs", "missing.json"))
os.path.getmtime(os.path.join(sys.argv[1], "configs", "other.json"))  # like Forge's UI scripts, only stat'ed
open(sys.argv[2] + ".request", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
"""


def test_the_tracer_notes_the_folders_forge_only_probed(tmp_path: Path) -> None:
    """No audit event covers a stat: a folder whose names Forge only probed (found or not) was missing from
    the record, so a worker answered each probe with a round trip to the volume (800 before the lab's Forge
    answered). The tracer notes them by wrapping stat."""
    site = tmp_path / "site"
    _write(site / "optional_pkg" / "__init__.py", "raise SystemExit('never imported')\n")
    _write(site / "extmod.py", "VALUE = 1\n")
    _write(site / "extmod" / "stub.pyi", "VALUE: int\n")  # like cv2/xphoto/: stubs only, no __init__
    _write(site / "configs" / "other.json", "{}\n")
    _write(site / "untouched" / "x.py", "\n")
    launch = _write(tmp_path / "launch.py", PROBING)
    record = tmp_path / "trace.json"
    run = subprocess.run([sys.executable, str(boot_set.TRACER), str(launch), str(site), str(record)],
                         env={**os.environ, RECORD_ENV: str(record)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    trace = json.loads(record.read_text())
    probed = set(trace["probed"])
    assert {str(site / "optional_pkg"), str(site / "extmod"), str(site / "configs")} <= probed, sorted(probed)
    assert str(site / "untouched") not in probed
    assert str(site / "optional_pkg" / "__init__.py") not in trace["opened"]  # probed, never opened
    stated = set(trace["stated"])
    assert {str(site / "configs" / "other.json"), str(site / "configs" / "missing.json")} <= stated
    assert str(site / "configs" / "other.json") not in trace["opened"]
    # Read at the interpreter's start, before any hook: every .pth of its site-packages, and what site loaded.
    import site as python_site

    pth = [str(p) for folder in python_site.getsitepackages() for p in sorted(Path(folder).glob("*.pth"))]
    assert pth and set(pth) <= set(trace["opened"]), pth
    assert python_site.__file__ in trace["opened"]


def test_a_probed_folder_is_laid_out_and_its_misses_stay_local(volume: VolumeLayout, tmp_path: Path) -> None:
    site = volume.venv / "lib" / "site-packages"
    trace = {"opened": [str(volume.launch_py)], "listed": [],
             "probed": [str(site / "pkg" / "sub"), str(site / "no-such-folder"), "/etc", str(volume.models_dir)]}
    index, files = boot_set.build_index(volume, trace, KEY)
    assert "venv/lib/site-packages/pkg/sub" in index.dirs and "venv/lib/site-packages/pkg" in index.dirs
    assert not any("no-such-folder" in rel or rel.startswith(("etc", "models")) for rel in index.dirs)
    assert index.trace == boot_set.TRACE
    boot_set.write(volume, index, files)
    mirror = tmp_path / "mirror"
    assert layout_child.build(volume, mirror)["ok"]
    sub = mirror / "venv" / "lib" / "site-packages" / "pkg" / "sub"
    assert sub.is_dir() and not sub.is_symlink()  # a probe of sub/__init__.py is answered by the local disk
    assert not (sub / "__init__.py").exists() and (sub / "deep.py").is_symlink()
    assert (sub / "deep.py").read_text() == "never imported\n"


def test_a_small_file_forge_only_stated_is_copied_and_a_large_one_stays_a_link(volume: VolumeLayout,
                                                                               tmp_path: Path) -> None:
    """Forge stats its UI's scripts (for their mtimes) and each extension's forge_app.py even with --nowebui: each
    a round trip to the volume through a link, unless the file is in the copy with its size and mtime."""
    forge = volume.forge_dir
    _write(forge / "javascript" / "ui.js", "// ui\n")
    large = forge / "javascript" / "large.js"
    _write(large, "x" * (boot_set.STATED_LIMIT + 1))
    os.utime(forge / "javascript" / "ui.js", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    trace = {"opened": [str(volume.launch_py)], "listed": [],
             "stated": [str(forge / "javascript" / "ui.js"), str(large), str(forge / "javascript" / "gone.js"),
                        str(volume.models_dir / "Lora" / "a.safetensors"), "/etc/hostname"]}
    index, files = boot_set.build_index(volume, trace, KEY)
    copied = {rel for rel, *_ in index.files}
    assert "stable-diffusion-webui-forge/javascript/ui.js" in copied
    assert not copied & {"stable-diffusion-webui-forge/javascript/large.js",
                         "stable-diffusion-webui-forge/javascript/gone.js"}
    assert not any(rel.startswith("models") for rel in copied)
    boot_set.write(volume, index, files)
    mirror = tmp_path / "mirror"
    assert layout_child.build(volume, mirror)["ok"]
    ui, big = mirror / volume.relative(forge / "javascript" / "ui.js"), mirror / volume.relative(large)
    assert not ui.is_symlink() and ui.lstat().st_mtime_ns == 1_600_000_000_000_000_000 and ui.read_text() == "// ui\n"
    assert big.is_symlink() and big.stat().st_size == boot_set.STATED_LIMIT + 1


def test_the_lay_out_bench_lays_out_the_set_and_turns_a_damaged_one_into_one_line(volume: VolumeLayout,
                                                                                   tmp_path: Path) -> None:
    layout_bench = load_script("bench_layout")  # scripts/bench_layout.py: its lay-out is the worker's
    index = boot_set.load_index(volume)
    own = layout_bench.lay_out(volume, index, 2, tmp_path / "mirror")
    launch = tmp_path / "mirror" / volume.relative(volume.launch_py)
    assert own >= 0 and launch.read_text() == "print('forge')\n" and not launch.is_symlink()
    with open(volume.boot_set_archive, "r+b") as archive:
        archive.truncate(10)
    with pytest.raises(layout_bench.BenchError) as refused:
        layout_bench.lay_out(volume, index, 2, tmp_path / "again")
    assert "the boot set cannot be laid out" in str(refused.value) and "files.bin changed size" in str(refused.value)
    assert "\n" not in str(refused.value)
