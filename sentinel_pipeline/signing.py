"""The bundle trust anchor: an ed25519 signature over ``manifest.json``, checked against keys kept
outside the bundle.

A bundle's ``manifest.json`` lists the sha256 of every file; on its own it only catches accidents
(anyone who can write ``models/`` can recompute it). ``write_bundle`` therefore signs the manifest's
exact bytes with the training side's private key and writes ``manifest.sig``; every reader
(verification, ``load_bundle``, replay, the backtest, the Dagster checks) checks that signature
against the **trusted public keys** before it reads anything else of the bundle.

Where the keys live (all outside ``models/``; see the README's "Threat model"):

- private key: ``SENTINEL_SIGNING_KEY`` (a file path), else
  ``$XDG_CONFIG_HOME/sentinel-pipeline/signing_key.pem`` (``~/.config/...`` without XDG). Generated
  on first use (PKCS#8 PEM, file mode 0600, directory 0700); a key file readable by group or others
  is refused, as ssh does. Only training needs it.
- trusted public keys: ``SENTINEL_TRUSTED_KEYS`` (a directory), else
  ``$XDG_CONFIG_HOME/sentinel-pipeline/trusted_keys/``; every ``*.pub`` file in it (PEM) is trusted.
  When a key is generated its public half is added there, so a single-user setup works out of the
  box; a verifier on another machine copies the ``.pub`` file into its own directory
  (``python -m sentinel_pipeline.sign trust FILE``).

``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "key_id": <16 hex: sha256 of the raw public key>,
"manifest_sha256": <hex>, "signature": <base64>}``.

CLI (``python -m sentinel_pipeline.sign``, module :mod:`sentinel_pipeline.sign`): ``keygen`` (create the key if absent, print its id and
public key file), ``show``, ``trust FILE`` (copy a public key into the trusted directory) and
``sign --bundle-dir DIR`` (re-sign an existing bundle whose files still match its manifest, e.g. one
written before signing existed; only do this for bundles you trust, else retrain).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sentinel_pipeline.safe_read import UnsafeFileError, read_regular

SIGNATURE_NAME = "manifest.sig"
MANIFEST_NAME = "manifest.json"
KEY_ENV = "SENTINEL_SIGNING_KEY"
TRUSTED_ENV = "SENTINEL_TRUSTED_KEYS"
KEY_FILE = "signing_key.pem"
TRUSTED_DIR = "trusted_keys"
MAX_SMALL_FILE = 16 << 20  # manifest / signature / JSON records: refuse anything absurdly large
RESIGN_HINT = (
    "re-sign it with `python -m sentinel_pipeline.sign sign --bundle-dir <bundle>` if you trust its "
    "contents (it must still match its manifest), or retrain it"
)


class SignatureError(ValueError):
    """A bundle's signature is missing, malformed, by an untrusted key, or does not match its manifest."""


# -- key locations --------------------------------------------------------------------------------


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sentinel-pipeline"


def signing_key_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The private key file: ``path``, else ``$SENTINEL_SIGNING_KEY``, else the config directory's."""
    if path is not None:
        return Path(path)
    env = os.environ.get(KEY_ENV)
    return Path(env) if env else config_dir() / KEY_FILE


def trusted_keys_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The trusted public keys directory: ``path``, else ``$SENTINEL_TRUSTED_KEYS``, else the config
    directory's ``trusted_keys/``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(TRUSTED_ENV)
    return Path(env) if env else config_dir() / TRUSTED_DIR


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new_file(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` and ``mode`` unless it exists (atomically: temp file + link).
    Returns False when another process created it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def trust_public_key(public_key: Ed25519PublicKey, trusted_dir: str | os.PathLike[str] | None = None) -> Path:
    """Add ``public_key`` to the trusted directory as ``<key id>.pub`` (kept if already there)."""
    directory = trusted_keys_dir(trusted_dir)
    target = directory / f"{key_id(public_key)}.pub"
    if not target.exists():
        _write_new_file(target, _public_pem(public_key), 0o644)
    return target


def load_signing_key(
    path: str | os.PathLike[str] | None = None,
    *,
    create: bool = True,
    trusted_dir: str | os.PathLike[str] | None = None,
) -> Ed25519PrivateKey:
    """The training side's private key; generated on first use when ``create`` (0600, and its public
    key added to the trusted directory). Refuses a symlink, a non-regular file, or a key file that
    group or others may read."""
    key_path = signing_key_path(path)
    if not os.path.lexists(key_path):
        if not create:
            raise SignatureError(f"no signing key at {key_path} (set {KEY_ENV} or run `python -m "
                                 "sentinel_pipeline.sign keygen`)")
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        if _write_new_file(key_path, pem, 0o600):
            trust_public_key(new.public_key(), trusted_dir)
    st = os.lstat(key_path)
    if not stat.S_ISREG(st.st_mode):
        raise SignatureError(f"signing key {key_path}: not a regular file (symlinks are refused)")
    if st.st_mode & 0o077:
        raise SignatureError(f"signing key {key_path}: permissions {oct(st.st_mode & 0o777)} let others read it; "
                             f"run `chmod 600 {key_path}`")
    try:
        key = serialization.load_pem_private_key(read_regular(key_path, 1 << 16), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {key_path}: not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {key_path}: not an ed25519 key ({type(key).__name__})")
    return key


def trusted_keys(trusted_dir: str | os.PathLike[str] | None = None) -> dict[str, Ed25519PublicKey]:
    """``{key id: public key}`` of every ``*.pub`` file in the trusted directory (bad files are skipped)."""
    directory = trusted_keys_dir(trusted_dir)
    keys: dict[str, Ed25519PublicKey] = {}
    if not directory.is_dir():
        return keys
    for p in sorted(directory.glob("*.pub")):
        try:
            key = serialization.load_pem_public_key(read_regular(p, 1 << 16))
        except (OSError, ValueError, TypeError):
            continue
        if isinstance(key, Ed25519PublicKey):
            keys[key_id(key)] = key
    return keys


# -- signing and checking ------------------------------------------------------------------------


def sign_manifest(bundle_dir: str | os.PathLike[str], key: Ed25519PrivateKey) -> Path:
    """Sign ``bundle_dir/manifest.json``'s bytes; writes ``manifest.sig`` (temp file + rename)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_regular(bundle_dir / MANIFEST_NAME, MAX_SMALL_FILE)
    record = {
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "signature": base64.b64encode(key.sign(manifest)).decode("ascii"),
    }
    target = bundle_dir / SIGNATURE_NAME
    fd, tmp = tempfile.mkstemp(dir=bundle_dir, prefix=f".tmp-{SIGNATURE_NAME}-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """A detached signature record (JSON bytes) of ``data``: algorithm, key id, sha256 and signature."""
    record = {
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
    }
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def verify_signed_bytes(
    data: bytes, signature_record: bytes, what: str, trusted_dir: str | os.PathLike[str] | None = None
) -> str:
    """Check a :func:`sign_bytes` record against ``data`` and the trusted keys; returns the signer's key id.
    Raises :class:`SignatureError` naming ``what`` and the problem."""
    try:
        record = json.loads(signature_record)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{what}: unreadable signature record: {exc}") from exc
    return _check_signature(record, data, trusted_dir, record_name=what, data_name=what,
                            mismatch=f"{what}: the signature does not match (changed after signing)")


def _check_signature(
    record: object, data: bytes, trusted_dir: str | os.PathLike[str] | None, *, record_name: str, data_name: str,
    mismatch: str, untrusted_hint: str = "",
) -> str:
    """The one ed25519 check behind every signature: the record's form, a trusted key id, the signature
    over ``data``. Returns the signer's key id; raises :class:`SignatureError` with the caller's names."""
    if not isinstance(record, dict) or record.get("algorithm") != "ed25519":
        raise SignatureError(f"{record_name}: not an ed25519 signature record")
    kid = str(record.get("key_id"))
    keys = trusted_keys(trusted_dir)
    if kid not in keys:
        raise SignatureError(f"{data_name}: signed by key {kid}, which is not among the trusted keys in "
                             f"{trusted_keys_dir(trusted_dir)} ({sorted(keys) or 'none'}){untrusted_hint}")
    try:
        keys[kid].verify(base64.b64decode(str(record.get("signature")), validate=True), data)
    except (ValueError, InvalidSignature) as exc:
        raise SignatureError(mismatch) from exc
    return kid


def verify_manifest_signature(
    bundle_dir: str | os.PathLike[str], trusted_dir: str | os.PathLike[str] | None = None
) -> tuple[bytes, str]:
    """Check ``manifest.sig`` against the trusted keys; returns (the manifest's bytes, signer key id).

    Reads only ``manifest.json`` and ``manifest.sig`` (regular files, no symlinks). Raises
    :class:`SignatureError` naming the bundle and the problem: unsigned (with how to re-sign or
    retrain), malformed, signed by a key that is not trusted, or not matching the manifest.
    """
    bundle_dir = Path(bundle_dir)
    sig_path, manifest_path = bundle_dir / SIGNATURE_NAME, bundle_dir / MANIFEST_NAME
    if bundle_dir.is_symlink() or not bundle_dir.is_dir():
        raise SignatureError(f"{bundle_dir}: not a directory (or a symlink): not a bundle")
    if not os.path.lexists(sig_path):
        raise SignatureError(f"{bundle_dir}: bundle is not signed (no {SIGNATURE_NAME}; bundles written before "
                             f"signing are refused): {RESIGN_HINT}")
    try:
        record = json.loads(read_regular(sig_path, 1 << 16))
        manifest = read_regular(manifest_path, MAX_SMALL_FILE)
    except (OSError, UnsafeFileError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{bundle_dir}: cannot read {SIGNATURE_NAME} / {MANIFEST_NAME}: {exc}") from exc
    kid = _check_signature(
        record, manifest, trusted_dir, record_name=f"{bundle_dir}: {SIGNATURE_NAME}",
        data_name=f"{bundle_dir}: {MANIFEST_NAME}",
        mismatch=f"{bundle_dir}: the signature in {SIGNATURE_NAME} does not match {MANIFEST_NAME} "
                 "(the manifest was changed after signing)",
        untrusted_hint="; add the training side's public key (`python -m sentinel_pipeline.sign trust FILE`) "
                       "or retrain",
    )
    return manifest, kid
