"""File-level runners of the data half: raw parquet -> ... -> Arrow cache.

Each ``run_*`` function reads its upstream artefacts from ``ArtifactPaths``, calls the stage module,
writes its artefacts atomically and returns a JSON-able summary (the Dagster assets turn it into UI
metadata; the benchmark and the tests call the same functions). ``run_data_half`` runs them all in
order. No Dagster import here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sentinel_pipeline.atomic_io import atomic_path, write_json_atomic
from sentinel_pipeline.data import arrow_cache, hdf5_splits, labels, raw_bars, scalers, splits
from sentinel_pipeline.data import features as feats
from sentinel_pipeline.data.feature_contract import FeatureContract, read_contract
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, ensure_default_raw_data
from sentinel_pipeline.paths import SPLITS, ArtifactPaths


@dataclass
class DataHalfConfig:
    """Every knob of the data half, with the project's defaults."""

    ingest: raw_bars.IngestConfig = field(default_factory=raw_bars.IngestConfig)
    synthetic: SyntheticMarketConfig = field(default_factory=SyntheticMarketConfig)
    generate_default_when_empty: bool = True
    features: feats.FeatureConfig = field(default_factory=feats.FeatureConfig)
    labels: labels.LabelConfig = field(default_factory=labels.LabelConfig)
    splits: splits.SplitConfig = field(default_factory=splits.SplitConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = fn()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# -- stage 1 -------------------------------------------------------------------------------------
def raw_input_files(paths: ArtifactPaths, cfg: DataHalfConfig) -> list[Path]:
    """The raw parquet files (generating the embedded synthetic default into an empty landing zone)."""
    if cfg.generate_default_when_empty:
        return ensure_default_raw_data(paths.raw_dir, cfg.synthetic)
    return sorted(paths.raw_dir.rglob("*.parquet"))


def run_raw_bars(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    """Ingest: bars + quarantine + quality report. Raises ``QuarantineLimitError`` after writing the
    quarantine (so it can be inspected) when too many rows were bad."""

    def go() -> dict[str, Any]:
        files = raw_input_files(paths, cfg)
        result = raw_bars.load_raw_bars(paths.raw_dir, cfg.ingest)
        raw_bars.write_ingest_result(result, paths.bars, paths.quarantine, paths.quality_report)
        raw_bars.enforce_quarantine_limit(result, cfg.ingest)
        return {"report": result.report, "input_files": [str(f) for f in files]}

    return _timed(go)


# -- stage 2 -------------------------------------------------------------------------------------
def run_feature_contract(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    contract = feats.build_contract(cfg.features)
    contract.write(paths.features_dir)
    return {"feature_contract_hash": contract.hash, "dims": contract.dims(), "n_features": len(contract.features)}


def load_contract(paths: ArtifactPaths) -> FeatureContract:
    return read_contract(paths.feature_contract)


def run_features(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        expected = feats.build_contract(cfg.features)
        if expected.hash != contract.hash:
            raise ValueError(
                f"{paths.feature_contract}: contract hash {contract.hash} does not match the feature config "
                f"({expected.hash}); rebuild the feature contract first"
            )
        bars = pd.read_parquet(paths.bars)
        frame = feats.compute_features(bars, cfg.features)
        _write_parquet(frame, paths.features)
        valid = frame["feature_valid"].to_numpy()
        return {
            "rows": int(len(frame)),
            "symbols": int(frame["symbol"].nunique()),
            "valid_rows": int(valid.sum()),
            "valid_fraction": float(valid.mean()) if len(valid) else 0.0,
            "feature_contract_hash": contract.hash,
            "dims": contract.dims(),
        }

    return _timed(go)


# -- stage 3 -------------------------------------------------------------------------------------
def run_labels(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        frame = pd.read_parquet(paths.features)
        labelled, stats = labels.label_dataset(frame, cfg.labels)
        _write_parquet(labelled, paths.labelled_dataset)
        return {"stats": stats, "label_params": labels.label_params(cfg.labels), "rows": int(len(labelled))}

    return _timed(go)


# -- stage 4 -------------------------------------------------------------------------------------
def run_splits(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        cols = ["symbol", "timestamp", "label_eligible", "feature_valid"]
        df = pd.read_parquet(paths.labelled_dataset, columns=cols)
        assignment, summary = splits.assign_splits(df, cfg.splits, labels.label_window_bars(cfg.labels))
        _write_parquet(assignment, paths.split_assignment)
        write_json_atomic(paths.split_summary, summary)
        return {"summary": summary}

    return _timed(go)


# -- stage 5 -------------------------------------------------------------------------------------
def run_scalers(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        dataset = pd.read_parquet(paths.labelled_dataset)
        assignment = pd.read_parquet(paths.split_assignment)
        fitted = scalers.fit_scalers(dataset, assignment, contract)
        scalers.save_scalers(paths.scalers_dir, fitted)
        return {"info": fitted.info, "feature_contract_hash": contract.hash}

    return _timed(go)


# -- stage 6 -------------------------------------------------------------------------------------
def run_hdf5(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        dataset = pd.read_parquet(paths.labelled_dataset)
        assignment = pd.read_parquet(paths.split_assignment)
        fitted = scalers.load_scalers(paths.scalers_dir, contract.hash)
        written = hdf5_splits.write_splits(
            dataset, assignment, contract, fitted, labels.label_params(cfg.labels), paths.hdf5_dir
        )
        return {
            "feature_contract_hash": contract.hash,
            "splits": {s: hdf5_splits.split_summary(written[s]) for s in SPLITS},
        }

    return _timed(go)


# -- stage 7 -------------------------------------------------------------------------------------
def run_arrow_cache(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in SPLITS:
            arrow_path = arrow_cache.build_cache(paths.h5(s), paths.arrow(s))
            ok, details = arrow_cache.cache_matches_source(paths.h5(s), arrow_path)
            out[s] = {"path": str(arrow_path), "matches_hdf5": ok, **details}
        return {"splits": out}

    return _timed(go)


STAGES: tuple[tuple[str, Callable[[ArtifactPaths, DataHalfConfig], dict[str, Any]]], ...] = (
    ("raw_bars", run_raw_bars),
    ("feature_contract", run_feature_contract),
    ("features", run_features),
    ("labels", run_labels),
    ("splits", run_splits),
    ("scalers", run_scalers),
    ("hdf5_splits", run_hdf5),
    ("arrow_cache", run_arrow_cache),
)


def run_data_half(paths: ArtifactPaths, cfg: DataHalfConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every data stage in order; returns ``{stage: summary}``."""
    cfg = cfg or DataHalfConfig()
    results: dict[str, Any] = {}
    for name, fn in STAGES:
        results[name] = fn(paths, cfg)
        log(f"[data] {name}: done in {results[name].get('seconds', 0.0):.2f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m sentinel_pipeline.data_half --data-dir DIR``: the data half without Dagster."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--raw-dir", default=None)
    args = ap.parse_args(argv)
    paths = ArtifactPaths(data_dir=Path(args.data_dir), raw_dir_override=Path(args.raw_dir) if args.raw_dir else None)
    results = run_data_half(paths)
    print(json.dumps({k: v.get("seconds") for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
