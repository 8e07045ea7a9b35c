"""Edit the spec file's ``[[models]]`` entries in place, keeping every comment and the layout.

A new entry is rendered by tomlkit (so any value is quoted and escaped correctly) and put after the
last ``[[models]]`` entry; an entry is removed with the comment lines right above its header. Comment
lines between two tables belong to the table below them, which is how people write them (tomlkit
would give them to the table above, so removing an entry with it drops its successor's comment,
and appending one puts the next section's comment above it); so the placement is done on lines.
Every edit is checked by parsing the result: it must hold exactly the old data plus (or minus) that
entry, or the edit is refused and the file left alone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import tomlkit

from provision.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_MODELS_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*models[ \t]*\]\][ \t]*(#.*)?$")
_ANY_HEADER = re.compile(r"^[ \t]*\[")


def _blank_or_comment(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _entries(lines: list[str]) -> list[tuple[int, int]]:
    """(first line, end) of each ``[[models]]`` entry: its header to before the next table's header,
    leaving the blank and comment lines just above that header to it."""
    spans = []
    headers = [i for i, line in enumerate(lines) if _ANY_HEADER.match(line)]
    for i in (h for h in headers if _MODELS_HEADER.match(lines[h])):
        following = [h for h in headers if h > i]
        end = following[0] if following else len(lines)
        if following:
            while end > i + 1 and _blank_or_comment(lines[end - 1]):
                end -= 1
        spans.append((i, end))
    return spans


def _checked(path: Path, before: str, after: str, expect: list[Any]) -> str:
    try:
        old, new = tomllib.loads(before), tomllib.loads(after)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: the edit would not be valid TOML ({exc}); the file was left as it was",
                        "edit the [[models]] entries by hand") from None
    wanted = {k: v for k, v in old.items() if k != "models"}
    if expect:
        wanted["models"] = expect
    if new != wanted:
        raise SpecError(f"{path}: the [[models]] entries are written in a form this edit cannot follow "
                        "(an inline array, or a header inside a string); the file was left as it was",
                        "edit the [[models]] entries by hand")
    return after


def with_model(path: Path, text: str, entry: dict[str, Any]) -> str:
    """``text`` with a ``[[models]]`` entry holding ``entry`` after the last one (or at the end)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    block = tomlkit.dumps({"models": [entry]}).splitlines(keepends=True)
    spans = _entries(lines)
    at = spans[-1][1] if spans else len(lines)
    before = ["\n"] if at > 0 and lines[at - 1].strip() else []
    after = ["\n"] if at < len(lines) and lines[at].strip() else []
    lines[at:at] = [*before, *block, *after]
    old = tomllib.loads(text).get("models", [])
    return _checked(path, text, "".join(lines), [*old, entry])


def without_model(path: Path, text: str, index: int) -> str:
    """``text`` without its ``index``-th ``[[models]]`` entry and the comment lines right above it."""
    lines = text.splitlines(keepends=True)
    spans = _entries(lines)
    if index >= len(spans):
        raise SpecError(f"{path}: the spec has no [[models]] entry number {index + 1}")
    start, end = spans[index]
    while start > 0 and lines[start - 1].strip() and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    if start > 0 and not lines[start - 1].strip() and (end == len(lines) or not lines[end].strip()):
        start -= 1  # one blank line separated it: do not leave two
    del lines[start:end]
    old = tomllib.loads(text).get("models", [])
    return _checked(path, text, "".join(lines), old[:index] + old[index + 1:])
