"""After adopt: ``install`` completes the volume around what is there (no model fetched, no Forge or extension
cloned), ``verify`` passes, and a model added later installs beside the adopted ones."""

from __future__ import annotations

import hashlib

import tomlkit

from tests.adopt.conftest import Original
from tests.helpers.forge_world import base_python
from tests.helpers.http_server import FileServer
from tests.provision.conftest import cli, git_calls, state_of


def _for_the_stand_in_world(original: Original) -> None:
    """What a user edits after adopt on this machine: the interpreter, torch and Forge's launcher settings
    (the stand-in world's local helper repositories and wheels instead of the original's CUDA torch)."""
    path = original.volume.root / "forge-volume.toml"
    doc = tomlkit.parse(path.read_text())
    forge = doc["forge"]
    forge["python"] = base_python()
    forge["torch"] = ["fake-torch"]
    forge["torch_index_url"] = ""
    forge["args"] = ["--always-cpu"]
    forge["env"] = original.world.helper_env
    path.write_text(tomlkit.dumps(doc))


def test_install_completes_an_adopted_volume_and_verify_passes(original: Original, spawns: list[list[str]]) -> None:
    root, checkout = original.volume.root, original.volume.checkout
    assert cli("adopt").exit_code == 0
    _for_the_stand_in_world(original)
    relock = cli("lock")
    assert relock.exit_code == 0 and "forge.python: changed" in relock.output, relock.output
    assert "forge: moved" not in relock.output  # the commit found stays locked
    spawns.clear()
    installed = cli("install")
    assert installed.exit_code == 0, installed.output
    assert not git_calls(spawns, "clone", "fetch")  # Forge and the extensions were taken as they are
    assert "moved the original worker's venv aside to venv-original/" in installed.output
    assert (root / "venv-original" / "pyvenv.cfg").read_text().endswith("version = 3.10.12\n")
    assert (root / "venv" / "pyvenv.cfg").is_file() and (root / "venv" / "bin" / "python").exists()
    assert state_of(root)["adopted"]["venv"] == "venv-original"
    for old, data in original.volume.models.items():  # the original's paths still resolve
        assert (checkout / old).read_bytes() == data
    verified = cli("verify")
    assert verified.exit_code == 0, verified.output
    status = cli("status")
    assert "venv-original/: its venv (Python 3.10.12" in status.output and "moved aside by install" in status.output
    assert f"rm -rf {root}/venv-original" in status.output
    # a model added later goes beside the adopted ones, and only it is fetched
    data = b"new lora " * 1000
    with FileServer() as server:
        server.add("/new_lora.safetensors", data)
        added = cli("add", "lora", server.url("/new_lora.safetensors"))
        assert added.exit_code == 0, added.output
        assert len(server.requests_to("/new_lora.safetensors")) >= 1
    assert (root / "models" / "Lora" / "new_lora.safetensors").read_bytes() == data
    assert (root / "models" / "Lora" / "my_style_v3.safetensors").is_file()
    assert cli("verify").exit_code == 0
    assert cli("install").output.startswith("nothing to do")


def test_a_model_with_no_source_is_checked_never_fetched_never_pruned(original: Original) -> None:
    root = original.volume.root
    assert cli("adopt").exit_code == 0
    _for_the_stand_in_world(original)
    assert cli("lock").exit_code == 0
    prune = cli("refresh-models", "--prune", "--dry-run")
    assert prune.exit_code == 0 and "7 already correct" in prune.output and "prune" not in prune.output, prune.output
    vae = root / "models" / "VAE" / "sdxl_vae.safetensors"
    vae.write_bytes(b"other bytes of the same length".ljust(vae.stat().st_size, b"."))
    deep = cli("verify", "--deep")
    assert deep.exit_code == 1
    assert f"wrong hash: models/VAE/sdxl_vae.safetensors has sha256 {hashlib.sha256(vae.read_bytes()).hexdigest()}" \
        in deep.output
    vae.unlink()
    missing = cli("verify")
    assert "missing: models/VAE/sdxl_vae.safetensors (vae no source: cannot be downloaded again)" in missing.output
    refresh = cli("refresh-models")
    assert refresh.exit_code == 1
    assert "error: models/VAE/sdxl_vae.safetensors is missing, and it has no source (kept from the volume by " \
           "adopt, sha256 " in refresh.output, refresh.output
    assert "(put the file back (the lock names its sha256 and size)" in refresh.output
    plan = cli("plan")
    assert "cannot repair models/VAE/sdxl_vae.safetensors (48.8 KiB): it is missing and has no source" in plan.output


def test_install_without_adopt_refuses_the_original_venv(original: Original) -> None:
    """A user who skips adopt: install must not clear the original worker's venv."""
    root = original.volume.root
    (root / "forge-volume.toml").write_text(original.world.spec())
    before = (root / "venv" / "pyvenv.cfg").read_text()
    result = cli("install")
    assert result.exit_code == 1
    assert f"error: {root / 'venv'} holds a venv forge-volume did not build (on the interpreter in /usr/bin) (if " \
           "this volume was filled by runpod-worker-forge's install script, run `forge-volume adopt` first" \
           in result.output, result.output
    assert (root / "venv" / "pyvenv.cfg").read_text() == before
    assert (root / "venv" / "lib" / "python3.10" / "site-packages" / "torch-2.1.2+cu121.dist-info").is_dir()
