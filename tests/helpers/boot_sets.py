"""Boot sets edited the ways a broken disk or a hostile writer of the volume would, for tests.

Written from the format as documented (``provision.boot.boot_set``), not with its code: ``index.json`` is
the index's compact JSON with ``,"seal":"<sha256 of the JSON>"`` before its last brace, and ``files.bin``
is cut in chunks of whole files, each listed in ``chunks`` with its length and sha256, and (version 3) stored
as one zstd frame, listed with the length of the files' bytes it unpacks to. ``load`` takes
the JSON as it is (sealed or not), ``save`` seals it again: the index is then one its writer meant.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import zstandard

from volume_layout import VolumeLayout

_SEAL = re.compile(rb',"seal":"[0-9a-f]{64}"\}\s*\Z')


def load(layout: VolumeLayout) -> dict[str, Any]:
    raw = layout.boot_set_index.read_bytes()
    sealed = _SEAL.search(raw)
    data: dict[str, Any] = json.loads(raw[:sealed.start()] + b"}" if sealed else raw)
    return data


def save(layout: VolumeLayout, data: dict[str, Any]) -> None:
    body = json.dumps(data, separators=(",", ":")).encode()
    layout.boot_set_index.write_bytes(body[:-1] + b',"seal":"' + hashlib.sha256(body).hexdigest().encode() + b'"}')


def add_file(layout: VolumeLayout, data: dict[str, Any], rel: str, content: bytes, *, mode: int = 0o644,
             listed: bool = True) -> None:
    """Append ``content`` to files.bin as the recorded file ``rel`` (in a chunk of its own, compressed as the
    index's version says), listed in its folder's recorded listing when ``listed`` and that folder is recorded."""
    compressed = data.get("version") == 3
    stored = zstandard.ZstdCompressor().compress(content) if compressed else content
    with open(layout.boot_set_archive, "ab") as archive:
        offset = archive.tell()
        archive.write(stored)
    if compressed:  # the files' offsets count in the unpacked bytes
        offset = sum(row[2] for row in data["chunks"])
    data["files"].append([rel, offset, len(content), 1_700_000_000_000_000_000, mode])
    if "chunks" in data:
        digest = hashlib.sha256(stored).hexdigest()
        data["chunks"].append([len(stored), digest, len(content)] if compressed else [len(stored), digest])
    folder, _, name = rel.rpartition("/")
    if listed and folder in data["dirs"]:
        data["dirs"][folder][1].append([name, "f", ""])


def list_entry(data: dict[str, Any], folder: str, name: str, kind: str, target: str = "") -> None:
    data["dirs"][folder][1].append([name, kind, target])


def as_version_2(layout: VolumeLayout, data: dict[str, Any]) -> None:
    """files.bin and ``data`` as a forge-volume before version 3 wrote them: each chunk's files' bytes as they are."""
    assert data["version"] == 3
    stored = layout.boot_set_archive.read_bytes()
    chunks, offset, raw = [], 0, bytearray()
    for length, _, unpacked in data["chunks"]:
        content = zstandard.ZstdDecompressor().decompress(stored[offset:offset + length], max_output_size=unpacked)
        assert len(content) == unpacked
        chunks.append([len(content), hashlib.sha256(content).hexdigest()])
        raw += content
        offset += length
    layout.boot_set_archive.write_bytes(bytes(raw))
    data["version"], data["chunks"] = 2, chunks
