"""Forge as a child process: its log, and whether it is ready.

``ForgeProcess`` starts a ``ForgeCommand`` (``provision.forge.launch``), passes every output line on
(the worker's stdout: RunPod's log stream) while keeping the last lines for error messages, and
watches it: readiness is polled every
10 ms with a deadline, and an exit is noticed at once. Nothing here writes to the volume.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from provision.errors import ForgeVolumeError
from provision.forge.launch import ForgeCommand

PROBE_ROUTE = "/sdapi/v1/samplers"  # cheap: no model scan; Forge has no health route in API-only mode
PROBE_INTERVAL = 0.01
LOG_DRAIN = 2.0  # seconds the log reader may take to read what an exited Forge wrote last
LOG_LINES = 200

BOOTING, READY, EXITED, BOOT_TIMEOUT, NOT_STARTED = "booting", "ready", "exited", "boot_timeout", "not_started"


class ForgeUnavailable(ForgeVolumeError):
    """Forge is not running: it exited, never became ready, or could not start."""

    hint = "read forge_log for the cause; the worker asks RunPod for a fresh one"

    def __init__(self, message: str, log: list[str]) -> None:
        super().__init__(message)
        self.log = log


# What torch says when it looks for CUDA on a machine without an NVIDIA GPU (or its driver).
_NO_GPU = ("Found no NVIDIA driver", "No CUDA GPUs are available", "Torch not compiled with CUDA enabled",
           "CUDA driver initialization failed")
NO_GPU_FIX = "FORGE_ARGS=--always-cpu"


def no_gpu_fix(log: list[str]) -> str:
    """The fix, when Forge died looking for a GPU this machine lacks: a sentence to append, else ""."""
    if any(sign in line for line in log for sign in _NO_GPU):
        return (f" (this machine has no usable NVIDIA GPU: to run Forge on the CPU, as for a local test, set "
                f"{NO_GPU_FIX})")
    return ""


# Run by the child before it becomes the real command: it asks Linux for SIGTERM when the worker dies
# (even by SIGKILL; the request survives exec), gives up if the worker is already gone, then execs. This
# is the child's own code rather than Popen's preexec_fn, which is unsafe while other threads run: a
# thread that imports a module registering fork hooks during the fork gets "release unlocked lock".
_DIE_WITH_PARENT = """\
import ctypes, os, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:  # one line, no traceback: e.g. the fast boot's copy removed as Forge was starting from it
    sys.stderr.write(f"cannot start {sys.argv[2]}: {exc.strerror or exc}\\n")
    sys.exit(127)
"""


def dying_with_parent(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` started through this interpreter (isolated, no site: a few ms) so that it dies with the
    worker. Linux sends the signal when the *thread* that started it ends, so start it from a thread
    that lives as long as it does. Raises OSError, as Popen would, when ``argv[0]`` cannot be run."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=path)
    if program is None or not os.access(program, os.X_OK) or os.path.isdir(program):
        raise OSError(errno.ENOENT, "no such program, or not executable", argv[0])
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


@dataclass
class Confirm:
    """A check that may replace the command Forge was started with (the fast boot's check of the volume
    behind its copy): ``done`` says whether it has an answer; ``replacement`` waits for it and returns
    None (keep Forge) or the command to start instead."""

    done: Callable[[], bool]
    replacement: Callable[[], ForgeCommand | None]


class ForgeProcess:
    """Forge as a child process. ``prepare``, when given, runs first (in the background, within the boot
    deadline: the phase is already ``booting``) and returns the command to start, e.g. from a mirror.
    ``confirm``, when given, is asked once, as soon as it has an answer or at the latest when Forge first
    answers (or exits while booting), whether that command was the right one; if not, Forge is restarted
    with the command it gives, within the same deadline. The fast boot starts Forge from its copy while
    it still checks the volume behind it."""

    def __init__(self, command: ForgeCommand, *, port: int, boot_timeout: float,
                 out: Callable[[str], None] | None = None,
                 prepare: Callable[[], ForgeCommand] | None = None,
                 confirm: Confirm | None = None) -> None:
        self.command = command
        self._prepare = prepare
        self._confirm = confirm
        self._stopping = False
        self.port = port
        self.boot_timeout = boot_timeout
        self.phase = NOT_STARTED
        self.returncode: int | None = None
        self._reader: threading.Thread | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None  # time.monotonic() when readiness was noticed
        self.ready_wall: float | None = None  # the same moment by the wall clock, to compare with Forge's log
        self.start_error = ""
        self.stop_reason = ""  # why the worker stopped a Forge that was running (it was wedged)
        self._out = out or _to_stdout
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._lock = threading.Lock()
        self._waiters: list[Callable[[], None]] = []
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        if self._prepare is None:
            self._spawn()
            return
        self._set(BOOTING)
        threading.Thread(target=self._prepare_and_spawn, name="forge-prepare", daemon=True).start()

    def _prepare_and_spawn(self) -> None:
        assert self._prepare is not None
        try:
            self.command = self._prepare()
        except Exception as exc:  # a failed speed-up must not keep Forge from starting
            self._out(f"[worker] preparing Forge's start failed ({exc!r}); starting it as it is")
        # Watch from this very thread: Linux sends the parent-death signal when the thread that started a
        # child ends, so the thread that starts Forge (and the mirror's helper) must live as long as Forge.
        if self._spawn(watch=False):
            self._watch()

    def _spawn(self, watch: bool = True) -> bool:
        with self._lock:
            if self._stopping:
                self.start_error = "Forge was stopped before it started"
            else:
                self._popen()
        if self._proc is None:
            self._set(NOT_STARTED)
            return False
        self._set(BOOTING)
        self._start_reader()
        if watch:
            threading.Thread(target=self._watch, name="forge-watch", daemon=True).start()
        return True

    def _popen(self) -> None:
        try:
            self._proc = subprocess.Popen(
                dying_with_parent(self.command.argv, self.command.env), env=self.command.env,
                cwd=self.command.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            self.start_error = f"cannot start Forge ({self.command.argv[0]}): {exc}"

    def stop(self, grace: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)

    def abandon(self, reason: str) -> None:
        """Stop a wedged Forge so the next job fails at once and asks RunPod for a fresh worker."""
        self.stop_reason = reason
        self._out(f"[worker] {reason}")
        threading.Thread(target=self.stop, name="forge-stop", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- log ----------------------------------------------------------------------------------
    def _start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read, name="forge-log", daemon=True)
        self._reader.start()

    def _drained(self) -> None:
        """Let the log reader reach the end of what the exited process wrote (its last lines say why it
        exited), for at most LOG_DRAIN seconds: a child it left behind may hold the pipe open."""
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(LOG_DRAIN)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self._log.append(line)
            self._out(line)

    def tail(self, lines: int = 20) -> list[str]:
        return list(self._log)[-lines:]

    # -- readiness ----------------------------------------------------------------------------
    def _set(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
            if phase == READY:
                self.ready_at, self.ready_wall = time.monotonic(), time.time()
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()

    def _probe(self, timeout: float) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", PROBE_ROUTE)
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _watch(self) -> None:
        deadline = self.started_at + self.boot_timeout
        proc = self._proc
        assert proc is not None
        while proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._set(BOOT_TIMEOUT)
                self._out(f"[worker] Forge did not answer within {self.boot_timeout:g} s; stopping it")
                self.stop()
                self.returncode = proc.poll()
                return
            if self._confirm is not None and self._confirm.done() and self._restarted(proc):
                proc = self._current()
                continue
            if self._probe(min(2.0, remaining)):
                if self._restarted(proc):
                    proc = self._current()
                    continue
                self._set(READY)
                self._out(f"[worker] Forge ready after {self.ready_at - self.started_at:.2f} s")  # type: ignore[operator]
                break
            time.sleep(min(PROBE_INTERVAL, max(remaining, 0)))
            if proc.poll() is not None and self._restarted(proc):
                proc = self._current()
        self.returncode = proc.wait()
        self._drained()  # seen under load: the exit noticed before the line naming its cause was read
        self._set(EXITED)

    def _current(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None
        return self._proc

    def _restarted(self, proc: subprocess.Popen[bytes]) -> bool:
        """Ask ``confirm`` (once); when it names another command, stop ``proc`` and start that. True if started."""
        confirm, self._confirm = self._confirm, None
        if confirm is None:
            return False
        try:
            command = confirm.replacement()
        except Exception as exc:  # a failed check must not take down a Forge that answers
            self._out(f"[worker] checking Forge's start failed ({exc!r}); keeping it")
            return False
        if command is None:
            return False
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with self._lock:
            if self._stopping:
                return False
            self.command = command
            self._popen()
        if self._proc is None or self._proc is proc:
            self._proc = proc  # could not start the replacement: what ended is Forge's end
            return False
        self._start_reader()
        return True

    def failure(self) -> str:
        """Why Forge cannot serve, in one line (only meaningful when the phase is not booting or ready)."""
        if self.phase == NOT_STARTED:
            return self.start_error or "Forge was not started"
        if self.phase == BOOT_TIMEOUT:
            return (f"Forge did not become ready within FORGE_BOOT_TIMEOUT={self.boot_timeout:g} s "
                    "(raise FORGE_BOOT_TIMEOUT if the volume is slow, else read forge_log)")
        if self.stop_reason:
            return self.stop_reason
        was = "after it was ready" if self.ready_at is not None else "while booting"
        last = " | ".join(line for line in self.tail(3) if line.strip())
        fix = no_gpu_fix(self.tail()) if self.ready_at is None else ""
        return f"Forge exited with code {self.returncode} {was}" + (f": {last}" if last else "") + fix

    def unavailable(self) -> ForgeUnavailable:
        return ForgeUnavailable(self.failure(), self.tail())

    async def wait_ready(self) -> None:
        """Return once Forge answers; raise ForgeUnavailable as soon as it cannot (exit, boot deadline)."""
        while True:
            if self.phase == READY:
                return
            if self.phase != BOOTING:
                raise self.unavailable()
            loop = asyncio.get_running_loop()
            woken = loop.create_future()

            def wake(loop: asyncio.AbstractEventLoop = loop, fut: asyncio.Future[None] = woken) -> None:
                loop.call_soon_threadsafe(_resolve, fut)

            with self._lock:
                if self.phase != BOOTING:
                    continue
                self._waiters.append(wake)
            # The watcher enforces the boot deadline; the margin only guards against a dead watcher.
            remaining = self.started_at + self.boot_timeout - time.monotonic() + 5.0
            try:
                await asyncio.wait_for(woken, max(remaining, 0.1))
            except asyncio.TimeoutError:
                raise ForgeUnavailable(self.failure() if self.phase != BOOTING else
                                       "Forge's readiness watcher stopped", self.tail()) from None
            finally:
                with self._lock:
                    if wake in self._waiters:
                        self._waiters.remove(wake)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _to_stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
