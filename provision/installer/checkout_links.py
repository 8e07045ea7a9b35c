"""Links that keep the original worker's model paths valid: the checkout's models/<Kind> -> models/<Kind>.

runpod-worker-forge's install kept models inside the Forge checkout, so its clients name them by
absolute paths such as ``/runpod-volume/stable-diffusion-webui-forge/models/insightface/inswapper_128.onnx``
(ReActor's swap model, an extension argument Forge passes on untouched). On this layout the model
is at ``models/insightface/`` at the volume's root. For every kind whose folder the Forge checkout
does not hold itself, the checkout's ``models/<Kind>`` is a relative link to ``models/<Kind>``, so
the old path names the same file on a pod (``/workspace``) and on a worker (``/runpod-volume``,
where ``/workspace`` is linked to the volume too), with nothing copied. Kinds whose folder is part
of Forge's own tree (``Stable-diffusion``, ``VAE``, ``ESRGAN``, ``text_encoder`` hold Forge's
placeholder files) keep it: replacing a tracked folder would be a local change to the checkout.

Made by ``forge-volume install`` (the ``links`` step) and checked by ``verify``; the worker only
reads them, so nothing is written to the volume at boot.
"""

from __future__ import annotations

import os
from pathlib import Path

from provision.errors import VolumeError
from provision.forge.first_use import INTERROGATE_LINK
from volume_layout import MODEL_KIND_DIRS, VolumeLayout


def wanted(layout: VolumeLayout) -> dict[Path, str]:
    """The links the checkout should hold: link path -> relative target (kinds Forge's tree has are left out)."""
    out = {}
    for kind in MODEL_KIND_DIRS:
        link, target = layout.checkout_model_link(kind)
        if link.is_symlink() or not link.exists():
            out[link] = target
    # Forge reads the CLIP interrogator's categories from interrogate/ in its working folder (the checkout;
    # git-ignored there): once the "interrogate" feature put them in models/, the checkout's name leads there.
    name, folder = INTERROGATE_LINK
    categories = layout.models_dir / folder
    link = layout.forge_dir / name
    if categories.is_dir() and (link.is_symlink() or not link.exists()):
        out[link] = os.path.relpath(categories, layout.forge_dir)
    return out


def problems(layout: VolumeLayout) -> list[str]:
    """One line per link that is missing or leads elsewhere (empty when there is no checkout yet)."""
    if not layout.forge_dir.is_dir():
        return []
    out = []
    for link, target in wanted(layout).items():
        if not link.is_symlink():
            out.append(f"links: {layout.relative(link)} is missing (it should link to {target}; "
                       "`forge-volume install` makes it)")
        elif os.readlink(link) != target:
            out.append(f"links: {layout.relative(link)} links to {os.readlink(link)}, not {target} "
                       "(`forge-volume install` corrects it)")
    return out


def make(layout: VolumeLayout) -> list[Path]:
    """Create or correct every wanted link; returns the links changed."""
    changed = []
    for link, target in wanted(layout).items():
        if link.is_symlink() and os.readlink(link) == target:
            continue
        try:
            link.parent.mkdir(exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
        except OSError as exc:
            raise VolumeError(f"cannot link {link} to {target}: {exc}",
                              "check that the volume is writable, then re-run `forge-volume install`") from None
        changed.append(link)
    return changed
