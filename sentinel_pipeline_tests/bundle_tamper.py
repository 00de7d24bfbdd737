"""What an attacker with write access to ``models/`` does to a bundle, for the trust tests."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from sentinel_pipeline.bundles import MANIFEST_NAME, RECORD_FILES, build_manifest, sha256_file, write_record
from sentinel_pipeline.signing import load_signing_key, sign_manifest


def rewrite_manifest(bundle: Path) -> None:
    """Recompute the manifest over the current files (anyone can); the old signature stays (now invalid)."""
    (bundle / MANIFEST_NAME).write_text(json.dumps(build_manifest(bundle)))


def resign(bundle: Path) -> None:
    """Re-sign the current manifest with the trusted training key: the worst case, a tampered bundle
    that reaches the loaders (someone holding the key, or a bug before signing)."""
    sign_manifest(bundle, load_signing_key())


def sign_untrusted(bundle: Path, key_path: Path) -> None:
    """Sign with a fresh key of the attacker's own, not among the trusted keys."""
    sign_manifest(bundle, load_signing_key(key_path, trusted_dir=key_path.parent / "attacker_trusted"))


class Payload:
    """A pickle whose loading runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def plant_pickles_in_scalers_and_records(bundle: Path, marker: Path) -> None:
    """A malicious pickle under both joblib names (the bundle metadata's scaler digests and the manifest
    recomputed, as the attacker can) and under every record name (listed in a records manifest bound to
    the rewritten bundle manifest). The signature is left as it was (now invalid): :func:`resign` next
    for the worst case."""
    for name in ("seq_scaler.joblib", "snap_scaler.joblib"):
        (bundle / name).write_bytes(malicious_pickle(marker))
    meta = json.loads((bundle / "bundle_metadata.json").read_text())
    meta["data_half_scalers"]["sha256"] = {n: sha256_file(bundle / n) for n in meta["data_half_scalers"]["sha256"]}
    (bundle / "bundle_metadata.json").write_text(json.dumps(meta))
    rewrite_manifest(bundle)
    for name in RECORD_FILES:
        write_record(bundle, name, malicious_pickle(marker))
