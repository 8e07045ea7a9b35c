"""Features' first-use files through the real CLI: the spec names features, `lock` pins their files,
`install` fetches them from a loopback mirror to where Forge looks, `verify`/`status`/`refresh-models`
treat them like models.

The lab test (opt-in, FORGE_LAB) scans the lab's Forge source for first-use download calls and fails
when one is not in the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from provision.forge.first_use import BERT_REVISION, CALL_SITES, FEATURES, HF_HUB_FOLDER, expand, scan_forge_source
from provision.forge.launch import Launch, Scratch, forge_command
from tests.conftest import snapshot
from tests.helpers.cli import cli
from tests.helpers.forge_world import World
from tests.helpers.http_server import FileServer
from tests.models.conftest import sha
from volume_layout import VolumeLayout


@pytest.fixture
def mirror() -> Iterator[tuple[FileServer, dict[str, bytes]]]:
    """A loopback mirror of the hosts Forge fetches from: <mirror>/<host>/<path>, random bytes per file."""
    blobs: dict[str, bytes] = {}
    with FileServer() as server:
        for file, _ in expand(("previews", "upscale:R-ESRGAN 4x+", "face-restore:codeformer")):
            parts = urlsplit(file.url)
            data = os.urandom(2_000 + len(blobs))
            server.add(f"/mirror/{parts.netloc}{parts.path}", data)
            blobs[file.path] = data
        yield server, blobs


def lock_json(volume: Path) -> dict[str, object]:
    return json.loads((volume / "forge-volume.lock").read_text())


def test_unknown_feature_is_one_line_naming_the_known_ones(installed_volume: Path,
                                                             provisioned_world: World) -> None:
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(provisioned_world.spec(features=["previews", "preview"]))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[0]
    assert "`forge.features` entry 'preview' is not a known feature; known: previews, taesd-encode, " \
           "face-restore, upscale" in line, result.output
    spec.write_text(provisioned_world.spec(features=["upscale"]))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1 and "needs a choice (upscale:NAME[,NAME...]); choices: ESRGAN_4x" in result.output
    spec.write_text(provisioned_world.spec(features=["upscale:R-ESRGAN 9x"]))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 1 and "'R-ESRGAN 9x' is not a choice of upscale" in result.output


def test_lock_install_verify_status_refresh(installed_volume: Path, provisioned_world: World,
                                            mirror: tuple[FileServer, dict[str, bytes]]) -> None:
    server, blobs = mirror
    features = ["previews", "upscale:R-ESRGAN 4x+", "face-restore:codeformer"]
    spec = installed_volume / "forge-volume.toml"
    spec.write_text(provisioned_world.spec(features=features, features_mirror=server.url("/mirror/")))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 0, result.output
    assert "file models/VAE-approx/model.pt: added for feature 'previews'" in result.output
    locked = {f["path"]: f for f in lock_json(installed_volume)["first_use"]}  # type: ignore[union-attr]
    assert set(locked) == set(blobs)
    approx = locked["models/VAE-approx/model.pt"]
    assert approx["url"] == "https://github.com/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/model.pt"
    assert approx["source"] == server.url("/mirror/github.com/AUTOMATIC1111/stable-diffusion-webui/releases/"
                                          "download/v1.0.0-pre/model.pt")
    assert (approx["size"], approx["sha256"], approx["feature"]) == (len(blobs[approx["path"]]), None, "previews")
    assert locked["models/GFPGAN/detection_Resnet50_Final.pth"]["feature"] == "face-restore:codeformer"
    assert not (installed_volume / "models" / "VAE-approx").exists()  # locking downloads nothing

    result = cli("install", volume=installed_volume)
    assert result.exit_code == 0, result.output
    for path, data in blobs.items():
        assert (installed_volume / path).read_bytes() == data, path
    pinned = {f["path"]: f["sha256"] for f in lock_json(installed_volume)["first_use"]}  # type: ignore[union-attr]
    assert pinned == {p: sha(d) for p, d in blobs.items()}  # trust on first use, written into the lock
    assert cli("verify", volume=installed_volume).exit_code == 0

    status = cli("status", "--files", "--json", volume=installed_volume)
    files = {f["path"]: f for f in json.loads(status.output)["model_files"]["files"]}
    assert files["models/RealESRGAN/RealESRGAN_x4plus.pth"]["status"] == "pinned"
    assert files["models/RealESRGAN/RealESRGAN_x4plus.pth"]["kind"] == "first-use"

    # A file changed on the volume: verify names it, refresh-models repairs it from the mirror.
    broken = installed_volume / "models/Codeformer/codeformer-v0.1.0.pth"
    broken.write_bytes(b"x" * broken.stat().st_size)
    result = cli("verify", "--deep", volume=installed_volume)
    assert result.exit_code == 1 and "wrong hash: models/Codeformer/codeformer-v0.1.0.pth" in result.output
    broken.unlink()
    result = cli("verify", volume=installed_volume)
    assert result.exit_code == 1
    assert "missing: models/Codeformer/codeformer-v0.1.0.pth (feature 'face-restore:codeformer' from" in result.output
    result = cli("refresh-models", volume=installed_volume)
    assert result.exit_code == 0 and "fetched models/Codeformer/codeformer-v0.1.0.pth" in result.output
    assert cli("verify", volume=installed_volume).exit_code == 0

    # A feature dropped from the spec: its files leave the lock, and --prune would remove them.
    spec.write_text(provisioned_world.spec(features=["previews"], features_mirror=server.url("/mirror/")))
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 0 and "file models/RealESRGAN/RealESRGAN_x4plus.pth: removed" in result.output
    result = cli("refresh-models", "--prune", "--dry-run", volume=installed_volume)
    assert "would prune models/RealESRGAN/RealESRGAN_x4plus.pth" in result.output
    assert "models/VAE-approx/model.pt" not in result.output


def test_the_cli_reference_names_every_feature() -> None:
    cli_doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for name in FEATURES:
        assert name in cli_doc and f"| `{name}" in readme, name


def test_a_lock_without_features_is_unchanged(installed_volume: Path) -> None:
    """Volumes locked before features existed keep their lock (and install's keys): nothing to do."""
    before = (installed_volume / "forge-volume.lock").read_text()
    result = cli("lock", volume=installed_volume)
    assert result.exit_code == 0 and "no changes" in result.output
    assert (installed_volume / "forge-volume.lock").read_text() == before
    result = cli("plan", volume=installed_volume)
    assert result.exit_code == 0 and "nothing to do" in result.output.lower(), result.output


def test_the_interrogators_categories_are_linked_into_the_checkout(installed_volume: Path) -> None:
    """Forge reads the CLIP interrogator's categories from interrogate/ in its working folder (the checkout):
    once the feature put them in models/interrogate, install links the checkout's name there, and verify
    checks the link."""
    categories = installed_volume / "models" / "interrogate"
    categories.mkdir(parents=True)
    (categories / "artists.txt").write_text("Rembrandt\n")
    result = cli("verify", volume=installed_volume)
    assert result.exit_code == 1
    assert "links: stable-diffusion-webui-forge/interrogate is missing (it should link to ../models/interrogate" \
        in result.output
    result = cli("install", volume=installed_volume)
    assert result.exit_code == 0, result.output
    link = installed_volume / "stable-diffusion-webui-forge" / "interrogate"
    assert os.readlink(link) == "../models/interrogate" and (link / "artists.txt").read_text() == "Rembrandt\n"
    assert cli("verify", volume=installed_volume).exit_code == 0


def test_blips_tokenizer_is_installed_in_forges_hf_cache_and_the_worker_reads_it_there(
        installed_volume: Path, provisioned_world: World, tmp_path: Path) -> None:
    """BLIP loads bert-base-uncased's tokenizer through transformers from the Hugging Face cache: install puts
    it in the cache's layout (snapshot, refs/main, the libraries' markers) in models/diffusers, the worker's
    Forge has HF_HUB_CACHE there, and huggingface_hub offline finds it there without writing a byte."""
    blobs: dict[str, bytes] = {}
    with FileServer() as server:
        for file, _ in expand(("interrogate",)):
            parts = urlsplit(file.url)
            blobs[file.path] = os.urandom(500 + len(blobs))
            server.add(f"/mirror/{parts.netloc}{parts.path}", blobs[file.path])
        (installed_volume / "forge-volume.toml").write_text(
            provisioned_world.spec(features=["interrogate"], features_mirror=server.url("/mirror/")))
        result = cli("lock", volume=installed_volume)
        assert result.exit_code == 0, result.output
        # clip.load's URL carries the real file's sha256, which the lock pins: re-pinned to this stand-in's.
        lock_path = installed_volume / "forge-volume.lock"
        lock = json.loads(lock_path.read_text())
        [clip] = [f for f in lock["first_use"] if f["path"] == "models/CLIP/ViT-L-14.pt"]
        clip["sha256"] = sha(blobs[clip["path"]])
        lock_path.write_text(json.dumps(lock, indent=2) + "\n")
        result = cli("install", volume=installed_volume)
        assert result.exit_code == 0, result.output
    cache = installed_volume / "models" / "diffusers"
    bert = cache / "models--bert-base-uncased"
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        rel = f"models/diffusers/models--bert-base-uncased/snapshots/{BERT_REVISION}/{name}"
        assert (installed_volume / rel).read_bytes() == blobs[rel]
    assert (bert / "refs" / "main").read_text() == BERT_REVISION
    # transformers and diffusers write these at import when missing: the worker must find them.
    assert (cache / "version.txt").read_text() == "1" and (cache / "version_diffusers_cache.txt").read_text() == "1"
    assert cli("verify", volume=installed_volume).exit_code == 0
    result = cli("refresh-models", "--prune", "--dry-run", volume=installed_volume)
    assert result.exit_code == 0 and "refs/main" not in result.output and "version" not in result.output, result.output

    # The worker's Forge: its Hub cache is that folder, and the library finds the tokenizer there offline.
    env = forge_command(VolumeLayout(installed_volume), Scratch(tmp_path / "scratch"), {}, Launch()).env
    assert env["HF_HUB_CACHE"] == str(cache) and env["HF_HUB_OFFLINE"] == "1"
    before = snapshot(installed_volume)
    hf_env = {k: v for k, v in env.items() if k.startswith(("HF_", "TRANSFORMERS_"))}
    found = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import hf_hub_download as d; "
         "print(d('bert-base-uncased', 'vocab.txt'))"],
        env={"PATH": os.environ["PATH"], **hf_env}, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()) == bert / "snapshots" / BERT_REVISION / "vocab.txt"
    assert snapshot(installed_volume) == before

    # A ref that is gone is a problem verify names and install writes back.
    (bert / "refs" / "main").unlink()
    result = cli("verify", volume=installed_volume)
    assert result.exit_code == 1 and "hf cache: models/diffusers/models--bert-base-uncased/refs/main is missing" \
        in result.output, result.output
    assert cli("install", volume=installed_volume).exit_code == 0
    assert (bert / "refs" / "main").read_text() == BERT_REVISION

    # Without a marker (a volume installed before them), transformers would write it at import onto the
    # volume: the worker's Forge keeps its Hub cache in the scratch then.
    (cache / "version.txt").unlink()
    env = forge_command(VolumeLayout(installed_volume), Scratch(tmp_path / "scratch2"), {}, Launch()).env
    assert "HF_HUB_CACHE" not in env and env["HF_HOME"].startswith(str(tmp_path / "scratch2")), env
    assert cli("install", volume=installed_volume).exit_code == 0
    assert (cache / "version.txt").read_text() == "1"


LAB = os.environ.get("FORGE_LAB")


@pytest.mark.skipif(not LAB, reason="opt-in: FORGE_LAB=/path/to/lab (the real Forge's source)")
def test_the_table_knows_every_first_use_download_of_the_lab_forge() -> None:
    forge = Path(str(LAB)) / "forge-src"
    found = scan_forge_source(forge)
    known = {path: count for path, (count, _) in CALL_SITES.items()}
    unknown = {p: n for p, n in found.items() if known.get(p) != n}
    assert not unknown, f"first-use download calls not in provision/forge/first_use.py's CALL_SITES: {unknown}"
    assert not set(known) - set(found), "CALL_SITES lists files the lab's Forge does not have"
    # Every file of the table is read from the source it names: its URL (or the folder of it) is there.
    venv = sorted((Path(str(LAB)) / "venv" / "lib").glob("python3*/site-packages"))
    libraries = "".join((venv[0] / p).read_text() for p in ("facexlib/detection/__init__.py",
                                                             "facexlib/parsing/__init__.py", "clip/clip.py"))
    for feature in FEATURES.values():
        for file in [*feature.files, *(f for files in feature.choices.values() for f in files)]:
            text = (forge / file.read_from).read_text() + libraries
            if file.folder.startswith(f"{HF_HUB_FOLDER}/models--"):  # loaded by repository id (transformers)
                repo = file.url.removeprefix("https://huggingface.co/").split("/resolve/")[0]
                assert f"from_pretrained('{repo}')" in text, (feature.name, file.url, file.read_from)
                continue
            folder = file.url.rsplit("/", 1)[0] + "/"
            assert file.url in text or folder in text, (feature.name, file.url, file.read_from)
