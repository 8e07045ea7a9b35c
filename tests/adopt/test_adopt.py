"""``forge-volume adopt`` on a volume the original worker's install script filled, driven as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from provision.adopt.moves import KILL_AFTER
from tests.adopt.conftest import Original
from tests.conftest import snapshot
from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import FileServer
from tests.provision.conftest import cli, state_of


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_dry_run_prints_the_plan_and_changes_nothing(original: Original) -> None:
    root = original.volume.root
    before = snapshot(root)
    result = cli("adopt", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    print(out)
    assert f"stable-diffusion-webui-forge at {original.volume.forge_commit[:12]} (main)" in out
    assert "models      7 file(s), 1.0 MiB: checkpoint 2 (693.4 KiB), controlnet 1 (117.2 KiB)" in out
    assert f"sd-webui-reactor at {original.volume.extensions['sd-webui-reactor'][:12]} (v0.6.1)" in out
    assert "webui-user.sh: replaced by the original's install script" in out
    assert "models/Codeformer/: a folder no model kind uses: left in place" in out
    assert "models/Lora/README.txt: not a model file by its name: left in place" in out
    assert "venv/: the original's venv (Python 3.10.12)" in out
    assert "dry run: nothing was changed" in out
    assert snapshot(root) == before


def test_adopt_moves_hashes_and_locks_and_old_paths_still_resolve(original: Original) -> None:
    root = original.volume.root
    checkout = original.volume.checkout
    result = cli("adopt")
    assert result.exit_code == 0, result.output
    lock = json.loads((root / "forge-volume.lock").read_text())
    assert lock["forge"]["commit"] == original.volume.forge_commit and lock["forge"]["ref"] == "main"
    assert lock["forge"]["repo"] == f"file://{original.world.forge.path}"
    assert {e["name"]: (e["commit"], e["ref"]) for e in lock["extensions"]} == {
        "sd-webui-reactor": (original.volume.extensions["sd-webui-reactor"], "v0.6.1"),
        "adetailer": (original.volume.extensions["adetailer"], "main")}
    locked = {m["path"]: m for m in lock["models"]}
    assert len(locked) == 7
    for old, data in original.volume.models.items():
        folder, name = old.split("/")[1:]
        new = root / "models" / folder / name
        assert locked[f"models/{folder}/{name}"]["sha256"] == sha(data)
        assert locked[f"models/{folder}/{name}"]["source"] == "volume"
        assert new.is_file() and not new.is_symlink() and new.read_bytes() == data
        assert (checkout / old).is_symlink() and (checkout / old).read_bytes() == data  # the old path resolves
        assert os.readlink(checkout / old) == os.path.relpath(new, (checkout / old).parent)
    reactor = root / "extensions" / "sd-webui-reactor"
    assert (reactor / "last_device.txt").read_text() == "CUDA\n"
    assert (checkout / "extensions" / "sd-webui-reactor").resolve() == reactor.resolve()
    assert (root / "config" / "config.json").read_text() == (checkout / "config.json").read_text()
    assert (root / "config" / "styles.csv").is_file()
    assert (root / "venv" / "pyvenv.cfg").is_file()  # the original venv stays in place
    assert (checkout / "models" / "Codeformer" / "codeformer-v0.1.0.pth").is_file()  # not recognised: left
    spec = (root / "forge-volume.toml").read_text()
    assert 'torch = ["torch==2.1.2", "torchvision==0.16.2"]' in spec
    assert 'torch_index_url = "https://download.pytorch.org/whl/cu121"' in spec
    assert 'env = { XFORMERS_PACKAGE = "xformers==0.0.23.post1" }' in spec
    records = {m["path"]: m for m in state_of(root)["models"]}
    assert records["models/Lora/my_style_v3.safetensors"]["sha256"] == sha(
        original.volume.models["models/Lora/my_style_v3.safetensors"])
    assert "7 model(s) have no known source" in result.output
    # the spec and lock agree: `lock` has nothing to do, offline
    relock = cli("lock")
    assert relock.exit_code == 0 and "no changes" in relock.output, relock.output
    status = cli("status")
    assert "no source   7 model file(s)" in status.output and "cannot be rebuilt elsewhere" in status.output
    assert "venv/: its venv (Python 3.10.12" in status.output
    # a second adopt is a no-op
    before = snapshot(root)
    again = cli("adopt")
    assert again.exit_code == 0 and "nothing to do: this volume was adopted" in again.output
    assert snapshot(root) == before


CLI = str(Path(sys.executable).with_name("forge-volume"))


def run_cli(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, CLI, *args], env={**os.environ, **(env or {})}, text=True, capture_output=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_an_adopt_killed_mid_way_finishes_when_run_again(original: Original) -> None:
    root, checkout = original.volume.root, original.volume.checkout
    killed = run_cli("adopt", env={KILL_AFTER: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    journal = json.loads((root / ".forge-volume" / "adopt" / "journal.json").read_text())
    moved = [m for m in journal["moves"] if (root / m["src"]).is_symlink()]
    assert len(moved) == 3 and not (root / "forge-volume.lock").exists()
    inodes = {m["dest"]: (root / m["dest"]).stat().st_ino for m in moved}
    # every old path still resolves, moved or not
    for old, data in original.volume.models.items():
        assert (checkout / old).read_bytes() == data
    # a kill between a move's two steps: the hard link made, the old path not yet a link
    half = next(m for m in journal["moves"] if not (root / m["src"]).is_symlink() and m["dest"].startswith("models/"))
    (root / half["dest"]).parent.mkdir(parents=True, exist_ok=True)
    os.link(root / half["src"], root / half["dest"])
    inodes[half["dest"]] = (root / half["dest"]).stat().st_ino
    dry = cli("adopt", "--dry-run")
    assert "was interrupted with 6 of 9 move(s) to go" in dry.output, dry.output
    again = run_cli("adopt")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "moved 6 of 9 path(s) now (3 done before)" in again.stdout
    assert "hashing" not in again.stderr  # the journal holds every hash: nothing read twice
    for dest, inode in inodes.items():
        assert (root / dest).stat().st_ino == inode  # nothing moved twice
    for old, data in original.volume.models.items():
        folder, name = old.split("/")[1:]
        assert (checkout / old).is_symlink() and (root / "models" / folder / name).read_bytes() == data
    assert run_cli("adopt").stdout.startswith("nothing to do")


def test_a_second_adopt_after_a_failure_hashes_only_what_is_new(original: Original, civitai: FileServer) -> None:
    checkout = original.volume.checkout
    bad = checkout / "models" / "Lora" / "locked.safetensors"
    bad.write_bytes(b"x" * 1000)
    bad.chmod(0)
    # root reads any file: run without the capabilities that let it, as an ordinary user would be
    no_override = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                   "--inh-caps", "-dac_override,-dac_read_search")
    failed = run_cli("adopt", prefix=no_override)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(
        "error: cannot read the model file stable-diffusion-webui-forge/models/Lora/locked.safetensors: "
        "Permission denied (fix its permissions or move the broken file out of the models folder"), failed.stderr
    assert not any((checkout / old).is_symlink() for old in original.volume.models)  # nothing moved
    bad.chmod(0o644)
    again = run_cli("adopt")
    assert again.returncode == 0, again.stderr
    assert "hashing 1 model file(s), 0.0 GiB (7 known from the hash cache)" in again.stderr


def test_refusals_name_the_problem_and_the_fix(original: Original) -> None:
    root, checkout = original.volume.root, original.volume.checkout
    before = snapshot(root)
    (checkout / "launch.py").write_text("# edited by hand\n")
    result = cli("adopt")
    assert result.exit_code == 1
    assert "error: stable-diffusion-webui-forge has local changes to tracked files: launch.py " \
           "(commit or undo them, or pass --keep-local-changes" in result.output
    (checkout / "embeddings").mkdir()
    (checkout / "embeddings" / "EasyNegative.pt").write_bytes(b"a")
    (checkout / "models" / "embeddings").mkdir()
    (checkout / "models" / "embeddings" / "easynegative.pt").write_bytes(b"b")
    result = cli("adopt", "--keep-local-changes")
    assert result.exit_code == 1
    assert "error: stable-diffusion-webui-forge/models/embeddings/easynegative.pt (embedding) and " \
           "stable-diffusion-webui-forge/embeddings/EasyNegative.pt (embedding) would both become " \
           "models/embeddings/easynegative.pt (rename or move one of them" in result.output, result.output
    (checkout / "models" / "embeddings" / "easynegative.pt").unlink()
    assert {k for k in snapshot(root)} - set(before) == {
        "stable-diffusion-webui-forge/embeddings", "stable-diffusion-webui-forge/embeddings/EasyNegative.pt",
        "stable-diffusion-webui-forge/models/embeddings"}  # refusals wrote nothing
    result = cli("adopt", "--keep-local-changes")
    assert result.exit_code == 0, result.output
    patch = root / ".forge-volume" / "adopt" / "stable-diffusion-webui-forge.patch"
    assert "+# edited by hand" in patch.read_text()
    assert (checkout / "launch.py").read_text() == "# edited by hand\n"  # kept as it is
    assert "saved local changes as .forge-volume/adopt/stable-diffusion-webui-forge.patch" in result.output


def test_a_forge_volume_volume_is_refused(original: Original) -> None:
    assert cli("init", "--preset", "minimal").exit_code == 0
    result = cli("adopt", "--dry-run")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {original.volume.root} is already a forge-volume volume (")
    assert "on this one use `forge-volume install`" in result.output


def test_not_an_original_volume(volume: Path) -> None:
    result = cli("adopt", "--dry-run")
    assert result.exit_code == 1
    assert "error: no original worker's Forge checkout at" in result.output


def test_sources_found_by_hash_on_a_civitai_stand_in(original: Original, civitai: FileServer) -> None:
    root = original.volume.root
    data = original.volume.models["models/Lora/my_style_v3.safetensors"]
    url = "https://civitai.com/api/download/models/4242?type=Model&format=SafeTensor"
    civitai.add(f"/api/v1/model-versions/by-hash/{sha(data)}", json.dumps(
        {"id": 4242, "files": [{"name": "myStyle.safetensors", "downloadUrl": url,
                                "hashes": {"SHA256": sha(data).upper()}}]}).encode())
    result = cli("adopt")
    assert result.exit_code == 0, result.output
    assert "Civitai's by-hash API named the source of 1 file(s)" in result.output
    lock = {m["name"]: m for m in json.loads((root / "forge-volume.lock").read_text())["models"]}
    assert lock["my_style_v3.safetensors"]["source"] == url
    assert lock["my_style_v3.safetensors"]["sha256"] == sha(data)
    assert lock["deliberate_v2.safetensors"]["source"] == "volume"
    assert len([s for s in civitai.requests if "/by-hash/" in s.path]) == 7


def test_an_unreachable_index_is_skipped_with_a_note(original: Original, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CIVITAI_API_BASE", f"http://127.0.0.1:{port}/api/v1")
    result = cli("adopt")
    assert result.exit_code == 0, result.output
    assert "Civitai's by-hash API did not answer (ConnectionError); 7 file(s) not looked up are recorded with " \
           "no source" in result.output


def test_a_named_hugging_face_repo_names_sources_by_hash(original: Original, monkeypatch: pytest.MonkeyPatch) -> None:
    root = original.volume.root
    upscaler = original.volume.models["models/ESRGAN/4x-UltraSharp.pth"]
    with FakeHub() as hub:
        commit = hub.add_repo("ashleykleynhans/upscalers", {"4x-UltraSharp.pth": upscaler, "lollypop.pth": b"l" * 99})
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        result = cli("adopt", "--no-lookup", "--hf-repo", "ashleykleynhans/upscalers")
        assert result.exit_code == 0, result.output
        assert not hub.resolve_requests()  # listed once, nothing downloaded
    lock = {m["name"]: m for m in json.loads((root / "forge-volume.lock").read_text())["models"]}
    entry = lock["4x-UltraSharp.pth"]
    assert entry["source"] == f"hf://ashleykleynhans/upscalers/4x-UltraSharp.pth@{commit}"
    assert (entry["revision"], entry["pinned_by"], entry["sha256"]) == (commit, "hub", sha(upscaler))
    assert lock["sdxl_vae.safetensors"]["source"] == "volume"
    assert "named the source of 1 file(s): hf://ashleykleynhans/upscalers/4x-UltraSharp.pth@" in result.output
    assert cli("verify").exit_code == 1  # not installed yet; but lock and spec agree:
    assert "no changes" in cli("lock").output
