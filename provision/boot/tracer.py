"""Run Forge's launch.py and record what it reads (install's boot proof; stdlib only: the volume's Python runs it).

Usage, as Forge's launcher: ``python tracer.py <launch.py> <Forge's args...>`` with
``FORGE_VOLUME_BOOT_TRACE=<record path>`` in the environment (removed before Forge starts). An audit
hook notes every path Forge opens and every folder it lists, and a wrapper of ``stat`` every folder it
looks into without opening anything there (no audit event covers a stat: the import system probes
``pkg/__init__.so``, ``__init__.py``... for every package a library checks with ``find_spec``, and for
every stub folder beside an extension module, like cv2's sixty); when ``<record>.request`` appears, a
thread writes them, with the files mapped into the process (shared libraries loaded by the dynamic
linker, which no audit hook sees) and the pages of each mapped file this process has touched, to
``<record>`` as JSON, atomically. Forge itself runs unchanged:
``sys.argv`` and ``sys.path[0]`` are what ``python launch.py`` would have given it.
"""

from __future__ import annotations

import array
import json
import os
import runpy
import sys
import threading
import time
from typing import Any

RECORD_ENV = "FORGE_VOLUME_BOOT_TRACE"
POLL = 0.05


def _absolute(path: object) -> str | None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not path:
        return None
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)


def _mapped() -> list[str]:
    out: set[str] = set()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/"):
                out.add(fields[5].rstrip("\n").removesuffix(" (deleted)"))
    return sorted(out)


def _touched() -> dict[str, list[list[int]]]:
    """For each mapped file, the byte ranges whose pages are mapped in this process (``/proc/self/pagemap``).

    These are the pages the boot faulted in (and, at most, the few neighbours the kernel maps around a
    fault from the cache), not what readahead put in the page cache: on a disk with an 8 MB readahead,
    the cache holds twice what the boot touched, and a worker would prefetch all of it over the network.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    pages: dict[str, set[int]] = {}
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps, \
            open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for line in maps:
            fields = line.split(None, 5)
            path = fields[5].rstrip("\n") if len(fields) == 6 else ""
            if not path.startswith("/") or path.endswith(" (deleted)"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            entries = array.array("Q")
            try:
                pagemap.seek(start // page * 8)
                entries.frombytes(pagemap.read((end - start) // page * 8))
            except (OSError, ValueError):
                continue
            first = int(fields[2], 16) // page
            present = pages.setdefault(path, set())
            present.update(first + i for i, entry in enumerate(entries) if entry >> 63)
    touched: dict[str, list[list[int]]] = {}
    for path, numbers in pages.items():
        spans: list[list[int]] = []
        for number in sorted(numbers):
            if spans and spans[-1][0] + spans[-1][1] == number * page:
                spans[-1][1] += page
            else:
                spans.append([number * page, page])
        touched[path] = spans
    return touched


def _trace_stats() -> tuple[dict[str, None], dict[str, None]]:
    """Note every path stat'd through ``os.stat`` or ``posix.stat`` (the import system calls the latter), and
    its folder, whether or not the path exists; returns (folders, paths), filled as Forge runs."""
    import posix

    probed: dict[str, None] = {}
    stated: dict[str, None] = {}
    real = posix.stat

    def traced(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if kwargs.get("dir_fd") is None and isinstance(path, (str, bytes, os.PathLike)):
            full = _absolute(os.fspath(path))
            if full is not None:
                probed.setdefault(os.path.dirname(full), None)
                stated.setdefault(full, None)
        return real(path, *args, **kwargs)

    posix.stat = traced
    os.stat = traced
    return probed, stated


def _read_before_the_hook() -> list[str]:
    """What the interpreter read before this script ran, which no hook of ours saw: the ``.pth`` files of its
    site-packages (``site`` reads them all at every start) and the modules loaded by then (``site`` and
    what those files import, like setuptools' ``_distutils_hack``)."""
    import site

    paths: list[str] = []
    for folder in site.getsitepackages():
        try:
            paths += [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".pth")]
        except OSError:
            continue
    for module in list(sys.modules.values()):
        for attribute in ("__file__", "__cached__"):
            path = getattr(module, attribute, None)
            if isinstance(path, str) and path.startswith("/"):
                paths.append(path)
    return paths


def main() -> None:
    record = os.environ.pop(RECORD_ENV)
    # insertion-ordered: the order Forge first opened them (what the interpreter read at its start first)
    opened: dict[str, None] = dict.fromkeys(_read_before_the_hook())
    listed: dict[str, None] = {}

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event == "open":
            path = _absolute(args[0])
            if path is not None:
                opened.setdefault(path, None)
        elif event in ("os.listdir", "os.scandir"):
            path = _absolute(args[0] if args and args[0] is not None else ".")
            if path is not None:
                listed.setdefault(path, None)

    probed, stated = _trace_stats()
    mapped: dict[str, None] = {}  # in the order the libraries first appeared: the order the boot needs them

    def answer() -> None:
        request = record + ".request"
        while not os.path.exists(request):
            for path in _mapped():
                mapped.setdefault(path, None)
            time.sleep(POLL)
        for path in _mapped():
            mapped.setdefault(path, None)
        data = {"opened": list(opened), "listed": list(listed), "probed": list(probed), "stated": list(stated),
                "mapped": list(mapped), "touched": _touched()}
        with open(record + ".tmp", "w", encoding="utf-8") as out:
            json.dump(data, out)
        os.replace(record + ".tmp", record)

    sys.addaudithook(hook)
    threading.Thread(target=answer, name="boot-tracer", daemon=True).start()
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
