"""The volume layout's path rules: model names, the models/ fence, the original worker's paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from volume_layout import LayoutError, VolumeLayout, worker_volume


def test_model_paths_follow_the_kind_table(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path)
    expected = tmp_path / "models" / "Stable-diffusion" / "a.safetensors"
    assert layout.model_path("checkpoint", "a.safetensors") == expected
    assert layout.model_path("upscaler", "x.pth") == tmp_path / "models" / "ESRGAN" / "x.pth"
    with pytest.raises(LayoutError, match="known kinds: checkpoint, lora"):
        layout.kind_dir("lycoris")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "..\\x", "x\0y", "n" * 256, "a\nb", "a\rb", "a\x1bb"])
def test_a_model_name_must_be_one_plain_component(tmp_path: Path, name: str) -> None:
    with pytest.raises(LayoutError):
        VolumeLayout(tmp_path).model_path("lora", name)


@pytest.mark.parametrize(("given", "expected"), [
    ("/runpod-volume/stable-diffusion-webui-forge/models/Lora", "Lora"),
    ("/workspace/stable-diffusion-webui-forge/models/Stable-diffusion/x.safetensors", "Stable-diffusion/x.safetensors"),
    ("/runpod-volume/models/VAE", "VAE"),
    ("/workspace/stable-diffusion-webui/models/Lora/x.safetensors", "Lora/x.safetensors"),
    ("Lora/sub", "Lora/sub"),
    ("/etc/cron.d", "/etc/cron.d"),
])
def test_the_original_workers_absolute_paths_map_into_models(tmp_path: Path, given: str, expected: str) -> None:
    assert VolumeLayout(tmp_path).models_relative(given) == expected


@pytest.mark.parametrize(("given", "root"), [
    ("/workspace/stable-diffusion-webui-forge/models", True),
    ("/runpod-volume/stable-diffusion-webui-forge/models/", True),
    ("/workspace/stable-diffusion-webui/models", True), ("/runpod-volume/models", True), (".", True),
    ("/", False), ("/etc", False), ("Lora", False), ("models", False), ("/workspace/models/Lora", False),
])
def test_the_models_root_in_every_original_spelling(tmp_path: Path, given: str, root: bool) -> None:
    assert VolumeLayout(tmp_path).names_models_root(given) is root


def test_inside_models_refuses_traversal_and_links_that_point_out(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path)
    (layout.models_dir / "Lora").mkdir(parents=True)
    assert layout.inside_models("Lora/x.safetensors") == (layout.models_dir / "Lora" / "x.safetensors").resolve()
    (layout.models_dir / "Lora" / "out").symlink_to(tmp_path.parent)
    for bad in ("../x", "/etc/passwd", "Lora/out/x", layout.models_relative("/runpod-volume/models/../../etc")):
        with pytest.raises(LayoutError, match="outside the volume's models folder"):
            layout.inside_models(bad)


def test_the_worker_finds_the_serverless_mount_before_the_pod_mount(tmp_path: Path) -> None:
    mount = tmp_path / "runpod-volume"
    assert worker_volume({}, serverless_mount=mount) == Path("/workspace")
    mount.mkdir()
    assert worker_volume({}, serverless_mount=mount) == mount
    assert worker_volume({"FORGE_VOLUME": "/data"}, serverless_mount=mount) == Path("/data")


def test_the_checkouts_kind_folders_link_relatively_to_the_volumes(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path / "vol")
    link, target = layout.checkout_model_link("insightface")
    assert link == tmp_path / "vol" / "stable-diffusion-webui-forge" / "models" / "insightface"
    assert target == "../../models/insightface"
    assert (link.parent / target).resolve() == layout.kind_dir("insightface").resolve()
