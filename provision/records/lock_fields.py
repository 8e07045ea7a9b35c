"""Checking a lock file's fields as they are read: the lock is edited by hand (a sha256 pasted from
Civitai in capitals, a size typed as a string), and every later step trusts what it holds.

Each problem is one clause naming the entry and the field; all of them are reported at once.
Hex digests are taken in any case and kept lowercase, as everything else compares them.
"""

from __future__ import annotations

import re
from typing import Any

from volume_layout import MODEL_KIND_DIRS

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")  # git's SHA-1 or SHA-256 object names
FIRST_USE_KIND = "first-use"  # as provision.records.lockfile names it


class Entry:
    """One table of the lock (``forge``, an extension, a model) read field by field into ``problems``."""

    def __init__(self, name: str, table: Any, problems: list[str]) -> None:
        self.name = name
        self.table = table if isinstance(table, dict) else {}
        self.problems = problems
        if not isinstance(table, dict):
            self.fail("", f"must be an object, not {type(table).__name__}")

    def fail(self, key: str, what: str) -> None:
        self.problems.append(f"{self.name}: {key} {what}" if key else f"{self.name} {what}")

    def only(self, *keys: str) -> None:
        for key in self.table:
            if key not in keys:
                self.fail(str(key), f"is not a field of a lock entry (fields: {', '.join(keys)})")

    def text(self, key: str, *, optional: bool = False) -> Any:
        if key not in self.table:
            if not optional:
                self.fail(key, "is missing")
            return None
        value = self.table[key]
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string{' or null' if optional else ''}, not {value!r}")
            return None
        return value

    def hex(self, key: str, pattern: re.Pattern[str], what: str, *, optional: bool = False) -> Any:
        value = self.text(key, optional=optional)
        if value is None:
            return None
        if not pattern.fullmatch(value):
            self.fail(key, f"must be {what}, not {value[:80]!r}")
            return None
        return value.lower()

    def size(self, key: str) -> Any:
        value = self.table.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            self.fail(key, f"must be a whole number of bytes (not quoted) or null, not {value!r}")
            return None
        return value

    def strings(self, key: str) -> Any:
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, f"must be a list of strings, not {value!r}")
            return []
        return value

    def mapping(self, key: str) -> Any:
        value = self.table.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            self.fail(key, f"must be an object of strings, not {value!r}")
            return {}
        return value


def forge_fields(table: Any, problems: list[str]) -> dict[str, Any]:
    e = Entry("forge", table, problems)
    e.only("repo", "ref", "commit", "python", "torch", "torch_index_url", "args", "env", "features",
           "features_mirror")
    return {"repo": e.text("repo"), "ref": e.text("ref"), "commit": e.hex("commit", _COMMIT, "a full git commit id"),
            "python": e.text("python"), "torch": e.strings("torch"),
            "torch_index_url": e.text("torch_index_url", optional=True), "args": e.strings("args"),
            "env": e.mapping("env"), "features": e.strings("features"),
            "features_mirror": e.text("features_mirror", optional=True)}


def extension_fields(i: int, table: Any, problems: list[str]) -> dict[str, Any]:
    name = table.get("name") if isinstance(table, dict) else None
    e = Entry(f"extension {name}" if isinstance(name, str) and name else f"extensions[{i}]", table, problems)
    e.only("name", "repo", "ref", "commit", "pip", "files")
    return {"name": e.text("name"), "repo": e.text("repo"), "ref": e.text("ref"),
            "commit": e.hex("commit", _COMMIT, "a full git commit id"), "pip": e.strings("pip"),
            "files": e.mapping("files")}


def model_fields(i: int, table: Any, problems: list[str]) -> dict[str, Any]:
    t = table if isinstance(table, dict) else {}
    kind, name = t.get("kind"), t.get("name")
    label = f"model {kind}/{name}" if isinstance(kind, str) and isinstance(name, str) else f"models[{i}]"
    e = Entry(label, table, problems)
    e.only("kind", "name", "source", "path", "sha256", "size", "revision", "pinned_by")
    fields = _file_fields(e)
    if fields["kind"] is not None and fields["kind"] not in MODEL_KIND_DIRS:
        e.fail("kind", f"is {fields['kind']!r}, not a known kind ({', '.join(MODEL_KIND_DIRS)})")
    return fields


def first_use_fields(i: int, table: Any, problems: list[str]) -> dict[str, Any]:
    path = table.get("path") if isinstance(table, dict) else None
    e = Entry(f"first_use {path}" if isinstance(path, str) and path else f"first_use[{i}]", table, problems)
    e.only("kind", "name", "source", "path", "sha256", "size", "revision", "pinned_by", "feature", "url")
    fields = _file_fields(e)
    if fields["kind"] is not None and fields["kind"] != FIRST_USE_KIND:
        e.fail("kind", f"is {fields['kind']!r}, not {FIRST_USE_KIND!r}")
    return {**fields, "feature": e.text("feature"), "url": e.text("url")}


def _file_fields(e: Entry) -> dict[str, Any]:
    kind = e.text("kind")
    pinned_by = e.text("pinned_by", optional=True) or "spec"  # who pinned it: told, never acted on
    return {"kind": kind, "name": e.text("name"), "source": e.text("source"), "path": e.text("path"),
            "sha256": e.hex("sha256", _SHA256, "64 hexadecimal digits (or null until the first download)",
                            optional=True),
            "size": e.size("size"), "revision": e.text("revision", optional=True), "pinned_by": pinned_by}
