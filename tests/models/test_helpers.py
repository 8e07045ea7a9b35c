"""The worker's model helpers (fetch_model, sync_hf_repo) and concurrent writers on one volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from provision.errors import ChecksumError, PathError
from provision.fetch.download import Download, Http, Retry, download
from provision.fetch.partials import sweep_leftovers
from provision.models import ModelRequest, RepoRequest, fetch_model, sync_hf_repo
from provision.progress import QUIET
from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import FileServer
from tests.models.conftest import CIVITAI_TOKEN, Hosts, sha, state_models
from volume_layout import VolumeLayout

ROOT = Path(__file__).parents[2]


def test_fetch_model_from_every_source(volume: Path, hosts: Hosts) -> None:
    layout = VolumeLayout(volume)
    for path, source in hosts.sources.items():
        kind = {"Stable-diffusion": "checkpoint", "VAE": "vae", "ESRGAN": "upscaler", "embeddings": "embedding",
                "Lora": "lora", "text_encoder": "text_encoder"}[path.split("/")[1]]
        name = "sd-vae.safetensors" if kind == "vae" else None
        got = fetch_model(layout, ModelRequest(source, kind=kind, name=name), QUIET)
        assert (got["path"], got["sha256"], got["downloaded"]) == (path, sha(hosts.blobs[path]), True)
        assert (volume / path).read_bytes() == hosts.blobs[path]
    records = state_models(volume)
    assert set(records) == set(hosts.blobs)
    before = hosts.total_requests()
    again = fetch_model(layout, ModelRequest("hf://org/sd/model.safetensors", kind="checkpoint"), QUIET)
    assert again["downloaded"] is False and again["bytes"] == 0
    assert hosts.total_requests() == before + 1  # one HEAD to learn the hub's checksum, no download
    assert CIVITAI_TOKEN not in json.dumps(records)


def test_fetch_model_into_a_caller_path_and_refusals(volume: Path, hosts: Hosts) -> None:
    layout = VolumeLayout(volume)
    url = hosts.sources["models/ESRGAN/upscaler.pth"]
    got = fetch_model(layout, ModelRequest(url, dest="ESRGAN/", name="mine.pth"), QUIET)
    assert got["path"] == "models/ESRGAN/mine.pth" and got["kind"] == "upscaler"
    got = fetch_model(layout, ModelRequest(url, dest=volume / "models" / "Lora"), QUIET)
    assert got["path"] == "models/Lora/upscaler.pth" and got["kind"] == "lora"
    (volume / "elsewhere").mkdir()
    (volume / "models" / "escape").symlink_to(volume / "elsewhere")
    for dest in ("../forge-volume.toml", "/etc/passwd", str(volume / "venv" / "x.pth"), "escape/x.pth"):
        with pytest.raises(PathError, match="outside the volume's models folder"):
            fetch_model(layout, ModelRequest(url, dest=dest), QUIET)
    with pytest.raises(PathError, match="plain file name"):
        fetch_model(layout, ModelRequest(url, kind="lora", name="../x.pth"), QUIET)
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=wrong):
        fetch_model(layout, ModelRequest(url, kind="vae", sha256=wrong), QUIET)
    assert not (volume / "models" / "VAE" / "upscaler.pth").exists()
    assert list((volume / "elsewhere").iterdir()) == []


def test_sync_hf_repo_mirrors_and_skips(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"README.md": b"# loras\n", "a.safetensors": os.urandom(40_000), "sub/b.safetensors": os.urandom(30_000),
             "sub/notes.txt": b"notes"}
    layout = VolumeLayout(volume)
    with FakeHub() as hub:
        commit = hub.add_repo("org/loras", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        got = sync_hf_repo(layout, RepoRequest("org/loras", kind="lora"), QUIET)
        assert (got["revision"], got["files"], got["downloaded"], got["skipped"]) == (commit, 4, 4, 0)
        assert got["bytes"] == sum(len(d) for d in files.values())
        for name, data in files.items():
            assert (volume / "models" / "Lora" / name).read_bytes() == data
        served = hub.blob(files["a.safetensors"]).bytes_sent
        again = sync_hf_repo(layout, RepoRequest("org/loras", kind="lora"), QUIET)
        assert (again["downloaded"], again["skipped"], again["bytes"]) == (0, 4, 0)
        assert hub.blob(files["a.safetensors"]).bytes_sent == served
        (volume / "models" / "Lora" / "sub" / "b.safetensors").write_bytes(b"damaged")
        fixed = sync_hf_repo(layout, RepoRequest("org/loras", dest="Lora"), QUIET)
        assert (fixed["downloaded"], fixed["skipped"]) == (1, 3)
        assert (volume / "models" / "Lora" / "sub" / "b.safetensors").read_bytes() == files["sub/b.safetensors"]
        other = sync_hf_repo(layout, RepoRequest("org/loras", revision=commit, dest="adetailer/mirror"), QUIET)
        assert other["path"] == "models/adetailer/mirror" and other["downloaded"] == 4
        with pytest.raises(PathError):
            sync_hf_repo(layout, RepoRequest("org/loras", dest="../../x"), QUIET)


_FETCH = """
import json, sys
from pathlib import Path
from provision.models import ModelRequest, fetch_model
from provision.progress import QUIET
from volume_layout import VolumeLayout
got = fetch_model(VolumeLayout(Path(sys.argv[1])), ModelRequest(sys.argv[2], kind="checkpoint", sha256=sys.argv[3]),
                  QUIET)
print(json.dumps(got))
"""


def test_two_processes_fetching_one_model(volume: Path) -> None:
    data = os.urandom(2 << 20)
    with FileServer() as server:
        route = server.add("/big.safetensors", data, delay_per_chunk=0.02)  # about 0.7 s: the two overlap
        procs = [subprocess.Popen([sys.executable, "-c", _FETCH, str(volume), server.url("/big.safetensors"),
                                   sha(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert sorted(r["downloaded"] for r in results) == [False, True]  # one fetched, the other found it done
    target = volume / "models" / "Stable-diffusion" / "big.safetensors"
    assert target.read_bytes() == data and route.gets == 1
    assert [p.name for p in target.parent.iterdir()] == ["big.safetensors"]
    assert list(state_models(volume)) == ["models/Stable-diffusion/big.safetensors"]


def test_without_a_working_lock_two_writers_cost_bandwidth_not_data(tmp_path: Path) -> None:
    """Where file locks silently fail (some network volumes) both download; unique temporaries keep it safe."""
    data = os.urandom(1 << 20)
    target = tmp_path / "m.safetensors"
    errors: list[BaseException] = []
    with FileServer() as server:
        route = server.add("/m", data, delay_per_chunk=0.01)

        def fetch() -> None:
            try:
                download(Download(server.url("/m"), target, sha256=sha(data),
                                  http=Http(retry=Retry(attempts=2, base=0.01))))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert errors == [] and route.gets == 3
    assert target.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


_sweep_at_lock: Path | None = None  # the target whose temporaries a "finishing writer" sweeps, see below


def _sweep_when_a_temporary_is_locked(event: str, args: tuple[object, ...]) -> None:
    # Python raises this audit event just before every flock: the moment between a writer making its
    # temporary and locking it, when another writer of the same target may finish and sweep.
    global _sweep_at_lock
    target = _sweep_at_lock
    if event != "fcntl.flock" or target is None:
        return
    name = os.path.basename(os.readlink(f"/proc/self/fd/{args[0]}"))
    if name.startswith(f".{target.name}.") and os.stat(args[0]).st_size == 0:  # type: ignore[arg-type]
        _sweep_at_lock = None  # once; the sweep locks files itself
        sweep_leftovers(target)


sys.addaudithook(_sweep_when_a_temporary_is_locked)


def test_a_finishing_writers_sweep_never_removes_a_live_writers_new_temporary(tmp_path: Path) -> None:
    """The race behind a FileNotFoundError of one of three concurrent writers, made to happen every time:
    writer B makes its fresh temporary, and writer A, finishing the same target, sweeps its leftovers
    before B has locked it. B's temporary must survive, and B must finish."""
    global _sweep_at_lock
    data = os.urandom(1 << 16)
    target = tmp_path / "m.safetensors"
    with FileServer() as server:
        server.add("/m", data)
        _sweep_at_lock = target
        try:
            got = download(Download(server.url("/m"), target, sha256=sha(data),
                                    http=Http(retry=Retry(attempts=2, base=0.01))))
        finally:
            swept, _sweep_at_lock = _sweep_at_lock is None, None
    assert swept  # the sweep did run in the window
    assert got.size == len(data) and target.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
