"""Every error forge-volume raises on purpose, in one place.

Each carries a one-line cause and a hint (what to do). The CLI maps them once, at its boundary,
to ``error: <cause> (<hint>)`` and exit 1; the worker maps them to ``{"error": ...}``.
Anything else escaping is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class ForgeVolumeError(Exception):
    """Base class: a failure with a one-line cause and a hint."""

    hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        return f"{text} ({self.hint})" if self.hint else text

    def __str__(self) -> str:
        return self.one_line()


class SpecError(ForgeVolumeError):
    """The spec file is missing, not TOML, or says something forge-volume cannot do."""

    hint = "fix the spec file, or write a fresh one with `forge-volume init`"


class LockError(ForgeVolumeError):
    """The lock file is missing, unreadable, or no longer matches the spec."""

    hint = "run `forge-volume lock` to resolve the spec again"


class StateError(ForgeVolumeError):
    """state.json is unreadable or from another layout version."""

    hint = "run `forge-volume install` to rebuild the volume's record"


class VolumeError(ForgeVolumeError):
    """The volume is missing, not provisioned, or not usable."""

    hint = "attach the network volume (same datacenter as the endpoint) and run `forge-volume install` on it"


class VolumeBusyError(ForgeVolumeError):
    """Another forge-volume process holds the volume's install lock."""

    hint = "wait for the other install to finish, or pass --wait to queue behind it"


class CommandError(ForgeVolumeError):
    """A subprocess (git, pip, python) failed; the message carries its stderr tail."""

    hint = "read the command's output above; fix the cause and re-run: install resumes where it stopped"


class UvMissingError(ForgeVolumeError):
    """The spec asks for a Python version to install, and uv (which installs it) is missing."""

    hint = "install it with `pip install 'forge-volume[uv]'`, or set `python` in the spec to an interpreter path"


class GitError(CommandError):
    """A git operation failed (unknown ref, unreachable repository, local changes)."""

    hint = "check the repo URL and ref in the spec, and that the repository is reachable"


class SourceError(ForgeVolumeError):
    """A model source string is not one of the accepted forms."""

    hint = "use hf://OWNER/REPO/PATH[@REVISION], https://..., http://... or civitai://MODEL_VERSION_ID"


class DownloadError(ForgeVolumeError):
    """A download failed for good (after retries for transient errors)."""

    hint = "check the source and the network, then re-run: completed bytes are kept and resumed"


class AuthError(DownloadError):
    """The server refused the download (401/403): token missing or wrong."""


class NotFoundError(DownloadError):
    """The server says the file is gone (404)."""

    hint = "check the source in the spec; the file may have moved or been deleted upstream"


class ChecksumError(DownloadError):
    """Downloaded bytes do not match the pinned sha256 or size."""

    hint = (
        "the file changed upstream or the download was corrupted; "
        "if the change is intended, run `forge-volume lock` again"
    )


class DiskFullError(DownloadError):
    """Not enough free space on the volume."""

    hint = "free space on the volume (`forge-volume refresh-models --prune`) or grow it in RunPod's console"


class PathError(ForgeVolumeError):
    """A destination that is not a usable place under the volume's models folder."""

    hint = "give a path under the volume's models/ folder (or a model kind), with a plain file name"
