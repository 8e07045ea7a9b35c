"""A volume laid out exactly as runpod-worker-forge's install script leaves it (``../shared/seed/LAYOUT.md``).

Its documented steps, in order, against local stand-ins: a depth-1 clone of Forge (a local repository,
cloned over file:// as git clones a remote), a venv folder at the volume's root (pyvenv.cfg and the
dist-info folders of the torch, torchvision and xformers it installed; no interpreter, nothing runs
it), extensions cloned into the checkout's extensions/ (ReActor checked out at its tag, with
``last_device.txt``), models downloaded into the checkout's models/<Kind>/ (stand-in bytes), the log
folder, its config files over Forge's (``webui-user.sh`` is tracked by Forge: replacing it is a local
change), and a Hugging Face cache at the root (``HF_HOME`` was the volume). Nothing here imports pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.gitrepo import GIT_ENV, Repo

CHECKOUT = "stable-diffusion-webui-forge"
WEBUI_USER = '#!/usr/bin/env bash\nexport COMMANDLINE_ARGS="--port 3000 --api --xformers --no-half-vae"\n'
CONFIG = '{"samples_save": true, "sd_model_checkpoint": "deliberate_v2.safetensors", "CLIP_stop_at_last_layers": 2}\n'
UI_CONFIG = '{"txt2img/Steps/value": 25}\n'
# (folder under the checkout's models/, file name, size in bytes): stand-ins for what the script downloads
# and what a user adds by hand (a LoRA, an embedding).
MODELS = (
    ("Stable-diffusion", "deliberate_v2.safetensors", 300_000),
    ("Stable-diffusion", "sd_xl_base_1.0.safetensors", 410_000),
    ("VAE", "sdxl_vae.safetensors", 50_000),
    ("ControlNet", "control_v11p_sd15_canny.pth", 120_000),
    ("ESRGAN", "4x-UltraSharp.pth", 60_000),
    ("insightface", "inswapper_128.onnx", 90_000),
    ("Lora", "my_style_v3.safetensors", 40_000),
)


def stand_in_bytes(name: str, size: int) -> bytes:
    """Distinct, reproducible bytes for a model file."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True)


@dataclass
class OriginalVolume:
    root: Path
    forge_commit: str
    extensions: dict[str, str] = field(default_factory=dict)  # name -> commit checked out
    models: dict[str, bytes] = field(default_factory=dict)  # path under the checkout -> bytes

    @property
    def checkout(self) -> Path:
        return self.root / CHECKOUT


def lay_out(root: Path, forge: Repo, extensions: dict[str, Repo], *, models: tuple[tuple[str, str, int], ...] = MODELS
            ) -> OriginalVolume:
    """The volume after ``install.sh``; ``forge`` must track ``webui-user.sh`` (see ``with_webui_user``)."""
    root.mkdir(parents=True, exist_ok=True)
    _git(root, "clone", "-q", "--depth=1", f"file://{forge.path}", CHECKOUT)
    checkout = root / CHECKOUT
    out = OriginalVolume(root, forge_commit=forge.head())
    venv = root / "venv"  # python3 -m venv /workspace/venv, then pip3 install torch... xformers...
    site = venv / "lib" / "python3.10" / "site-packages"
    for dist in ("torch-2.1.2+cu121", "torchvision-0.16.2+cu121", "xformers-0.0.23.post1", "numpy-1.26.2"):
        (site / f"{dist}.dist-info").mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.10.12\n")
    for name, repo in extensions.items():
        target = checkout / "extensions" / name
        if name == "sd-webui-reactor":  # git clone ...; git checkout v0.6.1
            _git(checkout, "clone", "-q", f"file://{repo.path}", str(target))
            _git(target, "-c", "advice.detachedHead=false", "checkout", "-q", "v0.6.1")
            (target / "last_device.txt").write_text("CUDA\n")
        else:  # git clone --depth=1 ...
            _git(checkout, "clone", "-q", "--depth=1", f"file://{repo.path}", str(target))
        out.extensions[name] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=target, text=True,
                                              capture_output=True, check=True).stdout.strip()
    for folder, name, size in models:
        path = checkout / "models" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = stand_in_bytes(name, size)
        path.write_bytes(data)
        out.models[f"models/{folder}/{name}"] = data
    # Forge's own first start downloads its face restorers into a folder no model kind uses.
    (checkout / "models" / "Codeformer").mkdir(parents=True, exist_ok=True)
    (checkout / "models" / "Codeformer" / "codeformer-v0.1.0.pth").write_bytes(b"codeformer")
    (checkout / "models" / "Lora" / "README.txt").write_text("my notes\n")
    (root / "logs").mkdir()
    (root / "logs" / "webui.log").write_text("Running on local URL: http://0.0.0.0:3000\n")
    # rm webui-user.sh config.json ui-config.json; wget the worker's own
    (checkout / "webui-user.sh").write_text(WEBUI_USER)
    (checkout / "config.json").write_text(CONFIG)
    (checkout / "ui-config.json").write_text(UI_CONFIG)
    (checkout / "styles.csv").write_text("name,prompt,negative_prompt\nfox,a red fox,\n")
    hub = root / "hub" / "models--openai--clip-vit-large-patch14"  # HF_HOME=/workspace
    hub.mkdir(parents=True)
    (hub / "refs").mkdir()
    return out


def with_webui_user(forge: Repo) -> Repo:
    """Forge tracks webui-user.sh (the original's script replaces it): give the stand-in Forge one."""
    forge.commit("webui-user.sh", {"webui-user.sh": "#!/usr/bin/env bash\n#export COMMANDLINE_ARGS=\"\"\n"})
    return forge


def reactor_repo(path: Path, files: dict[str, str | bytes]) -> Repo:
    """An extension repository with the tag v0.6.1 and a later commit on main (the script checks out the tag)."""
    repo = Repo(path)
    repo.commit("extension", files)
    _git(repo.path, "tag", "v0.6.1")
    repo.commit("after the tag", {"CHANGELOG.md": "later\n"})
    return repo
