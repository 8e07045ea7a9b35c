"""Git for forge-volume: resolve refs to commits, and put a checkout at a commit without losing work.

Every call goes through ``provision.proc.run`` so a failure carries git's stderr, with a timeout,
and with prompts disabled so a private or mistyped repository fails instead of hanging.
Reading HEAD is done from the files in ``.git`` so status checks spawn nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from provision.errors import GitError
from provision.proc import run

LS_REMOTE_TIMEOUT = 120.0
FETCH_TIMEOUT = 1800.0
LOCAL_TIMEOUT = 300.0
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{4,39}$")


def _env() -> dict[str, str]:
    # No credential prompt (it would hang a non-interactive install); C locale for stable messages.
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never", "LC_ALL": "C"}


def git(*args: str, cwd: Path | None = None, timeout: float = LOCAL_TIMEOUT, what: str | None = None) -> str:
    """Run ``git ARGS``; raise GitError with git's stderr on failure; return stdout stripped."""
    argv = ["git", "-c", "advice.detachedHead=false", *args]
    result = run(argv, cwd=cwd, env=_env(), timeout=timeout, error=GitError, what=what or f"git {args[0]}")
    return result.stdout.strip()


def redact_url(url: str) -> str:
    """A repository URL fit for logs and state.json: any user:token@ part is dropped."""
    parts = urlsplit(url)
    if not parts.netloc or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_full_sha(text: str) -> bool:
    return bool(_FULL_SHA.match(text))


def ls_remote(repo: str) -> dict[str, str]:
    """Every ref the remote advertises, name -> commit (annotated tags peeled to their commit)."""
    out = git("ls-remote", "--", repo, timeout=LS_REMOTE_TIMEOUT, what=f"git ls-remote {redact_url(repo)}")
    refs: dict[str, str] = {}
    peeled: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        if name.endswith("^{}"):
            peeled[name[:-3]] = sha
        elif name:
            refs[name] = sha
    refs.update(peeled)
    return refs


def _from_refs(refs: dict[str, str], ref: str) -> str | None:
    for name in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}"):
        if name in refs:
            return refs[name]
    return None


def _fetch_into_scratch(repo: str, commit_or_refspecs: list[str], shallow: bool) -> tempfile.TemporaryDirectory[str]:
    scratch = tempfile.TemporaryDirectory(prefix="forge-volume-resolve-")
    path = Path(scratch.name)
    try:
        git("init", "-q", "--bare", str(path))
        git("remote", "add", "origin", repo, cwd=path)
        # tree:0 fetches commits only: enough to name a commit, a fraction of Forge's history.
        depth = ["--depth", "1"] if shallow else []
        git("fetch", "-q", "--filter=tree:0", *depth, "origin", *commit_or_refspecs, cwd=path,
            timeout=FETCH_TIMEOUT, what=f"git fetch {redact_url(repo)}")
    except BaseException:
        scratch.cleanup()
        raise
    return scratch


def resolve_ref(repo: str, ref: str) -> str:
    """The full commit ``ref`` (branch, tag, full or short commit) names in ``repo``."""
    refs = ls_remote(repo)
    found = _from_refs(refs, ref)
    if found:
        return found
    if is_full_sha(ref.lower()):
        # Not advertised as a ref; ask for it by id, which also proves the commit exists.
        try:
            _fetch_into_scratch(repo, [ref.lower()], shallow=True).cleanup()
        except GitError as exc:
            raise GitError(f"commit {ref} is not in {redact_url(repo)}: {exc.message}") from None
        return ref.lower()
    if _SHORT_SHA.match(ref.lower()):
        scratch = _fetch_into_scratch(
            repo, ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"], shallow=False)
        try:
            return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=Path(scratch.name),
                       what=f"find commit {ref}")
        except GitError:
            raise GitError(f"{ref!r} is not a branch, tag or commit of {redact_url(repo)}") from None
        finally:
            scratch.cleanup()
    branches = sorted(n.removeprefix("refs/heads/") for n in refs if n.startswith("refs/heads/"))
    shown = ", ".join(branches[:8]) + (" ..." if len(branches) > 8 else "")
    raise GitError(f"{ref!r} is not a branch, tag or commit of {redact_url(repo)} (branches: {shown or 'none'})")


def _git_dir(path: Path) -> Path | None:
    dot = path / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
        text = dot.read_text(encoding="utf-8").strip()
        if text.startswith("gitdir:"):
            target = Path(text.removeprefix("gitdir:").strip())
            return target if target.is_absolute() else (path / target)
    return None


def head_commit(path: Path) -> str | None:
    """The commit checked out at ``path``, read from .git without spawning git; None if not a checkout."""
    gitdir = _git_dir(path)
    if gitdir is None:
        return None
    try:
        head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head if is_full_sha(head) else None
    ref = head.removeprefix("ref:").strip()
    try:
        value = (gitdir / ref).read_text(encoding="utf-8").strip()
        return value if is_full_sha(value) else None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        packed = (gitdir / "packed-refs").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if name == ref and is_full_sha(sha):
            return sha
    return None


def local_changes(path: Path) -> list[str]:
    """Tracked files modified, added or deleted in the checkout (untracked files are not changes)."""
    out = git("diff", "--name-only", "HEAD", "--", cwd=path, what=f"git diff in {path}")
    return [line for line in out.splitlines() if line.strip()]


def _fetch_commit(path: Path, repo: str, commit: str) -> None:
    if _has_commit(path, commit):
        return
    try:
        # By id and shallow: only what this commit needs (GitHub and local repos both allow it).
        git("fetch", "-q", "--depth", "1", "origin", commit, cwd=path, timeout=FETCH_TIMEOUT,
            what=f"git fetch {redact_url(repo)} {commit[:12]}")
    except GitError:
        # Servers that refuse unadvertised ids: fetch the branches and tags, then look again.
        git("fetch", "-q", "origin", "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*",
            cwd=path, timeout=FETCH_TIMEOUT, what=f"git fetch {redact_url(repo)}")
    if not _has_commit(path, commit):
        raise GitError(f"commit {commit} is not in {redact_url(repo)}",
                       "the commit may have been force-pushed away; run `forge-volume lock` to pin a new one")


def _has_commit(path: Path, commit: str) -> bool:
    try:
        git("cat-file", "-e", f"{commit}^{{commit}}", cwd=path, what="git cat-file")
    except GitError:
        return False
    return True


def _refuse_local_changes(path: Path, label: str) -> None:
    changed = local_changes(path)
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise GitError(
            f"{label} at {path} has local changes to tracked files: {shown}",
            f"commit or save them elsewhere, then `git -C {path} checkout -- .`, and re-run; "
            "forge-volume never discards them",
        )


def sync_checkout(path: Path, repo: str, commit: str, scratch_dir: Path, label: str) -> str:
    """Make ``path`` a checkout of ``repo`` at ``commit``; returns "unchanged", "updated" or "cloned".

    A new checkout is built in ``scratch_dir`` and renamed into place, so ``path`` never holds a
    half-cloned tree. An existing one is updated in place, after refusing local changes.
    """
    if path.exists():
        if _git_dir(path) is None:
            raise GitError(f"{path} exists but is not a git checkout",
                           f"move it away (it is not {label} as forge-volume installs it) and re-run")
        if head_commit(path) == commit:
            return "unchanged"  # local edits at the right commit are the user's business
        _refuse_local_changes(path, label)
        if _has_origin(path):
            git("remote", "set-url", "origin", repo, cwd=path)
        else:
            git("remote", "add", "origin", repo, cwd=path)
        _fetch_commit(path, repo, commit)
        git("checkout", "-q", "--detach", commit, cwd=path, what=f"git checkout {commit[:12]} in {path}")
        return "updated"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    work = scratch_dir / f"{path.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        git("init", "-q", str(work))
        git("remote", "add", "origin", repo, cwd=work)
        _fetch_commit(work, repo, commit)
        git("checkout", "-q", "--detach", commit, cwd=work, what=f"git checkout {commit[:12]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, path)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return "cloned"


def _has_origin(path: Path) -> bool:
    return "origin" in git("remote", cwd=path).split()
