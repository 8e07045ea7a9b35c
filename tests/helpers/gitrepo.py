"""Real git repositories made on the fly, standing in for Forge and its extensions."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
        cwd=repo, env={**os.environ, **GIT_ENV}, text=True, capture_output=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


class Repo:
    """A working git repository; its path doubles as the clone URL (a local path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", "main")

    @property
    def url(self) -> str:
        return str(self.path)

    def write(self, files: dict[str, str | bytes]) -> None:
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")

    def copy_tree(self, source: Path) -> None:
        shutil.copytree(source, self.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))

    def commit(self, message: str = "change", files: dict[str, str | bytes] | None = None) -> str:
        if files:
            self.write(files)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")

    def tag(self, name: str) -> None:
        git(self.path, "tag", name)

    def switch(self, branch: str, create: bool = False) -> None:
        """Check out ``branch`` in the working repository (``create``: start it at the current HEAD)."""
        git(self.path, "checkout", "-q", *(["-b"] if create else []), branch)

    def commit_on_branch(self, branch: str, files: dict[str, str | bytes], message: str = "change") -> str:
        """Commit ``files`` on a new branch started from HEAD, then come back; returns the new commit.

        Session-shared repositories stay put on main, so other tests' `ref = "main"` is unaffected.
        """
        back = git(self.path, "rev-parse", "--abbrev-ref", "HEAD")
        self.switch(branch, create=True)
        try:
            return self.commit(message, files)
        finally:
            self.switch(back)
