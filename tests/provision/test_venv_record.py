"""The venv as part of the volume's record (issue 24): recorded after install, guarded while install runs,
compared by verify, shown by plan.

The lab's case in miniature: the spec pins a torch that Forge's requirements file cannot live with (there
setuptools==69.5.1 against torch 2.13's setuptools>=77; here a pinned package that needs fake-torch<2), and
the shell has a REQS_FILE that would agree with it. Install used to let pip move torch back and report
success; now it names the package and the step and fails, and says the shell's REQS_FILE is not used.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.forge_world import SECRET_ENV, World, spec_text
from tests.helpers.wheels import make_wheel
from tests.provision.conftest import cli, installed_dists, state_of


def _pip(volume: Path, *args: str) -> None:
    subprocess.run([volume / "venv" / "bin" / "python", "-m", "pip", "install", "-q", *args], check=True)


def test_install_records_every_distribution_of_the_venv_torch_first(installed_volume: Path) -> None:
    record = state_of(installed_volume)["venv"]
    dists = record["distributions"]
    assert {k.replace("_", "-"): v for k, v in installed_dists(installed_volume).items()} == dists
    assert dists["fake-torch"] == "1.0" and dists["forge-req-dep"] == "1.0" and dists["ext-dep"] == "1.0"
    assert cli("verify").exit_code == 0


def test_verify_names_each_hand_change_of_the_venv_with_its_fix_and_plan_shows_it(installed_volume: Path) -> None:
    _pip(installed_volume, "forge-req-dep==2.0")  # another version of a Forge pin
    _pip(installed_volume, "xformers")  # a package install never put there

    result = cli("verify")

    assert result.exit_code == 1, result.output
    out = result.output
    assert "venv: forge-req-dep is 2.0, install recorded 1.0 (changed by hand?); `forge-volume install` puts 1.0 " \
           "back" in out
    assert "venv: xformers 0.0.27 is installed, but install did not record it (added by hand?); " \
           "`forge-volume install` removes it" in out
    plan = cli("plan")
    assert "restore forge-req-dep 2.0 -> 1.0" in plan.output
    assert "remove xformers 0.0.27 (not in the venv's record)" in plan.output


def test_install_puts_a_hand_changed_venv_back_as_recorded(installed_volume: Path) -> None:
    _pip(installed_volume, "xformers")

    result = cli("install")

    assert result.exit_code == 0, result.output
    assert "put the venv back as install recorded it: removed xformers 0.0.27" in result.output
    assert "xformers" not in installed_dists(installed_volume)
    assert cli("verify").exit_code == 0


@pytest.fixture
def old_torch_world(provisioned_world: World, installed_volume: Path, tmp_path: Path, wheelhouse: Path,
                    monkeypatch: pytest.MonkeyPatch) -> World:
    """fake-torch 2.0 to pin, and a Forge whose requirements file pins a package that needs fake-torch<2
    (requirements_cpu.txt beside it does not)."""
    extra = tmp_path / "more-wheels"
    make_wheel(extra, "fake-torch", "2.0")
    make_wheel(extra, "needs-old-torch", "1.0", requires=("fake-torch<2",))
    monkeypatch.setenv("PIP_FIND_LINKS", f"{wheelhouse} {extra}")
    provisioned_world.forge.commit_on_branch("old-torch-pins", {
        "requirements_versions.txt": "forge-req-dep==1.0\nneeds-old-torch==1.0\n",
        "requirements_cpu.txt": "forge-req-dep==1.0\n"})
    return provisioned_world


def _spec(world: World, env: dict[str, str]) -> str:
    return spec_text(world.forge, world.helper_env, extensions=[(n, r.url) for n, r in world.extensions.items()],
                     ref="old-torch-pins", torch=["fake-torch==2.0"], env={**dict([SECRET_ENV]), **env})


def test_a_step_that_moves_the_locked_torch_fails_the_install_naming_it(
        old_torch_world: World, installed_volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(_spec(old_torch_world, {}))
    assert cli("lock").exit_code == 0
    # As in the lab: the shell names a requirements file that agrees with the spec's torch; the spec does not.
    monkeypatch.setenv("REQS_FILE", "requirements_cpu.txt")

    result = cli("install")

    assert result.exit_code == 1, result.output
    assert "warning: REQS_FILE=requirements_cpu.txt in this shell's environment is not the spec's; install uses " \
           "Forge's own requirements_versions.txt" in result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: Forge's environment preparation moved fake-torch 2.0 -> 1.0, which the spec's "
                           "forge.torch (fake-torch==2.0) pins (make the spec's forge.torch and what this step "
                           "installs agree (Forge's requirements file: requirements_versions.txt"), line
    assert "prepare" not in state_of(installed_volume)["steps"]  # not recorded as done
    assert cli("verify").exit_code == 1

    # The fix the warning names: REQS_FILE in the spec. The torch step sees its torch moved and runs again.
    spec.write_text(_spec(old_torch_world, {"REQS_FILE": "requirements_cpu.txt"}))
    assert cli("lock").exit_code == 0
    fixed = cli("install")
    assert fixed.exit_code == 0, fixed.output
    assert "warning: REQS_FILE" not in fixed.output
    assert re.search(r"ran torch, extensions, prepare, requirements", fixed.output)
    assert installed_dists(installed_volume)["fake_torch"] == "2.0"
    assert state_of(installed_volume)["venv"]["distributions"]["fake-torch"] == "2.0"
