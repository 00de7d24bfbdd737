"""Manage the bundle signing keys and re-sign bundles: ``python -m sentinel_pipeline.sign`` (``sentinel-sign``).

``keygen`` creates the signing key if absent and prints its id; ``show`` prints the signing key's id
and the trusted key ids; ``trust FILE`` copies a public key (PEM) into the trusted directory;
``sign --bundle-dir DIR`` re-signs an existing bundle whose files still match its manifest (e.g. one
written before signing existed; only for bundles you trust, else retrain). The keys and what they
protect: :mod:`sentinel_pipeline.signing` and the README's "Threat model".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sentinel_pipeline.bundles import check_manifest, entry_problems
from sentinel_pipeline.safe_read import read_regular
from sentinel_pipeline.signing import (
    KEY_ENV,
    KEY_FILE,
    TRUSTED_DIR,
    TRUSTED_ENV,
    config_dir,
    key_id,
    load_signing_key,
    sign_manifest,
    signing_key_path,
    trust_public_key,
    trusted_keys,
    trusted_keys_dir,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sentinel_pipeline.sign", description=__doc__.split("\n\n")[0])
    p.add_argument("--key", type=Path, help=f"private key file (default ${KEY_ENV} or {config_dir() / KEY_FILE})")
    p.add_argument("--trusted-keys", type=Path, help=f"trusted keys directory (default ${TRUSTED_ENV} or "
                   f"{config_dir() / TRUSTED_DIR})")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("keygen", help="create the signing key if absent; print its id and public key file")
    sub.add_parser("show", help="print the signing key's id and the trusted key ids")
    trust = sub.add_parser("trust", help="trust a public key file (PEM)")
    trust.add_argument("file", type=Path)
    sign = sub.add_parser("sign", help="re-sign a bundle whose files still match its manifest")
    sign.add_argument("--bundle-dir", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        if args.command in ("keygen", "show"):
            key = load_signing_key(args.key, create=args.command == "keygen", trusted_dir=args.trusted_keys)
            print(f"signing key {signing_key_path(args.key)}: id {key_id(key.public_key())}")
            print(f"trusted keys in {trusted_keys_dir(args.trusted_keys)}: {sorted(trusted_keys(args.trusted_keys))}")
        elif args.command == "trust":
            key = serialization.load_pem_public_key(read_regular(args.file, 1 << 16))
            if not isinstance(key, Ed25519PublicKey):
                p.error(f"{args.file}: not an ed25519 public key")
            print(f"trusted {trust_public_key(key, args.trusted_keys)}")
        else:
            problems = entry_problems(args.bundle_dir, require_signature=False) + check_manifest(args.bundle_dir)
            if problems:
                hint = ""
                if any(n in p for p in problems for n in ("verification.json", "replay_report.json",
                                                           "replay_equity.png", "replay_")):
                    hint = (" (verification and replay records of the former layout sit at the top level of "
                            "old bundles: they are stale; delete them, sign, then verify again)")
                print(f"refusing to sign {args.bundle_dir}: " + "; ".join(problems) + hint, file=sys.stderr)
                return 1
            key = load_signing_key(args.key, trusted_dir=args.trusted_keys)
            print(f"signed {sign_manifest(args.bundle_dir, key)} with key {key_id(key.public_key())}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
