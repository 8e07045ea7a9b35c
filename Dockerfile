# forge-volume worker: a lean image that boots Stable Diffusion WebUI Forge from a RunPod network volume.
# No CUDA toolkit, torch, Forge or models here: they live on the volume (torch's CUDA runtime comes
# with the nvidia wheels in the volume's venv). The volume's venv runs on the volume's own Python,
# so this image's Python version does not matter to Forge.
# Debian pinned (bookworm), so the system package names below stay what they are (trixie renamed several).
FROM python:3.11-slim-bookworm

# A non-CUDA base image lacks these: without them the NVIDIA container runtime mounts no driver.
# No git in the image: Forge imports GitPython at start, which refuses to load without a git executable
# ("Bad git executable") unless told to stay quiet; Forge needs git only to manage extensions.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GIT_PYTHON_REFRESH=quiet \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# What Forge needs at run time from the system: OpenCV's libGL and glib (cv2 links libGL.so.1,
# libglib-2.0 and libgthread-2.0) and tcmalloc (the worker preloads it into Forge's process, as the old
# worker did). No font: Forge draws text with the Roboto it ships. Versions float with Debian's security
# updates (pinned versions disappear from the archive and break the build).
# OpenCV only needs libGL.so.1 to load (glvnd's dispatcher; it opens a GL driver only when a GL context
# is made, which a headless API server never does), but Debian's libglx0 depends on Mesa's GLX driver
# (libglx-mesa0), which depends on Mesa's DRI drivers and LLVM: about 200 MB with the 28 libraries only
# they use. A package built here that provides libglx-mesa0 stands in for it, so apt installs libGL
# without Mesa and the package database stays consistent: `apt-get check` passes and an image built
# FROM this one installs packages as usual (one that wants Mesa installs libgl1-mesa-dri by name).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN mkdir -p /tmp/no-mesa/DEBIAN \
    && printf '%s\n' 'Package: forge-volume-no-mesa' 'Version: 1.0' 'Architecture: all' \
       'Maintainer: forge-volume' 'Provides: libglx-mesa0' \
       'Description: libGL without Mesa, for a headless server that never makes a GL context' \
       > /tmp/no-mesa/DEBIAN/control \
    && dpkg-deb --build /tmp/no-mesa /tmp/no-mesa.deb \
    && dpkg --install /tmp/no-mesa.deb \
    && apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libtcmalloc-minimal4 \
    && rm -rf /tmp/no-mesa /tmp/no-mesa.deb /var/lib/apt/lists/*

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
