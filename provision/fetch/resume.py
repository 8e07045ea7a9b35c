"""Whether a kept partial may be resumed: only from the source it came from, and only when the server
proves the content is the same.

A download writes where its bytes came from (a hash of the URL it was asked for) and the validator
the server sent with them (a strong ETag, else Last-Modified) into an extended attribute of its
temporary file, as soon as the first answer arrives; the attribute moves with the file when it is
kept as a partial or adopted after a crash. A resume then asks ``Range`` with ``If-Range: <validator>``,
so a server whose file changed answers the whole file instead of a spliced tail. Without a validator,
a partial is resumed only when the expected sha256 is known in advance (a splice fails the check and
is retried from zero); a partial of another source, or of unknown origin, is started over.
Where the filesystem keeps no extended attributes, nothing is proven: downloads start over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

ATTR = "user.forge-volume.origin"


def source_id(url: str) -> str:
    """What names a source without holding it (a URL may carry a token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def validator_of(headers: Mapping[str, str]) -> str | None:
    """The validator ``If-Range`` may carry: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag", "")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified") or None


@dataclass
class Origin:
    source: str
    validator: str | None = None

    def write(self, fd: int) -> None:
        # Without extended attributes here, the partial will not be resumed unless a sha256 is known.
        with contextlib.suppress(OSError):
            os.setxattr(fd, ATTR, json.dumps({"source": self.source, "validator": self.validator}).encode())


def read(fd: int) -> Origin | None:
    try:
        data = json.loads(os.getxattr(fd, ATTR))
        return Origin(str(data["source"]), data.get("validator"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def may_resume(fd: int, url: str, sha256: str | None) -> tuple[bool, str | None]:
    """Whether the partial open as ``fd`` may be resumed for ``url``, and the validator to send with it."""
    origin = read(fd)
    if origin is not None and origin.source != source_id(url):
        return False, None
    if origin is not None and origin.validator:
        return True, origin.validator
    return sha256 is not None, None
