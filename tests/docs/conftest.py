"""Fixtures for the docs and example-client tests: the real worker, as a reader runs it locally.

``docs_worker`` is ``python -m worker --rp_serve_api`` on a copy of the test volume installed by
the real installer (its Forge is the stand-in answering with Forge's recorded responses), with the
checkpoints the examples name and a loopback Hugging Face hub holding the files they download.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.fake_hub import FakeHub
from tests.helpers.forge_world import World
from tests.helpers.http_server import PRIVATE_MODELS_ENV
from tests.worker.conftest import WorkerProc, module_volume, start_worker, worker_env

# Checkpoints the examples name (override_settings, set-model): present on the test volume.
CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "deliberate_v2.safetensors")
# Hugging Face files the helper examples name, served by the loopback hub.
HF_REPOS = {
    "ByteDance/SDXL-Lightning": {"sdxl_lightning_4step_lora.safetensors": b"lora weights " * 100},
    "latent-consistency/lcm-lora-sdxl": {"pytorch_lora_weights.safetensors": b"lcm lora " * 100,
                                         "README.md": b"# LCM LoRA\n"},
    # The original worker's sync form: top folders named like the kind folders, a README at the root.
    "your-hf-user/forge-models": {"Lora/my-lora.safetensors": b"my style " * 100,
                                  "Stable-diffusion/my-checkpoint.safetensors": b"my checkpoint " * 100,
                                  "README.md": b"# my models\n"},
}


@pytest.fixture(scope="package")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        for repo_id, files in HF_REPOS.items():
            fake.add_repo(repo_id, files)
        yield fake


@pytest.fixture(scope="package")
def docs_worker(provisioned_world: World, tmp_path_factory: pytest.TempPathFactory,
                hub: FakeHub) -> Iterator[WorkerProc]:
    folder = tmp_path_factory.mktemp("docs-worker")
    volume = module_volume(provisioned_world, folder)
    for name in CHECKPOINTS:
        (volume / "models" / "Stable-diffusion" / name).write_bytes(b"not really a checkpoint\n")
    env = worker_env(volume, folder / "scratch", HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1",
                     HF_HOME=str(folder / "hf-home"), **PRIVATE_MODELS_ENV)
    proc = start_worker(env, folder / "logs")
    yield proc
    proc.stop()
