"""Moving the original's models and extensions into this layout, so that a kill at any point loses nothing.

Every move is written to the journal (``.forge-volume/adopt/journal.json``) before the first one is
made, and each is carried out so that its state can be read back from the files alone:

- a file: hard-linked at its new path, then its old path atomically replaced by a relative symbolic
  link to the new one. At every instant the old path resolves to the same bytes (an original worker
  still running keeps reading it), and nothing is copied. Where hard links are refused, a rename
  takes their place (the old path is missing for that one instant).
- a folder (an extension): renamed, then the link made.

Running a move again finds what is done and does the rest, so a re-run never moves a file twice.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from provision.errors import AdoptError
from volume_layout import VolumeLayout

# Test hook: SIGKILL this process after that many moves (the suite proves a killed adopt finishes).
KILL_AFTER = "FORGE_VOLUME_TEST_KILL_AFTER_MOVES"


@dataclass(frozen=True)
class Move:
    src: str  # relative to the volume
    dest: str

    def as_dict(self) -> dict[str, str]:
        return {"src": self.src, "dest": self.dest}


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _link_back(src: Path, dest: Path) -> None:
    """Replace whatever is at ``src`` by a relative link to ``dest``, in one step."""
    tmp = src.with_name(f".{src.name}.adopt-link")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(dest, src.parent), target_is_directory=dest.is_dir())
    os.replace(tmp, src)


def done(layout: VolumeLayout, move: Move) -> bool:
    src, dest = layout.root / move.src, layout.root / move.dest
    return src.is_symlink() and dest.exists() and src.resolve() == dest.resolve()


def apply(layout: VolumeLayout, move: Move) -> bool:
    """Carry out one move (or finish it); False when it was already done."""
    src, dest = layout.root / move.src, layout.root / move.dest
    if done(layout, move):
        return False
    if src.is_symlink():
        raise AdoptError(f"{move.src} is now a link to {os.readlink(src)}, not to {move.dest} where adopt moves it",
                         f"put the file back at {move.src}, then run `forge-volume adopt` again")
    if not src.exists() and not dest.exists():
        raise AdoptError(f"{move.src} is gone and {move.dest} is not there either",
                         f"put the file back at {move.src}, then run `forge-volume adopt` again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
        if os.path.lexists(dest):
            if not (src.is_file() and _same_file(src.stat(), dest.stat())):
                raise AdoptError(f"{move.dest} already exists, and {move.src} would move there",
                                 "move one of them out of the way (they are different files), then run "
                                 "`forge-volume adopt` again")
        elif src.is_dir():
            os.rename(src, dest)
        else:
            try:
                os.link(src, dest)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise AdoptError(f"{move.src} and {move.dest} are on different file systems",
                                     "adopt moves files within one volume; mount the whole volume at one path") \
                        from None
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                    raise
                os.rename(src, dest)  # no hard links here: a rename is still no copy
    _link_back(src, dest)
    return True


def apply_all(layout: VolumeLayout, moves: list[Move]) -> int:
    """Carry out every move in order; returns how many were (finished) now."""
    limit = int(os.environ.get(KILL_AFTER) or 0)
    count = 0
    for move in moves:
        if apply(layout, move):
            count += 1
            if limit and count >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
    return count
