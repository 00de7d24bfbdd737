"""Reading files that must be regular files: no symlink is followed, no FIFO or device is opened.

Used wherever a file an attacker may have replaced is read (bundle files, records, scaler parameters):
``O_NOFOLLOW`` on open, and the file type is checked on the opened descriptor, so a swap between a
check and the read cannot redirect it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


class UnsafeFileError(ValueError):
    """A path that must be a regular file is a symlink, a directory, a device, ... (message names it)."""


def _open_no_follow(path: Path) -> int:
    """A read-only descriptor of ``path``; a symlink is refused (``O_NOFOLLOW``), a FIFO never blocks."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeFileError(f"{path}: is a symlink; bundle files must be regular files") from exc
        raise


def read_regular(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file and not a symlink (``O_NOFOLLOW``; the
    type is checked on the opened descriptor, so a swap after a check cannot redirect the read)."""
    path = Path(path)
    fd = _open_no_follow(path)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path}: not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafeFileError(f"{path}: {st.st_size} bytes, more than the {max_bytes} allowed")
        return fh.read()


def sha256_regular(path: str | Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex, size) of a regular, non-symlink file (same rules as :func:`read_regular`)."""
    path = Path(path)
    fd = _open_no_follow(path)
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UnsafeFileError(f"{path}: not a regular file")
        while block := fh.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
