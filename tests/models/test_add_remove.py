"""`forge-volume add` and `remove` through the CLI, on an installed volume: the spec keeps its comments,
only the new entry is locked and fetched (no git, no pip: Forge and the extensions are not looked at),
bad input changes nothing, and a removed model's file stays unless --delete. (That a branch which
moved upstream stays pinned is shown in test_relock.py; here no git command runs at all.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import cli
from tests.helpers.forge_world import World
from tests.models.conftest import Hosts, lock_models, sha, state_models
from tests.provision.conftest import git_calls, pip_installs, spawns  # noqa: F401  (spawns is a fixture)
from volume_layout import VolumeLayout

COMMENTED = """
# --- models: keep this comment ---
[[models]]
kind = "embedding"   # a small one
source = "{tofu}"

# the VAE, pinned by name
[[models]]
kind = "vae"
source = "hf://org/sd/vae/vae.safetensors"
name = "sd-vae.safetensors"
# trailing words
"""


@pytest.fixture
def locked(installed_volume: Path, provisioned_world: World, hosts: Hosts) -> Path:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(provisioned_world.spec(extra=COMMENTED.format(tofu=hosts.sources["models/embeddings/tofu.pt"])))
    assert cli("lock", volume=installed_volume).exit_code == 0
    assert cli("install", volume=installed_volume).exit_code == 0
    return installed_volume


def test_add_locks_and_fetches_only_the_new_model(locked: Path, hosts: Hosts, spawns: list[list[str]]) -> None:  # noqa: F811
    spec = locked / "forge-volume.toml"
    before_text = spec.read_text()
    before_lock = json.loads((locked / "forge-volume.lock").read_text())
    requests = {s: len(s.requests) for s in (hosts.hub.server, hosts.hub.cdn, hosts.files, hosts.cdn)}
    spawns.clear()

    result = cli("add", "checkpoint", "hf://org/sd/model.safetensors", "--name", "base.safetensors", volume=locked)

    assert result.exit_code == 0, result.output
    path = "models/Stable-diffusion/base.safetensors"
    data = hosts.blobs["models/Stable-diffusion/model.safetensors"]
    assert result.stdout.splitlines()[0].startswith(f"model {path}: added from hf://org/sd/model.safetensors")
    assert f"fetched {path} (293.0 KiB)" in result.stdout and "models: 1 fetched" in result.stdout
    assert result.output.count(f"fetched {path}") == 1  # said once (the models step's own summary is not repeated)
    assert (locked / path).read_bytes() == data
    assert state_models(locked)[path]["sha256"] == sha(data)
    # The spec: the old text, byte for byte, and the new entry after the last model.
    assert spec.read_text() == before_text + (
        '\n[[models]]\nkind = "checkpoint"\nsource = "hf://org/sd/model.safetensors"\nname = "base.safetensors"\n')
    after_lock = json.loads((locked / "forge-volume.lock").read_text())
    assert {k: v for k, v in after_lock.items() if k != "models"} == \
        {k: v for k, v in before_lock.items() if k != "models"}
    assert after_lock["models"][:-1] == before_lock["models"]
    assert git_calls(spawns, "ls-remote", "fetch", "clone", "checkout") == [] and pip_installs(spawns) == []
    asked = {s: s.requests[requests[s]:] for s in requests}
    assert not asked[hosts.files] and not asked[hosts.cdn]  # the other models' hosts were not asked
    assert all("model.safetensors" in r.path or "/blobs/" in r.path for s in asked.values() for r in s)
    plan = cli("plan", volume=locked)
    assert plan.exit_code == 0 and "nothing to do" in plan.stdout, plan.output
    assert cli("verify", volume=locked).exit_code == 0


@pytest.mark.parametrize("args, code, words", [
    (["add", "lorra", "hf://org/sd/model.safetensors"], 2, "'lorra' is not one of 'checkpoint', 'lora'"),
    (["add", "embedding", "{tofu}", "--sha256", "0" * 64], 1, "already has the embedding model 'tofu.pt'"),
    (["add", "vae", "hf://org/sd/model.safetensors", "--name", "sd-vae.safetensors"], 1, "already has the vae model"),
    (["add", "lora", "hf://org/sd/model.safetensors", "--sha256", "abc"], 1, "is not 64 hexadecimal digits"),
    (["add", "lora", "org/sd/model.safetensors"], 1, "has no scheme; accepted forms: hf://"),
    (["add", "lora", "hf://org/sd/model.safetensors", "--name", "../x.safetensors"], 1, "not usable as a file name"),
    (["add", "lora", "hf://org/sd/model.safetensors", "--name", ".x.safetensors.partial"], 1, "temporary file"),
    (["add", "lora", "hf://org/sd/model.safetensors", "--name", ".x.safetensors"], 1, "hidden name"),
    (["add", "lora", "hf://org/sd/gone.safetensors"], 1, "no such file in the repository"),
    (["remove", "nothing.safetensors"], 2, "models: embedding/tofu.pt, vae/sd-vae.safetensors"),
])
def test_bad_input_fails_before_the_spec_is_touched(locked: Path, hosts: Hosts, args: list[str], code: int,
                                                    words: str) -> None:
    files = [locked / "forge-volume.toml", locked / "forge-volume.lock", VolumeLayout(locked).state]
    before = [f.read_bytes() for f in files]
    tofu = hosts.sources["models/embeddings/tofu.pt"]
    result = cli(*[a.format(tofu=tofu) for a in args], volume=locked)
    assert result.exit_code == code, result.output
    assert words in result.output, result.output
    assert "Traceback" not in result.output
    assert [f.read_bytes() for f in files] == before
    assert not list((locked / "models" / "Lora").glob("*"))  # the folder itself is made by Forge's first start


def test_the_same_add_again_is_not_a_duplicate(locked: Path, hosts: Hosts) -> None:
    """Same kind, source and name as an entry already there (an add interrupted after it wrote the spec):
    nothing to add, nothing fetched again, and the command finishes as the first one would have."""
    files = [locked / "forge-volume.toml", locked / "forge-volume.lock"]
    before = [f.read_bytes() for f in files]
    requests = hosts.total_requests()
    result = cli("add", "embedding", hosts.sources["models/embeddings/tofu.pt"], volume=locked)
    assert result.exit_code == 0, result.output
    assert "model models/embeddings/tofu.pt: already in the spec and the lock; fetching it" in result.stdout
    assert [f.read_bytes() for f in files] == before
    assert hosts.total_requests() == requests  # present and recorded: not fetched again


def test_add_refuses_while_the_spec_has_unlocked_edits(locked: Path, hosts: Hosts) -> None:
    spec = locked / "forge-volume.toml"
    spec.write_text(spec.read_text().replace('args = ["--always-cpu"]', 'args = ["--always-cpu", "--lowvram"]'))
    before = spec.read_text()
    result = cli("add", "lora", "hf://org/sd/model.safetensors", volume=locked)
    assert result.exit_code == 1 and "forge.args" in result.stderr and "forge-volume lock" in result.stderr
    assert spec.read_text() == before


def test_remove_takes_the_entry_out_and_the_file_stays_unless_delete(locked: Path, hosts: Hosts) -> None:
    spec = locked / "forge-volume.toml"
    original = spec.read_text()
    assert cli("add", "lora", hosts.sources["models/ESRGAN/upscaler.pth"], "--name", "l.safetensors", "--sha256",
               sha(hosts.blobs["models/ESRGAN/upscaler.pth"]).upper(), volume=locked).exit_code == 0
    lora = locked / "models" / "Lora" / "l.safetensors"
    assert lora.exists()

    result = cli("remove", "l.safetensors", volume=locked)
    assert result.exit_code == 0, result.output
    assert "the file stays on the volume" in result.stdout
    assert spec.read_text() == original  # exactly as before the add, comments and all
    assert "models/Lora/l.safetensors" not in lock_models(locked) and lora.exists()

    result = cli("remove", "embedding/tofu.pt", "--delete", volume=locked)
    assert result.exit_code == 0, result.output
    assert "deleted models/embeddings/tofu.pt" in result.stdout
    assert not (locked / "models" / "embeddings" / "tofu.pt").exists()
    assert "models/embeddings/tofu.pt" not in state_models(locked)
    text = spec.read_text()
    assert "# a small one" not in text and "# the VAE, pinned by name" in text and "# trailing words" in text
    assert "# --- models: keep this comment ---" not in text  # it sat right above the removed entry
    assert list(lock_models(locked)) == ["models/VAE/sd-vae.safetensors"]
    assert cli("lock", volume=locked).stdout.startswith("no changes")
    assert cli("verify", volume=locked).exit_code == 0


def test_remove_delete_and_refresh_models_do_not_follow_a_kind_folder_linked_out_of_models(
        locked: Path, tmp_path: Path) -> None:
    """Issue 19 hole 7: a kind folder that is a link out of models/ is refused by the CLI too, before
    the spec, the lock or any file changes."""
    embeddings = locked / "models" / "embeddings"
    outside = tmp_path / "elsewhere"
    embeddings.rename(outside)
    embeddings.symlink_to(outside, target_is_directory=True)
    spec, lock = (locked / "forge-volume.toml").read_text(), (locked / "forge-volume.lock").read_text()

    result = cli("remove", "embedding/tofu.pt", "--delete", volume=locked)
    assert result.exit_code == 1
    assert "outside the volume's models folder" in result.stderr and "make models/embeddings a real folder" \
        in result.stderr, result.output
    assert (outside / "tofu.pt").exists()
    assert (locked / "forge-volume.toml").read_text() == spec and (locked / "forge-volume.lock").read_text() == lock

    (outside / "tofu.pt").unlink()
    result = cli("refresh-models", volume=locked)
    assert result.exit_code == 1 and "outside the volume's models folder" in result.stderr, result.output
    assert list(outside.iterdir()) == []


def test_a_checkpoint_the_lock_no_longer_lists_is_never_chosen_for_forge(locked: Path, hosts: Hosts) -> None:
    """Day one: `remove` without --delete keeps the file, which sorts first in the folder. Install must
    not warm Forge up on it nor record it as the checkpoint workers prefetch at boot; a boot record that
    names it is a verify problem, with its fix."""
    from provision.boot import boot_set
    from volume_layout import VolumeLayout

    for name in ("a-old.safetensors", "b-new.safetensors"):
        assert cli("add", "checkpoint", "hf://org/sd/model.safetensors", "--name", name, volume=locked).exit_code == 0
    layout = VolumeLayout(locked)
    layout.boot_set_index.unlink()  # the boot proof runs again: Forge loads the lock's first checkpoint
    assert cli("install", volume=locked).exit_code == 0
    assert boot_set.load_index(layout).checkpoint == "models/Stable-diffusion/a-old.safetensors"

    removed = cli("remove", "a-old.safetensors", volume=locked)
    assert removed.exit_code == 0 and "the file stays on the volume" in removed.output

    verify = cli("verify", volume=locked)
    assert verify.exit_code == 1
    assert "boot set: the boot set names the checkpoint models/Stable-diffusion/a-old.safetensors to prefetch, " \
           "which the lock no longer lists; workers boot Forge straight from the volume, slowly, until " \
           "`forge-volume install` records it again" in verify.output
    assert "boot" in cli("plan", volume=locked).output

    again = cli("install", volume=locked)
    assert again.exit_code == 0, again.output
    assert "ran boot" in again.output
    assert boot_set.load_index(layout).checkpoint == "models/Stable-diffusion/b-new.safetensors"
    assert (locked / "models" / "Stable-diffusion" / "a-old.safetensors").is_file()  # still kept, as documented
    assert cli("verify", volume=locked).exit_code == 0
