"""`forge-volume lock`: every ref (branch, tag, full or short commit) resolved to a commit with real git."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import spec_text
from tests.helpers.gitrepo import Repo
from tests.provision.conftest import cli, installed_dists, state_of
from volume_layout import VolumeLayout


@pytest.fixture
def two_commit_forge(forge_repo: Repo) -> tuple[Repo, str, str]:
    """Forge with v1.0 on its first commit and main one commit further."""
    first = forge_repo.head()
    second = forge_repo.commit("second", {"NEWS.md": "second\n"})
    return forge_repo, first, second


@pytest.mark.parametrize("which", ["branch", "tag", "full commit", "short commit"])
def test_lock_resolves_every_kind_of_ref(which: str, two_commit_forge: tuple[Repo, str, str],
                                         helper_repos: dict[str, str], ext_repo: Callable[[str], Repo],
                                         volume: Path) -> None:
    forge, first, second = two_commit_forge
    ref, expected = {"branch": ("main", second), "tag": ("v1.0", first), "full commit": (first, first),
                     "short commit": (first[:8], first)}[which]
    ext = ext_repo("ext-a")
    ext_head = ext.head()
    (volume / "forge-volume.toml").write_text(
        spec_text(forge, helper_repos, ref=ref, extensions=[("ext-a", ext.url)]), encoding="utf-8")

    result = cli("lock")

    assert result.exit_code == 0, result.output
    assert f"Forge {expected[:12]}" in result.stdout
    lock = json.loads((volume / "forge-volume.lock").read_text())
    assert lock["forge"]["commit"] == expected
    assert lock["forge"]["ref"] == ref
    assert lock["extensions"] == [{"name": "ext-a", "repo": ext.url, "ref": "main", "commit": ext_head,
                                   "pip": ["ext-extra"], "files": {}}]
    assert not (volume / ".forge-volume").exists()  # lock resolves; it does not install


def test_annotated_tag_resolves_to_its_commit(forge_repo: Repo, helper_repos: dict[str, str], volume: Path) -> None:
    from tests.helpers.gitrepo import git

    git(forge_repo.path, "tag", "-a", "v2.0", "-m", "release")
    (volume / "forge-volume.toml").write_text(spec_text(forge_repo, helper_repos, ref="v2.0"), encoding="utf-8")
    assert cli("lock").exit_code == 0
    assert json.loads((volume / "forge-volume.lock").read_text())["forge"]["commit"] == forge_repo.head()


@pytest.mark.parametrize("ref", ["no-such-branch", "deadbeef", "0" * 40])
def test_unknown_ref_is_named_and_nothing_written(ref: str, forge_repo: Repo, helper_repos: dict[str, str],
                                                  volume: Path) -> None:
    (volume / "forge-volume.toml").write_text(spec_text(forge_repo, helper_repos, ref=ref), encoding="utf-8")

    for command in ("lock", "install"):
        result = cli(command)
        assert result.exit_code == 1
        assert ref in result.stderr and forge_repo.url in result.stderr
        assert "check the repo URL and ref" in result.stderr
    assert sorted(p.name for p in volume.iterdir() if p.name != ".forge-volume") == ["forge-volume.toml"]
    assert not VolumeLayout(volume).state.exists()


def test_unreachable_repo_carries_gits_stderr(forge_repo: Repo, helper_repos: dict[str, str], volume: Path) -> None:
    text = spec_text(forge_repo, helper_repos).replace(forge_repo.url, forge_repo.url + "-gone")
    (volume / "forge-volume.toml").write_text(text, encoding="utf-8")
    result = cli("lock")
    assert result.exit_code == 1
    assert "git ls-remote" in result.stderr
    assert "does not appear to be a git repository" in result.stderr  # git's own words
    assert not (volume / "forge-volume.lock").exists()


def test_spec_edited_after_locking_is_refused_and_named(installed_volume: Path) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(spec.read_text().replace('args = ["--always-cpu"]', 'args = ["--always-cpu", "--xformers"]'))
    before = state_of(installed_volume)

    for command in ("install", "plan"):
        result = cli(command)
        assert result.exit_code == 1
        assert f"{installed_volume / 'forge-volume.lock'} no longer matches {spec}" in result.stderr
        assert "forge.args" in result.stderr and "forge-volume lock" in result.stderr
    assert state_of(installed_volume) == before

    assert cli("lock").exit_code == 0
    result = cli("install")
    assert result.exit_code == 0, result.output
    assert state_of(installed_volume)["forge_args"] == ["--always-cpu", "--xformers"]
    # Forge's preparation ran with the new args: --xformers made it install XFORMERS_PACKAGE.
    assert installed_dists(installed_volume).get("xformers") == "0.0.27"


def test_atomic_writes_never_share_a_temporary_with_another_writer(tmp_path: Path) -> None:
    """Two pods, or two serverless workers of one image, run forge-volume under the same pid, and on a
    network volume the state lock may not hold: a writer must neither write into nor delete the
    temporary file of another writer's state.json or lock (its rename would then fail, or publish a mix)."""
    import os

    from provision.records.atomic import write_atomic

    target = tmp_path / "state.json"
    other = tmp_path / f".state.json.{os.getpid()}.tmp"  # the other writer's write in progress
    other.write_text('{"half": ', encoding="utf-8")
    write_atomic(target, '{"mine": 1}\n')
    assert target.read_text(encoding="utf-8") == '{"mine": 1}\n'
    assert other.read_text(encoding="utf-8") == '{"half": '
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "state.json"]
