"""`forge-volume lock` a second time: it keeps what it pinned, moves refs only when asked, says what it
changed, needs no network when nothing changed, names the file a server gives, and refuses two entries
on one path. Real git repositories whose branches move; model hosts on loopback, counting requests."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import spec_text
from tests.helpers.cli import cli
from tests.helpers.gitrepo import Repo
from tests.models.conftest import Hosts, lock_models, sha
from tests.provision.conftest import git_calls, spawns  # noqa: F401  (spawns is a fixture)


def _lock(volume: Path) -> Any:
    return json.loads((volume / "forge-volume.lock").read_text())


def _model(kind: str, source: str, **keys: str) -> str:
    return f'\n[[models]]\nkind = "{kind}"\nsource = "{source}"\n' + "".join(f'{k} = "{v}"\n' for k, v in keys.items())


@dataclass
class Upstream:
    """Forge and extension ext-a (branch main) as real git repositories, and the spec that names them."""

    forge: Repo
    ext: Repo
    helper_repos: dict[str, str]
    spec: Path

    def __call__(self, extra: str = "", extensions: bool = True, ref: str = "main",
                 torch: list[str] | None = None) -> Path:
        self.spec.write_text(spec_text(self.forge, self.helper_repos, ref=ref, torch=torch, extra=extra,
                                       extensions=[("ext-a", self.ext.url)] if extensions else []), encoding="utf-8")
        return self.spec


@pytest.fixture
def world(volume: Path, forge_repo: Repo, helper_repos: dict[str, str], ext_repo: Callable[[str], Repo]) -> Upstream:
    return Upstream(forge_repo, ext_repo("ext-a"), helper_repos, volume / "forge-volume.toml")


def test_lock_keeps_pinned_commits_until_asked_to_upgrade(world: Upstream, volume: Path,
                                                          spawns: list[list[str]]) -> None:  # noqa: F811
    forge, ext = world.forge, world.ext
    world()
    first = cli("lock", volume=volume)
    assert first.exit_code == 0, first.output
    assert f"forge: added main at {forge.head()[:12]}" in first.stdout
    assert f"extension ext-a: added main at {ext.head()[:12]}" in first.stdout
    old_forge, old_ext = forge.head(), ext.head()
    new_forge = forge.commit("upstream moved", {"NEWS.md": "new\n"})
    new_ext = ext.commit("upstream moved", {"NEWS.md": "new\n"})
    lock_text = (volume / "forge-volume.lock").read_text()

    spawns.clear()
    again = cli("lock", volume=volume)
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("no changes: ")
    assert (volume / "forge-volume.lock").read_text() == lock_text  # not even rewritten
    assert git_calls(spawns, "ls-remote", "fetch") == []  # nothing asked of the remotes

    one = cli("lock", "--upgrade", "ext-a", volume=volume)
    assert one.exit_code == 0, one.output
    assert one.stdout.splitlines()[0] == f"extension ext-a: moved main {old_ext[:12]} → main {new_ext[:12]}"
    assert (_lock(volume)["forge"]["commit"], _lock(volume)["extensions"][0]["commit"]) == (old_forge, new_ext)
    assert [c[-2:] for c in git_calls(spawns, "ls-remote")] == [["--", ext.url]]  # only that one

    both = cli("lock", "--upgrade", volume=volume)
    assert both.exit_code == 0, both.output
    assert both.stdout.splitlines()[0] == f"forge: moved main {old_forge[:12]} → main {new_forge[:12]}"
    assert _lock(volume)["forge"]["commit"] == new_forge
    current = cli("lock", "--upgrade", "forge", "--upgrade", "ext-a", volume=volume)
    assert current.exit_code == 0 and "no changes" in current.stdout and "all current" in current.stdout


def test_changing_a_ref_in_the_spec_resolves_only_that_entry(world: Upstream, volume: Path,
                                                             spawns: list[list[str]]) -> None:  # noqa: F811
    forge, ext = world.forge, world.ext
    tagged = forge.head()  # the fixture Forge is tagged v1.0 at its first commit
    world()
    assert cli("lock", volume=volume).exit_code == 0
    ext_commit = _lock(volume)["extensions"][0]["commit"]
    ext.commit("upstream moved", {"NEWS.md": "new\n"})
    forge.commit("after the tag", {"NEWS.md": "new\n"})
    world(ref="v1.0")
    spawns.clear()
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"forge: moved main {tagged[:12]} → v1.0 {tagged[:12]}"
    assert _lock(volume)["forge"]["ref"] == "v1.0"
    assert _lock(volume)["extensions"][0]["commit"] == ext_commit  # unchanged in the spec: kept
    assert [c[-1] for c in git_calls(spawns, "ls-remote")] == [forge.url]


def test_lock_prints_each_change_and_no_changes_when_there_are_none(world: Upstream, volume: Path,
                                                                    hosts: Hosts) -> None:
    tofu = hosts.sources["models/embeddings/tofu.pt"]
    world(_model("embedding", tofu))
    assert cli("lock", volume=volume).exit_code == 0
    world(_model("checkpoint", "hf://org/sd/model.safetensors"), extensions=False, torch=["fake-torch"])
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    blob = hosts.blobs["models/Stable-diffusion/model.safetensors"]
    assert result.stdout.splitlines() == [
        "forge.torch: changed [] → ['fake-torch']",
        "extension ext-a: removed",
        f"model models/Stable-diffusion/model.safetensors: added from hf://org/sd/model.safetensors: "
        f"revision {hosts.commit[:12]}, sha256 {sha(blob)[:12]}… (hub)",
        "model models/embeddings/tofu.pt: removed",
        f"wrote {volume / 'forge-volume.lock'}: Forge {_lock(volume)['forge']['commit'][:12]}, 0 extension(s), "
        "1 model(s)",
    ]
    again = cli("lock", volume=volume)
    assert again.exit_code == 0 and again.stdout == (
        f"no changes: {volume / 'forge-volume.lock'} matches the spec (Forge "
        f"{_lock(volume)['forge']['commit'][:12]}, 0 extension(s), 1 model(s))\n")


def test_first_download_checksum_and_hub_revision_are_kept_and_no_request_is_made(
        volume: Path, world: Upstream, hosts: Hosts) -> None:
    """Trust on first use stays trusted: locking again keeps the sha256 measured at the first download
    and the hub revision, with no request to any host, even once the hub moved."""
    installed_volume = volume
    world(hosts.models_toml())
    assert cli("lock", volume=installed_volume).exit_code == 0
    assert cli("refresh-models", volume=installed_volume).exit_code == 0  # pins tofu.pt and config.json
    pinned = lock_models(installed_volume)
    assert pinned["models/embeddings/tofu.pt"]["sha256"] == sha(hosts.blobs["models/embeddings/tofu.pt"])
    assert pinned["models/embeddings/tofu.pt"]["pinned_by"] == "first-download"
    hosts.hub.commit("org/sd", {"model.safetensors": b"newer", "vae/vae.safetensors": b"v", "config.json": b"{}"})
    before = hosts.total_requests()
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 0 and "no changes" in result.stdout, result.output
    assert lock_models(installed_volume) == pinned and hosts.total_requests() == before

    upgraded = cli("lock", "--upgrade", "checkpoint/model.safetensors", volume=installed_volume)
    assert upgraded.exit_code == 0, upgraded.output
    path = "models/Stable-diffusion/model.safetensors"
    assert upgraded.stdout.splitlines()[0].startswith(f"model {path}: moved revision {hosts.commit[:12]} → ")
    assert lock_models(installed_volume)[path]["sha256"] == sha(b"newer")
    # the other entries of that repository did not move: they were not named
    assert lock_models(installed_volume)["models/VAE/sd-vae.safetensors"]["revision"] == hosts.commit
    everything = cli("lock", "--upgrade", volume=installed_volume)
    assert everything.exit_code == 0, everything.output
    tofu = lock_models(installed_volume)["models/embeddings/tofu.pt"]
    assert tofu["sha256"] == pinned["models/embeddings/tofu.pt"]["sha256"]  # a URL has no version to move to


def test_offline_lock_with_nothing_to_resolve_succeeds(world: Upstream, volume: Path, hosts: Hosts) -> None:
    world(hosts.models_toml())
    assert cli("lock", volume=volume).exit_code == 0
    lock_text = (volume / "forge-volume.lock").read_text()
    # Everything remote disappears: the git repositories and every model host.
    world.forge.path.rename(world.forge.path.with_name("gone"))
    world.ext.path.rename(world.ext.path.with_name("gone-too"))
    for server in (hosts.hub.server, hosts.hub.cdn, hosts.files, hosts.cdn):
        server.stop()
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    assert "no changes" in result.stdout
    assert (volume / "forge-volume.lock").read_text() == lock_text
    upgrade = cli("lock", "--upgrade", "ext-a", volume=volume)  # this one needs the network, and says so
    assert upgrade.exit_code == 1 and "git ls-remote" in upgrade.stderr


def test_adding_one_model_asks_only_its_host(world: Upstream, volume: Path, hosts: Hosts) -> None:
    world(hosts.models_toml(skip=("models/embeddings/tofu.pt",)))
    assert cli("lock", volume=volume).exit_code == 0
    before = len(hosts.files.requests) + len(hosts.hub.server.requests) + len(hosts.cdn.requests)
    world(hosts.models_toml())
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("model models/embeddings/tofu.pt: added from ")
    new = (hosts.files.requests + hosts.hub.server.requests + hosts.cdn.requests)[before:]
    assert [r.path for r in hosts.files.requests[-len(new):]] == ["/files/tofu.pt"] and len(new) == 1


def test_unknown_upgrade_name_is_a_usage_error_naming_the_known_ones(world: Upstream, volume: Path,
                                                                    hosts: Hosts) -> None:
    world(_model("embedding", hosts.sources["models/embeddings/tofu.pt"]))
    assert cli("lock", volume=volume).exit_code == 0
    result = cli("lock", "--upgrade", "ext-b", volume=volume)
    assert result.exit_code == 2
    assert "'ext-b' is not an entry of the spec or the lock" in result.output
    assert "known: forge, ext-a, embedding/tofu.pt" in result.output


def test_two_entries_on_one_path_are_refused_naming_both(world: Upstream, volume: Path,
                                                         hosts: Hosts) -> None:
    """Issue 10, hole 6: a civitai model whose name (known only once resolved) equals another entry's,
    and two names that differ only in case, fail `lock` naming both entries; no lock is written."""
    lora = "models/Lora/civitai-lora.safetensors"
    clash = _model("lora", "civitai://4242") + _model("lora", hosts.sources["models/embeddings/tofu.pt"],
                                                        name="civitai-lora.safetensors")
    cased = _model("lora", "hf://org/sd/model.safetensors", name="Same.safetensors") + \
        _model("lora", hosts.sources["models/embeddings/tofu.pt"], name="same.safetensors")
    for extra, where in ((clash, lora), (cased, "models/Lora/same.safetensors")):
        world(extra)
        result = cli("lock", volume=volume)
        assert result.exit_code == 1, result.output
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: models lora ") and f"both go to {where}" in line, line
        assert "another `name" in line
        assert not (volume / "forge-volume.lock").exists()
    world(clash)
    assert "civitai://4242" in cli("lock", volume=volume).stderr and hosts.files.url("/files/tofu.pt") in \
        cli("lock", volume=volume).stderr


@pytest.mark.parametrize("header, name", [
    ('attachment; filename="real-name.safetensors"', "real-name.safetensors"),
    ("attachment; filename*=UTF-8''r%C3%A9al%20name.safetensors", "réal name.safetensors"),
])
def test_a_url_model_takes_its_name_from_content_disposition(world: Upstream, volume: Path,
                                                             hosts: Hosts, header: str, name: str) -> None:
    data = b"x" * 5000
    hosts.files.add("/api/download/models/12345", redirect=hosts.cdn.url("/signed-blob") + "?sig=1")
    hosts.cdn.add("/signed-blob", data, headers={"Content-Disposition": header})
    world(_model("lora", hosts.files.url("/api/download/models/12345")))
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    entry = _lock(volume)["models"][0]
    assert (entry["name"], entry["path"], entry["size"]) == (name, f"models/Lora/{name}", 5000)
    assert "warning" not in result.output
    assert [r.headers.get("range") for r in hosts.cdn.requests_to("/signed-blob")] == ["bytes=0-0"]


def test_a_server_name_without_a_model_suffix_warns_and_a_hostile_one_is_refused(
        world: Upstream, volume: Path, hosts: Hosts) -> None:
    route = hosts.files.add("/api/download/models/7", b"y" * 100,
                            headers={"Content-Disposition": 'attachment; filename="notes.txt"'})
    world(_model("lora", hosts.files.url("/api/download/models/7")))
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    assert _lock(volume)["models"][0]["name"] == "notes.txt"
    assert "warning: models/Lora/notes.txt: Forge lists only .safetensors, .ckpt, .pt files for kind lora" \
        in result.stderr
    for hostile in ("../../../etc/cron.d/x.safetensors", ".hidden.safetensors", "a\\b.safetensors"):
        route.headers["Content-Disposition"] = f'attachment; filename="{hostile}"'
        (volume / "forge-volume.lock").unlink(missing_ok=True)  # lock it afresh
        refused = cli("lock", volume=volume)
        assert refused.exit_code == 1, refused.output
        assert "cannot be used" in refused.stderr and "add `name = " in refused.stderr, refused.stderr
        assert not (volume / "forge-volume.lock").exists()


def test_an_unreadable_lock_is_resolved_afresh_with_a_warning(world: Upstream, volume: Path) -> None:
    world()
    assert cli("lock", volume=volume).exit_code == 0
    good = _lock(volume)
    (volume / "forge-volume.lock").write_text('{"lock_version": 1, "forge": {"repo": ')  # cut off mid-write
    result = cli("lock", volume=volume)
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "not a forge-volume lock file" in result.stderr
    assert "resolving every entry again" in result.stderr
    assert "forge: added main" in result.stdout
    assert _lock(volume) == good
