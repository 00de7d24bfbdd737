"""Shipping a verified bundle as one archive: ``python -m sentinel_pipeline.package``.

Example::

    python -m sentinel_pipeline.package --bundle-dir models/mlp_two_head__20240102T000000Z__0123456789abcdef
    # -> models/archives/mlp_two_head__20240102T000000Z__0123456789abcdef/model_final.zip

:func:`package_bundle` refuses (:class:`PackageError`, naming the bundle and why) a bundle that fails
the trust checks every reader applies (``bundles.trusted_bundle_problems``: the signature of
``manifest.json`` by a key in the trusted-keys directory outside the bundle, the entry rule, every
file's sha256 against the manifest, the records area), and, with ``verified_manifest_sha256`` (the
Dagster asset passes the digest of the passing ``bundle_verified`` evaluation) or
``require_verified`` (a signed passing verification record, as ``verification.require_verified``),
a bundle whose manifest is not the verified one.

The archive holds ``manifest.json``, ``manifest.sig`` and every file the manifest lists (so whatever a
family or a later format adds to the manifest, e.g. graph files or ``model.onnx``, travels without a
change here), flat, nothing else: records are not signed and stay behind. The manifest and signature
are read once and their signature checked on those very bytes; each file is hashed while it is
copied in, and a file that no longer matches the manifest aborts the write. It is deterministic: the
manifest, the signature, then the files in name order, every member dated 1980-01-01 00:00:00 with
mode 0644, deflate level 6 and the bundle name as the archive comment, so one bundle gives the same
bytes every time (with the same zlib). It is written to a temporary sibling, checked with the same
unpacking rules :mod:`sentinel_pipeline.bundle_archive` applies when it is read back, and renamed into
place. ``python -m sentinel_pipeline.verify --bundle-dir X.zip`` verifies an archive directly.

Exit codes: 0 written, 1 the bundle was refused (the message names it and why), 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.bundle_archive import (
    ARCHIVE_NAME,
    DEFAULT_LIMITS,
    ArchiveError,
    ArchiveLimits,
    inspect_archive,
)
from sentinel_pipeline.safe_read import UnsafeFileError, read_regular, sha256_regular
from sentinel_pipeline.signing import (
    MANIFEST_NAME,
    MAX_SMALL_FILE,
    SIGNATURE_NAME,
    SignatureError,
    verify_signed_bytes,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
ARCHIVES_DIR = "archives"  # <models dir>/archives/<bundle>/model_final.zip (not named like a bundle)
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can record: no clock in the bytes
MEMBER_MODE = 0o100644  # a regular file, rw-r--r--
COMPRESS_LEVEL = 6
_CHUNK = 1 << 20


class PackageError(ValueError):
    """A bundle cannot be packaged (the message names the bundle and every reason)."""


@dataclass(frozen=True)
class PackagedBundle:
    path: Path  # the archive
    bundle_dir: Path
    size: int
    sha256: str
    members: tuple[str, ...]
    manifest_sha256: str


def default_archive_path(bundle_dir: str | os.PathLike[str]) -> Path:
    """``<models dir>/archives/<bundle name>/model_final.zip``: beside the bundle, outside it (a bundle
    refuses files it does not list)."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.parent / ARCHIVES_DIR / bundle_dir.name / ARCHIVE_NAME


def _member(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that the mode below is read as one
    info.external_attr = MEMBER_MODE << 16
    info.file_size = size  # lets zipfile decide on zip64 before the data is written
    return info


def _copy_file(zf: zipfile.ZipFile, bundle_dir: Path, name: str, entry: object) -> None:
    """Copy one manifest-listed file in, hashing what is written; refuse one that differs from the manifest."""
    try:
        size, digest = int(entry["size"]), str(entry["sha256"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{bundle_dir}: malformed manifest entry for {name}: {entry!r}") from exc
    h, n = hashlib.sha256(), 0
    try:  # no symlink followed, no FIFO waited on (a file swapped after the trust checks)
        fd = os.open(bundle_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise PackageError(f"{bundle_dir}: {name}: cannot be read: {exc}") from exc
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise PackageError(f"{bundle_dir}: {name}: not a regular file: not packaged")
        with zf.open(_member(name, size), "w") as dst:
            while block := src.read(_CHUNK):
                h.update(block)
                n += len(block)
                dst.write(block)
    if (n, h.hexdigest()) != (size, digest):
        raise PackageError(f"{bundle_dir}: {name} changed while it was packaged (size {n}, sha256 {h.hexdigest()}; "
                           f"manifest: {size}, {digest}): not packaged")


def package_bundle(
    bundle_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    trusted_keys: str | os.PathLike[str] | None = None,
    verified_manifest_sha256: str | None = None,
    require_verified: bool = False,
    expected_hash: str | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> PackagedBundle:
    """Write ``model_final.zip`` of a trusted bundle (module docstring) to ``out`` (default
    :func:`default_archive_path`), replacing an older one atomically; returns what was written."""
    from sentinel_pipeline.bundles import (  # torch: only once the arguments are known
        check_records,
        manifest_sha256,
        trusted_bundle_problems,
    )

    bundle_dir = Path(bundle_dir)
    target = Path(out) if out is not None else default_archive_path(bundle_dir)
    if target.resolve().is_relative_to(bundle_dir.resolve()):
        raise PackageError(f"{bundle_dir}: the archive {target} would be written inside the bundle, which "
                           "refuses files its manifest does not list: choose another --out")
    problems = trusted_bundle_problems(bundle_dir, trusted_keys, records=False)
    if problems:
        raise PackageError(f"{bundle_dir}: not packaged: bundle refused: " + "; ".join(problems))
    if verified_manifest_sha256 is not None and manifest_sha256(bundle_dir) != verified_manifest_sha256:
        raise PackageError(f"{bundle_dir}: not packaged: {MANIFEST_NAME} (sha256 {manifest_sha256(bundle_dir)}) is "
                           f"not the verified manifest (sha256 {verified_manifest_sha256}): the bundle changed "
                           "since verification")
    problems = check_records(bundle_dir)  # not shipped, but a records area of another manifest is refused
    if problems:
        raise PackageError(f"{bundle_dir}: not packaged: bundle refused: " + "; ".join(problems))
    if require_verified:
        from sentinel_pipeline.verification import require_verified as verified

        try:
            verified(bundle_dir, expected_hash, verified_manifest_sha256=verified_manifest_sha256,
                     trusted_keys=trusted_keys)
        except ValueError as exc:  # BundleNotVerifiedError
            raise PackageError(f"{bundle_dir}: not packaged: {exc}") from exc
    # read the manifest and its signature once: the bytes shipped are the bytes whose signature held
    try:
        manifest = read_regular(bundle_dir / MANIFEST_NAME, MAX_SMALL_FILE)
        signature = read_regular(bundle_dir / SIGNATURE_NAME, 1 << 16)
        verify_signed_bytes(manifest, signature, f"{bundle_dir}/{MANIFEST_NAME}", trusted_keys)
        files = json.loads(manifest)["files"]
    except (OSError, UnsafeFileError, SignatureError, UnicodeDecodeError, json.JSONDecodeError, KeyError,
            TypeError) as exc:
        raise PackageError(f"{bundle_dir}: not packaged: {exc}") from exc
    digest = hashlib.sha256(manifest).hexdigest()
    if verified_manifest_sha256 is not None and digest != verified_manifest_sha256:
        raise PackageError(f"{bundle_dir}: not packaged: {MANIFEST_NAME} (sha256 {digest}) is not the verified "
                           f"manifest (sha256 {verified_manifest_sha256}): the bundle changed since verification")
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as zf:
            zf.comment = bundle_dir.name.encode("utf-8")[:200]
            for name, data in ((MANIFEST_NAME, manifest), (SIGNATURE_NAME, signature)):
                zf.writestr(_member(name, len(data)), data)
            for name in sorted(files):
                _copy_file(zf, bundle_dir, name, files[name])
        try:  # what is shipped must open under the rules it will be read with
            members = inspect_archive(tmp, limits)
        except ArchiveError as exc:
            raise PackageError(f"{bundle_dir}: not packaged: the archive would be refused when read: {exc}") from exc
        sha, size = sha256_regular(tmp)
    return PackagedBundle(path=target, bundle_dir=bundle_dir, size=size, sha256=sha, members=tuple(members),
                          manifest_sha256=digest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sentinel-package",
        description="Write model_final.zip of a trusted bundle (signature, files and manifest checked first).",
    )
    p.add_argument("--bundle-dir", required=True, type=Path, help="the bundle directory")
    p.add_argument("--out", type=Path, help=f"the archive to write (default: <models dir>/{ARCHIVES_DIR}/<bundle>/"
                   f"{ARCHIVE_NAME})")
    p.add_argument("--trusted-keys", type=Path,
                   help="directory of trusted public keys (*.pub); default $SENTINEL_TRUSTED_KEYS or "
                   "~/.config/sentinel-pipeline/trusted_keys")
    p.add_argument("--require-verified", action="store_true",
                   help="also require a signed verification record that passed on the current manifest "
                   "(records/verification.json, written by `sentinel-verify --write-record`)")
    p.add_argument("--expected-hash", help="with --require-verified: the feature contract hash it was verified for")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad arguments
    if not args.bundle_dir.is_dir():
        parser.error(f"--bundle-dir {args.bundle_dir}: not a directory")
    if args.expected_hash is not None and not args.require_verified:
        parser.error("--expected-hash needs --require-verified")

    from sentinel_pipeline.locking import bundle_lock

    try:
        with bundle_lock(args.bundle_dir, shared=True):  # its verification (exclusive) cannot run meanwhile
            result = package_bundle(args.bundle_dir, args.out, trusted_keys=args.trusted_keys,
                                    require_verified=args.require_verified, expected_hash=args.expected_hash)
    except PackageError as exc:
        print(f"sentinel-package: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, ValueError) as exc:
        print(f"sentinel-package: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    summary = {"archive": str(result.path), "bundle": str(result.bundle_dir), "size": result.size,
               "sha256": result.sha256, "members": list(result.members), "manifest_sha256": result.manifest_sha256}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{result.path}: {result.size} bytes, sha256 {result.sha256}, {len(result.members)} members "
              f"(bundle {result.bundle_dir.name}, manifest sha256 {result.manifest_sha256})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
