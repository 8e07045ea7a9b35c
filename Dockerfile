# forge-volume worker: a lean image that boots Stable Diffusion WebUI Forge from a RunPod network volume.
# No CUDA toolkit, torch, Forge or models here: they live on the volume (torch's CUDA runtime comes
# with the nvidia wheels in the volume's venv). The volume's venv runs on the volume's own Python,
# so this image's Python version does not matter to Forge.
# Debian pinned (bookworm), so the system package names below stay what they are (trixie renamed several).
FROM python:3.11-slim-bookworm

# A non-CUDA base image lacks these: without them the NVIDIA container runtime mounts no driver.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# What Forge needs at run time from the system: OpenCV's libGL and glib, tcmalloc (preloaded into
# Forge's process by the worker), and a font for text in images. Versions float with Debian's security
# updates (pinned versions disappear from the archive and break the build).
# OpenCV only needs libGL.so.1 to load (glvnd's dispatcher; it opens a GL driver only when a GL
# context is made, which a headless API server never does), but Debian's libgl1 drags in Mesa's
# software GL drivers and LLVM: about 165 MB, a third of the image.
# They are removed again, by pattern, since their names carry versions that change with Debian.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libtcmalloc-minimal4 fonts-dejavu-core \
    && dpkg-query -W -f '${Package}\n' \
       | awk '/^(libgl1-mesa-dri|libgallium[-0-9.]*|libllvm[0-9]+|libz3-[0-9]+)$/' \
       | xargs -r dpkg --remove --force-depends \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/forge-volume
COPY pyproject.toml README.md ./
COPY volume_layout ./volume_layout
COPY provision ./provision
COPY worker ./worker
# The local package with its worker extra; the SDK is pinned there (runpod==1.12.0).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[worker]"

COPY scripts/start.sh /opt/forge-volume/scripts/start.sh
# Jobs run from an empty folder: RunPod's SDK would run a test_input.json found in the working directory.
WORKDIR /srv
CMD ["/opt/forge-volume/scripts/start.sh"]
