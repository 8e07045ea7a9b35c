"""Running subprocesses: argument lists only, and every failure carries the command's stderr.

Long steps (pip, Forge's preparation, uv, compileall) run with ``stream=True``: their output,
stdout and stderr merged, goes line by line to the sink that ``output_to`` installs (install's log
file on the volume and the line under its progress bar) as it is printed, and a failure names the
log file that holds all of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

from provision.errors import CommandError

TAIL_LINES = 15


class OutputSink(Protocol):
    """Where a streamed command's lines go (``provision.installer.steplog.StepLog``)."""

    path: Path

    def line(self, text: str) -> None: ...


_SINK: ContextVar[OutputSink | None] = ContextVar("output_sink", default=None)


@contextmanager
def output_to(sink: OutputSink) -> Iterator[None]:
    """Streamed commands run inside this block send their lines to ``sink``."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def log_line(text: str) -> None:
    """A line of our own in the log of ``output_to`` (when there is one), among the commands' output."""
    sink = _SINK.get()
    if sink is not None:
        sink.line(text)


_USER_INFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")  # a token in a URL: never into a log


def _log_captured(label: str, result: subprocess.CompletedProcess[str]) -> None:
    """A short command's captured output (git, venv creation) in the log of ``output_to`` too, after it ran:
    the log holds every command's output, not only the streamed ones'."""
    sink = _SINK.get()
    if sink is None:
        return
    shown = _USER_INFO.sub(r"\1", label)
    sink.line(f"$ {shown} (exit code {result.returncode})")
    for line in ((result.stdout or "") + "\n" + (result.stderr or "")).splitlines():
        if line.strip():
            sink.line(_USER_INFO.sub(r"\1", line))


def tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 3600,
    error: type[CommandError] = CommandError,
    what: str | None = None,
    stream: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise ``error`` naming it, its exit code and its output's last lines
    (with ``check`` False a non-zero exit is the caller's to judge: the result is returned).

    With ``stream`` its output (stdout and stderr merged, in ``stdout``) also goes, line by line, to
    the sink of ``output_to`` while it runs.
    """
    argv = [os.fspath(a) for a in args]
    label = what or " ".join(argv[:3])
    sink = _SINK.get() if stream else None
    try:
        if stream:
            result = _streamed(argv, cwd, env, timeout, sink)
        else:
            result = subprocess.run(
                argv, cwd=cwd, env=None if env is None else dict(env), text=True, timeout=timeout,
                stdin=subprocess.DEVNULL, capture_output=True,
            )
        if not stream:
            _log_captured(label, result)
    except FileNotFoundError:
        raise error(f"{label} failed: {argv[0]} is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise error(f"{label} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0 and check:
        detail = tail((result.stderr or "") + "\n" + (result.stdout or ""))
        where = f" (its whole output is in {sink.path})" if sink is not None else ""
        raise error(f"{label} failed with exit code {result.returncode}: {detail}{where}")
    return result


def _streamed(argv: list[str], cwd: Path | None, env: Mapping[str, str] | None, timeout: float | None,
              sink: OutputSink | None) -> subprocess.CompletedProcess[str]:
    """Run with merged output read line by line by a thread, so the deadline holds however quiet it is."""
    lines: deque[str] = deque(maxlen=2000)  # enough for the error's tail; the sink keeps everything
    with subprocess.Popen(argv, cwd=cwd, env=None if env is None else dict(env), text=True, errors="replace",
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          bufsize=1) as proc:
        assert proc.stdout is not None

        def pump() -> None:
            for raw in proc.stdout:  # type: ignore[union-attr]
                text = raw.rstrip("\r\n")
                lines.append(text)
                if sink is not None:
                    sink.line(text)

        reader = threading.Thread(target=pump, name="output", daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except BaseException:  # a deadline, Ctrl-C, SIGTERM: the command must not outlive us
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=10)
    return subprocess.CompletedProcess(argv, code, "\n".join(lines), "")
