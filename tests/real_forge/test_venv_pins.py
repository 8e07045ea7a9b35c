"""The real Forge (opt-in, ``FORGE_LAB``): the venv is part of what a volume records (issue 24).

The day-one case: the spec pins ``torch===2.13.0`` and the shell has the lab's ``REQS_FILE`` while the
spec's ``env`` does not. Forge's own ``requirements_versions.txt`` pins ``setuptools==69.5.1``, which
torch 2.13 cannot live with, so pip moves torch back to 2.12.1. Install used to report success with that
torch; now it must fail naming torch and the step (or end with torch 2.13.0), and say the shell's
REQS_FILE is not the spec's. Then the fix (REQS_FILE in the spec) installs torch 2.13.0, and a hand
``pip install`` of another version into the volume's venv is a ``verify`` failure naming it.
One volume in ``FORGE_LAB_VOLUME``/pins (emptied first); about 15 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.real_forge.conftest import BOOT_TIMEOUT, CLI, INSTALL_TIMEOUT, LAB, ORIGINAL_ENV, SKIP, lab_env, spec_text
from volume_layout import VolumeLayout

pytestmark = [pytest.mark.slow, SKIP, pytest.mark.timeout(3 * INSTALL_TIMEOUT)]


def run(volume: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run([CLI, "--volume", str(volume), *args], text=True, capture_output=True,
                            env={**ORIGINAL_ENV, "FORGE_BOOT_TIMEOUT": BOOT_TIMEOUT, **(env or {})},
                            timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL)
    print(f"\n[venv-pins] forge-volume {' '.join(args)}: exit {result.returncode} in "
          f"{time.monotonic() - started:.0f} s\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}", flush=True)
    return result


def venv_version(volume: Path, name: str) -> str | None:
    found = list((volume / "venv").glob(f"lib/python*/site-packages/{name}-*.dist-info"))
    return found[0].name.removesuffix(".dist-info").split("-", 1)[1] if found else None


def without_reqs_file(text: str) -> str:
    """The lab's spec with REQS_FILE out of the spec's env (and no model: the boot needs none)."""
    text = text.split("\n\n[[models]]")[0] + "\n"
    line = next(line for line in text.splitlines() if line.startswith("env = "))
    kept = ", ".join(p for p in line[len("env = { "):-len(" }")].split(", ") if not p.startswith("REQS_FILE"))
    return text.replace(line, f"env = {{ {kept} }}")


def _volume() -> Path:
    base = Path(os.environ["FORGE_LAB_VOLUME"]) if os.environ.get("FORGE_LAB_VOLUME") else Path("/tmp/venv-pins")
    return base / "pins"


def _full_spec() -> str:
    return spec_text(Path(LAB), "http://127.0.0.1:9/unused.safetensors")


def test_a_torch_moved_by_forges_requirements_never_passes() -> None:
    """The lab's case, from an empty volume (runs first: the next test goes on from its volume)."""
    reqs_file = lab_env(Path(LAB))["REQS_FILE"]
    volume = _volume()
    shutil.rmtree(volume, ignore_errors=True)
    volume.mkdir(parents=True)
    spec = volume / "forge-volume.toml"
    spec.write_text(without_reqs_file(_full_spec()))

    first = run(volume, "install", env={"REQS_FILE": reqs_file})

    out = first.stdout + first.stderr
    assert f"warning: REQS_FILE={reqs_file} in this shell's environment is not the spec's" in out
    if first.returncode == 0:
        assert venv_version(volume, "torch") == "2.13.0", out  # restored: the only other way to pass
    else:
        errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, first.stderr
        # Failed: by the guard naming torch and the step, or (pip refusing the conflict) with torch untouched.
        assert ("moved torch 2.13.0 -> " in errors[0] and "which the spec's forge.torch (torch===2.13.0) pins"
                in errors[0]) or venv_version(volume, "torch") == "2.13.0", first.stderr
        assert run(volume, "verify").returncode == 1


def test_the_fix_installs_the_locked_torch_and_verify_names_a_hand_change() -> None:
    """The fix the warning names (REQS_FILE in the spec's env), then a `pip install` by hand."""
    volume = _volume()
    spec = volume / "forge-volume.toml"
    assert spec.is_file(), "runs after test_a_torch_moved_by_forges_requirements_never_passes"
    spec.write_text(_full_spec().split("\n\n[[models]]")[0] + "\n")
    assert run(volume, "lock").returncode == 0
    fixed = run(volume, "install")
    assert fixed.returncode == 0
    assert venv_version(volume, "torch") == "2.13.0"
    record = json.loads(VolumeLayout(volume).state.read_text())["venv"]
    assert record["torch"] == {"torch": "2.13.0", "torchvision": "0.28.0", "xformers": None}
    assert record["distributions"]["torch"] == "2.13.0"
    assert run(volume, "verify").returncode == 0

    # A hand change of the venv: verify names it, with its fix, and fails.
    python = volume / "venv" / "bin" / "python"
    was = venv_version(volume, "setuptools")
    other = "69.5.1" if was != "69.5.1" else "80.9.0"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", f"setuptools=={other}"], check=True,
                   env=ORIGINAL_ENV, timeout=600)
    hand = run(volume, "verify")
    assert hand.returncode == 1
    assert f"venv: setuptools is {other}, install recorded {was} (changed by hand?); `forge-volume install` puts " \
           f"{was} back" in hand.stdout + hand.stderr
