"""`plan`, `status [--json]` and `init --preset`, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provision.records.spec import PRESETS, parse_spec
from tests.conftest import snapshot
from tests.helpers.forge_world import SECRET_ENV, World
from tests.provision.conftest import cli, state_of
from volume_layout import VolumeLayout


def test_plan_on_an_installed_volume_has_nothing_to_do(installed_volume: Path, spawns: list[list[str]]) -> None:
    before = snapshot(installed_volume)
    result = cli("plan")
    assert result.exit_code == 0, result.output
    assert result.stdout == "nothing to do: the volume matches the lock\n"
    assert spawns == []
    assert snapshot(installed_volume) == before


def test_plan_without_a_lock_says_install_would_resolve_it(provisioned_world: World, volume: Path,
                                                            spawns: list[list[str]]) -> None:
    (volume / "forge-volume.toml").write_text(provisioned_world.spec())
    result = cli("plan")
    assert result.exit_code == 0, result.output
    assert f"no lock at {volume / 'forge-volume.lock'}: install would first resolve the spec" in result.stdout
    assert "then install everything: python, venv, torch, Forge, extensions" in result.stdout
    assert spawns == []  # offline: it did not resolve anything
    assert sorted(p.name for p in volume.iterdir()) == ["forge-volume.toml"]


def test_plan_lists_what_a_changed_lock_would_do(provisioned_world: World, installed_volume: Path) -> None:
    checkout = installed_volume / "stable-diffusion-webui-forge"
    old = provisioned_world.forge.head()
    new = provisioned_world.forge.commit_on_branch("plan-moved", {"NEWS.md": "moved\n"})
    (installed_volume / "forge-volume.toml").write_text(
        provisioned_world.spec(ref="plan-moved", extensions=["ext-one"]))
    assert cli("lock").exit_code == 0
    before = snapshot(installed_volume)

    result = cli("plan")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "forge (the lock changed):" in lines
    assert f"  update the Forge checkout from {old[:12]} to {new[:12]}" in lines
    assert "extensions (the lock changed):" in lines
    assert "  remove extension ext-two (no longer in the lock)" in lines
    assert "prepare (forge changes):" in lines
    assert "requirements (prepare changes):" in lines
    assert "bytecode (requirements changes):" in lines
    assert not any(line.startswith(("python", "venv", "torch", "config")) for line in lines)
    assert snapshot(installed_volume) == before  # plan wrote nothing
    assert (checkout / "NEWS.md").exists() is False


def test_plan_on_a_fresh_volume_with_a_lock_lists_every_step(provisioned_world: World, volume: Path,
                                                             tmp_path: Path) -> None:
    (volume / "forge-volume.toml").write_text(provisioned_world.spec())
    assert cli("lock").exit_code == 0
    result = cli("plan")
    assert result.exit_code == 0, result.output
    steps = [line.split(" (")[0] for line in result.stdout.splitlines() if not line.startswith("  ")]
    assert steps == ["python", "venv", "torch", "forge", "extensions", "prepare", "requirements", "models", "config",
                     "links", "bytecode", "boot"]
    assert "  pip install fake-torch into the venv" in result.stdout
    assert "  clone extension ext-one at" in result.stdout
    assert sorted(p.name for p in volume.iterdir()) == ["forge-volume.lock", "forge-volume.toml"]


def test_status_on_an_unprovisioned_volume_says_so(volume: Path) -> None:
    result = cli("status")
    assert result.exit_code == 0, result.output
    assert "not provisioned (no state.json); run `forge-volume install`" in result.stdout
    assert "free of" in result.stdout
    report = json.loads(cli("status", "--json").stdout)
    assert report["provisioned"] is False and report["exists"] is True
    assert report["disk"]["free"] > 0
    assert list(volume.iterdir()) == []


def test_status_of_an_installed_volume(provisioned_world: World, installed_volume: Path) -> None:
    result = cli("status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "provisioned; layout version 1" in out
    assert f"forge       {provisioned_world.forge.head()[:12]} from {provisioned_world.forge.url}" in out
    assert "extensions  2: ext-one" in out and "ext-two" in out
    assert "models      0 file(s), 0 B" in out
    assert SECRET_ENV[0] in out and SECRET_ENV[1] not in out


def test_status_json_is_complete_and_holds_no_secret_values(provisioned_world: World,
                                                            installed_volume: Path) -> None:
    # A model record as the models code writes it, to see counts and bytes per kind.
    state_path = VolumeLayout(installed_volume).state
    state = state_of(installed_volume)
    state["models"] = [
        {"path": "models/Lora/a.safetensors", "kind": "lora", "size": 100, "sha256": "0" * 64, "source": "x"},
        {"path": "models/Lora/b.safetensors", "kind": "lora", "size": 50, "sha256": "1" * 64, "source": "y"},
        {"path": "models/VAE/v.safetensors", "kind": "vae", "size": 7, "sha256": "2" * 64, "source": "z"},
    ]
    state_path.write_text(json.dumps(state))

    result = cli("status", "--json")

    assert result.exit_code == 0, result.output
    assert SECRET_ENV[1] not in result.stdout
    report = json.loads(result.stdout)
    assert report["provisioned"] is True and report["unfinished_steps"] == []
    assert report["volume"] == str(installed_volume)
    assert report["layout_version"] == 1 and report["mount_point"] == str(installed_volume)
    assert report["forge"] == {"repo": provisioned_world.forge.url, "commit": provisioned_world.forge.head()}
    assert [e["name"] for e in report["extensions"]] == ["ext-one", "ext-two"]
    assert report["forge_args"] == ["--always-cpu"]
    assert SECRET_ENV[0] in report["forge_env_names"]
    assert report["models"] == {"count": 3, "bytes": 157, "by_kind": {"lora": {"count": 2, "bytes": 150},
                                                                       "vae": {"count": 1, "bytes": 7}}}
    assert report["sizes"]["venv"] > 0 and report["disk"]["free"] > 0
    assert set(report["steps"]) >= {"python", "venv", "forge", "bytecode"}


def test_status_hides_credentials_in_repo_urls(installed_volume: Path) -> None:
    state_path = VolumeLayout(installed_volume).state
    state = state_of(installed_volume)
    state["forge"]["repo"] = "https://user:ghp_secret@github.com/me/forge.git"
    state_path.write_text(json.dumps(state))
    result = cli("status", "--json")
    assert "ghp_secret" not in result.stdout
    assert json.loads(result.stdout)["forge"]["repo"] == "https://github.com/me/forge.git"


def test_status_of_a_missing_volume(tmp_path: Path) -> None:
    result = cli("--volume", str(tmp_path / "not-mounted"), "status")
    assert result.exit_code == 0
    assert "the folder does not exist (is the network volume attached?)" in result.stdout


@pytest.mark.parametrize("preset", PRESETS)
def test_init_writes_each_preset_and_refuses_to_overwrite(preset: str, volume: Path) -> None:
    spec_path = volume / "forge-volume.toml"

    result = cli("init", "--preset", preset)

    assert result.exit_code == 0, result.output
    assert f"wrote {spec_path} (preset {preset})" in result.stdout
    spec = parse_spec(spec_path.read_text(), spec_path)
    assert spec.forge.repo.endswith("stable-diffusion-webui-forge.git")
    assert bool(spec.models) is (preset != "minimal")

    spec_path.write_text(spec_path.read_text() + "# my edit\n")
    again = cli("init", "--preset", preset)
    assert again.exit_code == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert spec_path.read_text().endswith("# my edit\n")

    forced = cli("init", "--preset", preset, "--force")
    assert forced.exit_code == 0
    assert not spec_path.read_text().endswith("# my edit\n")


def test_init_rejects_an_unknown_preset(volume: Path) -> None:
    result = cli("init", "--preset", "nope")
    assert result.exit_code == 2
    assert list(volume.iterdir()) == []
