"""The fast boot's lay-out against a boot set that a broken disk or a hostile writer of the volume changed.

The lay-out runs as the worker runs it (``lay_out``: ``python -m provision.boot.layout_child VOL MIRROR`` as a
child), on the small volume of ``test_boot_set`` whose boot set the real recorder wrote, then edited with
``tests.helpers.boot_sets`` (from the documented format). Whatever the edit: nothing is made outside the
mirror, and a boot set that breaks a rule is one ``fast boot off: ...`` line (Forge boots from the volume).
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from provision.boot import layout_driver
from provision.boot.boot_set import BIG
from tests.boot import test_boot_set
from tests.helpers import boot_sets
from tests.helpers.read_only import available as read_only_available
from volume_layout import VolumeLayout

FORGE = "stable-diffusion-webui-forge"
volume = test_boot_set.volume  # the fixture: a small volume whose boot set the real recorder wrote


def lay(volume: VolumeLayout, mirror: Path) -> tuple[layout_driver.VolumeCheck | None, list[str]]:
    said: list[str] = []
    check = layout_driver.lay_out(volume, mirror, 60, said.append)
    if check is not None:
        assert check.problem(60) is None  # the child checked the volume (it is unchanged) and went on
    return check, said


def refused(said: list[str], why: str) -> None:
    assert len(said) == 1, said
    assert said[0].startswith("fast boot off: ") and said[0].endswith("; booting from the volume"), said[0]
    assert why in said[0] and "forge-volume install" in said[0], said[0]


@pytest.mark.parametrize("attack", ["a link, then a file under it", "a link, then a name with a slash"])
def test_a_crafted_listing_never_makes_anything_outside_the_mirror(volume: VolumeLayout, tmp_path: Path,
                                                                    attack: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = boot_sets.load(volume)
    for i in range(300):  # many files first: the link is made by another thread meanwhile
        boot_sets.add_file(volume, data, f"{FORGE}/modules/pad{i}.py", b"X = 1\n" * 20)
    boot_sets.list_entry(data, FORGE, "evil", "l", str(outside))
    if attack == "a link, then a file under it":
        boot_sets.add_file(volume, data, f"{FORGE}/evil/pwned.py", b"print('pwned')\n", listed=False)
        why = f"{FORGE}/evil/pwned.py is not a file its recorded folder lists"
    else:
        boot_sets.list_entry(data, FORGE, "evil/pwned.py", "l", "/etc/passwd")
        why = f"{FORGE} lists 'evil/pwned.py', which is not a plain name"
    boot_sets.save(volume, data)

    check, said = lay(volume, tmp_path / "mirror")

    assert os.listdir(outside) == []
    assert check is None
    refused(said, f"the boot set breaks a rule of the lay-out: {why}")


def test_modes_reach_the_mirror_without_setuid_setgid_or_sticky_bits(volume: VolumeLayout,
                                                                       tmp_path: Path) -> None:
    data = boot_sets.load(volume)
    [entry] = [f for f in data["files"] if f[0] == f"{FORGE}/launch.py"]
    entry[4] = 0o7755
    boot_sets.save(volume, data)

    check, said = lay(volume, tmp_path / "mirror")

    assert check is not None, said
    mode = stat.S_IMODE(os.stat(tmp_path / "mirror" / FORGE / "launch.py").st_mode)
    assert mode & 0o7000 == 0 and mode & 0o700 == 0o700, oct(mode)


@pytest.mark.parametrize("bad", ["overlapping offsets", "a negative size"])
def test_files_that_do_not_tile_files_bin_are_refused(volume: VolumeLayout, tmp_path: Path,
                                                      bad: str) -> None:
    data = boot_sets.load(volume)
    first, second = sorted(data["files"], key=lambda f: f[1])[:2]
    if bad == "overlapping offsets":  # the sizes still add up to files.bin's
        second[1] = first[1]
        why = "in files.bin; the files before it end at"
    else:
        second[2] += first[2] + 5
        first[2] = -5
        why = f"{first[0]} has offset {first[1]} and size -5"
    boot_sets.save(volume, data)

    check, said = lay(volume, tmp_path / "mirror")

    assert check is None
    refused(said, why)
    assert not any(files for _, _, files in os.walk(tmp_path / "mirror"))


def test_a_huge_prefetch_span_is_clamped_to_its_file(volume: VolumeLayout, tmp_path: Path) -> None:
    data = boot_sets.load(volume)
    [library] = data["ranges"]
    library[3] = [[0, 2**52], [-4096, 8192], [2**60, 2**60], [4096, -1]]
    boot_sets.save(volume, data)

    def limited() -> None:  # the memory the issue saw a span of 2**52 bytes exhaust
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    child = subprocess.run([sys.executable, "-m", "provision.boot.layout_child", str(volume.root), str(tmp_path / "m")],
                           capture_output=True, text=True, timeout=120, preexec_fn=limited,
                           env={**os.environ, "MALLOC_ARENA_MAX": "2"})

    assert child.returncode == 0, child.stderr
    said = [json.loads(line) for line in child.stdout.splitlines()]
    assert said[0]["ok"] is True
    [prefetched] = [line for line in said if "prefetched" in line]
    assert prefetched["prefetched"] == BIG + 4096 + len(b"weights")  # the library once, whole; then the checkpoint
    assert prefetched["libraries"] == BIG + 4096 and 0 <= prefetched["libraries_seconds"] <= prefetched["seconds"]


def test_files_bin_damaged_at_the_same_size_turns_the_fast_boot_off_with_the_fix(volume: VolumeLayout,
                                                                                  tmp_path: Path) -> None:
    size = volume.boot_set_archive.stat().st_size
    with open(volume.boot_set_archive, "r+b") as archive:
        first = archive.read(1)
        archive.seek(0)
        archive.write(bytes([first[0] ^ 0xFF]))
    assert volume.boot_set_archive.stat().st_size == size

    check, said = lay(volume, tmp_path / "mirror")

    assert check is None
    refused(said, f"the boot set is damaged: files.bin does not match its digest (bytes 0-{size})")


def test_an_index_edited_by_hand_is_not_used(volume: VolumeLayout, tmp_path: Path) -> None:
    text = volume.boot_set_index.read_text()
    volume.boot_set_index.write_text(text.replace('"launch.py"', '"launch.pz"'))

    check, said = lay(volume, tmp_path / "mirror")

    assert check is None
    refused(said, ".forge-volume/boot-set/index.json does not match its digest")


@pytest.mark.skipif(not read_only_available(), reason="a small tmpfs needs root and unshare")
def test_the_room_check_counts_what_the_lay_out_writes(volume: VolumeLayout, tmp_path: Path) -> None:
    data = boot_sets.load(volume)
    for i in range(3):  # 3 MB of recorded files for a 2 MB tmpfs
        boot_sets.add_file(volume, data, f"{FORGE}/modules/big{i}.py", os.urandom(1 << 20))
    boot_sets.save(volume, data)
    mirror = tmp_path / "small"
    mirror.mkdir()
    script = 'mount -t tmpfs -o size=2m none "$0" && exec "$@"'
    child = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(mirror),
                            sys.executable, "-m", "provision.boot.layout_child", str(volume.root), str(mirror)],
                           capture_output=True, text=True, timeout=120)

    assert child.returncode == 0, child.stderr
    first = json.loads(child.stdout.splitlines()[0])
    assert first["ok"] is False
    assert f"{mirror} has room for 2.0 MiB" in first["reason"], first
    assert "the boot set needs 3.1 MiB" in first["reason"], first


def test_a_boot_set_a_newer_forge_volume_recorded_asks_for_the_newer_worker_image(volume: VolumeLayout,
                                                                                  tmp_path: Path) -> None:
    """Install ran a newer forge-volume than the endpoint's image: `install` with this one would only record the
    older format again, so the line names the image, not install."""
    data = boot_sets.load(volume)
    data["version"] = 99
    boot_sets.save(volume, data)

    check, said = lay(volume, tmp_path / "mirror")

    assert check is None
    assert said == ["fast boot off: the boot set was recorded by a newer forge-volume (index version 99; this one "
                    "reads 2 and 3) (update the worker's image to the forge-volume that ran `install`); booting "
                    "from the volume"]
