"""A loopback stand-in for the Hugging Face Hub, faithful to what huggingface_hub reads.

Routes (as huggingface_hub 2.x calls them):
- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: LFS files answer 302 to a CDN on another host
  name ("localhost", like a signed CDN URL) with ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256),
  ``X-Linked-Size`` and ``Location``; files kept in git answer 200 with ``ETag`` (the git blob sha1).
- ``GET /api/models/{repo}[/revision/{revision}]`` (``model_info``; ``?blobs=True`` adds sizes,
  blob ids and LFS sha256) and ``GET /api/models/{repo}/tree/{revision}`` (``list_repo_tree``).
- Errors carry ``X-Error-Code`` (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound) as the
  real hub does, so huggingface_hub raises its own typed errors.
The CDN is a ``FileServer``: its routes can drop connections, serve wrong bytes, and count bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from tests.helpers.http_server import FileServer, Route, _Handler
from tests.helpers.tls import Cert

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".onnx", ".ckpt", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # private (or gated) repos need "Authorization: Bearer <token>"
    gated: bool = False

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        commit = self.branches.get(revision, revision)
        files = self.commits.get(commit)
        return (commit, files) if files is not None else None


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class FakeHub:
    """``with FakeHub() as hub: hub.add_repo("org/m", {"a.safetensors": b"..."}); HF_ENDPOINT=hub.endpoint``
    (``FakeHub(tls=cert)``: the same over https)."""

    def __init__(self, tls: Cert | None = None) -> None:
        self.server = FileServer(tls=tls)  # with a certificate, the hub and its CDN answer over https
        self.cdn = FileServer(tls=tls)
        self.repos: dict[str, FakeRepo] = {}
        self.server.custom = self._answer

    @property
    def endpoint(self) -> str:
        return self.server.url("")

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, token: str | None = None,
                 gated: bool = False) -> str:
        self.repos[repo_id] = FakeRepo(repo_id, token=token, gated=gated)
        return self.commit(repo_id, files)

    def commit(self, repo_id: str, files: dict[str, bytes]) -> str:
        """A new commit on main holding exactly ``files``; returns its sha."""
        repo = self.repos[repo_id]
        digest = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(files.items()))).encode()).hexdigest()
        repo.commits[digest] = dict(files)
        repo.branches["main"] = digest
        for data in files.values():
            sha = hashlib.sha256(data).hexdigest()
            if f"/blobs/{sha}" not in self.cdn.routes:
                self.cdn.add(f"/blobs/{sha}", data)
        return digest

    def blob(self, data: bytes) -> Route:
        """The CDN route serving these bytes (to make it misbehave or count what it sent)."""
        return self.cdn.routes[f"/blobs/{hashlib.sha256(data).hexdigest()}"]

    def resolve_requests(self) -> list[str]:
        return [r.path for r in self.server.requests if "/resolve/" in r.path]

    # --- routing ----------------------------------------------------------------------------------

    def _answer(self, h: _Handler, head: bool) -> bool:
        parts = urlsplit(h.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            self._tree(h, m.group(1), m.group(2), m.group(3) or "", query)
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            self._info(h, m.group(1), m.group(2) or "main", query)
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self._resolve(h, m.group(1), m.group(2), m.group(3))
        else:
            return False
        return True

    def _repo(self, h: _Handler, repo_id: str, revision: str) -> tuple[FakeRepo, str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        auth = h.headers.get("Authorization")
        if repo is None or (repo.token and not repo.gated and auth != f"Bearer {repo.token}"):
            h.reply(401, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound",
                                                             "X-Error-Message": "Repository not found"})
            return None
        if repo.gated and auth != f"Bearer {repo.token}":
            h.reply(403 if auth else 401, b'{"error":"gated"}', {"X-Error-Code": "GatedRepo",
                                                                "X-Error-Message": "Access to model is restricted"})
            return None
        found = repo.files_at(revision)
        if found is None:
            h.reply(404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo, found[0], found[1]

    def _resolve(self, h: _Handler, repo_id: str, revision: str, filename: str) -> None:
        found = self._repo(h, repo_id, revision)
        if found is None:
            return
        _, commit, files = found
        data = files.get(filename)
        if data is None:
            h.reply(404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
            return
        if is_lfs(filename):
            sha = hashlib.sha256(data).hexdigest()
            location = self.cdn.url(f"/blobs/{sha}", host="localhost") + "?X-Amz-Signature=fake"
            h.reply(302, b"", {"Location": location, "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"',
                               "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_id(data)}"',
                               "Accept-Ranges": "bytes"})
            return
        h.reply(200, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"})

    def _entry(self, path: str, data: bytes, metadata: bool) -> dict[str, object]:
        entry: dict[str, object] = {"rfilename": path}
        if metadata:
            entry.update(size=len(data), blobId=git_blob_id(data))
            if is_lfs(path):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _info(self, h: _Handler, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        found = self._repo(h, repo_id, revision)
        if found is None:
            return
        repo, commit, files = found
        metadata = query.get("blobs", ["false"])[0].lower() == "true"
        body = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": bool(repo.token),
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": [self._entry(p, d, metadata) for p, d in sorted(files.items())]}
        h.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _tree(self, h: _Handler, repo_id: str, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        found = self._repo(h, repo_id, revision)
        if found is None:
            return
        _, _, files = found
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        out: list[dict[str, object]] = []
        dirs: set[str] = set()
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            item: dict[str, object] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if is_lfs(path):
                item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(item)
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        h.reply(200, json.dumps(out).encode(), {"Content-Type": "application/json"})

    def start(self) -> FakeHub:
        self.server.start()
        self.cdn.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        self.cdn.stop()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
