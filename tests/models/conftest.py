"""Model hosts on loopback: a fake Hugging Face hub, a plain file server, and a civitai stand-in.

``hosts`` starts them, points HF_ENDPOINT and CIVITAI_API_BASE at them, and serves one model of
every source kind; ``models_toml`` is the matching [[models]] part of a spec.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.cli import state_of
from tests.helpers.fake_hub import FakeHub
from tests.helpers.http_server import FileServer

CIVITAI_TOKEN = "civ-s3cret-token"
CIVITAI_VERSION = "4242"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Hosts:
    hub: FakeHub
    files: FileServer  # plain URLs, and civitai's API and download route
    cdn: FileServer  # civitai's storage, on another host name
    blobs: dict[str, bytes]  # volume-relative path -> expected bytes
    sources: dict[str, str]  # volume-relative path -> source string
    commit: str  # the hub repo's commit when the hosts started

    def total_requests(self) -> int:
        return sum(len(s.requests) for s in (self.hub.server, self.hub.cdn, self.files, self.cdn))

    def models_toml(self, *, skip: tuple[str, ...] = ()) -> str:
        text = ""
        for path, source in self.sources.items():
            if path in skip:
                continue
            kind = {"Stable-diffusion": "checkpoint", "VAE": "vae", "ESRGAN": "upscaler", "embeddings": "embedding",
                    "Lora": "lora", "text_encoder": "text_encoder"}[path.split("/")[1]]
            text += f'\n[[models]]\nkind = "{kind}"\nsource = "{source}"\n'
            name = path.rsplit("/", 1)[1]
            if path == "models/VAE/sd-vae.safetensors":
                text += f'name = "{name}"\n'
            if path == "models/ESRGAN/upscaler.pth":
                text += f'sha256 = "{sha(self.blobs[path])}"\n'
        return text


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    rnd = os.urandom
    blobs = {
        "models/Stable-diffusion/model.safetensors": rnd(300_000),
        "models/VAE/sd-vae.safetensors": rnd(120_000),
        "models/text_encoder/config.json": b'{"hidden_size": 768}\n',
        "models/ESRGAN/upscaler.pth": rnd(200_000),
        "models/embeddings/tofu.pt": rnd(50_000),
        "models/Lora/civitai-lora.safetensors": rnd(150_000),
    }
    with FakeHub() as hub, FileServer() as files, FileServer() as cdn:
        commit = hub.add_repo("org/sd", {
            "model.safetensors": blobs["models/Stable-diffusion/model.safetensors"],
            "vae/vae.safetensors": blobs["models/VAE/sd-vae.safetensors"],
            "config.json": blobs["models/text_encoder/config.json"],
        })
        files.add("/files/upscaler.pth", blobs["models/ESRGAN/upscaler.pth"])
        files.add("/files/tofu.pt", blobs["models/embeddings/tofu.pt"])
        lora = blobs["models/Lora/civitai-lora.safetensors"]
        cdn.add("/civitai-blob", lora)
        files.add(f"/api/download/models/{CIVITAI_VERSION}", require_token=CIVITAI_TOKEN,
                  redirect=cdn.url("/civitai-blob", host="localhost") + "?sig=abc")
        files.add(f"/api/v1/model-versions/{CIVITAI_VERSION}", json.dumps({
            "id": int(CIVITAI_VERSION), "name": "v1",
            "downloadUrl": files.url(f"/api/download/models/{CIVITAI_VERSION}"),
            "files": [
                {"name": "civitai-lora.yaml", "sizeKB": 1.0, "type": "Config", "primary": False,
                 "hashes": {}, "downloadUrl": files.url("/nope")},
                {"name": "civitai-lora.safetensors", "sizeKB": len(lora) / 1024, "type": "Model", "primary": True,
                 "hashes": {"SHA256": sha(lora).upper(), "AutoV2": "ABCDEF0123"},
                 "downloadUrl": files.url(f"/api/download/models/{CIVITAI_VERSION}")},
            ],
        }).encode(), headers={"Content-Type": "application/json"})
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("CIVITAI_API_BASE", files.url("/api/v1"))
        monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
        sources = {
            "models/Stable-diffusion/model.safetensors": "hf://org/sd/model.safetensors",
            "models/VAE/sd-vae.safetensors": "hf://org/sd/vae/vae.safetensors",
            "models/text_encoder/config.json": "hf://org/sd/config.json",
            "models/ESRGAN/upscaler.pth": files.url("/files/upscaler.pth"),
            "models/embeddings/tofu.pt": files.url("/files/tofu.pt"),
            "models/Lora/civitai-lora.safetensors": f"civitai://{CIVITAI_VERSION}",
        }
        yield Hosts(hub=hub, files=files, cdn=cdn, blobs=blobs, sources=sources, commit=commit)


def state_models(volume: Path) -> dict[str, dict[str, object]]:
    return {m["path"]: m for m in state_of(volume)["models"]}


def lock_models(volume: Path) -> dict[str, dict[str, object]]:
    lock = json.loads((volume / "forge-volume.lock").read_text())
    return {m["path"]: m for m in lock["models"]}
