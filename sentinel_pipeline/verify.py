"""Command line bundle verification: ``python -m sentinel_pipeline.verify`` / ``sentinel-verify``.

Example::

    sentinel-verify --bundle-dir models/mlp_two_head__20240102T000000Z__0123456789abcdef \\
        --expected-hash 0123456789abcdef --val-h5 data/artifacts/hdf5/val.h5

Runs ``verification.verify_bundle`` and prints its report: one line per check with PASS/FAIL and
why, or with ``--json`` the report as a JSON object. ``--gates FILE`` (JSON or YAML,
``{variant: {field: value}}``) overrides the default quality gates; ``--write-record`` stores the
report as the bundle's ``records/verification.json`` (which ``verification.require_verified`` reads
when no Dagster event log vouches for the bundle). ``--trusted-keys DIR`` names the trusted public
keys (default ``$SENTINEL_TRUSTED_KEYS`` or ``~/.config/sentinel-pipeline/trusted_keys``; see
``sentinel_pipeline.signing``); ``--scalers-dir DIR`` (the data half's ``scalers/``) makes the
scaler check compare the bundle's scaler parameters with the data half's. Nothing is unpickled.
``--bundle-dir`` may name a bundle archive (``model_final.zip``, written by ``sentinel_pipeline.package``):
it is unpacked safely (``sentinel_pipeline.bundle_archive``) into a private temporary directory and
runs the same checks; an archive the unpacking refuses fails the report naming the member and why.

Exit codes: 0 every check passed, 1 some check failed (the report names it), 2 usage error (bad or
missing arguments, a bundle directory or validation file that does not exist, an unreadable gates
file). Arguments are validated before the heavy modules (torch) are imported, so usage errors are fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sentinel-verify",
        description="Verify a trained model bundle: files, manifest, contract, metadata, model, scalers, "
        "metrics and quality gates.",
    )
    p.add_argument("--bundle-dir", required=True, type=Path,
                   help="the bundle directory, or its archive (model_final.zip, unpacked safely into a private "
                   "temporary directory and verified there)")
    p.add_argument("--expected-hash", required=True, help="the feature contract hash the bundle must carry")
    p.add_argument(
        "--val-h5",
        type=Path,
        help="validation split for the forward pass (default: the val_h5 recorded in the bundle's train_config.json)",
    )
    p.add_argument(
        "--gate-h5",
        type=Path,
        help="split the statistical gates are scored on (default: test.h5 beside the validation split); "
        "never the split that chose the checkpoint",
    )
    p.add_argument("--trusted-keys", type=Path,
                   help="directory of trusted public keys (*.pub); default $SENTINEL_TRUSTED_KEYS or "
                   "~/.config/sentinel-pipeline/trusted_keys")
    p.add_argument("--scalers-dir", type=Path,
                   help="the data half's scaler directory: the bundle's scaler parameters must equal its scalers.json")
    p.add_argument("--gates", type=Path, help="JSON or YAML file of per-variant quality gate overrides")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument(
        "--write-record", action="store_true", help="write the report into the bundle as verification.json"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad arguments
    archive = args.bundle_dir.suffix.lower() == ".zip" and not args.bundle_dir.is_dir()
    if archive:
        if not args.bundle_dir.is_file():
            parser.error(f"--bundle-dir {args.bundle_dir}: no such archive")
        if args.write_record:
            parser.error("--write-record: an archive carries no records (verify the bundle directory to write one)")
    elif not args.bundle_dir.is_dir():
        parser.error(f"--bundle-dir {args.bundle_dir}: not a directory")
    if args.val_h5 is not None and not args.val_h5.is_file():
        parser.error(f"--val-h5 {args.val_h5}: no such file")
    if args.gate_h5 is not None and not args.gate_h5.is_file():
        parser.error(f"--gate-h5 {args.gate_h5}: no such file")
    if args.scalers_dir is not None and not (args.scalers_dir / "scalers.json").is_file():
        parser.error(f"--scalers-dir {args.scalers_dir}: no scalers.json there")
    if args.gates is not None and not args.gates.is_file():
        parser.error(f"--gates {args.gates}: no such file")

    from sentinel_pipeline.locking import bundle_lock
    from sentinel_pipeline.verification import load_gates, verify_bundle, write_verification_record

    gates = None
    if args.gates is not None:
        try:
            gates = load_gates(args.gates)
        except ValueError as exc:
            parser.error(f"--gates: {exc}")
    try:
        # exclusive, like the Dagster check: no reader while it is verified (an archive is read once, into a
        # private copy: no lock)
        with contextlib.nullcontext() if archive else bundle_lock(args.bundle_dir):
            report = verify_bundle(args.bundle_dir, args.expected_hash, val_h5=args.val_h5, gate_h5=args.gate_h5,
                                   gates=gates, trusted_keys=args.trusted_keys, scalers_dir=args.scalers_dir)
            if args.write_record:
                write_verification_record(args.bundle_dir, report)
    except (ValueError, OSError, MemoryError) as exc:  # could not run at all: the cause, not a traceback
        print(f"sentinel-verify: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return EXIT_OK if report.passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
