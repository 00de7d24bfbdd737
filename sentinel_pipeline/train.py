"""Command line training: ``python -m sentinel_pipeline.train`` / ``sentinel-train``.

Example::

    sentinel-train --train-h5 data/artifacts/hdf5/train.h5 --val-h5 data/artifacts/hdf5/val.h5 \\
        --feature-schema data/artifacts/features/feature_schema.txt --out-dir runs/mlp \\
        --model mlp_two_head --epochs 20 --models-dir models

``--config FILE`` (YAML or JSON, the fields of ``training.config.TrainConfig``) supplies defaults;
flags given on the command line override it. Thread counts are fixed before torch is imported (the
``OMP``/``MKL`` variables are set from ``--threads`` and ``runtime.configure_threads`` is called), so
the heavy modules are imported only after argument parsing. Progress goes to stderr (tqdm), the log
to stderr and ``<out-dir>/train_log.txt``; a JSON summary of the result is printed to stdout.

Exit codes: 0 success (also when the run in ``--out-dir`` was already complete), 1 training failed
(e.g. the loss diverged), 2 usage error (bad flags or config, missing input files, a feature contract
mismatch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from sentinel_pipeline.training.config import (
    DEVICES,
    MONITORS,
    OPTIMIZERS,
    PROFILES,
    SCHEDULERS,
    ConfigError,
    TrainConfig,
    load_config,
    merge_cli,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
log = logging.getLogger("sentinel_pipeline.train")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag defaults to None so that only given flags override the config."""
    p = argparse.ArgumentParser(
        prog="sentinel-train",
        description="Train a sentinel-pipeline model on train/val HDF5 splits and optionally write a bundle.",
    )
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields (flags override it)")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--train-h5", help="train split (HDF5; its Arrow cache is preferred when valid)")
    io.add_argument("--val-h5", help="validation split (HDF5)")
    io.add_argument("--feature-schema", help="feature_schema.txt (feature_contract.json is read beside it)")
    io.add_argument("--out-dir", help="run directory (checkpoints, metrics, log); a rerun resumes it")
    io.add_argument("--models-dir", help="write a model bundle here after training")
    io.add_argument("--scalers-dir", help="fitted scalers for the bundle (default <artifacts>/scalers)")
    io.add_argument("--expected-hash", help="feature contract hash the splits must carry")
    io.add_argument("--family-input", action="append", metavar="NAME=PATH",
                    help="an extra input of the model's family, e.g. symbol_graph=artifacts/symbol_graph "
                    "(repeatable; over the config file's family_inputs)")
    io.add_argument("--no-arrow", dest="prefer_arrow", action="store_const", const=False, default=None,
                    help="read the HDF5 files even when a valid Arrow cache exists")
    t = p.add_argument_group("training")
    t.add_argument("--model", help="model variant (mlp_two_head, seq_ctx_fusion, transformer_tbm)")
    t.add_argument("--seq-len", type=int, help="window length in bars (default 30)")
    t.add_argument("--batch-size", type=int, help="batch size (default: the profile's)")
    t.add_argument("--epochs", type=int, help="maximum epochs (default 20)")
    t.add_argument("--learning-rate", type=float, help="learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=float, help="(decoupled) weight decay (default 1e-4)")
    t.add_argument("--grad-clip", type=float, help="gradient norm clip (default 1.0)")
    t.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="optimizer (default: the model family's; adamw for the window models)")
    t.add_argument("--scheduler", choices=SCHEDULERS,
                   help="learning-rate scheduler (default: the model family's; none for the window models)")
    t.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 5)")
    t.add_argument("--monitor", choices=MONITORS, help="early-stopping monitor (default: the variant's)")
    t.add_argument("--limit-samples", type=int, help="use only the first N samples of each split")
    t.add_argument("--seed", type=int, help="random seed (default 1337)")
    t.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                   help="visit train samples in a permutation reseeded per epoch (the pipeline does); "
                   "default: the profile's (safe: temporal order)")
    t.add_argument("--fresh", action="store_true", default=None,
                   help="discard an earlier run in --out-dir instead of resuming it")
    r = p.add_argument_group("runtime")
    r.add_argument("--profile", choices=PROFILES, help="safe (default) or throughput")
    r.add_argument("--device", choices=DEVICES, help="auto (default), cpu or cuda")
    r.add_argument("--num-workers", type=int, help="loader worker processes (default: the profile's; safe 0)")
    r.add_argument("--threads", type=int, help="intra-op CPU threads (default: the usable CPUs)")
    r.add_argument("--log-every", type=int, help="log the running loss every N steps (default 50)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _overrides(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flags that were given, as TrainConfig fields (``--family-input`` entries laid over the config
    file's ``family_inputs``)."""
    skip = {"config", "no_progress", "family_input"}
    out = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if getattr(args, "family_input", None):
        inputs = dict((base or {}).get("family_inputs") or {})
        for item in args.family_input:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--family-input {item!r}: expected NAME=PATH")
            inputs[name] = path
        out["family_inputs"] = inputs
    return out


def _set_threads(threads: int | None) -> None:
    """Fix thread counts before torch is imported, then let the runtime apply them to torch."""
    if threads is not None:
        for var in THREAD_ENV_VARS:
            os.environ[var] = str(threads)
    from sentinel_pipeline.training import runtime

    runtime.configure_threads(threads)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_console_logging() -> None:
    """Log INFO and above of the package to stderr (once per process, however often main() runs)."""
    pkg = logging.getLogger("sentinel_pipeline")
    pkg.setLevel(logging.INFO)
    if any(isinstance(h, _StderrHandler) for h in pkg.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)


def run(config: TrainConfig, progress: bool = True) -> int:
    """Train ``config``; print a JSON summary; return the exit code."""
    from sentinel_pipeline.data.feature_contract import ContractError
    from sentinel_pipeline.training.engine import TrainingDivergedError, train

    try:
        result = train(config, progress=progress)
    except TrainingDivergedError as exc:
        print(f"sentinel-train: training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ConfigError, ContractError, FileNotFoundError) as exc:
        print(f"sentinel-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # the traceback is in train_log.txt (engine logs it)
        print(f"sentinel-train: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    summary = {
        "out_dir": str(result.out_dir),
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "already_complete": result.already_complete,
        "bundle_dir": str(result.bundle_dir) if result.bundle_dir else None,
        "head_vs_baseline": result.metrics.get("head_vs_baseline"),
    }
    if result.already_complete:
        print(f"sentinel-train: the run in {result.out_dir} is already complete; use --fresh to retrain",
              file=sys.stderr)
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sentinel-train``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        file_config = load_config(args.config) if args.config else {}
        config = merge_cli(file_config, _overrides(args, file_config))
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"sentinel-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _set_threads(config.threads)
    _setup_console_logging()
    return run(config, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
