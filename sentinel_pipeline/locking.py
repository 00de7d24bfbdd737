"""An exclusive, process-wide lock on a pipeline instance's data directory.

Two runs at once (a manual run during the nightly one) are serialised on this lock for the stages
that write shared artefacts, so they cannot interleave writes; every write is atomic besides
(``atomic_io``), so a reader never sees a half-written file either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class LockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def exclusive_lock(directory: str | Path, name: str = ".pipeline.lock", timeout_s: float = 3600.0) -> Iterator[Path]:
    """Hold an ``flock`` on ``directory/name`` for the duration of the block (waits up to ``timeout_s``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"could not lock {path} within {timeout_s:.0f}s (another run holds it)") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
