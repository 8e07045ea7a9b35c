"""Settings files an extension needs on the volume (`files` in an [[extensions]] table).

The original install script wrote "CUDA" into ReActor's last_device.txt, else ReActor swaps
faces on the CPU; the spec says so declaratively and install keeps it true.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.forge_world import World
from tests.provision.conftest import cli, state_of

FILES = 'files = { "last_device.txt" = "CUDA", "settings/mode.txt" = "fast" }\n'


def _spec_with_files(world: World, files: str = FILES) -> str:
    return world.spec().replace('name = "ext-one"\n', f'name = "ext-one"\n{files}', 1)


def test_files_are_written_pinned_and_kept(provisioned_world: World, installed_volume: Path,
                                           spawns: list[list[str]]) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(_spec_with_files(provisioned_world))
    assert cli("lock").exit_code == 0
    lock = (installed_volume / "forge-volume.lock").read_text()
    assert '"last_device.txt": "CUDA"' in lock

    assert "write extensions/ext-one/last_device.txt" in cli("plan").output
    result = cli("install")
    assert result.exit_code == 0, result.output
    ext = installed_volume / "extensions" / "ext-one"
    assert (ext / "last_device.txt").read_text() == "CUDA"
    assert (ext / "settings" / "mode.txt").read_text() == "fast"

    # Changed behind the toolkit's back: the next install puts it right, and nothing else runs.
    (ext / "last_device.txt").write_text("CPU")
    spawns.clear()
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert (ext / "last_device.txt").read_text() == "CUDA"
    assert not [argv for argv in spawns if "clone" in argv or "install" in argv[2:4]]
    assert state_of(installed_volume)["steps"]["extensions"]["finished_at"]


def test_a_changed_file_in_the_spec_makes_the_lock_stale(provisioned_world: World, installed_volume: Path) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(_spec_with_files(provisioned_world))
    assert cli("lock").exit_code == 0
    spec.write_text(_spec_with_files(provisioned_world, 'files = { "last_device.txt" = "CPU" }\n'))
    result = cli("install")
    assert result.exit_code == 1
    assert "extension 'ext-one' changed (repo, ref, pip or files)" in result.stderr


def test_a_file_path_leaving_the_extension_is_a_spec_error(provisioned_world: World, volume: Path) -> None:
    for bad in ("../escape.txt", "/etc/x", "a/../../b", ".git/config"):
        (volume / "forge-volume.toml").write_text(_spec_with_files(provisioned_world, f'files = {{ "{bad}" = "x" }}\n'))
        result = cli("plan")
        assert result.exit_code == 1
        assert "`extensions[0].files`" in result.stderr and "relative path inside the extension" in result.stderr
        assert sorted(p.name for p in volume.iterdir()) == ["forge-volume.toml"]


def test_a_settings_file_change_reruns_only_the_settings_step(provisioned_world: World, installed_volume: Path,
                                                              spawns: list[list[str]]) -> None:
    """Adding or changing an extension's `files` only writes files: Forge's preparation
    (launch.py --exit, hours of pip on a real pod) and the extension's checkout must not run again."""
    before = state_of(installed_volume)["steps"]
    (installed_volume / "forge-volume.toml").write_text(_spec_with_files(provisioned_world))
    assert cli("lock").exit_code == 0
    spawns.clear()
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert (installed_volume / "extensions" / "ext-one" / "last_device.txt").read_text() == "CUDA"
    assert "ran config, boot;" in result.output, result.output
    assert not [argv for argv in spawns if "--exit" in argv]  # no launch.py --exit (the boot proof runs again)
    after = state_of(installed_volume)["steps"]
    assert {k: after[k] for k in ("extensions", "prepare", "requirements", "bytecode")} == \
        {k: before[k] for k in ("extensions", "prepare", "requirements", "bytecode")}
