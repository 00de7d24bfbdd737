"""Write files and directories so that a crash never leaves a half-written result.

Every artefact is written to a temporary sibling path first and renamed into place with
``os.replace`` (atomic on POSIX within one filesystem). A reader therefore sees either the old
complete file or the new complete file, never a partial one. The temporary file (or every file of a
temporary directory) is ``fsync``-ed before the rename and the parent directory after it, so the new
content is on disk once the rename is visible, even across a power cut.

Temporary names say who writes them: ``.<name>.tmp-<pid>-<host>-<random>`` (and ``.<name>.old-...``
for a directory being replaced). A writer killed mid-write leaves such a leftover behind;
:func:`sweep_stale_temps` removes the leftovers whose writer process is gone (never one whose writer
still runs, nor one written from another host, whose pid cannot be checked from here).

Disk-full, read-only and permission errors while writing raise :class:`WriteError` (an ``OSError``)
whose message says so in plain words and names the path. :func:`probe_writable` checks a directory
before a long job writes to it (creates and removes a probe file, optionally checks free space).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_MB = 1024 * 1024
# the plain words for the errno values a writer can do something about
_PLAIN: dict[int, str] = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# libraries that lose the errno keep the C library's text
_TEXTS: tuple[tuple[str, int], ...] = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS),
)
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.-]+)-(?P<rand>[0-9a-f]{8})$")


class WriteError(OSError):
    """An artefact could not be written: the disk is full, the file system is read-only, or permission
    was denied. ``str()`` is one plain sentence naming the path; ``errno`` is the underlying code."""

    def __init__(self, path: str | os.PathLike[str], code: int, *, needed_bytes: int | None = None,
                 detail: str | None = None) -> None:
        self.path = Path(path)
        self.needed_bytes = needed_bytes
        words = _PLAIN.get(code, os.strerror(code))
        extra: list[str] = []
        if code in (errno.ENOSPC, errno.EDQUOT):
            if needed_bytes:
                extra.append(f"needs ~{_mb(needed_bytes)}")
            free = _free_bytes(self.path)
            if free is not None:
                extra.append(f"{_mb(free)} free")
        if detail:
            extra.append(detail)
        message = f"cannot write {self.path}: {words}" + (f" ({', '.join(extra)})" if extra else "")
        super().__init__(code, message, str(self.path))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (worker processes), message kept as it was
        return (_rebuild_write_error, (str(self.path), self.errno, self.needed_bytes, self.message))


def _rebuild_write_error(path: str, code: int, needed_bytes: int | None, message: str) -> WriteError:
    err = WriteError(path, code, needed_bytes=needed_bytes)
    err.message = message
    return err


def _mb(n: int) -> str:
    return f"{n / _MB:.1f} MB" if n < 10 * _MB else f"{n / _MB:.0f} MB"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def write_error_code(exc: BaseException) -> int | None:
    """The disk-full / read-only / permission errno behind ``exc`` (its chain included), or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _PLAIN:
            return int(e.errno)
        text = str(e)
        for needle, code in _TEXTS:
            if needle in text:
                return code
        e = e.__cause__ or e.__context__
    return None


def _about_this_write(exc: BaseException, code: int, target: Path) -> bool:
    """A permission error counts as this write's only when it names no file or a file of the target's
    directory (a body that fails to *read* an input elsewhere keeps its own error)."""
    if code not in (errno.EACCES, errno.EPERM) or not isinstance(exc, OSError):
        return True
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    if not names:
        return True
    parent = target.parent.resolve()
    for n in names:
        p = Path(os.fsdecode(n)).resolve() if not isinstance(n, int) else None
        if p is not None and (p == parent or parent in p.parents or p == target.resolve()):
            return True
    return False


@contextlib.contextmanager
def plain_write_errors(target: str | os.PathLike[str], *, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a disk-full / read-only / permission ``OSError`` raised in the block into a :class:`WriteError`
    naming ``target``; anything else passes through unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        code = write_error_code(exc)
        if code is None or not _about_this_write(exc, code, Path(target)):
            raise
        raise WriteError(target, code, needed_bytes=needed_bytes) from exc


# -- writer identity and stale leftovers ----------------------------------------------------------


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:48] or "host"


def temp_sibling(path: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """A temp path next to ``path`` that names its writer (``.<name>.<kind>-<pid>-<host>-<rand>``), so that
    :func:`sweep_stale_temps` can tell a dead writer's leftover from a live one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}")


_tmp_sibling = temp_sibling


def temp_writer(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(pid, host) of the writer of a temp path of this module, or None for any other name."""
    m = TEMP_RE.match(Path(path).name)
    return (int(m["pid"]), m["host"]) if m else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real writer pid: never treat it as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep_stale_temps(directory: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Remove the temp leftovers (``.<name>.tmp-<pid>-<host>-*``) in ``directory`` whose writer is gone.

    A leftover is removed only when it was written on this host and its pid no longer runs; a live
    writer's, another host's and any name this module does not write are left alone. A dead writer's
    ``.<name>.old-*`` (a directory it was replacing) is removed when ``<name>`` exists and renamed back
    to ``<name>`` when it does not (the writer died between its two renames). ``recursive`` also sweeps
    the subdirectories. Returns the paths removed or restored. Safe to call from several processes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    here = _host_tag()
    done: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for p in entries:
        m = TEMP_RE.match(p.name)
        if m is None:
            if recursive and p.is_dir() and not p.is_symlink():
                done += sweep_stale_temps(p, recursive=True)
            continue
        if m["host"] != here or pid_alive(int(m["pid"])):
            continue
        target = p.with_name(m["name"])
        try:
            if m["kind"] == "old" and not target.exists():
                os.replace(p, target)
                _fsync_dir(directory)
                log.warning("restored %s from %s (its writer, pid %s, died while replacing it)", target, p.name,
                            m["pid"])
            else:
                _remove(p)
                log.info("removed stale temp %s (its writer, pid %s, is gone)", p, m["pid"])
        except FileNotFoundError:
            continue  # another sweeper got there first
        done.append(p)
    return done


# -- durability -------------------------------------------------------------------------------------


def _fsync_fd_of(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_fd_of(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_tree(path: Path) -> None:
    """fsync ``path`` (a file), or every file and directory under it (a directory), before a rename."""
    if path.is_symlink():
        return
    if not path.is_dir():
        _fsync_fd_of(path, os.O_RDONLY)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                _fsync_fd_of(p, os.O_RDONLY)
        _fsync_dir(Path(root))


# -- atomic writes ----------------------------------------------------------------------------------


def _mkdir_parent(target: Path) -> None:
    with plain_write_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it, rename it onto ``path`` and fsync
    the directory.

    On an exception the temporary file is removed and ``path`` is left untouched. A disk-full,
    read-only or permission error becomes a :class:`WriteError` naming ``path``.
    """
    target = Path(path)
    _mkdir_parent(target)
    tmp = _tmp_sibling(target, "tmp")
    try:
        with plain_write_errors(target):
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"atomic write of {target}: nothing was written to {tmp}")
            _fsync_tree(tmp)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success fsync its files, rename it to ``path`` and fsync the parent.

    With ``overwrite=True`` an existing directory at ``path`` is replaced (the old one is moved
    aside first and removed after the new one is in place). On an exception the temporary
    directory is removed and nothing appears at ``path``. A disk-full, read-only or permission error
    becomes a :class:`WriteError` naming ``path``.
    """
    target = Path(path)
    _mkdir_parent(target)
    tmp = _tmp_sibling(target, "tmp")
    try:
        with plain_write_errors(target):
            tmp.mkdir()
            yield tmp
            _fsync_tree(tmp)
            if target.exists():
                if not overwrite:
                    raise FileExistsError(f"{target} already exists")
                old = _tmp_sibling(target, "old")
                os.replace(target, old)
                os.replace(tmp, target)
                _fsync_dir(target.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
                _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


# -- probing a directory before a long job -----------------------------------------------------------


def probe_writable(directory: str | os.PathLike[str], *, needed_bytes: int | None = None,
                   what: str = "directory") -> Path:
    """Fail fast, in plain words, when ``directory`` cannot take the artefacts a job is about to write.

    Creates ``directory`` (and its parents) when missing, then creates, writes, fsyncs and removes a
    probe file in it; with ``needed_bytes``, also refuses a file system with less free space than that.
    Raises :class:`WriteError` (disk full, read-only, permission denied) naming ``directory``.
    """
    directory = Path(directory)
    with plain_write_errors(directory, needed_bytes=needed_bytes):
        directory.mkdir(parents=True, exist_ok=True)
        probe = _tmp_sibling(directory / "write-probe", "tmp")
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    if needed_bytes:
        free = _free_bytes(directory)
        if free is not None and free < needed_bytes:
            raise WriteError(directory, errno.ENOSPC, needed_bytes=needed_bytes, detail=f"checked before the {what} "
                             "was written")
    return directory


__all__ = [
    "WriteError",
    "atomic_dir",
    "atomic_path",
    "plain_write_errors",
    "probe_writable",
    "sweep_stale_temps",
    "temp_writer",
    "write_error_code",
    "write_json_atomic",
    "write_text_atomic",
]
