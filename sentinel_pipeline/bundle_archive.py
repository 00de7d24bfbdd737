"""Reading ``model_final.zip``: the safe unpacking of a bundle archive into a private directory.

A bundle archive (written by :mod:`sentinel_pipeline.package`) holds a bundle's ``manifest.json``,
``manifest.sig`` and every file the manifest lists, flat (no folders), nothing else. Anyone may hand
us such a file, so it is unpacked member by member with the stdlib ``zipfile`` and these rules; each
refusal (:class:`ArchiveError`) names the archive and the member:

- names: no path traversal (a ``..`` component, with ``/`` or ``\\`` as separator), no absolute names
  (``/x``, ``\\x``, ``\\\\server\\x``, ``C:\\x`` or ``C:x``), no NUL, no folders at all (bundle files are
  flat), no two members with the same name (or names equal up to case);
- types: regular files only: a member whose Unix mode (``external_attr``) is a symlink, a directory,
  a device or a FIFO, an MS-DOS directory entry or an encrypted member is refused; only the stored and
  deflate methods are read (bzip2 and lzma are refused: CPython decompresses their blocks without an
  output bound);
- sizes (zip bombs): at most :attr:`ArchiveLimits.max_members` members, each declaring at most
  ``max_member_bytes``, all together at most ``max_total_bytes``, and a compression ratio of at most
  ``max_ratio`` for members above ``ratio_floor_bytes``. Declared sizes can lie, so the caps are
  enforced again on the bytes actually inflated: reading stops and refuses as soon as a member yields
  more than it declared (or than a cap allows), and a member that yields fewer bytes is refused too;
- contents: ``manifest.json`` must be present and every member must be the manifest, its signature or
  a file the manifest lists. Whether the files match the manifest, and the manifest its signature,
  is then checked on the unpacked directory by the same code as for any bundle directory.

``ZipFile.extractall`` is not used: it sanitises names silently (``../x`` becomes ``x``, ``/x``
becomes ``x``) instead of refusing them, follows no size cap, and writes whatever member types the
archive declares, so these checks are hand-written here on top of ``zipfile``'s member reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sentinel_pipeline.signing import MANIFEST_NAME, MAX_SMALL_FILE, SIGNATURE_NAME

ARCHIVE_NAME = "model_final.zip"
ARCHIVE_SUFFIX = ".zip"
ALLOWED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_CHUNK = 1 << 20
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# the zip comment names the bundle (information only: it names the private unpacking directory)
_COMMENT_NAME_RE = re.compile(r"^[A-Za-z0-9_]+(?:__[A-Za-z0-9]+)*$")


class ArchiveError(ValueError):
    """A bundle archive refused (the message names the archive, the member and the rule)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps against zip bombs. Today's bundles are a few MB (the largest member is the checkpoint);
    the caps leave two orders of magnitude for larger models and ONNX files."""

    max_members: int = 256
    max_member_bytes: int = 1 << 30  # 1 GiB per member
    max_total_bytes: int = 2 << 30  # 2 GiB unpacked in all
    max_ratio: float = 100.0  # uncompressed / compressed; weights compress ~1.1x, logs and JSON ~5-20x
    ratio_floor_bytes: int = 1 << 20  # members smaller than this are not held to the ratio


DEFAULT_LIMITS = ArchiveLimits()


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a bundle archive (a ``.zip`` that is not a directory) rather than a bundle
    directory."""
    p = Path(path)
    return p.suffix.lower() == ARCHIVE_SUFFIX and not p.is_dir()


def name_problem(name: str) -> str | None:
    """Why a member name could point outside the directory it is unpacked into (None: it cannot)."""
    if not name or "\x00" in name:
        return "empty name or a NUL byte in the name"
    if name.startswith(("/", "\\")) or _DRIVE_RE.match(name):
        return "absolute name"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "path traversal ('..' in the name)"
    return None


def flat_problem(name: str) -> str | None:
    """Why a member name is not flat (None: a plain file name; a bundle's files have no folders)."""
    if len(re.split(r"[/\\]", name)) > 1 or name == ".":
        return "a name with folders (a bundle's files are flat)"
    return None


def type_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member is not a plain regular file (None: it is one)."""
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "a symlink"
    if info.filename.endswith("/") or kind == stat.S_IFDIR or info.external_attr & 0x10:
        return "a directory entry"
    if kind not in (0, stat.S_IFREG):
        return f"not a regular file (mode {mode:#o})"
    if info.flag_bits & 0x1:
        return "encrypted"
    if info.compress_type not in ALLOWED_METHODS:
        return f"compression method {info.compress_type} (only stored and deflate are read)"
    return None


def size_problem(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    """Why a member's declared sizes are refused (None: within the caps)."""
    if info.file_size > limits.max_member_bytes:
        return f"declares {info.file_size} bytes, more than the {limits.max_member_bytes} allowed per member"
    if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        return (f"compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 ({info.compress_size} -> "
                f"{info.file_size} bytes) above the {limits.max_ratio:.0f}:1 allowed (a zip bomb)")
    return None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, cap: int, sink) -> int:  # noqa: ANN001
    """Inflate one member into ``sink`` (a callable taking bytes), at most ``cap`` bytes and exactly the
    size it declares; returns the byte count. The count is enforced here, on what is actually read,
    whatever the headers say."""
    member = f"{where}: member {info.filename!r}"
    limit = min(cap, info.file_size)
    n = 0
    try:
        with zf.open(info) as src:
            while block := src.read(min(_CHUNK, limit - n + 1)):
                n += len(block)
                if n > limit:
                    raise ArchiveError(f"{member} inflates to more than {limit} bytes (declared {info.file_size}, "
                                       f"cap {cap}): refused (a zip bomb, or a lying header)")
                sink(block)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        raise ArchiveError(f"{member}: cannot be read: {type(exc).__name__}: {exc}") from exc
    if n != info.file_size:
        raise ArchiveError(f"{member} holds {n} bytes, its header declares {info.file_size}: refused")
    return n


class _Archive:
    """An open archive whose member list passed every rule on names, types, declared sizes and
    manifest membership (:meth:`check`)."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, limits: ArchiveLimits) -> None:
        self.path, self.zf, self.limits = path, zf, limits
        self.members: list[zipfile.ZipInfo] = []
        self.manifest_files: dict[str, object] = {}

    def refuse(self, info: zipfile.ZipInfo | str | None, why: str) -> ArchiveError:
        name = info.orig_filename if isinstance(info, zipfile.ZipInfo) else info
        return ArchiveError(f"{self.path}: " + (f"member {name!r}: " if name is not None else "") + why
                            + ": archive refused")

    def check(self) -> None:
        infos = self.zf.infolist()
        if len(infos) > self.limits.max_members:
            raise self.refuse(None, f"{len(infos)} members, more than the {self.limits.max_members} allowed")
        seen: dict[str, str] = {}
        total = 0
        for info in infos:
            # ZipInfo cuts a name at its first NUL: judge the name as stored (orig_filename) too
            problem = name_problem(info.orig_filename) or name_problem(info.filename) or type_problem(info) \
                or flat_problem(info.filename) or size_problem(info, self.limits)
            if problem:
                raise self.refuse(info, problem)
            key = info.filename.casefold()
            if key in seen:
                raise self.refuse(info, f"duplicate name (also member {seen[key]!r})")
            seen[key] = info.filename
            total += info.file_size
            if total > self.limits.max_total_bytes:
                raise self.refuse(info, f"members declare {total} bytes in all, more than the "
                                        f"{self.limits.max_total_bytes} allowed")
        self.members = infos
        manifest_info = next((i for i in infos if i.filename == MANIFEST_NAME), None)
        if manifest_info is None:
            raise self.refuse(None, f"no {MANIFEST_NAME}: not a bundle archive")
        chunks: list[bytes] = []
        _read_member(self.zf, manifest_info, str(self.path), MAX_SMALL_FILE, chunks.append)
        try:
            manifest = json.loads(b"".join(chunks))
            files = manifest["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a mapping")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise self.refuse(manifest_info, f"unreadable manifest: {exc}") from exc
        self.manifest_files = files
        allowed = {MANIFEST_NAME, SIGNATURE_NAME, *files}
        for info in infos:
            if info.filename not in allowed:
                raise self.refuse(info, f"not listed in the archive's {MANIFEST_NAME}")

    def extract_to(self, dest: Path) -> None:
        """Write every member into ``dest`` (new files only, never through a symlink), the caps enforced
        on the bytes actually inflated."""
        total = 0
        for info in self.members:
            cap = min(self.limits.max_member_bytes, self.limits.max_total_bytes - total)
            fd = os.open(dest / info.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                total += _read_member(self.zf, info, str(self.path), cap, out.write)


@contextlib.contextmanager
def _open_archive(archive: str | os.PathLike[str], limits: ArchiveLimits) -> Iterator[_Archive]:
    path = Path(archive)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ArchiveError(f"{path}: {exc.strerror or exc}: archive refused") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{path}: not a regular file (a symlink or a special file): archive refused")
    if st.st_size > limits.max_total_bytes + (16 << 20):
        raise ArchiveError(f"{path}: {st.st_size} bytes, larger than any archive within the caps: archive refused")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            raise ArchiveError(f"{path}: not a readable zip archive ({exc}): archive refused") from exc
        with zf:
            archive_obj = _Archive(path, zf, limits)
            archive_obj.check()
            yield archive_obj


def inspect_archive(archive: str | os.PathLike[str], limits: ArchiveLimits = DEFAULT_LIMITS) -> list[str]:
    """The member names of an archive that passes every rule (in archive order), reading only its
    manifest; :class:`ArchiveError` otherwise."""
    with _open_archive(archive, limits) as arc:
        return [i.filename for i in arc.members]


def unpack_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str],
                   limits: ArchiveLimits = DEFAULT_LIMITS) -> Path:
    """Unpack a bundle archive into the new directory ``dest`` (mode 0700; it must not exist) after the
    rules of the module docstring; returns ``dest``. On a refusal ``dest`` is removed again."""
    dest = Path(dest)
    with _open_archive(archive, limits) as arc:
        dest.mkdir(mode=0o700)
        try:
            arc.extract_to(dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


@contextlib.contextmanager
def unpacked_bundle(archive: str | os.PathLike[str], limits: ArchiveLimits = DEFAULT_LIMITS) -> Iterator[Path]:
    """The archive unpacked (the rules of :func:`unpack_archive`) into a private temporary directory
    (mode 0700, removed on exit); yields the bundle directory inside it, named by the archive's comment
    when that looks like a bundle name (information only), else by the archive's stem."""
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-bundle-"))
    try:
        with _open_archive(archive, limits) as arc:
            comment = arc.zf.comment.decode("ascii", errors="replace")
            name = comment if _COMMENT_NAME_RE.match(comment) and len(comment) <= 200 else (
                re.sub(r"[^A-Za-z0-9_.-]", "_", Path(archive).stem).lstrip(".") or "bundle")
            dest = tmp / name
            dest.mkdir(mode=0o700)
            arc.extract_to(dest)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def bundle_directory(path: str | os.PathLike[str], limits: ArchiveLimits = DEFAULT_LIMITS) -> Iterator[Path]:
    """A bundle directory for ``path``: the directory itself, or an archive unpacked into a private
    temporary directory for the duration of the ``with`` block (for callers that only read the bundle
    inside it, e.g. ``with bundle_directory(p) as d: load_bundle(d)``)."""
    if is_archive(path):
        with unpacked_bundle(path, limits) as d:
            yield d
    else:
        yield Path(path)
