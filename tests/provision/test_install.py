"""`forge-volume install` against real git repositories, a real venv and offline pip.

One volume is installed per session (``provisioned_world``); tests that change it work on their
own copy (``installed_volume``), so each scenario costs only the steps it re-runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.commands.install import installation_problems
from provision.records.lockfile import read_lock
from tests.helpers.forge_world import SECRET_ENV, World, base_python, make_extension_repo
from tests.helpers.gitrepo import git
from tests.helpers.procs import kill_group
from tests.provision.conftest import cli, git_calls, installed_dists, pip_installs, state_of
from volume_layout import VolumeLayout

STEPS = ["python", "venv", "torch", "forge", "extensions", "prepare", "requirements", "models", "config", "links",
         "bytecode", "boot"]


def test_fresh_install_builds_everything(provisioned_world: World, installed_volume: Path) -> None:
    world, volume = provisioned_world, installed_volume
    summary = (world.root / "install-summary.txt").read_text()
    assert f"ran {', '.join(STEPS)}" in summary
    # Forge's built-in ControlNet installer lifted forge-req-dep over Forge's pin (as the real one lifts
    # numpy); install put the pin back, as Forge's launcher would at every boot, and said so.
    assert "restored Forge's pinned requirements over what extension installers installed: " \
           "forge-req-dep 2.0 -> 1.0" in summary

    # The lock was written next to the spec, pinning the repositories' current commits.
    lock = json.loads((volume / "forge-volume.lock").read_text())
    assert lock["forge"]["commit"] == world.forge.head()
    assert {e["name"]: e["commit"] for e in lock["extensions"]} == {n: r.head() for n, r in world.extensions.items()}

    # venv on the spec's interpreter, with torch, Forge's requirements and the extensions' packages.
    venv_python = volume / "venv" / "bin" / "python"
    assert venv_python.resolve() == Path(base_python()).resolve()
    assert installed_dists(volume).items() >= {
        "fake_torch": "1.0", "forge_req_dep": "1.0", "ext_dep": "1.0", "ext_extra": "1.0"}.items()

    # Forge at the locked commit; the launcher's preparation cloned the helper repos and ran installers.
    checkout = volume / "stable-diffusion-webui-forge"
    assert git(checkout, "rev-parse", "HEAD") == world.forge.head()
    assert sorted(p.name for p in (checkout / "repositories").iterdir()) == [
        "BLIP", "huggingface_guess", "stable-diffusion-webui-assets"]
    assert (checkout / "extensions-builtin" / "sd_forge_controlnet" / "installed.txt").is_file()
    for name, repo in world.extensions.items():
        ext = volume / "extensions" / name
        assert git(ext, "rev-parse", "HEAD") == repo.head()
        assert (ext / "install-ran.txt").read_text() == "ok"
    assert (volume / ".forge-volume" / "prepare-data" / "extensions").resolve() == (volume / "extensions").resolve()

    # Bytecode everywhere Python will import from, so workers never write __pycache__ on the volume.
    assert list((checkout / "__pycache__").glob("launch.*.pyc"))
    assert list((volume / "extensions" / "ext-one" / "scripts" / "__pycache__").glob("ext.*.pyc"))
    assert list(volume.glob("venv/lib/python*/site-packages/forge_req_dep/__pycache__/*.pyc"))

    # Settings seed.
    assert json.loads((volume / "config" / "config.json").read_text())["samples_save"] is False
    assert (volume / "config" / "styles.csv").read_text().startswith("name,prompt")

    state = state_of(volume)
    assert state["layout_version"] == 1
    assert state["python"]["path"] == base_python()
    assert state["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert state["forge"] == {"repo": world.forge.url, "commit": world.forge.head()}
    assert [e["name"] for e in state["extensions"]] == ["ext-one", "ext-two"]
    assert state["forge_args"] == ["--always-cpu"]
    assert state["forge_env"][SECRET_ENV[0]] == SECRET_ENV[1]  # the worker needs the value at boot
    assert sorted(state["steps"]) == sorted(STEPS)
    assert all(rec["key"] and rec["finished_at"].endswith("Z") for rec in state["steps"].values())
    assert state["sizes"]["venv"] > 1_000_000
    assert installation_problems(VolumeLayout(volume), read_lock(volume / "forge-volume.lock")) == []

    # The boot proof started Forge as a worker does (API only, loopback, no GPU here) and its API answered;
    # Forge's first start made its own folders and files, recorded as Forge's.
    boot = state["boot"]
    assert boot["ok"] is True and "Forge booted from the volume in" in summary
    assert boot["argv"][:2] == ["--nowebui", "--api"] and "--always-cpu" in boot["argv"]
    assert boot["argv"][boot["argv"].index("--server-name") + 1] == "127.0.0.1"
    assert {"models/diffusers/version.txt", "models/Codeformer", "models/ControlNetPreprocessor/clip_vision"} \
        <= set(boot["forge_files"])
    assert (volume / "models" / "diffusers" / "version.txt").is_file() and (checkout / "config_states").is_dir()


def test_second_install_starts_no_process(installed_volume: Path, spawns: list[list[str]]) -> None:
    before = state_of(installed_volume)
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert "nothing to do: the volume already matches the lock" in result.stdout
    assert spawns == []  # no git, no pip, no python: every step's check read files only
    assert state_of(installed_volume) == before


def test_a_venv_lifted_over_forges_pins_is_restored_by_the_next_install(
        installed_volume: Path, wheelhouse: Path, spawns: list[list[str]]) -> None:
    venv_python = installed_volume / "venv" / "bin" / "python"
    subprocess.run([venv_python, "-m", "pip", "install", "-q", "forge-req-dep==2.0"], check=True)
    assert installed_dists(installed_volume)["forge_req_dep"] == "2.0"
    spawns.clear()

    result = cli("install")

    assert result.exit_code == 0, result.output
    assert "ran requirements, bytecode, boot;" in result.stdout  # no second launch.py --exit
    assert "restored Forge's pinned requirements over what extension installers installed: " \
           "forge-req-dep 2.0 -> 1.0" in result.stdout
    assert installed_dists(installed_volume)["forge_req_dep"] == "1.0"
    # The launcher's own rule: `pip install -r` of Forge's requirements file, not a list of its own.
    [pip] = pip_installs(spawns)
    checkout = installed_volume / "stable-diffusion-webui-forge"
    assert pip[pip.index("-r") + 1] == str(checkout / "requirements_versions.txt")
    # Its output is in the install's log, under the step's header, as every other command's is.
    log = Path(result.stdout.split("the steps' whole output: ")[1].split()[0])
    step = log.read_text().split("==> Forge's pinned requirements")[1].split("==> ")[0]
    assert "Successfully installed forge-req-dep-1.0" in step


def test_resume_after_a_step_fails_half_way(provisioned_world: World, installed_volume: Path, tmp_path: Path,
                                           spawns: list[list[str]]) -> None:
    marker = tmp_path / "flaky-ran-once"
    flaky = make_extension_repo(tmp_path / "repos" / "flaky", "flaky", install_py=(
        "import sys\nfrom pathlib import Path\n"
        f"marker = Path({str(marker)!r})\n"
        "if not marker.exists():\n"
        "    marker.write_text('1')\n"
        "    sys.exit('flaky: the first run fails on purpose')\n"
        "Path(__file__).with_name('install-ran.txt').write_text('ok')\n"))
    extra = f'\n[[extensions]]\nname = "flaky"\nrepo = "{flaky.url}"\nref = "main"\n'
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
    assert cli("lock").exit_code == 0

    failed = cli("install")
    assert failed.exit_code == 1
    assert "Forge's environment preparation (launch.py --exit) failed" in failed.stderr
    assert "flaky: the first run fails on purpose" in failed.stderr  # the launcher's stderr, carried up
    steps = state_of(installed_volume)["steps"]
    assert "extensions" in steps and "prepare" not in steps and "bytecode" not in steps
    assert (installed_volume / "extensions" / "flaky" / "install.py").is_file()

    spawns.clear()
    resumed = cli("install")
    assert resumed.exit_code == 0, resumed.output
    assert "ran prepare, requirements, bytecode, boot;" in resumed.stdout
    assert (installed_volume / "extensions" / "flaky" / "install-ran.txt").read_text() == "ok"
    # The installer itself cloned and pip-installed nothing on the second run (launch.py did its own part)
    # but put back the pin the built-in installer lifted again.
    assert git_calls(spawns, "clone", "fetch", "init") == []
    assert [argv for argv in pip_installs(spawns) if "-r" not in argv] == []


def test_ref_moved_updates_in_place(provisioned_world: World, installed_volume: Path,
                                    spawns: list[list[str]]) -> None:
    forge = provisioned_world.forge
    checkout = installed_volume / "stable-diffusion-webui-forge"
    git_dir_inode = (checkout / ".git").stat().st_ino
    new = forge.commit_on_branch("moved-requirements", {
        "requirements_versions.txt": "forge-req-dep==2.0\n", "NEWS.md": "requirements bumped\n"})
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(provisioned_world.spec(ref="moved-requirements"))
    assert cli("lock").exit_code == 0

    result = cli("install")

    assert result.exit_code == 0, result.output
    assert "Forge updated at" in result.stdout
    # python, venv, torch and extensions untouched
    assert "ran forge, prepare, requirements, bytecode, boot;" in result.stdout
    assert git(checkout, "rev-parse", "HEAD") == new
    assert (checkout / "NEWS.md").is_file()
    assert (checkout / ".git").stat().st_ino == git_dir_inode  # updated, not re-cloned
    assert git_calls(spawns, "clone", "init") == [] and git_calls(spawns, "fetch")
    assert installed_dists(installed_volume)["forge_req_dep"] == "2.0"  # requirements change picked up
    assert state_of(installed_volume)["forge"]["commit"] == new


def test_local_changes_in_the_checkout_are_reported_not_discarded(provisioned_world: World,
                                                                  installed_volume: Path) -> None:
    checkout = installed_volume / "stable-diffusion-webui-forge"
    old_head = git(checkout, "rev-parse", "HEAD")
    edited = (checkout / "launch.py").read_text() + "# my local fix\n"
    (checkout / "launch.py").write_text(edited)
    provisioned_world.forge.commit_on_branch("moved-local", {"NEWS.md": "upstream moved\n"})
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(ref="moved-local"))
    assert cli("lock").exit_code == 0

    result = cli("install")

    assert result.exit_code == 1
    assert "has local changes to tracked files: launch.py" in result.stderr
    assert "never discards them" in result.stderr
    assert (checkout / "launch.py").read_text() == edited
    assert git(checkout, "rev-parse", "HEAD") == old_head


def test_extension_removed_from_spec_is_removed_and_models_untouched(provisioned_world: World,
                                                                     installed_volume: Path) -> None:
    model = installed_volume / "models" / "Stable-diffusion" / "mine.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights" * 1000)
    manual = installed_volume / "extensions" / "hand-installed"
    manual.mkdir()
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extensions=["ext-one"]))
    assert cli("lock").exit_code == 0

    result = cli("install")

    assert result.exit_code == 0, result.output
    assert "removed extension ext-two (no longer in the lock)" in result.stdout
    assert not (installed_volume / "extensions" / "ext-two").exists()
    assert (installed_volume / "extensions" / "ext-one" / "install-ran.txt").is_file()
    assert [e["name"] for e in state_of(installed_volume)["extensions"]] == ["ext-one"]
    assert model.read_bytes() == b"weights" * 1000
    # A folder forge-volume did not install is left alone, and reported.
    assert manual.is_dir()
    problems = installation_problems(VolumeLayout(installed_volume), read_lock(installed_volume / "forge-volume.lock"))
    assert problems == ["extension hand-installed: on the volume but not in the lock"]


def test_installation_problems_names_each_mismatch_and_install_repairs_them(installed_volume: Path) -> None:
    layout = VolumeLayout(installed_volume)
    lock = read_lock(layout.lock)
    git(layout.forge_dir, "commit", "-q", "--allow-empty", "-m", "moved off the locked commit")
    shutil.rmtree(layout.extension_dir("ext-two"))
    layout.venv_python.unlink()

    problems = installation_problems(layout, lock)

    assert problems == [
        f"venv: {layout.venv_python} is missing or broken",
        f"forge: the checkout is at {git(layout.forge_dir, 'rev-parse', 'HEAD')[:12]}, "
        f"the lock says {lock.forge.commit[:12]}",
        f"extension ext-two: missing from {layout.extensions_dir}",
        # Workers would still boot, from the volume: the boot set recorded at install no longer describes it.
        "boot set: venv/bin was modified; workers boot Forge straight from the volume, slowly, until "
        "`forge-volume install` records it again",
    ]

    result = cli("install")

    assert result.exit_code == 0, result.output
    # A new venv invalidates everything built into the old one: torch, extension packages, preparation.
    assert "ran venv, torch, forge, extensions, prepare, requirements, bytecode, boot;" in result.stdout
    assert installation_problems(layout, lock) == []
    assert installed_dists(installed_volume).items() >= {"fake_torch": "1.0", "ext_extra": "1.0"}.items()


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {seconds} s")
        time.sleep(0.05)


def test_two_installs_at_once_never_interleave(provisioned_world: World, installed_volume: Path,
                                               tmp_path: Path, cli_env: dict[str, str]) -> None:
    started, gate = tmp_path / "slow-started", tmp_path / "slow-gate"
    slow = make_extension_repo(tmp_path / "repos" / "slow", "slow", install_py=(
        "import time\nfrom pathlib import Path\n"
        f"Path({str(started)!r}).write_text('1')\n"
        "deadline = time.monotonic() + 60\n"
        f"while not Path({str(gate)!r}).exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"))
    extra = f'\n[[extensions]]\nname = "slow"\nrepo = "{slow.url}"\nref = "main"\n'
    (installed_volume / "forge-volume.toml").write_text(provisioned_world.spec(extra=extra))
    assert cli("lock").exit_code == 0
    command = [sys.executable, "-m", "provision.cli", "install"]
    first = subprocess.Popen(command, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    waiter = None
    try:
        wait_for(started, 60)

        refused = cli("install")
        assert refused.exit_code == 1
        assert f"the volume {installed_volume} is busy: install (pid {first.pid}" in refused.stderr
        assert "--wait" in refused.stderr

        waiter = subprocess.Popen([*command[:-1], "install", "--wait"], env=cli_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert waiter.stderr is not None
        said = waiter.stderr.readline()  # its first line, once it found the volume busy (EOF if it exits)
        assert said.startswith(f"waiting for install (pid {first.pid}") and "the volume" in said, said
        assert waiter.poll() is None  # queued behind the first install
        gate.write_text("go")
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert "ran extensions, prepare, requirements, bytecode, boot" in out
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert "nothing to do" in out  # it ran after the first, and found the work done
    finally:
        for proc in (first, waiter):  # with what they started (the extension's install.py waits 60 s)
            if proc is not None:
                kill_group(proc)
                proc.wait()


def test_python_version_is_installed_with_uv(provisioned_world: World, volume: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # No network here: uv's own error comes back, proving it was asked to install onto the volume.
    monkeypatch.setenv("UV_OFFLINE", "1")
    spec = provisioned_world.spec().replace(f'python = "{base_python()}"', 'python = "3.10"')
    (volume / "forge-volume.toml").write_text(spec)
    result = cli("install")
    assert result.exit_code == 1
    assert "uv python install 3.10 failed with exit code" in result.stderr
    assert any(word in result.stderr.lower() for word in ("offline", "network"))  # uv's own stderr
    assert (volume / "python").is_dir() and not (volume / "venv").exists()


def test_python_version_without_uv_names_the_extra(provisioned_world: World, volume: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.installer.pyenv

    # uv ships in the dev venv; pretend it is absent, as on a pod that installed forge-volume without [uv].
    monkeypatch.setattr(provision.installer.pyenv.shutil, "which", lambda *a, **k: None)
    spec = provisioned_world.spec().replace(f'python = "{base_python()}"', 'python = "3.10"')
    (volume / "forge-volume.toml").write_text(spec)
    result = cli("install")
    assert result.exit_code == 1
    assert "needs uv, which is not installed" in result.stderr
    assert "pip install 'forge-volume[uv]'" in result.stderr


def test_spec_from_elsewhere_is_kept_on_the_volume(provisioned_world: World, installed_volume: Path,
                                                    tmp_path: Path) -> None:
    spec = tmp_path / "project" / "forge-volume.toml"
    spec.parent.mkdir()
    spec.write_text(provisioned_world.spec().replace('args = ["--always-cpu"]', 'args = ["--always-cpu", "--api"]'))

    result = cli("--quiet", "--spec", str(spec), "install")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --quiet: no step lines, no bars; the summary still goes to stdout
    assert f"wrote the lock {spec.with_suffix('.lock')}" in result.stdout  # resolved next to its spec
    assert (installed_volume / "forge-volume.toml").read_text() == spec.read_text()
    assert (installed_volume / "forge-volume.lock").read_text() == spec.with_suffix(".lock").read_text()
    assert state_of(installed_volume)["forge_args"] == ["--always-cpu", "--api"]


def test_leftovers_of_a_killed_clone_are_cleared(installed_volume: Path) -> None:
    partial = installed_volume / ".forge-volume" / "tmp" / "ext-three.1a2b3c4d.partial"
    (partial / ".git").mkdir(parents=True)
    (partial / "install.py").write_text("raise SystemExit('must never run')\n")
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert not partial.exists()


def test_the_original_workers_model_paths_lead_to_the_volumes_models(installed_volume: Path) -> None:
    """runpod-worker-forge kept models in the checkout's models/; its clients' absolute paths
    (ReActor's .../stable-diffusion-webui-forge/models/insightface/inswapper_128.onnx) must name ours."""
    layout = VolumeLayout(installed_volume)
    model = layout.model_path("insightface", "inswapper_128.onnx")
    model.parent.mkdir(parents=True)
    model.write_bytes(b"swap model\n")
    old_path = layout.forge_dir / "models" / "insightface" / "inswapper_128.onnx"
    assert old_path.read_bytes() == b"swap model\n" and old_path.resolve() == model.resolve()
    link = layout.forge_dir / "models" / "Lora"
    assert link.is_symlink() and os.readlink(link) == "../../models/Lora"  # relative: any mount point
    assert git(layout.forge_dir, "status", "--porcelain", "--untracked-files=no") == ""

    # verify names a missing or wrong link; install puts it back.
    link.unlink()
    (layout.forge_dir / "models" / "insightface").unlink()
    (layout.forge_dir / "models" / "insightface").symlink_to("/elsewhere")
    lock = read_lock(layout.lock)
    assert installation_problems(layout, lock) == [
        "links: stable-diffusion-webui-forge/models/Lora is missing (it should link to ../../models/Lora; "
        "`forge-volume install` makes it)",
        "links: stable-diffusion-webui-forge/models/insightface links to /elsewhere, not ../../models/insightface "
        "(`forge-volume install` corrects it)"]
    result = cli("install")
    assert result.exit_code == 0 and "ran links, boot;" in result.stdout, result.output
    assert installation_problems(layout, lock) == [] and old_path.read_bytes() == b"swap model\n"


def test_a_kind_folder_in_forges_own_tree_is_left_to_forge(installed_volume: Path) -> None:
    # Forge's repository ships models/Stable-diffusion/ with a placeholder file (so does the fixture Forge):
    # replacing it with a link would be a local change to the checkout.
    layout = VolumeLayout(installed_volume)
    tracked = layout.forge_dir / "models" / "Stable-diffusion"
    assert tracked.is_dir() and not tracked.is_symlink()
    assert (tracked / "Put Stable Diffusion checkpoints here.txt").is_file()
    assert git(layout.forge_dir, "status", "--porcelain", "--untracked-files=no") == ""
    assert (layout.forge_dir / "models" / "VAE").is_symlink()
    assert installation_problems(layout, read_lock(layout.lock)) == []
