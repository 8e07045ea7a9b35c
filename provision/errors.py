"""Every error forge-volume raises on purpose, in one place.

Each carries a one-line cause and advice per surface: ``hint`` for the CLI (a shell on a pod) and
``job_hint`` for a worker's helper job, where "run `forge-volume lock`" or "pass --wait" cannot
be done. The CLI maps them once, at its boundary, to ``error: <cause> (<hint>)`` and exit 1; the
worker's helpers map them to ``{"error": <cause> (<job hint>)}``.
Anything else escaping is a bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

from typing import Literal

Surface = Literal["cli", "job"]


class ForgeVolumeError(Exception):
    """Base class: a failure with a one-line cause and advice for each surface."""

    hint = ""  # what to do in a shell on a pod (the CLI)
    job_hint: str | None = None  # what to do from a helper job, where the CLI's advice does not apply

    def __init__(self, message: str, hint: str | None = None, *, job_hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint
        if job_hint is not None:
            self.job_hint = job_hint

    def advice(self, surface: Surface = "cli") -> str:
        """The hint for ``surface``. For a job: the most specific of the raise site's and the classes'
        advice, a ``job_hint`` winning over a ``hint`` given at the same level (a subclass's own hint
        is about its case, and beats a job_hint it inherits)."""
        if surface != "job":
            return self.hint
        for level in (vars(self), *(vars(cls) for cls in type(self).__mro__)):
            if level.get("job_hint") is not None:
                return str(level["job_hint"])
            if "hint" in level:
                return str(level["hint"])
        return self.hint

    def one_line(self, surface: Surface = "cli") -> str:
        text = " ".join(self.message.split())
        hint = self.advice(surface)
        return f"{text} ({hint})" if hint else text

    def __str__(self) -> str:
        return self.one_line()


class SpecError(ForgeVolumeError):
    """The spec file is missing, not TOML, or says something forge-volume cannot do."""

    hint = "fix that line of the spec (nothing was changed), then run the command again"
    job_hint = "the spec is edited on a pod; fix it there"


class LockError(ForgeVolumeError):
    """The lock file is missing, unreadable, or no longer matches the spec."""

    hint = "run `forge-volume lock` to resolve the spec again"
    job_hint = ("the volume's forge-volume.lock is written on a pod with this volume (the CLI's lock command); "
                "fix it there, then send the job again")


class CorruptLockError(LockError):
    """The lock file is not a lock (truncated, not JSON): install sets it aside and resolves the spec again."""

    hint = "run `forge-volume install` (it resolves the spec into a new lock), or `forge-volume lock`"
    job_hint = ("the volume's forge-volume.lock is written on a pod with this volume (the CLI's lock command); "
                "fix it there, then send the job again")


class InvalidLockError(LockError):
    """A lock field holds something no lock would (edited by hand): the message names each entry and field."""

    hint = ("correct the fields named in forge-volume.lock (a sha256 is 64 hex digits, a size a number "
            "without quotes), or run `forge-volume lock` to resolve the spec into a new lock")
    job_hint = ("correct the fields named in the volume's forge-volume.lock on a pod with this volume (or lock "
                "the spec again there), then send the job again")


class StaleLockError(LockError):
    """The spec was edited after locking: the lock no longer describes it. The message names each entry
    that differs."""

    hint = "run `forge-volume lock` to lock what changed, then run this command again"
    job_hint = ("lock the edited spec on a pod with this volume (the CLI's lock command), or put the "
                "forge-volume.lock that matches it on the volume, then send the job again")


class StateError(ForgeVolumeError):
    """state.json is unreadable or from another layout version."""

    hint = "run `forge-volume install` to rebuild the volume's record"
    job_hint = "the volume's record is rebuilt by an install on a pod with this volume"


class CorruptStateError(StateError):
    """state.json is not JSON (a truncated write, a full disk): install rebuilds it from the volume."""

    hint = "run `forge-volume install`: it rebuilds the record from what is on the volume, re-downloading nothing"
    job_hint = "the volume's record is rebuilt by an install on a pod with this volume"


class VolumeError(ForgeVolumeError):
    """The volume is missing, not provisioned, or not usable."""

    hint = "attach the network volume (same datacenter as the endpoint) and run `forge-volume install` on it"
    job_hint = "attach the provisioned network volume to the endpoint (same datacenter)"


class VolumeBusyError(ForgeVolumeError):
    """Another forge-volume process holds the volume's install lock."""

    hint = "wait for the other install to finish, or pass --wait to queue behind it"
    job_hint = "an install or refresh-models holds the volume; send the job again when it has finished"


class CommandError(ForgeVolumeError):
    """A subprocess (git, pip, python) failed; the message carries its stderr tail."""

    hint = ("read the command's output (its last lines above, all of it in the log named); fix the cause and "
            "re-run: install resumes where it stopped")


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
    job_hint = "check the source and the network, then send the job again: completed bytes are kept and resumed"


class DownloadCancelled(DownloadError):
    """The download was cancelled (RunPod's cancel, a job's timeout, Ctrl-C); its bytes are kept to resume."""

    hint = "run it again to resume"


class AuthError(DownloadError):
    """The server refused the download (401/403): token missing or wrong."""


class NotFoundError(DownloadError):
    """The server says the file is gone (404)."""

    hint = "check the source in the spec; the file may have moved or been deleted upstream"
    job_hint = "check the source; the file may have moved or been deleted upstream"


class ChecksumError(DownloadError):
    """Downloaded bytes do not match the pinned sha256 or size."""

    hint = (
        "the file changed upstream or the download was corrupted; "
        "if the change is intended, take it with `forge-volume lock --upgrade NAME`"
    )
    job_hint = ("the file changed upstream or the download was corrupted; if the change is intended, "
                "send the new sha256 (or none) with the job, or update the volume's lock on a pod")


class DiskFullError(DownloadError):
    """Not enough free space on the volume."""

    hint = "free space on the volume (`forge-volume refresh-models --prune`) or grow it in RunPod's console"
    job_hint = ("free space on the volume (a /v1/refresh-models job with \"prune\": true) "
                "or grow it in RunPod's console")


class PathError(ForgeVolumeError):
    """A destination that is not a usable place under the volume's models folder."""

    hint = "give a path under the volume's models/ folder (or a model kind), with a plain file name"


class ReplaceError(PathError):
    """A helper job would replace a model the lock pins, or one that came from another source."""

    hint = 'send "overwrite": true to replace it, or give the new file another name or folder'


class NoSourceError(ForgeVolumeError):
    """A model recorded with no source (``source = "volume"``, found by ``adopt``) is missing or changed:
    nothing can download it again."""

    hint = ("put the file back (the lock names its sha256 and size), or take it out of the spec and run "
            "`forge-volume lock`; a model with a source can be added with `forge-volume add`")
    job_hint = ("put the file back on the volume, or take it out of the spec on a pod; a model with no source "
                "cannot be downloaded")


class AdoptError(ForgeVolumeError):
    """``forge-volume adopt`` cannot take this volume over as it is; the message names what and the fix."""

    hint = "fix what the message names, then run `forge-volume adopt` again (nothing was moved)"


class RunPodError(ForgeVolumeError):
    """RunPod's API refused or failed a request, or a datacenter's work could not be done there.
    The message names the request (method and path, never the key)."""

    hint = "check RunPod's console or status page, then re-run `forge-volume regions apply` (it resumes)"
    job_hint = "only `forge-volume regions` on a workstation talks to RunPod's API; no endpoint job does"


class RunPodKeyError(RunPodError):
    """RUNPOD_API_KEY is missing or unusable."""

    hint = ("export RUNPOD_API_KEY (RunPod console -> Settings -> API Keys, read and write); forge-volume "
            "reads it from the environment only and never prints or stores it")
