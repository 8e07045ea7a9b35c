#!/usr/bin/env python3
"""Benchmark: `forge-volume lock` a second time, with nothing changed and after adding one model.

Builds the offline world the tests use (fixture Forge, helper repos, two extensions as local git
repositories) and model hosts on loopback (a fake Hugging Face hub with its CDN, a plain file
server and a civitai stand-in), writes a spec naming Forge, both extensions and one model of each
source kind, locks it once, then measures with the real console script:

- `lock` with nothing changed: wall time (target <= 0.5 s) and network requests (target 0): HTTP
  requests counted by the loopback servers, git's remote calls (ls-remote, fetch) counted by
  Python's audit hook inside the CLI process;
- `lock` after adding one model to the spec: the requests it made, which must all be for that model.

Usage: python scripts/bench_lock.py [--runs N]   (exit 1 if a target is missed)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.audited_cli import audited, cli_path, spawned, timed  # noqa: E402
from tests.helpers.fake_hub import FakeHub  # noqa: E402
from tests.helpers.forge_world import build_world  # noqa: E402
from tests.helpers.http_server import FileServer  # noqa: E402

NOCHANGE_TARGET_S = 0.5
def git_remote_calls(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    return [c for c in spawned(result) if c and Path(c[0]).name == "git" and ({"ls-remote", "fetch", "clone"} & set(c))]


def model(kind: str, source: str) -> str:
    return f'\n[[models]]\nkind = "{kind}"\nsource = "{source}"\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed runs of the no-change lock (default 10)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="forge-volume-bench-lock-"))
    try:
        world = build_world(work)
        volume = work / "volume"
        volume.mkdir()
        with FakeHub() as hub, FileServer() as files:
            hub.add_repo("org/sd", {"model.safetensors": os.urandom(100_000), "vae.safetensors": os.urandom(50_000)})
            files.add("/files/upscaler.pth", os.urandom(80_000))
            files.add("/files/added.safetensors", os.urandom(60_000))
            lora = os.urandom(70_000)
            files.add("/api/download/models/7", lora,
                      headers={"Content-Disposition": 'attachment; filename="civitai-lora.safetensors"'})
            files.add("/api/v1/model-versions/7", json.dumps({"id": 7, "files": [{
                "name": "civitai-lora.safetensors", "sizeKB": len(lora) / 1024, "primary": True,
                "hashes": {"SHA256": hashlib.sha256(lora).hexdigest()},
                "downloadUrl": files.url("/api/download/models/7")}]}).encode())
            models = (model("checkpoint", "hf://org/sd/model.safetensors") + model("vae", "hf://org/sd/vae.safetensors")
                      + model("upscaler", files.url("/files/upscaler.pth")) + model("lora", "civitai://7"))
            spec = volume / "forge-volume.toml"
            spec.write_text(world.spec(extra=models), encoding="utf-8")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE_", "HF_", "CIVITAI_"))}
            env.update(FORGE_VOLUME=str(volume), HF_ENDPOINT=hub.endpoint, HF_HOME=str(work / "hf-home"),
                       HF_HUB_DISABLE_TELEMETRY="1", CIVITAI_API_BASE=files.url("/api/v1"))
            servers = (hub.server, hub.cdn, files)
            cli = cli_path()

            first, locked = timed(audited("lock"), env)
            first_git = len(git_remote_calls(locked))
            first_http = sum(len(s.requests) for s in servers)

            before = sum(len(s.requests) for s in servers)
            times = [timed([cli, "lock"], env)[0] for _ in range(args.runs)]
            _, nochange = timed(audited("lock"), env)
            nochange_http = sum(len(s.requests) for s in servers) - before
            nochange_git = git_remote_calls(nochange)
            said = nochange.stdout.strip()

            spec.write_text(world.spec(extra=models + model("lora", files.url("/files/added.safetensors"))))
            marks = {id(s): len(s.requests) for s in servers}
            _, added = timed(audited("lock"), env)
            asked = [(r.method, r.path) for s in servers for r in s.requests[marks[id(s)]:]]
            added_git = git_remote_calls(added)

        print(f"first lock (Forge, 2 extensions, 4 models): {first:.2f} s, {first_git} git remote calls, "
              f"{first_http} HTTP requests (the counters see the network)")
        print(f"lock with nothing changed, {args.runs} runs: median {statistics.median(times):.3f} s, "
              f"max {max(times):.3f} s (target <= {NOCHANGE_TARGET_S} s)")
        print(f"  network requests: {nochange_http} HTTP, {len(nochange_git)} git remote calls (target 0); "
              f"it said: {said}")
        print(f"lock after adding one model: {len(asked)} HTTP request(s) {asked}, {len(added_git)} git remote "
              "calls (target: only that model's)")
        ok = (max(times) <= NOCHANGE_TARGET_S and nochange_http == 0 and not nochange_git and not added_git
              and asked and all(path == "/files/added.safetensors" for _, path in asked))
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
