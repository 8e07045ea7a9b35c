"""Reading the JSON examples out of docs/api, for the tests that keep them true.

A page marks its examples with the fence's info string:
  ```json request            a body a client POSTs to /run or /runsync; the worker must accept it
  ```json request invalid    a body the worker must refuse, with the error its response shows
  ```json response           what comes back for the request above it
  ```json response unrecorded   the same, for a route no recording of Forge covers
  ```json progress           a progress report as /status shows it while a job runs
Plain ```json fences are only checked for being valid JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
API = DOCS / "api"
RESPONSES = ROOT / "tests" / "data" / "forge" / "responses"

FENCE = re.compile(r"^```json([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
KINDS = ("", "request", "request invalid", "response", "response unrecorded", "progress")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    kind: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def data(self) -> Any:
        return json.loads(self.text)


@dataclass(frozen=True)
class Example:
    """A request and the responses documented for it."""

    request: Block
    responses: tuple[Block, ...]


def pages() -> list[Path]:
    return sorted(API.rglob("*.md"))


def call_pages() -> list[Path]:
    """Pages that document one call (not the index or the jobs page)."""
    return sorted([*API.glob("forge/*.md"), *API.glob("helper/*.md")])


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, match.group(1).strip(), match.group(2)))
    return found


def examples(page: Path) -> list[Example]:
    out: list[Example] = []
    request: Block | None = None
    responses: list[Block] = []
    for block in blocks(page):
        if block.kind.startswith("request"):
            if request is not None:
                out.append(Example(request, tuple(responses)))
            request, responses = block, []
        elif block.kind.startswith("response"):
            assert request is not None, f"{block.where}: a response example with no request before it"
            responses.append(block)
    if request is not None:
        out.append(Example(request, tuple(responses)))
    return out


def all_examples() -> list[Example]:
    return [example for page in pages() for example in examples(page)]


@cache
def recordings() -> tuple[dict[str, Any], ...]:
    """Forge's recorded exchanges (read once; do not modify them)."""
    return tuple(json.loads(p.read_text(encoding="utf-8")) | {"file": p.name} for p in sorted(RESPONSES.glob("*.json")))


def matches(doc: Any, real: Any) -> bool:
    """Whether a documented value is the real one, allowing the docs' two abbreviations: a long string
    (a base64 image) cut to its first characters plus "...", and a long list cut to its first items."""
    if isinstance(doc, str) and isinstance(real, str):
        if doc == real:
            return True
        return doc.endswith("...") and len(doc) >= 13 and real.startswith(doc[:-3]) and len(real) > len(doc)
    if isinstance(doc, list) and isinstance(real, list):
        if len(doc) > len(real) or (not doc and real):
            return False
        return all(matches(d, r) for d, r in zip(doc, real, strict=False))
    if isinstance(doc, dict) and isinstance(real, dict):
        return doc.keys() == real.keys() and all(matches(doc[k], real[k]) for k in doc)
    if isinstance(doc, bool) or isinstance(real, bool):
        return doc is real
    return bool(doc == real)
