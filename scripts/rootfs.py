"""The worker image's root file system, built by the Dockerfile's own steps, and the worker run in it.

Docker has no engine on the development machines, so this reads the Dockerfile and carries it out
itself: ``FROM python:X.Y-slim-SUITE`` becomes a Debian SUITE minbase from debootstrap, slimmed as
Debian's slim images are, with Debian's Python X.Y as a venv at /usr/local (where the official
image keeps its Python, so ``python`` and ``pip`` are found the same way); then every ``ENV``,
``SHELL``, ``WORKDIR``, ``COPY`` and ``RUN`` runs as written, the ``RUN`` steps in a chroot. An
instruction it does not know stops the build: the Dockerfile stays the one description of the image.

    python scripts/rootfs.py build ROOTFS [--mirror URL]     # needs root, debootstrap, network
    python scripts/rootfs.py run ROOTFS --volume VOLUME       # boot the worker, send jobs, check answers
    python scripts/rootfs.py check-apt ROOTFS                 # apt-get check; an image FROM it installs a package

``run`` starts the image's ``CMD`` (start.sh, ``--rp_serve_api``) under chroot with the image's
environment and VOLUME bind-mounted at /runpod-volume, as RunPod mounts a network volume, sends
``GET /sdapi/v1/sd-models`` and a 64x64 two-step txt2img through RunPod's local API, checks the
answers and that Forge's process has tcmalloc loaded, prints one line per check and stops the
worker. A volume's venv built on an interpreter outside the volume (a spec's ``python = "/path"``,
as the test volumes and the lab's are) gets that interpreter mounted read-only at its own path;
on RunPod the interpreter lies on the volume. Mounts live in a private mount namespace
(``unshare``), so nothing stays mounted when a step ends. Opt-in: ``tests/image/test_rootfs.py``
drives all three with ``FORGE_ROOTFS=1``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What `docker build` gives a RUN step that the image does not set itself.
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the official python:*-slim image adds to Debian's slim base (its own Dockerfile).
PYTHON_IMAGE_ENV = {"PATH": "/usr/local/bin:" + DOCKER_PATH, "LANG": "C.UTF-8"}
PYTHON_IMAGE_PACKAGES = ("ca-certificates", "netbase", "tzdata")
# Debian's slim images (debuerreotype --slimify): no docs but copyright, no man pages, no translations.
SLIM_DPKG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""
SLIM_APT = {
    "docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
                    '/var/cache/apt/*.bin || true"; };\nDir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
BUILD_CA = "/run/forge-volume-build/ca.crt"  # the host's CA bundle, for pip behind a TLS-inspecting proxy
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
SERVERLESS_MOUNT = "/runpod-volume"


class RootfsError(Exception):
    """A one-line reason the build or run failed."""


# -- the Dockerfile ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined as Docker joins them (comment lines inside dropped)."""
    lines = text.splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            i += 1
            continue
        start, joined = i + 1, ""
        while i < len(lines):
            line = lines[i]
            i += 1
            if line.lstrip().startswith("#") and joined:
                continue
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1]
                continue
            joined += line
            break
        keyword, _, args = joined.strip().partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def substitute(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # the legacy form: ENV KEY value with spaces
        return {words[0]: substitute(args.split(None, 1)[1] if len(words) > 1 else "", env)}
    pairs: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise RootfsError(f"ENV {args!r}: {word!r} is not KEY=value")
        pairs[key] = substitute(value, {**env, **pairs})
    return pairs


@dataclass
class Image:
    """What the Dockerfile says the image is: its base, its environment, its steps, its command."""

    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    steps: list[Instruction] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"


KNOWN = {"FROM", "ENV", "SHELL", "RUN", "WORKDIR", "COPY", "CMD"}


def read_image(dockerfile: Path) -> Image:
    """The Dockerfile's meaning for this builder; an instruction or form it cannot carry out is an error."""
    image = Image()
    for ins in parse_dockerfile(dockerfile.read_text(encoding="utf-8")):
        where = f"{dockerfile.name}:{ins.line}"
        if ins.keyword not in KNOWN:
            raise RootfsError(f"{where}: the rootfs builder does not carry out {ins.keyword}; teach scripts/rootfs.py")
        if ins.keyword == "FROM":
            if image.base:
                raise RootfsError(f"{where}: a second FROM (multi-stage builds are not carried out)")
            image.base = ins.args
            image.env = dict(base_env(ins.args))
        else:
            if ins.keyword == "ENV":
                image.env.update(parse_env(ins.args, image.env))
            elif ins.keyword == "CMD":
                image.cmd = json.loads(ins.args)
            elif ins.keyword == "WORKDIR":
                image.workdir = os.path.join(image.workdir, ins.args)
            elif ins.keyword == "COPY" and ins.args.startswith("--"):
                raise RootfsError(f"{where}: COPY flags are not carried out: {ins.args}")
            image.steps.append(ins)
        if not image.base:
            raise RootfsError(f"{where}: {ins.keyword} before FROM")
    if not image.cmd:
        raise RootfsError(f"{dockerfile}: no CMD (exec form) to run")
    return image


def base_parts(base: str) -> tuple[str, str]:
    """(Python version, Debian suite) of ``python:X.Y-slim-SUITE``, the only base this builder stands in for."""
    match = re.fullmatch(r"python:(\d+\.\d+)-slim-([a-z]+)", base)
    if not match:
        raise RootfsError(f"FROM {base}: the rootfs builder stands in only for python:X.Y-slim-SUITE "
                          "(a slim Python on a named Debian release)")
    return match.group(1), match.group(2)


def base_env(base: str) -> dict[str, str]:
    base_parts(base)
    return dict(PYTHON_IMAGE_ENV)


# -- running things in the root file system -----------------------------------------------------
@dataclass(frozen=True)
class Bind:
    source: Path
    target: str  # absolute, inside the root file system
    readonly: bool = False


MOUNT_SCRIPT = r"""
set -eu
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
while [ "$1" != "--" ]; do
  src=$1 dst=$root$2 mode=$3; shift 3
  if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; [ -e "$dst" ] || : > "$dst"; fi
  mount --bind "$src" "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
shift
exec chroot "$root" "$@"
"""


def chroot_argv(root: Path, argv: Sequence[str], env: dict[str, str], cwd: str = "/",
                binds: Sequence[Bind] = ()) -> list[str]:
    """A command that runs ``argv`` in ``root`` with exactly ``env``, /proc, /dev, /sys and ``binds``
    mounted in a private mount namespace (gone when the command ends)."""
    bind_args = [a for b in binds for a in (str(b.source), b.target, "ro" if b.readonly else "rw")]
    inner = ["/usr/bin/env", "-i", "-C", cwd, *(f"{k}={v}" for k, v in env.items()), *argv]
    return ["unshare", "--mount", "--propagation", "private", "--fork", "--", "/bin/sh", "-c", MOUNT_SCRIPT,
            "sh", str(root), *bind_args, "--", *inner]


def run(argv: Sequence[str | Path], what: str, timeout: float = 1800, **kwargs: Any) -> None:
    """Run a step with its output going to ours; fail with what it was and the tail of its output."""
    print(f"[rootfs] {what}", flush=True)
    proc = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False, **kwargs)
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise RootfsError(f"{what} failed (exit {proc.returncode}):\n{tail}")


# -- build --------------------------------------------------------------------------------------
def slim(root: Path) -> None:
    """Configure dpkg and apt as Debian's slim images do, and drop what debootstrap already unpacked."""
    (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG, encoding="utf-8")
    for name, text in SLIM_APT.items():
        (root / "etc/apt/apt.conf.d" / name).write_text(text, encoding="utf-8")
    excluded = [line.split(None, 1)[1] for line in SLIM_DPKG.splitlines() if line.startswith("path-exclude")]
    included = [line.split(None, 1)[1] for line in SLIM_DPKG.splitlines() if line.startswith("path-include")]
    for top in {pattern.split("/*")[0] for pattern in excluded}:
        folder = root / top.lstrip("/")
        for path in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
            inside = "/" + str(path.relative_to(root))
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when emptied
            elif any(fnmatch.fnmatch(inside, p) for p in excluded) and not any(
                    fnmatch.fnmatch(inside, p) for p in included):
                path.unlink()
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / junk).glob("*"):
            if path.is_file():
                path.unlink()


def sources(root: Path, suite: str, mirror: str) -> None:
    """The archive, its updates and its security archive, as Debian's images list them."""
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    security = mirror.rstrip("/") + "-security"
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {suite}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n", encoding="utf-8")


def build_base(image: Image, root: Path, mirror: str) -> None:
    version, suite = base_parts(image.base)
    run(["debootstrap", "--variant=minbase", suite, root, mirror], f"debootstrap {suite} minbase from {mirror}")
    slim(root)
    sources(root, suite, mirror)
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    packages = " ".join([*PYTHON_IMAGE_PACKAGES, f"python{version}", f"python{version}-venv"])
    script = (f"apt-get update && apt-get install -y --no-install-recommends {packages}"
              f" && python{version} -m venv /usr/local && rm -rf /var/lib/apt/lists/*")
    env = {**base_env(image.base), "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
    run(chroot_argv(root, ["/bin/sh", "-c", script], env), f"the {image.base} stand-in: Debian's Python {version} "
        "as a venv at /usr/local, with the official image's ca-certificates, netbase, tzdata")


def ignored(patterns: list[str]) -> Any:
    """A copytree ignore function for .dockerignore patterns (``**/name`` or a top-level path)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = os.path.relpath(folder, REPO)
        out = set()
        for name in names:
            path = name if rel == "." else os.path.join(rel, name)
            for pattern in patterns:
                if fnmatch.fnmatch(path, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(name, pattern[3:])):
                    out.add(name)
        return out
    return ignore


def copy_step(args: str, root: Path, workdir: str) -> None:
    *sources_, dest = shlex.split(args)
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")] if (REPO / ".dockerignore").exists() else []
    target = root / os.path.join(workdir, dest).lstrip("/")
    into_dir = dest.endswith("/") or len(sources_) > 1
    for src in sources_:
        source = REPO / src
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignored(patterns), dirs_exist_ok=True)
        else:
            final = target / source.name if into_dir else target
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, final)


def build(root: Path, dockerfile: Path, mirror: str) -> tuple[Image, int]:
    """Carry out the Dockerfile into ``root``; return the image and the base stand-in's size (apparent bytes)."""
    image = read_image(dockerfile)
    if root.exists() and any(root.iterdir()):
        raise RootfsError(f"{root} is not empty; give a new folder")
    root.mkdir(parents=True, exist_ok=True)
    build_base(image, root, mirror)
    base_bytes = size(root)[0]
    print(f"[rootfs] the base stand-in: {base_bytes / 1e6:.1f} MB", flush=True)
    env = dict(base_env(image.base))
    shell = ["/bin/sh", "-c"]
    workdir = "/"
    binds = [Bind(HOST_CA, BUILD_CA, readonly=True)] if HOST_CA.exists() else []
    plumbing = {"PIP_CERT": BUILD_CA, "SSL_CERT_FILE": BUILD_CA} if binds else {}
    for ins in image.steps:
        label = f"{dockerfile.name}:{ins.line} {ins.keyword} {' '.join(ins.args.split())[:100]}"
        if ins.keyword == "ENV":
            env.update(parse_env(ins.args, env))
        elif ins.keyword == "SHELL":
            shell = json.loads(ins.args)
        elif ins.keyword == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            print(f"[rootfs] {label}", flush=True)
            copy_step(ins.args, root, workdir)
        elif ins.keyword == "RUN":
            argv = json.loads(ins.args) if ins.args.startswith("[") else [*shell, ins.args]
            run(chroot_argv(root, argv, {"HOME": "/root", **env, **plumbing}, workdir, binds), label)
    build_ca = root / BUILD_CA.lstrip("/")
    if build_ca.exists():
        build_ca.unlink()
        with contextlib.suppress(OSError):
            build_ca.parent.rmdir()
    return image, base_bytes


def size(root: Path) -> tuple[int, int]:
    """(apparent bytes, bytes on disk) of every file, link and folder under ``root``, hard links once."""
    apparent = disk = 0
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            apparent += st.st_size
            disk += st.st_blocks * 512
    return apparent, disk


def cmd_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    _, base_bytes = build(args.rootfs, args.dockerfile, args.mirror)
    apparent, disk = size(args.rootfs)
    summary = {"rootfs": str(args.rootfs), "apparent_bytes": apparent, "disk_bytes": disk, "base_bytes": base_bytes,
               "build_seconds": round(time.monotonic() - started, 1)}
    print(f"[rootfs] built {args.rootfs} in {summary['build_seconds']} s: {apparent / 1e6:.1f} MB "
          f"({disk / 1e6:.1f} MB on disk); the Dockerfile's steps added {(apparent - base_bytes) / 1e6:.1f} MB",
          flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


# -- apt in the result -------------------------------------------------------------------------
def cmd_check_apt(args: argparse.Namespace) -> int:
    """``apt-get check``, then an image built FROM this one installs a package (in an overlay: the rootfs stays)."""
    image = read_image(args.dockerfile)
    env = {"HOME": "/root", **image.env, "DEBIAN_FRONTEND": "noninteractive"}
    run(chroot_argv(args.rootfs, ["apt-get", "check"], env), "apt-get check (the package database is consistent)")
    with tempfile.TemporaryDirectory(prefix="rootfs-overlay-") as tmp:
        upper, work, merged = (Path(tmp) / n for n in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            d.mkdir()
        script = (f"mount -t overlay overlay -o lowerdir={args.rootfs},upperdir={upper},workdir={work} {merged}"
                  f' && exec "$0" "$@"')
        inner = chroot_argv(merged, ["/bin/sh", "-c", f"apt-get update -qq && apt-get install -y "
                                     f"--no-install-recommends {args.package}"], env)
        run(["unshare", "--mount", "--propagation", "private", "--fork", "--", "/bin/sh", "-c", script, *inner],
            f"an image FROM this one: apt-get install {args.package}")
    print(f"[rootfs] apt: database consistent; {args.package} installs on top", flush=True)
    return 0


# -- run the worker -----------------------------------------------------------------------------
def interpreter_binds(volume: Path) -> list[Bind]:
    """The venv's base interpreter, read-only at its own path, when it lives outside the volume."""
    cfg = volume / "venv" / "pyvenv.cfg"
    if not cfg.is_file():
        return []
    home = next((line.split("=", 1)[1].strip() for line in cfg.read_text().splitlines()
                 if line.split("=", 1)[0].strip() == "home"), "")
    if not home:
        return []
    prefix = Path(home).parent
    if prefix.resolve().is_relative_to(volume.resolve()):
        return []
    return [Bind(prefix, str(prefix), readonly=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: Any, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return {"http_status": exc.code, "body": exc.read().decode(errors="replace")[:2000]}


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for child in children(pid):
        out += [child, *descendants(child)]
    return out


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise RootfsError("txt2img: the image is not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass
class Chroot:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def worker_pid(self) -> int | None:
        """The worker: the process unshare forked (chroot, env and start.sh exec into it)."""
        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def forge_pid(self) -> int | None:
        worker = self.worker_pid()
        for pid in descendants(worker) if worker else []:
            with contextlib.suppress(OSError):
                if b"launch.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def stop(self, deadline: float = 30) -> None:
        """SIGTERM to the worker, as RunPod stops a container; it stops Forge. SIGKILL to our group after."""
        if self.proc.poll() is None:
            worker = self.worker_pid()
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker or self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(deadline)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextlib.contextmanager
def worker_in(root: Path, volume: Path, image: Image, extra_env: dict[str, str], log: Path) -> Iterator[Chroot]:
    """The image's CMD with ``--rp_serve_api`` under chroot, VOLUME at /runpod-volume, until the block ends."""
    port = free_port()
    hosts = log.with_name("hosts")
    hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n", encoding="utf-8")
    binds = [Bind(volume.resolve(), SERVERLESS_MOUNT), Bind(hosts, "/etc/hosts", readonly=True),
             *interpreter_binds(volume)]
    env = {"HOME": "/root", **image.env, **extra_env}
    argv = [*image.cmd, "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(chroot_argv(root, argv, env, image.workdir, binds), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    chroot = Chroot(proc, port, log)
    try:
        yield chroot
    finally:
        chroot.stop()


def wait_api(chroot: Chroot, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if chroot.proc.poll() is not None:
            raise RootfsError(f"the worker exited with {chroot.proc.returncode}:\n{chroot.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", chroot.port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RootfsError(f"the worker's API did not open within {deadline:g} s:\n{chroot.tail()}")


def job(chroot: Chroot, job_input: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    answer = post(f"http://127.0.0.1:{chroot.port}/runsync", {"input": job_input}, timeout)
    return answer, time.monotonic() - started


def run_checks(chroot: Chroot, timeout: float) -> dict[str, Any]:
    """sd-models, txt2img and tcmalloc in Forge's process; raise with the worker's log tail on a failure."""
    results: dict[str, Any] = {}
    wait_api(chroot, 120)
    models, took = job(chroot, {"api": {"method": "GET", "endpoint": "/sdapi/v1/sd-models"}}, timeout)
    if models.get("status") != "COMPLETED" or not isinstance(models.get("output"), list) or not models["output"]:
        raise RootfsError(f"sd-models: {json.dumps(models)[:600]}\n{chroot.tail()}")
    names = [m.get("title") or m.get("model_name") for m in models["output"]]
    results["sd_models"] = {"seconds": round(took, 1), "models": names}
    print(f"[rootfs] sd-models answered in {took:.1f} s (first job, Forge's boot included): {names}", flush=True)
    payload = {"prompt": "a red fox in fresh snow", "steps": 2, "width": 64, "height": 64, "seed": 1}
    image, took = job(chroot, {"api": {"method": "POST", "endpoint": "/sdapi/v1/txt2img"}, "payload": payload}, timeout)
    output = image.get("output") if image.get("status") == "COMPLETED" else None
    if not isinstance(output, dict) or not output.get("images"):
        raise RootfsError(f"txt2img: {json.dumps(image)[:600]}\n{chroot.tail()}")
    sizes = [png_size(base64.b64decode(b64)) for b64 in output["images"]]
    results["txt2img"] = {"seconds": round(took, 1), "images": sizes}
    print(f"[rootfs] txt2img answered in {took:.1f} s: {len(sizes)} PNG {sizes}", flush=True)
    forge = chroot.forge_pid()
    maps = Path(f"/proc/{forge}/maps").read_text() if forge else ""
    results["tcmalloc"] = "libtcmalloc_minimal" in maps
    print(f"[rootfs] Forge (pid {forge}) has tcmalloc loaded: {results['tcmalloc']}", flush=True)
    if not results["tcmalloc"]:
        raise RootfsError(f"Forge's process (pid {forge}) does not have libtcmalloc_minimal loaded")
    return results


def cmd_run(args: argparse.Namespace) -> int:
    image = read_image(args.dockerfile)
    extra = dict(pair.split("=", 1) for pair in args.env)
    extra.setdefault("FORGE_BOOT_TIMEOUT", str(int(args.timeout)))
    log = Path(tempfile.mkdtemp(prefix="rootfs-run-")) / "worker.log"
    print(f"[rootfs] worker log: {log}", flush=True)
    with worker_in(args.rootfs, args.volume, image, extra, log) as chroot:
        results = run_checks(chroot, args.timeout)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the image's root file system into a new folder")
    b.add_argument("rootfs", type=Path)
    b.add_argument("--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror (default {DEFAULT_MIRROR})")
    b.add_argument("--json", type=Path, help="also write the size and time here")
    r = sub.add_parser("run", help="boot the worker in the root file system and send it jobs")
    r.add_argument("rootfs", type=Path)
    r.add_argument("--volume", type=Path, required=True, help="a provisioned volume (bind-mounted at /runpod-volume)")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more worker environment")
    r.add_argument("--timeout", type=float, default=600, help="deadline of Forge's boot and of each job (s)")
    r.add_argument("--json", type=Path, help="also write the results here")
    a = sub.add_parser("check-apt", help="apt-get check, and install a package on top (in an overlay)")
    a.add_argument("rootfs", type=Path)
    a.add_argument("--package", default="jq")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: run as root (debootstrap, chroot and mounts need it)", file=sys.stderr)
        return 2
    handlers = {"build": cmd_build, "run": cmd_run, "check-apt": cmd_check_apt}
    try:
        return handlers[args.command](args)
    except (RootfsError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
