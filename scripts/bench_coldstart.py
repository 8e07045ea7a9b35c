#!/usr/bin/env python3
"""Cold start of the real Forge from a simulated network volume: the original worker's way, ours, the limit.

Opt-in: needs root, /dev/fuse, the Forge lab (``/work/lab``, see ``../shared/forge-lab/``) and a volume
provisioned from it by ``forge-volume install`` (``--volume``, default ``/work/realvol/volume``). Its
own setup installs Debian's ``fuse3 libfuse3-3`` and ``mfusepy`` when they are missing.

It first runs ``forge-volume install`` on the volume (nothing to do unless something changed;
``--no-install`` skips it). Then, for each latency setting (``--settings``: META_MS,READ_MS,BW_MBPS
of ``scripts/netvol.py``, ``,shared`` appended for a bandwidth the reads in flight share; ``0,0,0`` is FUSE
without delays), round by round (``--runs``), each
variant once, timed from process start to (a) Forge answering on its API port, (b) the first
``GET /sdapi/v1/sd-models`` answered, (c) the first txt2img (64x64, 2 steps) answered:

- ``original``: runpod-worker-forge's way: its ``start.sh`` runs ``webui.py`` from the volume's venv
  with its flags (``ORIGINAL_FLAGS``); (b) and (c) go to Forge directly (its handler's relay costs
  about a millisecond, nothing at this scale).
- ``ours-off``: our worker (``python -m worker`` behind RunPod's local API, jobs to ``/runsync``),
  ``FORGE_FAST_BOOT=0``.
- ``ours``: the same, fast boot on (``FORGE_FAST_BOOT`` unset).
- ``limit``: the page-cache limit: our worker (fast boot off) on the volume directly, no FUSE, right
  after an untimed warm-up run, caches not dropped.
- ``warm``: the same with fast boot on: ``warm`` against ``limit`` is "a warm worker's first answer".
- ``--candidate NAME=DIR`` (repeatable): ``ours`` with the worker's code from DIR (another checkout, a git
  worktree of a change) first on its ``PYTHONPATH``: a change and main measured interleaved in one run, the
  only comparison this machine's drift allows (the same code measured 18 s and 24 s twenty minutes apart).
- ``--source NAME=PATH`` (repeatable): the FUSE runs of variant NAME serve PATH, a copy of the volume (a tree
  of hard links with its own ``.forge-volume``: a boot set another forge-volume recorded), over the volume's
  path; so main's code boots from the boot set main writes while a candidate boots from its own.

A FUSE variant's run is cold: a fresh ``netvol`` mount of the volume, ``sync; echo 3 >
/proc/sys/vm/drop_caches``, then the process in ``unshare -m`` with the mount bind-mounted over the
volume's own path (the venv holds absolute paths). Per run it records netvol's counters when Forge
answers and at the end (metadata calls, opens, bytes, top sources) and the peak memory of the
worker and of Forge (VmHWM, and the highest RssAnon sampled: memory outside the page cache).

Prints medians per setting and variant, the ratios ours/original and ours/limit, and writes every
run to ``--out`` (JSON, rewritten after each run). Logs and counters of each run stay under
``--work`` (default ``bench-out/coldstart/<time>``). A cold run takes about 90 s at 1,1,400 and
300 s at 5,2,200 on 2 cores; the defaults (two settings, three runs, five variants) about 70 minutes.

    sudo .venv/bin/python scripts/bench_coldstart.py
    sudo .venv/bin/python scripts/bench_coldstart.py --settings 1,1,400 --runs 1 --variants ours-off --no-install
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT))

import netvol  # noqa: E402
from netvol import Latency  # noqa: E402

from volume_layout import VolumeLayout  # noqa: E402

VARIANTS = ("original", "ours-off", "ours", "limit", "warm")
FUSE_VARIANTS = ("original", "ours-off", "ours")
DEFAULT_SETTINGS = ("1,1,400", "5,2,200")
DEFAULT_VOLUME = Path("/work/realvol/volume")
DEFAULT_LAB = Path("/work/lab")
FORGE_SCRIPTS = ("launch.py", "webui.py")  # how a Forge process shows in netvol's per-process counters
PROBE_ROUTE = "/sdapi/v1/samplers"  # the worker's own readiness probe: cheap, no model scan
TXT2IMG: dict[str, Any] = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}
# runpod-worker-forge's start.sh (ashleykleynhans/runpod-worker-forge; read from the fork
# swimmingyoshi/runpod-worker-forge@78c185bc, start.sh), in its order. Dropped: --xformers (no
# xformers on a CPU). It also sets PYTHONUNBUFFERED=true, HF_HOME=/workspace (the volume) and
# LD_PRELOAD to a libtcmalloc.so.N when `ldconfig -p` lists one.
ORIGINAL_FLAGS = ("--no-half-vae", "--skip-python-version-check", "--skip-torch-cuda-test", "--skip-install",
                  "--lowram", "--opt-sdp-attention", "--disable-safe-unpickle", "--api", "--nowebui",
                  "--skip-version-check", "--no-hashing", "--no-download-sd-model")
DROPPED_FLAGS = ("--xformers",)


class BenchError(Exception):
    """A run or a setup step failed; the message says what and carries the stderr tail."""


# -- arguments and the refusal ---------------------------------------------------------------------
def _latency(text: str) -> Latency:
    try:
        return Latency.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(n for n in re.split(r"[,\s]+", text) if n)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(VARIANTS)}")
    return tuple(dict.fromkeys(names))


def _candidate(text: str) -> tuple[str, Path]:
    name, eq, where = text.partition("=")
    if not eq or not re.fullmatch(r"[a-z][a-z0-9-]*", name) or name in VARIANTS:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR, NAME in lowercase letters, digits and '-' and "
                                         f"none of {', '.join(VARIANTS)}")
    root = Path(where).absolute()
    if not all((root / package / "__init__.py").is_file() for package in ("worker", "provision")):
        raise argparse.ArgumentTypeError(f"{root} is not a checkout of forge-volume (no worker/ and provision/)")
    return name, root


def _source(text: str) -> tuple[str, Path]:
    name, eq, where = text.partition("=")
    root = Path(where).absolute()
    if not eq or not name or not (root / "venv").is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=PATH, PATH a copy of the volume (with its venv/)")
    return name, root


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_coldstart.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", type=Path, default=DEFAULT_VOLUME, help="a volume provisioned from the lab")
    ap.add_argument("--lab", type=Path, default=DEFAULT_LAB, help="the Forge lab (its env.sh)")
    ap.add_argument("--settings", type=_latency, nargs="+", default=[Latency.parse(s) for s in DEFAULT_SETTINGS],
                    metavar="META_MS,READ_MS,BW_MBPS", help="latency settings (default: 1,1,400 5,2,200)")
    ap.add_argument("--runs", type=_positive, default=3, help="rounds per setting (default 3)")
    ap.add_argument("--variants", type=_variants, default=VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--candidate", type=_candidate, action="append", default=[], metavar="NAME=DIR",
                    help="one more variant, NAME: ours with the worker's code from DIR, another checkout (a git "
                         "worktree), run interleaved with the rest; repeatable")
    ap.add_argument("--source", type=_source, action="append", default=[], metavar="NAME=PATH",
                    help="variant NAME's FUSE runs serve PATH, a copy of the volume, over the volume's path")
    ap.add_argument("--no-install", action="store_true", help="skip `forge-volume install` on the volume")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds each wait may take (default 900)")
    ap.add_argument("--work", type=Path, help="logs and counters (default bench-out/coldstart/<time>)")
    ap.add_argument("--out", type=Path, help="result JSON (default WORK/result.json)")
    ap.add_argument("--page-reporting", choices=("off", "host"), default="off",
                    help="a VM's free page reporting to its host and DAMON's paging out: off for the bench "
                         "(default; see HostMemory) or as the host set them")
    args = ap.parse_args(list(argv))
    if args.deadline <= 0:
        ap.error("--deadline must be > 0")
    args.candidates = dict(args.candidate)
    if len(args.candidates) < len(args.candidate):
        ap.error("--candidate names must differ")
    args.variants = (*args.variants, *args.candidates)
    args.sources = dict(args.source)
    if bad := [name for name in args.sources if name not in args.variants or name not in (*FUSE_VARIANTS,
                                                                                          *args.candidates)]:
        ap.error(f"--source for {', '.join(bad)}: only a variant run through FUSE (ours, ours-off, original, a "
                 "candidate) serves a copy")
    args.volume = args.volume.absolute()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.work = (args.work or ROOT / "bench-out" / "coldstart" / stamp).absolute()
    args.out = (args.out or args.work / "result.json").absolute()
    return args


def refusal(args: argparse.Namespace, euid: int | None = None, fuse_dev: Path = Path("/dev/fuse")) -> str | None:
    """Why this machine cannot run the benchmark, in one line; None when it can."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return "needs root (FUSE mounts, unshare -m, drop_caches): run it with sudo"
    if not fuse_dev.exists():
        return f"needs {fuse_dev} (FUSE): this machine or container has none"
    if not (args.lab / "env.sh").is_file():
        return f"needs the Forge lab: {args.lab}/env.sh not found (build it with ../shared/forge-lab/build.sh; --lab)"
    layout = VolumeLayout(args.volume)
    if not layout.venv_python.exists() or not layout.forge_dir.is_dir():
        return (f"needs a volume provisioned from the lab: {args.volume} has no venv or Forge "
                f"(forge-volume install; --volume)")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux)"
    return None


# -- small helpers ---------------------------------------------------------------------------------
def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def free_ports(count: int) -> list[int]:
    """Ports free now, below the ephemeral range: a port the kernel hands out for port 0 can be taken by
    another program (a test server on this shared machine) between this check and the bind."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", random.randint(20000, 32000)))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def lab_env(lab: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines of the lab's env.sh (the launcher's offline overrides)."""
    env: dict[str, str] = {}
    for line in (lab / "env.sh").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for word in words[1:]:
                name, eq, value = word.partition("=")
                if eq:
                    env[name] = value
    return env


def tcmalloc_like_start_sh() -> str:
    """What start.sh puts in LD_PRELOAD: the first ``libtcmalloc.so.N`` that ``ldconfig -p`` lists, else ''."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(r"libtcmalloc\.so\.\d", out)
    return found.group(0) if found else ""


def http_call(port: int, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw[:500].decode(errors="replace")
    finally:
        conn.close()


def answers(port: int) -> bool:
    try:
        return http_call(port, "GET", PROBE_ROUTE, timeout=2.0)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_until(what: str, check: Callable[[], bool], deadline: float, alive: Callable[[], str | None],
               interval: float = 0.1) -> None:
    """Poll ``check`` until true; BenchError when ``alive`` reports a death or the deadline passes."""
    end = time.monotonic() + deadline
    while not check():
        dead = alive()
        if dead:
            raise BenchError(f"{what}: {dead}")
        if time.monotonic() > end:
            raise BenchError(f"{what}: not within {deadline:g} s")
        time.sleep(interval)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True, timeout=300)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mounted(mnt: Path) -> bool:
    """From the mount table, without touching the mount (a stat would be counted as a call)."""
    target = str(mnt)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS and RssAnon of a live process, in kB (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def shmem_kb() -> int:
    """The machine's shared memory (tmpfs such as /dev/shm) in kB: memory outside any process's RSS that
    the page cache cannot give back."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def child_matching(parent: int, needle: str) -> int | None:
    """A child of ``parent`` whose command line contains ``needle`` (Forge under the worker)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and needle in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


# Where a cold start's time goes, from the lines the worker and Forge print (seconds; each one is optional).
PHASES = (
    ("lay-out", re.compile(r"\[worker\] fast boot: .* laid out on local disk in ([\d.]+) s")),
    ("libraries prefetched",
     re.compile(r"\[worker\] fast boot: prefetched .* the libraries' pages \(.*?\) in ([\d.]+) s")),
    ("volume checked", re.compile(r"\[worker\] fast boot: the volume checked \(.*?\) in ([\d.]+) s")),
    ("checkpoint read", re.compile(r"\[worker\] fast boot: prefetched .* then the checkpoint \(.*?\) in ([\d.]+) s")),
    ("Forge startup", re.compile(r"^Startup time: ([\d.]+)s", re.MULTILINE)),
    ("import torch", re.compile(r"^Startup time: .*?import torch: ([\d.]+)s", re.MULTILINE)),
    ("Forge ready", re.compile(r"\[worker\] Forge ready after ([\d.]+) s")),
    ("model load", re.compile(r"^Model loaded in ([\d.]+)s", re.MULTILINE)),
    ("hashing", re.compile(r"^Model loaded in .*?calculate hash: ([\d.]+)s", re.MULTILINE)),
)


def forge_calls(snapshot: Mapping[str, Any]) -> dict[str, int]:
    """Forge's own calls to the volume in a netvol snapshot (its processes: those running ``launch.py`` or
    ``webui.py``): what Forge itself waited for, apart from the worker's and the lay-out child's."""
    out = {"meta": 0, "reads": 0, "bytes": 0}
    for proc in (snapshot.get("procs") or {}).values():
        if any(name in str(proc.get("cmd", "")) for name in FORGE_SCRIPTS):
            for key in out:
                out[key] += int(proc.get(key, 0))
    return out


def phases(log: str) -> dict[str, float]:
    """The phases a run's log names, in seconds (the first of each: the cold start's)."""
    found: dict[str, float] = {}
    for name, pattern in PHASES:
        if match := pattern.search(log):
            found[name] = float(match.group(1))
    return found


def cpu_seconds(pid: int) -> float | None:
    """A live process's user and system CPU seconds (all its threads), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_members(pgid: int) -> list[int]:
    """The processes still in process group ``pgid`` (zombies included: their memory may not be freed yet)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry.name))
    return members


def cpu_idle(window: float = 0.5) -> float:
    """The share of the machine's CPU time that was idle over ``window`` seconds (/proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def settle(deadline: float = 60.0, idle: float = 0.9) -> float:
    """Wait until the machine is quiet (what the previous run left, a process freeing its memory, the page
    cache written back, has ended), at most ``deadline`` seconds; returns the seconds waited. Without it a run
    could start while the one before still freed 4 GB (seen: 100 % system time for 20 s after a Forge exit),
    and a variant's figure would depend on which variant ran before it."""
    started = time.monotonic()
    while time.monotonic() - started < deadline and cpu_idle() < idle:
        pass
    return time.monotonic() - started


# -- the machine's memory ---------------------------------------------------------------------------
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")
KDAMONDS = Path("/sys/kernel/mm/damon/admin/kdamonds")
NO_REPORTING_ORDER = 11  # above the buddy allocator's highest order (10): no free block is large enough to report
MADV_POPULATE_WRITE = 23  # linux/mman.h (5.14+): fault in every page of a range at once
PRETOUCH_MARGIN = 1 << 30  # left untouched: the machine's own needs while the toucher runs
PRETOUCH = """
import mmap, resource, sys
size = int(sys.argv[1])
m = mmap.mmap(-1, size)
try:
    m.madvise(POPULATE_WRITE, 0, size)
except OSError:  # a kernel before 5.14: one write per page
    for offset in range(0, size, mmap.PAGESIZE):
        m[offset] = 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""".replace("POPULATE_WRITE", str(MADV_POPULATE_WRITE))


def pretouch(size: int) -> int:
    """Fault in ``size`` bytes of anonymous memory in a child, which then exits and frees them; the child's peak
    resident memory in bytes (``size`` and the interpreter's own)."""
    done = subprocess.run([sys.executable, "-c", PRETOUCH, str(size)], capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise BenchError(f"touching {size >> 20} MiB of free memory failed: {done.stderr.strip()[-500:]}")
    return int(done.stdout.split()[-1])


def mem_free(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemFree in bytes: pages nothing holds (not even the page cache)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"{meminfo} has no MemFree line")


class HostMemory:
    """A virtual machine's memory machinery held still for the bench: free pages handed back to the host, and
    the page cache paged out behind the runs' backs.

    A guest with virtio-balloon's free page reporting (Firecracker's, this machine's) reports free 2 MiB
    blocks to the host, which discards them; the next touch of such a page costs a fault in the host and a
    zeroed page. The cold runs start with ``drop_caches``, which frees gigabytes, and then pay for every page
    they fill again: measured on this machine, copying the lab's 2.1 GB checkpoint out of a freshly filled
    page cache took 3.4 s (3.9 s of system time) with reporting on and 0.8-1.3 s with it off, and Forge's
    model load 5.7 s in a cold run against 2.1 s in the limit's, whose run drops nothing. ``hold`` stops
    the reporting and touches the free memory once (so what was handed back before is the guest's again).

    The same machine runs DAMON (``kdamond``) with a scheme that pages out file pages no process maps once
    they have gone unused for a minute: between a warm-up and its timed run, and more so with SDXL's longer
    runs, it took pages of the "warm" page cache away (the limit's SDXL runs measured 19 to 32 s). ``hold``
    turns the kdamonds off too.

    ``release`` restores both. A machine without these knobs (bare metal, most hosts) is left as it is."""

    def __init__(self, knob: Path = PAGE_REPORTING, kdamonds: Path = KDAMONDS) -> None:
        self.knob = knob
        self.kdamonds = kdamonds
        self.was: str | None = None
        self.stopped: list[Path] = []  # the state files of the kdamonds this bench turned off

    def hold(self, touch: Callable[[int], object] | None = None) -> dict[str, Any]:
        """Reporting and DAMON off, the free memory touched once (``touch``, default ``pretouch``); what was
        done."""
        held: dict[str, Any] = {"damon": self._stop_damon()}
        try:
            was = self.knob.read_text().strip()
        except OSError:
            return {"page_reporting": "absent", **held}
        try:
            self.knob.write_text(f"{NO_REPORTING_ORDER}\n")
        except OSError as exc:
            return {"page_reporting": f"order {was}, left on: {exc.strerror or exc}", **held}
        self.was = was
        size = max(0, mem_free() - PRETOUCH_MARGIN)
        started = time.monotonic()
        (touch or pretouch)(size)
        return {"page_reporting": f"off for the bench (was order {was})", "pretouched_mib": size >> 20,
                "pretouch_s": round(time.monotonic() - started, 1), **held}

    def _stop_damon(self) -> str:
        states = sorted(self.kdamonds.glob("*/state"))
        for state in states:
            try:
                if state.read_text().strip() == "on":
                    state.write_text("off\n")
                    self.stopped.append(state)
            except OSError:
                continue
        if not states:
            return "absent"
        return f"{len(self.stopped)} kdamond(s) off for the bench" if self.stopped else "no kdamond running"

    def release(self) -> None:
        for state in self.stopped:
            with contextlib.suppress(OSError):
                state.write_text("on\n")
        self.stopped = []
        if self.was is not None:
            with contextlib.suppress(OSError):
                self.knob.write_text(f"{self.was}\n")
            self.was = None


def median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


# -- processes and mounts, cleaned up on every exit path ------------------------------------------
class Cleanup:
    """Every process group and mount the bench started; ``close`` ends them all (also on Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, grace: float = 20.0) -> None:
        """``sig`` to the group's leader (SIGINT: the SDK's graceful stop), then SIGKILL to the group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # Forge and anything else left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        gone_by = time.monotonic() + 60
        while group_members(proc.pid) and time.monotonic() < gone_by:
            time.sleep(0.1)  # a Forge killed with its worker still frees gigabytes for seconds
        if proc in self.procs:
            self.procs.remove(proc)

    def unmount(self, mnt: Path) -> None:
        for args in (["fusermount3", "-u", str(mnt)], ["fusermount3", "-u", "-z", str(mnt)]):
            if not mounted(mnt):
                break
            subprocess.run(args, capture_output=True, timeout=60, check=False)
        if mnt in self.mounts:
            self.mounts.remove(mnt)

    def close(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, signal.SIGTERM, grace=10.0)
        for mnt in list(self.mounts):
            self.unmount(mnt)


# -- one run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    setting: str
    variant: str
    round: int
    ok: bool = False
    error: str = ""
    forge_s: float | None = None
    models_s: float | None = None
    image_s: float | None = None
    fuse_before: dict[str, Any] | None = None  # netvol.summarize when Forge answered
    fuse_total: dict[str, Any] | None = None
    fuse_after: dict[str, int] | None = None  # total minus before
    memory: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # the 1-minute load average at start and end: a busy machine
    run_dir: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # where the time went, from the process's own log
    settled_s: float = 0.0  # seconds waited before the run for the machine to be quiet
    clock: dict[str, float] = field(default_factory=dict)  # when the worker started Forge, from the run's start
    netvol_cpu: dict[str, float] = field(default_factory=dict)  # the FUSE daemon's CPU seconds (this machine's
    # cost of the instrument: a network volume's client runs in the kernel or on another host)


class Sampler(threading.Thread):
    """Samples the worker's and Forge's memory every half second; finds Forge under the worker."""

    def __init__(self, main_pid: int, forge_pid: int | None) -> None:
        super().__init__(name="memory", daemon=True)
        self.main_pid = main_pid
        self.forge_pid = forge_pid
        self.peak_anon: dict[str, int] = {}
        self.last: dict[str, dict[str, int]] = {}
        self.shmem_start = self.shmem_peak = shmem_kb()
        self.halt = threading.Event()

    def sample(self) -> None:
        self.shmem_peak = max(self.shmem_peak, shmem_kb())
        if self.forge_pid is None:
            self.forge_pid = child_matching(self.main_pid, "launch.py") or child_matching(self.main_pid, "webui.py")
        for name, pid in (("worker", self.main_pid), ("forge", self.forge_pid)):
            if pid is None or (name == "worker" and pid == self.forge_pid):
                continue
            status = proc_status(pid)
            if status:
                self.last[name] = status
                self.peak_anon[name] = max(self.peak_anon.get(name, 0), status.get("RssAnon", 0))

    def run(self) -> None:
        while not self.halt.wait(0.5):
            self.sample()

    def result(self) -> dict[str, Any]:
        self.sample()
        self.halt.set()
        out: dict[str, Any] = {name: {"vmhwm_kb": self.last[name].get("VmHWM"),
                                      "peak_rss_anon_kb": self.peak_anon.get(name)} for name in self.last}
        out["shmem_growth_kb"] = self.shmem_peak - self.shmem_start  # e.g. a boot set laid out in /dev/shm
        return out


class Bench:
    def __init__(self, args: argparse.Namespace, cleanup: Cleanup) -> None:
        self.args = args
        self.cleanup = cleanup
        self.layout = VolumeLayout(args.volume)
        self.netvol_pid: int | None = None  # the mounted FUSE daemon's, while a run has one
        self.lab_env = lab_env(args.lab)
        self.tcmalloc = tcmalloc_like_start_sh()
        self.mnt = args.work / "mnt"
        self.runs: list[Run] = []
        self.host_memory: dict[str, Any] = {}

    # -- commands ------------------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_", "BUCKET_", "RUNPOD_"))}

    def original_command(self, run_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
        """start.sh's Forge command on this machine: see ``original_argv``."""
        from provision.forge.launch import prepare_scratch

        scratch = prepare_scratch(self.layout, run_dir / "scratch")
        env = self.base_env()
        env.update(self.lab_env)  # the lab's offline overrides (HF_HUB_OFFLINE, ...): no network here
        env.update(VIRTUAL_ENV=str(self.layout.venv), PATH=f"{self.layout.venv / 'bin'}:{env.get('PATH', '')}",
                   PYTHONUNBUFFERED="true", HF_HOME=str(self.layout.root), LD_PRELOAD=self.tcmalloc)
        return original_argv(self.layout, scratch.data, port), env

    def worker_command(self, run_dir: Path, variant: str, forge_port: int, api_port: int
                       ) -> tuple[list[str], dict[str, str]]:
        env = self.base_env()
        env.update(FORGE_VOLUME=str(self.layout.root), FORGE_PORT=str(forge_port),
                   FORGE_SCRATCH=str(run_dir / "scratch"), FORGE_BOOT_TIMEOUT=str(int(self.args.deadline)),
                   FORGE_ARGS="--always-cpu", UVICORN_LOG_LEVEL="warning")
        if variant in ("ours-off", "limit"):
            env["FORGE_FAST_BOOT"] = "0"
        if variant in self.args.candidates:  # its packages come before the ones this bench was installed with
            env["PYTHONPATH"] = str(self.args.candidates[variant])
        return [sys.executable, "-m", "worker", "--rp_serve_api", "--rp_api_port", str(api_port)], env

    # -- the volume ----------------------------------------------------------------------------
    def install(self) -> None:
        cli = Path(sys.executable).with_name("forge-volume")
        log = self.args.work / "install.log"
        print(f"forge-volume install on {self.layout.root} (log: {log}) ...", flush=True)
        started = time.monotonic()
        with log.open("wb") as out:
            try:
                result = subprocess.run([str(cli), "--volume", str(self.layout.root), "install"], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=3600,
                                        env={**self.base_env(), "FORGE_BOOT_TIMEOUT": str(int(self.args.deadline))})
            except subprocess.TimeoutExpired:
                raise BenchError(f"forge-volume install did not end within 3600 s:\n{tail(log)}") from None
        if result.returncode != 0:
            raise BenchError(f"forge-volume install failed (exit {result.returncode}):\n{tail(log)}")
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)

    def mount(self, latency: Latency, stats: Path, log: Path, src: Path | None = None) -> subprocess.Popen[bytes]:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if mounted(self.mnt):
            self.cleanup.unmount(self.mnt)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPTS / "netvol.py"), "mount", str(src or self.layout.root), str(self.mnt),
                 "--meta-ms", f"{latency.meta_ms:g}", "--read-ms", f"{latency.read_ms:g}",
                 "--bw-mbps", f"{latency.bw_mbps:g}", *(["--bw-shared"] if latency.shared else []),
                 "--stats", str(stats)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.cleanup.procs.append(proc)
        self.cleanup.mounts.append(self.mnt)

        def gone() -> str | None:
            return None if proc.poll() is None else f"netvol exited with {proc.returncode}:\n{tail(log)}"

        wait_until("netvol mount", lambda: mounted(self.mnt), 60.0, gone)
        return proc

    def unmount(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.cleanup.unmount(self.mnt)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            self.cleanup.stop(proc, signal.SIGTERM)
            raise BenchError(f"netvol did not exit after the unmount:\n{tail(log)}") from None
        if proc in self.cleanup.procs:
            self.cleanup.procs.remove(proc)

    # -- a run ---------------------------------------------------------------------------------
    def run_once(self, setting: Latency | None, variant: str, round_no: int, timed: bool = True) -> Run:
        label = setting.label if setting else "page-cache"
        name = f"{label.replace(',', '_')}-{variant}-r{round_no}" + ("" if timed else "-warmup")
        run_dir = self.args.work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        settled = settle()
        run = Run(setting=label, variant=variant, round=round_no, run_dir=str(run_dir), load=[os.getloadavg()[0]],
                  settled_s=round(settled, 1))
        netvol_proc: subprocess.Popen[bytes] | None = None
        netvol_log, stats = run_dir / "netvol.log", run_dir / "fuse-total.json"
        try:
            if setting is not None:
                netvol_proc = self.mount(setting, stats, netvol_log, self.args.sources.get(variant))
                self.netvol_pid = netvol_proc.pid
                drop_caches()
                run.settled_s = round(run.settled_s + settle(deadline=20.0), 1)  # the freed cache handed back
            self.boot_and_ask(run, run_dir, variant, fuse=setting is not None)
            run.ok = True
        except BenchError as exc:
            run.error = str(exc)
        finally:
            if netvol_proc is not None:
                self.netvol_pid = None
                try:
                    self.unmount(netvol_proc, netvol_log)
                except BenchError as exc:
                    run.error = run.error or str(exc)
                    run.ok = False
        run.load.append(os.getloadavg()[0])
        if setting is not None and stats.is_file():
            run.fuse_total = netvol.summarize(json.loads(stats.read_text()))
            if run.fuse_before is not None:
                run.fuse_after = netvol.subtract(run.fuse_total, run.fuse_before)
        return run

    def boot_and_ask(self, run: Run, run_dir: Path, variant: str, fuse: bool) -> None:
        log = run_dir / "process.log"
        forge_port, api_port = free_ports(2)
        if variant == "original":
            argv, env = self.original_command(run_dir, forge_port)
        else:
            argv, env = self.worker_command(run_dir, variant, forge_port, api_port)
        if fuse:
            # A private mount namespace where the netvol mount lies over the volume's own path.
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(self.mnt), str(self.layout.root),
                    *argv]
        (run_dir / "command.txt").write_text(shlex.join(argv) + "\n")
        with log.open("wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.cleanup.procs.append(proc)
        sampler = Sampler(proc.pid, proc.pid if variant == "original" else None)
        sampler.start()
        deadline = self.args.deadline

        def gone() -> str | None:
            return None if proc.poll() is None else f"exited with {proc.returncode}; its log ends:\n{tail(log)}"

        forge_seen = threading.Event()
        forge_error: list[str] = []

        def watch_forge() -> None:
            try:
                wait_until("Forge's API", lambda: answers(forge_port), deadline, gone)
                run.forge_s = time.monotonic() - started
                if fuse:
                    daemon_cpu = cpu_seconds(self.netvol_pid) if self.netvol_pid else None
                    if daemon_cpu is not None:
                        run.netvol_cpu["FUSE daemon CPU to answer"] = round(daemon_cpu, 1)
                    before = run_dir / "fuse-at-answer.json"
                    netvol.dump(self.mnt, before)
                    snapshot = json.loads(before.read_text())
                    run.fuse_before = {**netvol.summarize(snapshot), "forge": forge_calls(snapshot)}
            except (BenchError, RuntimeError, OSError, ValueError) as exc:
                forge_error.append(str(exc))
            finally:
                forge_seen.set()

        def watch_launch() -> None:
            """When the worker starts Forge (after the fast boot's lay-out), on this bench's clock."""
            while not forge_seen.is_set():
                with contextlib.suppress(OSError):
                    if b"[worker] starting Forge: " in log.read_bytes():
                        run.clock["Forge launched at"] = round(time.monotonic() - started, 2)
                        return
                forge_seen.wait(0.01)

        watcher = threading.Thread(target=watch_forge, name="forge-watch", daemon=True)
        watcher.start()
        if variant != "original":
            threading.Thread(target=watch_launch, name="launch-watch", daemon=True).start()
        try:
            if variant == "original":
                forge_seen.wait(deadline + 5)
                if forge_error or run.forge_s is None:
                    raise BenchError(forge_error[0] if forge_error else "Forge's API: no answer")
                status, body = http_call(forge_port, "GET", "/sdapi/v1/sd-models", timeout=deadline)
                check_models(status, body, log)
                run.models_s = time.monotonic() - started
                from worker.original_defaults import TXT2IMG as ROUTE
                from worker.original_defaults import with_defaults

                # What the original handler sends: its schema's defaults for every field left out.
                status, body = http_call(forge_port, "POST", ROUTE, with_defaults(ROUTE, dict(TXT2IMG)),
                                         timeout=deadline)
                check_image(status, body, log)
                run.image_s = time.monotonic() - started
                daemon_cpu = cpu_seconds(self.netvol_pid) if fuse and self.netvol_pid else None
                if daemon_cpu is not None:
                    run.netvol_cpu["FUSE daemon CPU to image"] = round(daemon_cpu, 1)
            else:
                wait_until("RunPod's local API", lambda: runpod_api(api_port), deadline, gone)
                job: dict[str, Any] = {"api": {"method": "GET", "endpoint": "/sdapi/v1/sd-models"}}
                status, body = http_call(api_port, "POST", "/runsync", {"input": job}, timeout=deadline)
                check_models(status, job_output(status, body, log), log)
                run.models_s = time.monotonic() - started
                job = {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": dict(TXT2IMG)}
                status, body = http_call(api_port, "POST", "/runsync", {"input": job}, timeout=deadline)
                check_image(status, job_output(status, body, log), log)
                run.image_s = time.monotonic() - started
                daemon_cpu = cpu_seconds(self.netvol_pid) if fuse and self.netvol_pid else None
                if daemon_cpu is not None:
                    run.netvol_cpu["FUSE daemon CPU to image"] = round(daemon_cpu, 1)
                forge_seen.wait(30)
                if forge_error:
                    raise BenchError(forge_error[0])
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{variant}: {exc}; its log ends:\n{tail(log)}") from None
        finally:
            run.memory = sampler.result()
            self.cleanup.stop(proc)
            run.phases = {**run.clock, **phases(log.read_text(encoding="utf-8", errors="replace")), **run.netvol_cpu}


def runpod_api(port: int) -> bool:
    """RunPod's local API answers on ``port`` (its FastAPI schema names /runsync: not some other server)."""
    try:
        status, body = http_call(port, "GET", "/openapi.json", timeout=2.0)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200 and isinstance(body, dict) and "/runsync" in body.get("paths", {})


def job_output(status: int, body: Any, log: Path) -> Any:
    """The output of a ``/runsync`` answer, or BenchError with the answer and the worker's log."""
    if status != 200 or not isinstance(body, dict) or body.get("status") != "COMPLETED":
        raise BenchError(f"/runsync answered {status}: {str(body)[:500]}; the worker's log ends:\n{tail(log)}")
    return body.get("output")


def check_models(status: int, body: Any, log: Path) -> None:
    if status != 200 or not isinstance(body, list) or not body:
        raise BenchError(f"sd-models answered {status}: {str(body)[:500]}; the log ends:\n{tail(log)}")


def check_image(status: int, body: Any, log: Path) -> None:
    if status != 200 or not isinstance(body, dict) or not body.get("images"):
        raise BenchError(f"txt2img answered {status}: {str(body)[:500]}; the log ends:\n{tail(log)}")


def original_argv(layout: VolumeLayout, data_dir: Path, port: int) -> list[str]:
    """start.sh's ``python3 webui.py`` with its flags, and what this machine and this volume need.

    Added: ``--always-cpu`` (no GPU here); ``--port`` a free port (for 3000: the machine is shared);
    ``--server-name 127.0.0.1`` (start.sh's Forge listens on all interfaces); ``--data-dir`` in local
    scratch (the simulated volume is read-only, and the original writes its settings into the
    checkout) with ``--models-dir``, ``--embeddings-dir`` and ``--hypernetwork-dir`` on the volume,
    where forge-volume keeps the models (the same folders our worker passes).
    """
    return [str(layout.venv_python), str(layout.forge_dir / "webui.py"), *ORIGINAL_FLAGS,
            "--always-cpu", "--port", str(port), "--server-name", "127.0.0.1",
            "--data-dir", str(data_dir), "--models-dir", str(layout.models_dir),
            "--embeddings-dir", str(layout.kind_dir("embedding")),
            "--hypernetwork-dir", str(layout.kind_dir("hypernetwork"))]


# -- the schedule and the report -------------------------------------------------------------------
def schedule(settings: Sequence[Latency], variants: Sequence[str], runs: int) -> Iterator[tuple[Latency, int, str]]:
    """For each setting, round by round, every variant once; the order turns by one each round so no
    variant always runs first (after the mount) or right after another's warm-up."""
    for setting in settings:
        for r in range(runs):
            shift = r % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                yield setting, r + 1, variant


def aggregate(runs: Sequence[Mapping[str, Any]], checkpoint_bytes: int | None = None,
              candidates: Sequence[str] = ()) -> dict[str, Any]:
    """Medians per setting and variant, and the ratios the issue asks for (first image and first models)."""
    out: dict[str, Any] = {}
    settings = list(dict.fromkeys(r["setting"] for r in runs))
    for setting in settings:
        per: dict[str, Any] = {}
        for variant in dict.fromkeys(r["variant"] for r in runs if r["setting"] == setting):
            mine = [r for r in runs if r["setting"] == setting and r["variant"] == variant]
            ok = [r for r in mine if r["ok"]]
            entry: dict[str, Any] = {"runs": len(mine), "failed": len(mine) - len(ok)}
            for key in ("forge_s", "models_s", "image_s"):
                entry[key] = median([r[key] for r in ok])
                entry[key + "_all"] = [r[key] for r in mine]
            for part in ("fuse_before", "fuse_total"):
                found = [r[part] for r in ok if r.get(part)]
                if found:
                    entry[part] = {k: median([f[k] for f in found]) for k in ("meta", "missing", "opens",
                                                                               "files_opened", "bytes")}
                    entry[part]["top_sources"] = found[-1]["top_sources"]
                    own = [f["forge"] for f in found if "forge" in f]
                    if own:
                        entry[part]["forge"] = {k: median([f[k] for f in own]) for k in ("meta", "reads", "bytes")}
            for proc in ("worker", "forge"):
                hwm = [r["memory"].get(proc, {}).get("vmhwm_kb") for r in ok]
                anon = [r["memory"].get(proc, {}).get("peak_rss_anon_kb") for r in ok]
                if any(v is not None for v in hwm):
                    entry[f"{proc}_vmhwm_kb"] = median(hwm)
                    entry[f"{proc}_peak_rss_anon_kb"] = median(anon)
            names = dict.fromkeys(name for r in ok for name in r.get("phases") or {})
            entry["phases"] = {name: median([(r.get("phases") or {}).get(name) for r in ok]) for name in names}
            shm = [r["memory"].get("shmem_growth_kb") for r in ok]
            if any(v is not None for v in shm):
                entry["shmem_growth_kb"] = median(shm)
            per[variant] = entry
        ratios: dict[str, float] = {}
        pairs = [("ours", "original"), ("ours-off", "original"), ("ours", "limit"), ("ours", "ours-off"),
                 ("warm", "limit"), *((c, other) for c in candidates for other in ("ours", "limit"))]
        for num, den in pairs:
            for key in ("image_s", "models_s"):
                a, b = per.get(num, {}).get(key), per.get(den, {}).get(key)
                if a is not None and b:
                    ratios[f"{num}/{den} {key[:-2]}"] = round(a / b, 3)
            # Round by round: on a drifting machine the ratio of two medians may pair a fast round of one variant
            # with a slow round of the other (stop 27's 5 ms figure: 1.16, against 1.49 pooled round by round).
            same = same_round(runs, setting, num, den)
            if same:
                ratios[f"{num}/{den} image, same-round median"] = round(median(same) or 0.0, 3)
        bound = read_bound(setting, per, checkpoint_bytes)
        if bound is not None and per.get("ours", {}).get("image_s"):
            ratios["ours/bound image"] = round(per["ours"]["image_s"] / bound, 3)
        out[setting] = {"variants": per, "ratios": ratios, "bound_s": bound}
    return out


def same_round(runs: Sequence[Mapping[str, Any]], setting: str, num: str, den: str) -> list[float]:
    """``num``'s first image over ``den``'s, for each round of ``setting`` where both worked."""
    image = {(r["variant"], r["round"]): r["image_s"] for r in runs
             if r["setting"] == setting and r["ok"] and r.get("image_s")}
    return [image[(num, n)] / image[(den, n)] for v, n in sorted(image) if v == num and (den, n) in image]


def read_bound(setting: str, per: Mapping[str, Any], checkpoint_bytes: int | None) -> float | None:
    """max(the page-cache limit, the checkpoint's size over the volume's bandwidth + a warm worker's time to
    Forge's first answer): a cold start cannot beat the page cache, nor reading the checkpoint once."""
    limit = per.get("limit", {}).get("image_s")
    warm = per.get("warm", {}).get("forge_s")
    try:
        bandwidth = float(setting.split(",")[2]) * 1e6
    except (IndexError, ValueError):
        return None
    if limit is None or warm is None or not checkpoint_bytes or not bandwidth:
        return None
    return max(limit, checkpoint_bytes / bandwidth + warm)


def fmt(value: float | None, unit: str = "s") -> str:
    return "—" if value is None else f"{value:.1f} {unit}" if unit else f"{value:.0f}"


def report(summary: Mapping[str, Any]) -> str:
    lines = []
    for setting, block in summary.items():
        lines.append(f"\n== setting {setting} (meta ms, read ms, MB/s) ==")
        lines.append(f"{'variant':9} {'forge':>8} {'models':>8} {'image':>8}  {'meta<ans':>9} {'meta':>7} "
                     f"{'opens':>6} {'MB<ans':>7} {'MB':>7}  {'wkr MB':>7} {'forge MB':>9} {'shm MB':>7}  "
                     "runs (image s)")
        for variant, e in block["variants"].items():
            before, total = e.get("fuse_before") or {}, e.get("fuse_total") or {}
            mem_w = e.get("worker_peak_rss_anon_kb")
            mem_f = e.get("forge_peak_rss_anon_kb")
            shm = e.get("shmem_growth_kb")
            runs = ", ".join("fail" if v is None else f"{v:.1f}" for v in e["image_s_all"])
            lines.append(
                f"{variant:9} {fmt(e['forge_s']):>8} {fmt(e['models_s']):>8} {fmt(e['image_s']):>8}  "
                f"{fmt(before.get('meta'), ''):>9} {fmt(total.get('meta'), ''):>7} {fmt(total.get('opens'), ''):>6} "
                f"{fmt(before['bytes'] / 1e6 if before else None, ''):>7} "
                f"{fmt(total['bytes'] / 1e6 if total else None, ''):>7}  "
                f"{fmt(mem_w / 1024 if mem_w else None, ''):>7} {fmt(mem_f / 1024 if mem_f else None, ''):>9} "
                f"{fmt(shm / 1024 if shm is not None else None, ''):>7}  {runs}")
        for variant, e in block["variants"].items():
            top = (e.get("fuse_total") or {}).get("top_sources")
            if top:
                lines.append(f"  top sources of metadata calls, {variant}: "
                             + ", ".join(f"{path} {n}" for path, n in top[:6]))
        for variant, e in block["variants"].items():
            own = (e.get("fuse_before") or {}).get("forge")
            if own:
                lines.append(f"  Forge's own calls to the volume before it answered, {variant} (medians): "
                             f"{own['meta']:.0f} metadata calls, {own['reads']:.0f} reads "
                             f"({own['bytes'] / (1 << 20):.1f} MiB)")
        for variant, e in block["variants"].items():
            if e.get("phases"):
                lines.append(f"  where the time goes, {variant} (medians, from its log): "
                             + ", ".join(f"{name} {fmt(value)}" for name, value in e["phases"].items()))
        if block.get("bound_s"):
            lines.append(f"  bound: max(limit, checkpoint / bandwidth + warm worker's Forge answer) = "
                         f"{block['bound_s']:.1f} s")
        if block["ratios"]:
            lines.append("  ratios (medians): " + ", ".join(f"{k} {v:.2f}" for k, v in block["ratios"].items()))
    lines.append("\n(original: (b) and (c) sent to Forge directly; its handler's relay adds about a millisecond. "
                 "wkr/forge MB: peak RssAnon, memory outside the page cache (VmHWM in the JSON); shm MB: growth of the "
                 "machine's shared memory (tmpfs) during the run.)")
    return "\n".join(lines)


def boot_checkpoint(layout: VolumeLayout) -> dict[str, Any]:
    """The checkpoint the boot set names (the one the first txt2img loads) and its size, when there is one."""
    from provision.boot.boot_set import read_index

    index = read_index(layout)
    if index is None or index.checkpoint is None:
        return {}
    try:
        return {"path": index.checkpoint, "bytes": layout.absolute(index.checkpoint).stat().st_size}
    except OSError:
        return {"path": index.checkpoint}


def write_result(args: argparse.Namespace, bench: Bench, started: str) -> dict[str, Any]:
    runs = [vars(r) for r in bench.runs]
    checkpoint = boot_checkpoint(bench.layout)
    result = {
        "started": started, "volume": str(args.volume), "lab": str(args.lab),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "settings": [s.label for s in args.settings], "runs_per_setting": args.runs, "variants": list(args.variants),
        "original": {"flags": list(ORIGINAL_FLAGS), "dropped": list(DROPPED_FLAGS),
                     "argv_example": original_argv(bench.layout, Path("<scratch>/data"), 0),
                     "ld_preload": bench.tcmalloc,
                     "source": "ashleykleynhans/runpod-worker-forge start.sh (fork swimmingyoshi@78c185bc)"},
        "host_memory": bench.host_memory, "checkpoint": checkpoint,
        "candidates": {name: {"dir": str(root), "commit": checkout_commit(root)}
                       for name, root in args.candidates.items()},
        "sources": {name: str(path) for name, path in args.sources.items()},
        "summary": aggregate(runs, checkpoint.get("bytes"), list(args.candidates)), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    netvol.write_json(args.out, result)
    return result


def checkout_commit(root: Path) -> str:
    """The commit a candidate's checkout is at, with "+changes" when its files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + ("+changes" if dirty else "")


# -- setup -----------------------------------------------------------------------------------------
def ensure_fuse() -> None:
    """The bench's own setup: Debian's libfuse3 and mfusepy, installed when missing."""
    if shutil.which("fusermount3") is None or not Path("/usr/lib/x86_64-linux-gnu/libfuse3.so.3").exists():
        print("installing fuse3 libfuse3-3 (apt-get) ...", flush=True)
        result = subprocess.run(["apt-get", "install", "-y", "fuse3", "libfuse3-3"], capture_output=True, text=True,
                                timeout=900, check=False)
        if result.returncode != 0:
            raise BenchError(f"apt-get install fuse3 libfuse3-3 failed:\n{result.stderr[-2000:]}")
    probe = subprocess.run([sys.executable, "-c", "import os; os.environ['FUSE_LIBRARY_NAME']='fuse3'; import mfusepy"],
                           capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode != 0:
        print(f"installing mfusepy into {sys.prefix} (pip) ...", flush=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "mfusepy"], capture_output=True,
                                text=True, timeout=900, check=False)
        if result.returncode != 0:
            raise BenchError(f"pip install mfusepy failed:\n{result.stderr[-2000:]}")


def compile_bytecode(*trees: Path) -> None:
    """Bytecode for ``trees`` and this interpreter's site-packages, as the image's ``pip install`` leaves them.
    Without it a worker run with PYTHONDONTWRITEBYTECODE (the image sets it) from a venv without bytecode compiles
    220 modules at every start, 0.25 s before it starts booting Forge that no worker on RunPod spends (and a
    candidate's packages, or a baseline's, unevenly). ``bench_worker`` calls it too."""
    argv = [sys.executable, "-m", "compileall", "-q", "-j", "0", *map(str, trees), sysconfig.get_paths()["purelib"]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:  # a file that does not compile (a test fixture in site-packages): noted, not fatal
        print(f"compileall: {result.stdout.strip().splitlines()[-1:] or result.returncode}", file=sys.stderr,
              flush=True)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    why = refusal(args)
    if why:
        print(f"bench_coldstart: {why}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    cleanup = Cleanup()
    # SIGTERM ends the bench as Ctrl-C does: through the finally below.
    signal.signal(signal.SIGTERM, interrupt)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bench = Bench(args, cleanup)
    memory = HostMemory()
    try:
        ensure_fuse()
        compile_bytecode(*(tree / name for tree in (ROOT, *args.candidates.values())
                           for name in ("volume_layout", "provision", "worker")))
        if args.page_reporting == "off":
            bench.host_memory = memory.hold()
        else:
            bench.host_memory = {"page_reporting": "as the host set it (--page-reporting host)"}
        print(f"host memory: {', '.join(f'{k} {v}' for k, v in bench.host_memory.items())}", flush=True)
        if not args.no_install:
            bench.install()
        plan = list(schedule(args.settings, args.variants, args.runs))
        print(f"{len(plan)} timed runs; work folder {args.work}; results {args.out}", flush=True)
        for setting, round_no, variant in plan:
            fuse_setting = setting if variant in FUSE_VARIANTS or variant in args.candidates else None
            if fuse_setting is None:  # page cache warm: an untimed run of the same variant first
                warm = bench.run_once(None, variant, round_no, timed=False)
                if not warm.ok:
                    print(f"  warm-up {variant} failed: {warm.error}", flush=True)
            run = bench.run_once(fuse_setting, variant, round_no)
            run.setting = setting.label  # warm variants are reported beside the setting they ran with
            bench.runs.append(run)
            status = (f"forge {fmt(run.forge_s)}, models {fmt(run.models_s)}, image {fmt(run.image_s)} "
                      f"(load {run.load[0]:.1f} -> {run.load[-1]:.1f})" if run.ok else f"FAILED: {run.error}")
            print(f"[{setting.label} round {round_no}] {variant}: {status}", flush=True)
            write_result(args, bench, started)
    except KeyboardInterrupt:
        print("interrupted: stopping processes and unmounting", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench_coldstart: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup.close()
        memory.release()
        if bench.runs:
            result = write_result(args, bench, started)
            print(report(result["summary"]))
            print(f"\nresults: {args.out}")
    return 0 if all(r.ok for r in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
