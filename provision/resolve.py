"""Resolving a spec into a lock: every git ref to a commit, every model to a pinned revision and checksum."""

from __future__ import annotations

from provision.gitops import redact_url, resolve_ref
from provision.lockfile import Lock, LockedExtension, LockedForge
from provision.progress import Progress
from provision.spec import Spec


def lock_spec(spec: Spec, progress: Progress) -> Lock:
    """Resolve ``spec`` (network: git ls-remote, and the model hosts when there are models)."""
    f = spec.forge
    progress.info(f"resolving Forge {f.ref} in {redact_url(f.repo)}")
    forge = LockedForge(
        repo=f.repo, ref=f.ref, commit=resolve_ref(f.repo, f.ref), python=f.python, torch=list(f.torch),
        torch_index_url=f.torch_index_url, args=list(f.args), env=dict(f.env),
    )
    extensions = []
    for ext in spec.extensions:
        progress.info(f"resolving extension {ext.name} {ext.ref} in {redact_url(ext.repo)}")
        extensions.append(LockedExtension(name=ext.name, repo=ext.repo, ref=ext.ref,
                                          commit=resolve_ref(ext.repo, ext.ref), pip=list(ext.pip),
                                          files=dict(ext.files)))
    models = []
    if spec.models:
        from provision.models import resolve_models  # models code pulls in huggingface_hub: only when needed

        models = resolve_models(spec.models, progress)
    return Lock(forge=forge, extensions=extensions, models=models)
