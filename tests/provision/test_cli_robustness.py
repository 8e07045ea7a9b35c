"""Bad states and slips a user runs into, each with a way out: files where folders belong, a mistyped
--volume on init, a closed pipe, global options after the command, torch from the default index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.forge_world import World
from tests.provision.conftest import cli, pip_installs
from volume_layout import VolumeLayout

FORGE_VOLUME = str(Path(sys.executable).with_name("forge-volume"))
COMMANDS = [("plan",), ("install",), ("refresh-models",), ("status",), ("lock",), ("status", "--files")]


def _make_file(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("oops\n")


@pytest.mark.parametrize("where", ["models", "models/Lora", "config", ".forge-volume"])
def test_a_file_where_a_folder_should_be_gets_one_line_naming_it(installed_volume: Path, where: str) -> None:
    blocked = installed_volume / where
    _make_file(blocked)
    for command in COMMANDS:
        result = cli(*command)
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.splitlines() == [
            f"error: {blocked} is a file where a folder should be (move or delete that file, then re-run; "
            "forge-volume creates the folder itself)"], command
    verify = cli("verify")
    assert verify.exit_code == 1
    assert f"{blocked} is a file where a folder should be" in verify.stdout.splitlines()
    assert "unexpected" not in verify.output
    blocked.unlink()  # the way out the message gives
    assert cli("install").exit_code == 0
    assert cli("verify").exit_code == 0


def test_a_folder_where_the_spec_should_be(volume: Path) -> None:
    spec = volume / "forge-volume.toml"
    spec.mkdir()
    for command in [*COMMANDS, ("init",)]:
        result = cli(*command)
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr == f"error: {spec} is a folder where the spec file should be " \
                                "(move or delete that folder, then re-run)\n"
    verify = cli("verify")
    assert verify.exit_code == 1 and f"{spec} is a folder where the spec file should be" in verify.output


def test_init_refuses_a_folder_that_does_not_exist_unless_asked_to_create_it(tmp_path: Path) -> None:
    typo = tmp_path / "workspce"
    refused = cli("--volume", str(typo), "init")
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"Error: {typo} does not exist (nothing is mounted at {typo}; it is on the "
                                     "filesystem mounted at ")
    assert "check --volume or FORGE_VOLUME, or pass --create to create the folder" in refused.stderr
    assert not typo.exists()
    created = cli("--volume", str(typo), "init", "--create")
    assert created.exit_code == 0, created.output
    assert (typo / "forge-volume.toml").is_file()


@pytest.mark.parametrize("command", ["verify", "status"])
def test_a_reader_that_goes_away_is_no_error(installed_volume: Path, command: str, cli_env: dict[str, str]) -> None:
    for i in range(3):  # extras give verify lines to print after the first
        (installed_volume / "models" / "Lora").mkdir(parents=True, exist_ok=True)
        (installed_volume / "models" / "Lora" / f"extra-{i}.safetensors").write_bytes(b"x" * 10)
    piped = subprocess.run(["bash", "-c", f'"$0" {command} | head -1', FORGE_VOLUME], env=cli_env,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 1
    assert "Error" not in piped.stderr and "unexpected" not in piped.stderr
    # The harshest reader: its end of the pipe is closed before the command writes a byte.
    proc = subprocess.Popen([FORGE_VOLUME, command], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "BrokenPipe" not in stderr and "unexpected" not in stderr and "Exception ignored" not in stderr
    assert stderr == ""


def test_global_options_after_the_command_are_accepted(installed_volume: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_VOLUME", str(tmp_path / "elsewhere"))
    status = cli("status", "--json", "--volume", str(installed_volume))
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["volume"] == str(installed_volume)
    install = cli("install", "--volume", str(installed_volume), "--quiet")
    assert install.exit_code == 0, install.output
    assert install.stdout.startswith("nothing to do: the volume already matches the lock")
    spec = tmp_path / "other.toml"
    shutil.copy(installed_volume / "forge-volume.toml", spec)
    shutil.copy(installed_volume / "forge-volume.lock", tmp_path / "other.lock")
    plan = cli("plan", f"--spec={spec}", f"--volume={installed_volume}", "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["nothing_to_do"] is True
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("off", ['""', "false"])
def test_torch_index_url_can_be_switched_off(installed_volume: Path, provisioned_world: World, off: str,
                                             spawns: list[list[str]]) -> None:
    spec = installed_volume / "forge-volume.toml"
    text = spec.read_text()
    spec.write_text(text.replace('torch = ["fake-torch"]\n', f'torch = ["fake-torch"]\ntorch_index_url = {off}\n'))
    assert cli("lock").exit_code == 0
    assert json.loads((installed_volume / "forge-volume.lock").read_text())["forge"]["torch_index_url"] is None
    result = cli("install")
    assert result.exit_code == 0, result.output
    torch = [argv for argv in pip_installs(spawns) if "fake-torch" in argv]
    assert torch and all("--extra-index-url" not in argv for argv in torch)


def test_torch_index_url_true_is_refused(installed_volume: Path) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(spec.read_text().replace('torch = ["fake-torch"]\n',
                                             'torch = ["fake-torch"]\ntorch_index_url = true\n'))
    result = cli("plan")
    assert result.exit_code == 1
    assert "`forge.torch_index_url` must be a URL, or \"\" / false for no extra index, not true" in result.stderr


def test_no_unexpected_errors_on_an_unreadable_state_folder(installed_volume: Path) -> None:
    state = VolumeLayout(installed_volume).state
    state.unlink()
    state.mkdir()
    result = cli("status")
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {state} is a folder where state.json")
    assert os.path.isdir(state)
