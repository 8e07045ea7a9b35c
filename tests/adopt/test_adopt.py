"""``forge-volume adopt`` on a volume the original worker's install script filled, driven as a user would."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tests.adopt.conftest import Original
from tests.conftest import snapshot
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
