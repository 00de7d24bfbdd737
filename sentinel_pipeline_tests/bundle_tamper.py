"""What an attacker with write access to ``models/`` does to a bundle, for the trust tests."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from sentinel_pipeline.bundles import MANIFEST_NAME, build_manifest
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
