"""File locks (``flock``) that serialise the pipeline's writers and keep readers off half-finished work.

Locks are advisory ``flock`` locks on small lock files; the operating system releases them when the
holding process exits, however it exits (a crash or ``SIGKILL`` never leaves a lock behind). A lock
held by one process blocks every other process, whichever Dagster instance launched it, so they also
protect runs that bypass Dagster's run queue (``dagster job execute``, the CLI, a second
``DAGSTER_HOME``).

========================================== ========== ================================================
lock file                                  mode       held by
========================================== ========== ================================================
``<stage dir>/.pipeline.lock``             exclusive  a data stage while it builds (``exclusive_lock``)
``<run dir>/.run.lock``                    exclusive  ``training.engine.train()`` for the whole run:
                                                      completed-run check, training, bundle write
``<models dir>/.locks/.bundle-writes.lock`` exclusive  writing a bundle (name choice + rename)
``<models dir>/.locks/<bundle>.lock``      exclusive  verifying a bundle and writing its record
                                           shared     replay and backtest while they read the bundle
========================================== ========== ================================================

Bundle locks live outside the bundle directories (``.locks/`` is not named like a bundle, so
``bundles.list_bundles`` ignores it), because a bundle refuses files it does not list.

The exclusive holder writes ``pid host`` into the lock file and shared holders append theirs, so a
wait that times out names the process(es) holding the lock (:class:`LockTimeout`). Waiting is logged
once, naming the holder. The default wait is :data:`DEFAULT_TIMEOUT_S` (env ``SENTINEL_LOCK_TIMEOUT_S``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from sentinel_pipeline.atomic_io import pid_alive

log = logging.getLogger(__name__)

LOCKS_DIRNAME = ".locks"
RUN_LOCK_NAME = ".run.lock"
STAGE_LOCK_NAME = ".pipeline.lock"
BUNDLE_WRITES_LOCK_NAME = ".bundle-writes.lock"
# a training run of the full default market takes tens of minutes; a waiter must outlast it
DEFAULT_TIMEOUT_S = float(os.environ.get("SENTINEL_LOCK_TIMEOUT_S", 6 * 3600))
_POLL_S = 0.1


class LockTimeout(TimeoutError):
    """A lock could not be taken in time; the message names the lock file and its holder(s)."""


def _host() -> str:
    return socket.gethostname()




def lock_holders(path: str | Path) -> list[str]:
    """The holders recorded in a lock file (``"pid 123 on host"``), live ones only where that can be told."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out: list[str] = []
    here = _host()
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        pid, host, mode = int(parts[0]), parts[1], parts[2] if len(parts) > 2 else "exclusive"
        if host == here and not pid_alive(pid):
            continue  # a shared holder that has gone (its line stays until the next exclusive holder)
        text = f"pid {pid} on {host} ({mode})"
        if text not in out:
            out.append(text)
    return out


def _describe(path: Path) -> str:
    holders = lock_holders(path)
    return "held by " + ", ".join(holders) if holders else "held by another process"


@contextlib.contextmanager
def file_lock(
    path: str | Path,
    *,
    shared: bool = False,
    timeout_s: float | None = None,
    what: str | None = None,
) -> Iterator[Path]:
    """Hold an ``flock`` on the file ``path`` (created if missing) for the duration of the block.

    ``shared=True`` takes a shared (reader) lock: any number of shared holders at once, none while an
    exclusive holder has it. Waits up to ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`; 0: do not
    wait), then raises :class:`LockTimeout` naming the holder. ``what`` says in messages what the lock
    protects.
    """
    path = Path(path)
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    mode = "shared" if shared else "exclusive"
    label = f"{what} ({path})" if what else str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        if not shared or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:  # a reader on a read-only directory: an existing lock file can still be locked
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            # nobody can write there either
            log.warning("cannot create the lock file %s (%s): reading %s without a lock", path, exc.strerror,
                        what or path.parent)
            yield path
            return
    acquired = False
    try:
        flag = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, flag | fcntl.LOCK_NB)
                acquired = True
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"could not take the {mode} lock on {label} within {timeout:.0f}s: {_describe(path)}"
                ) from None
            if not waited:
                waited = True
                log.info("waiting for the %s lock on %s, %s", mode, label, _describe(path))
            time.sleep(_POLL_S)
        record = f"{os.getpid()} {_host()} {mode}\n".encode()
        if shared:
            with contextlib.suppress(OSError):
                _append(path, record)
        else:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
        if waited:
            log.info("took the %s lock on %s", mode, label)
        yield path
    finally:
        with contextlib.suppress(OSError):
            if acquired and not shared:
                os.ftruncate(fd, 0)  # still held: the next holders start from an empty record
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _append(path: Path, record: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, record)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(directory: str | Path, name: str = STAGE_LOCK_NAME, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the exclusive lock ``directory/name`` (a data stage's lock by default) for the block."""
    with file_lock(Path(directory) / name, timeout_s=timeout_s, what=f"stage {Path(directory).name}") as path:
        yield path


def run_dir_lock(run_dir: str | Path, *, shared: bool = False, timeout_s: float | None = None):
    """The lock of a training run directory (``<run dir>/.run.lock``): exclusive for ``train()``."""
    return file_lock(Path(run_dir) / RUN_LOCK_NAME, shared=shared, timeout_s=timeout_s,
                     what=f"training run {Path(run_dir).name}")


def bundle_lock_path(models_dir: str | Path, bundle_name: str) -> Path:
    """``<models dir>/.locks/<bundle>.lock``: outside the bundle, which refuses files it does not list."""
    if not bundle_name or "/" in bundle_name or bundle_name in (".", ".."):
        raise ValueError(f"invalid bundle name {bundle_name!r}")
    return Path(models_dir) / LOCKS_DIRNAME / f"{bundle_name}.lock"


def bundle_lock(bundle_dir: str | Path, *, shared: bool = False, timeout_s: float | None = None):
    """The lock of one bundle: exclusive to verify it and write its record, shared to read it."""
    bundle_dir = Path(bundle_dir)
    return file_lock(bundle_lock_path(bundle_dir.parent, bundle_dir.name), shared=shared, timeout_s=timeout_s,
                     what=f"bundle {bundle_dir.name}")


def bundle_writes_lock(models_dir: str | Path, *, timeout_s: float | None = None):
    """Serialises bundle writes into ``models_dir`` (the choice of a free name and the rename)."""
    return file_lock(Path(models_dir) / LOCKS_DIRNAME / BUNDLE_WRITES_LOCK_NAME, timeout_s=timeout_s,
                     what=f"bundle writes in {models_dir}")


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LockTimeout",
    "bundle_lock",
    "bundle_lock_path",
    "bundle_writes_lock",
    "exclusive_lock",
    "file_lock",
    "lock_holders",
    "run_dir_lock",
]
