"""The house by concern (issue 18), drawn from the code's imports: no arrow runs back up, no circle, and the
worker's runtime path loads neither the CLI nor the downloader.

Layers, bottom to top (a module may import its own layer or a lower one; ``volume_layout`` is below all):
errors/progress/proc < fetch < records < forge < models < boot < installer (adopt, regions beside it) < commands
< cli; worker/ above all.
Every import counts, the ones inside functions too: a lazy import still climbs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# adopt (issue 20) and regions (issue 22) sit beside installer: they build on the volume's records, models and
# install steps, and a command drives them.
LAYERS = (("errors", "progress", "proc"), ("fetch",), ("records",), ("forge",), ("models",), ("boot",),
          ("installer", "adopt", "regions"), ("commands",), ("cli",))
PACKAGES = ("provision", "worker")
# Forge's facts as tables (what it fetches at first use, the files it makes itself) import nothing of ours above
# errors: they sit at the bottom, so the spec and the lock can check entries against them.
MODULE_LAYERS = {"provision.forge.first_use": 0, "provision.forge.files": 0}


def layer_of(module: str) -> int | None:
    """The layer of a module of ours (None: the package roots, ``provision`` itself, which hold no code that
    imports); a module of provision/ in no layer is an error, so a new package must be placed."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    parts = module.split(".")
    if parts[0] == "worker":
        return len(LAYERS)
    if len(parts) == 1:
        return None
    for number, names in enumerate(LAYERS):
        if parts[1] in names:
            return number
    if parts[1] == "presets":  # data only (the presets' TOML files)
        return None
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {__file__}")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def arrows(root: Path) -> dict[str, dict[str, int]]:
    """module -> {module of ours it imports: line}, every import statement counted."""
    mods = modules(root)
    out: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        targets: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from package import module`` is an arrow to the module; ``from module import name``, to it.
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            else:
                continue
            for target in names:
                if target in mods and target != name and not name.startswith(f"{target}."):
                    targets.setdefault(target, node.lineno)
        out[name] = targets
    return out


def upward(root: Path) -> list[str]:
    """Every import of a higher layer, as ``module:line -> target``."""
    found = []
    for name, targets in sorted(arrows(root).items()):
        here = layer_of(name)
        for target, line in sorted(targets.items()):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                found.append(f"{name}:{line} -> {target}")
    return found


def circles(root: Path) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    graph = {name: set(targets) for name, targets in arrows(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_runs_back_up_the_layers() -> None:
    assert upward(ROOT) == []


def test_no_circle_among_the_modules() -> None:
    assert circles(ROOT) == []


def test_the_check_sees_a_climb_and_a_circle(tmp_path: Path) -> None:
    """The two tests above can fail: a tree with one upward import and one circle is caught."""
    for rel, text in {
        "provision/__init__.py": "",
        "provision/fetch/__init__.py": "",
        "provision/fetch/a.py": "def f() -> None:\n    from provision.commands import c\n",
        "provision/commands/__init__.py": "",
        "provision/commands/c.py": "from provision.commands import d\n",
        "provision/commands/d.py": "import provision.commands.c\n",
        "worker/__init__.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    assert upward(tmp_path) == ["provision.fetch.a:2 -> provision.commands.c"]
    assert circles(tmp_path) == [["provision.commands.c", "provision.commands.d"]]


# What a worker imports before its first job (python -m worker: worker.__main__ then, in main, worker.boot
# and worker.handler), and what the lay-out child imports.
RUNTIME = {
    "worker": ["worker.__main__", "worker.boot", "worker.handler", "worker.config", "worker.volume", "worker.proxy"],
    "layout child": ["provision.boot.layout_child"],
}
FORBIDDEN = ("provision.cli", "provision.commands", "provision.installer", "provision.models",
             "provision.fetch.download", "provision.fetch.hub", "provision.fetch.session",
             "click", "requests", "urllib3", "huggingface_hub", "tqdm")


# What the worker imports before ``build_worker`` starts the fast boot's lay-out: neither the relay's HTTP client
# nor the SDK, whose imports (aiohttp alone 0.13 s) come after it, beside the lay-out.
BEFORE_LAY_OUT = ["worker.boot", "worker.handler"]
AFTER_LAY_OUT = ("aiohttp", "yarl", "runpod")


def _loaded(modules: list[str]) -> list[str]:
    """Every module a fresh interpreter holds after importing ``modules``."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def _among(loaded: list[str], packages: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(f"{p}.") for p in packages)]


@pytest.mark.parametrize("path", sorted(RUNTIME))
def test_the_runtime_path_loads_neither_the_cli_nor_the_downloader(path: str) -> None:
    bad = _among(_loaded(RUNTIME[path]), FORBIDDEN)
    assert bad == [], f"the {path}'s imports load {bad}"


def test_the_worker_loads_neither_the_sdk_nor_aiohttp_before_its_lay_out_starts() -> None:
    early = _among(_loaded(BEFORE_LAY_OUT), AFTER_LAY_OUT)
    assert early == [], f"worker.boot and worker.handler load {early}"
