"""provision.boot.unpack's read of files.bin: around the page cache (O_DIRECT) where the file system allows it,
in aligned pieces from chunks that start and end anywhere, and the same bytes either way."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from provision.boot import unpack
from provision.boot.boot_set import WINDOW, resident_ranges
from provision.boot.plan import Chunk, File

SIZE = 3 * unpack.PIECE + 12345  # pieces, and a tail that is not a whole block


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Path, bytes, int]]:
    data = os.urandom(SIZE)
    path = tmp_path / "files.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield path, data, fd
    finally:
        os.close(fd)


def _direct(path: Path, fd: int) -> int:
    direct = unpack.open_direct(str(path), fd)
    if direct is None:
        pytest.skip(f"{path.parent}'s file system refuses O_DIRECT reads")
    return direct


def _uncached(path: Path, fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_ranges(path):
        pytest.skip(f"{path.parent}'s file system keeps the file's pages cached")


@pytest.mark.parametrize(("position", "end"), [
    (0, SIZE), (1, 100), (4095, 4097), (4096, unpack.PIECE + 1), (unpack.PIECE - 5, 2 * unpack.PIECE + 7),
    (3 * unpack.PIECE + 100, SIZE), (SIZE - 1, SIZE),
])
def test_a_direct_read_gives_the_bytes_from_any_position_to_at_most_the_end(
        archive: tuple[Path, bytes, int], position: int, end: int) -> None:
    path, data, fd = archive
    direct = _direct(path, fd)
    try:
        got = bytes(unpack._Pieces(direct, end - position, direct=True).read(position, end))
    finally:
        os.close(direct)
    assert got and got == data[position:position + len(got)] and position + len(got) <= end
    assert len(got) >= min(end - position, unpack.PIECE - position % unpack.ALIGN)  # a whole piece when there is one


def test_a_chunk_unpacked_around_the_page_cache_leaves_none_of_files_bin_in_it(
        archive: tuple[Path, bytes, int], tmp_path: Path) -> None:
    path, data, fd = archive
    _uncached(path, fd)
    direct = _direct(path, fd)
    # A chunk that starts and ends off the blocks, its files across the pieces' edges.
    offset, sizes = 777, [5, unpack.PIECE, 3, 2 * unpack.PIECE - 1000, 0, 4096]
    files, at = [], offset
    for i, size in enumerate(sizes):
        files.append(File(folder="", name=f"f{i}", offset=at, size=size, mtime=1_700_000_000_000_000_000, mode=0o644))
        at += size
    chunk = Chunk(offset=offset, length=at - offset, digest=hashlib.sha256(data[offset:at]).hexdigest(), start=offset,
                  files=files)
    out = tmp_path / "out"
    out.mkdir()
    folder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert unpack._unpack(chunk, {"": folder}, direct, direct=True) == chunk.length
    finally:
        os.close(folder)
        os.close(direct)
    for f in files:
        assert (out / f.name).read_bytes() == data[f.offset:f.offset + f.size]
    assert resident_ranges(path) == []  # read once, into the copy: not a second time into memory


def test_a_chunk_whose_bytes_differ_fails_read_around_the_cache_too(archive: tuple[Path, bytes, int],
                                                                    tmp_path: Path) -> None:
    path, _data, fd = archive
    direct = _direct(path, fd)
    chunk = Chunk(offset=10, length=5000, digest=hashlib.sha256(b"not these").hexdigest(), start=10,
                  files=[File(folder="", name="f", offset=10, size=5000, mtime=0, mode=0o644)])
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(unpack.Corrupt, match="does not match its digest"):
            unpack._unpack(chunk, {"": folder}, direct, direct=True)
    finally:
        os.close(folder)
        os.close(direct)


def test_o_direct_is_used_only_on_the_very_file_the_lay_out_checked(archive: tuple[Path, bytes, int],
                                                                     tmp_path: Path) -> None:
    _path, _data, fd = archive
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 8192)
    assert unpack.open_direct(str(other), fd) is None  # swapped between the two opens: not this one
    assert unpack.open_direct(str(tmp_path / "missing.bin"), fd) is None


def _frame_chunk(tmp_path: Path, content: bytes, stored: bytes, sizes: list[int]) -> tuple[Chunk, Path]:
    """files.bin holding ``stored`` after 777 bytes of another chunk, recorded as one chunk of files of ``sizes``
    (their bytes: ``content``'s), which begin at 5000 in the unpacked bytes."""
    path = tmp_path / "files.bin"
    path.write_bytes(b"p" * 777 + stored)
    files, at = [], 5000
    for i, size in enumerate(sizes):
        files.append(File(folder="", name=f"f{i}", offset=at, size=size, mtime=1_700_000_000_000_000_000, mode=0o644))
        at += size
    return Chunk(offset=777, length=len(stored), digest=hashlib.sha256(stored).hexdigest(), files=files,
                 raw=len(content), start=5000), path


def _unpack_into(tmp_path: Path, chunk: Chunk, path: Path, direct: bool) -> int:
    out = tmp_path / "out"
    out.mkdir()
    folder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.open(path, os.O_RDONLY)
    reader = _direct(path, fd) if direct else fd
    try:
        return unpack._unpack(chunk, {"": folder}, reader, direct=direct)
    finally:
        os.close(folder)
        os.close(fd)
        if reader != fd:
            os.close(reader)


@pytest.mark.parametrize("direct", [False, True])
def test_a_compressed_chunk_unpacks_to_its_files(tmp_path: Path, direct: bool) -> None:
    sizes = [5, unpack.PIECE, 0, 3 * unpack.PIECE - 1000, 4096]  # across the pieces' edges, read and unpacked
    content = b"".join(os.urandom(64) * (size // 64) + os.urandom(size % 64) for size in sizes)
    stored = zstandard.ZstdCompressor(level=6).compress(content)
    chunk, path = _frame_chunk(tmp_path, content, stored, sizes)

    assert _unpack_into(tmp_path, chunk, path, direct) == len(content)

    at = 0
    for f, size in zip(chunk.files, sizes, strict=True):
        assert (tmp_path / "out" / f.name).read_bytes() == content[at:at + size]
        assert (tmp_path / "out" / f.name).stat().st_mtime_ns == f.mtime
        at += size


@pytest.mark.parametrize(("case", "why"), [
    ("more than recorded", "unpacks to more than 100 bytes"),
    ("fewer than recorded", "unpacks to 50 bytes, not 100"),
    ("a window larger than a chunk's", "does not unpack (zstd decompress error: Frame requires too much memory"),
    ("not a frame", "does not unpack"),
])
def test_a_frame_that_lies_about_its_files_fails_with_nothing_larger_than_recorded(tmp_path: Path, case: str,
                                                                                      why: str) -> None:
    """files.bin and its index are written by whoever writes the volume: the digests match here (a consistent
    lie), so only the frame's own bytes say what is wrong."""
    recorded = [40, 60]
    content = bytes(100)
    if case == "more than recorded":
        stored = zstandard.ZstdCompressor().compress(bytes(unpack.PIECE + 1))
    elif case == "fewer than recorded":
        stored = zstandard.ZstdCompressor().compress(bytes(50))
    elif case == "a window larger than a chunk's":  # it would take 32 MiB in each of the lay-out's threads
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=WINDOW.bit_length() + 2)
        stored = zstandard.ZstdCompressor(compression_params=params).compress(bytes(WINDOW * 4))
    else:
        stored = b"not zstd at all" * 10
    chunk, path = _frame_chunk(tmp_path, content, stored, recorded)

    with pytest.raises(unpack.Corrupt, match="files.bin's chunk at 777 " + re.escape(why)):
        _unpack_into(tmp_path, chunk, path, direct=False)

    for f, size in zip(chunk.files, recorded, strict=True):
        written = tmp_path / "out" / f.name
        assert not written.exists() or written.stat().st_size <= size


def test_a_damaged_frame_is_named_by_its_digest(tmp_path: Path) -> None:
    content = os.urandom(1000) * 300
    stored = bytearray(zstandard.ZstdCompressor().compress(content))
    digest = hashlib.sha256(stored).hexdigest()
    stored[len(stored) // 2] ^= 0x55  # a disk error: the frame usually stops there, before the digest is known
    chunk, path = _frame_chunk(tmp_path, content, bytes(stored), [len(content)])
    chunk.digest = digest

    damaged = f"files.bin does not match its digest (bytes 777-{777 + len(stored)})"
    with pytest.raises(unpack.Corrupt, match=re.escape(damaged)):
        _unpack_into(tmp_path, chunk, path, direct=False)
