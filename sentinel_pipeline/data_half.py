"""File-level runners of the data half: raw parquet -> ... -> Arrow cache.

Each ``run_*`` function reads its upstream artefacts from ``ArtifactPaths``, calls the stage module,
writes its artefacts atomically and returns a JSON-able summary (the Dagster assets turn it into UI
metadata; the benchmark and the tests call the same functions). ``run_data_half`` runs them all in
order. No Dagster import here.

I/O between stages is most of the data half's time and memory at 10M bars (the compiled stage code
is a small share), so: parquet is written by ``raw_bars.write_parquet`` (no dictionary encoding for
float columns) and read memory-mapped, only the columns a stage uses, with one pandas block per
column (no consolidation copy); Arrow's memory pool hands freed memory back to the OS after each read
and each stage. The wide tables are streamed one parquet row group at a time: the labels stage
appends its columns to the features row group by row group, the scalers gather only their fit rows,
and the HDF5 stage writes the three split files in row chunks (``*_from_parquet`` functions), so the
57-column labelled table is never whole in memory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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


def _release_arrow_memory() -> None:
    """Hand the memory that Arrow's pool keeps after frees back to the OS (mimalloc/jemalloc hold it)."""
    pa.default_memory_pool().release_unused()


def _read_frame(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """``pd.read_parquet`` (same frame), read with one copy of the data (``raw_bars.read_parquet``)."""
    df = raw_bars.read_parquet(path, columns)
    _release_arrow_memory()
    return df


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        _release_arrow_memory()
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
        raw_bars.write_ingest_result(result, paths.bars, paths.quarantine, paths.quality_report, paths.bar_flags)
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
        bars = _read_frame(paths.bars)
        frame = feats.compute_features(bars, cfg.features)
        del bars  # the frame shares its bar columns
        raw_bars.write_parquet(frame, paths.features)
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
        # label_dataset sees only the columns it reads; its label columns are then appended to the
        # features one row group at a time: the file is the one label_dataset(whole frame) would give
        # written by write_parquet, but the feature columns are never all in memory
        frame = _read_frame(paths.features, list(labels.REQUIRED_COLUMNS))
        quirks = _bar_quirks(paths, frame)
        labelled, stats = labels.label_dataset(frame, cfg.labels, quirks)
        del frame
        new = labelled[labels.label_columns(cfg.labels)]
        del labelled
        features = pq.ParquetFile(paths.features, memory_map=True)
        empty = pd.concat([features.schema_arrow.empty_table().to_pandas(), new.iloc[:0]], axis=1)
        added = pa.Table.from_pandas(new, preserve_index=False)  # as DataFrame.to_parquet converts them
        del new
        schema = pa.schema([*features.schema_arrow, *added.schema],
                           metadata=pa.Schema.from_pandas(empty, preserve_index=False).metadata)
        _append_columns(features, added, schema, paths.labelled_dataset)
        return {"stats": stats, "label_params": labels.label_params(cfg.labels), "rows": int(added.num_rows)}

    return _timed(go)


def _bar_quirks(paths: ArtifactPaths, features: pd.DataFrame) -> Any:
    """The raw stage's per-bar quirk bits (``bar_flags.parquet``), checked to be the features' rows."""
    if not paths.bar_flags.is_file():
        raise ValueError(f"{paths.bar_flags}: bar flags of the raw stage are missing; rebuild raw_bars")
    flags = _read_frame(paths.bar_flags, ["timestamp", "quirks"])
    same = len(flags) == len(features) and bool(
        (labels.timestamps_ns(flags["timestamp"]) == labels.timestamps_ns(features["timestamp"])).all()
    )
    if not same:
        raise ValueError(
            f"{paths.bar_flags}: bar flags ({len(flags)} rows) are not the rows of {paths.features} "
            f"({len(features)} rows); rebuild raw_bars and features"
        )
    return flags["quirks"].to_numpy()


def _append_columns(source: pq.ParquetFile, added: pa.Table, schema: pa.Schema, path: Path) -> None:
    """Write ``source``'s columns followed by ``added``'s (same rows) to ``path``, one row group at a time.

    The row groups keep the source's boundaries, which are ``pq.write_table``'s (``write_parquet``),
    so the result is what ``write_parquet`` of the whole concatenated table writes.
    """
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, **raw_bars.parquet_write_options(schema)) as out:
        offset = 0
        for part in raw_bars.iter_row_groups(source):
            rows = part.num_rows
            out.write_table(pa.Table.from_arrays([*part.columns, *added.slice(offset, rows).columns], schema=schema))
            offset += rows


# -- stage 4 -------------------------------------------------------------------------------------
def run_splits(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        cols = ["symbol", "timestamp", "label_eligible", "feature_valid"]
        df = _read_frame(paths.labelled_dataset, cols)
        assignment, summary = splits.assign_splits(df, cfg.splits, labels.label_window_bars(cfg.labels))
        raw_bars.write_parquet(assignment, paths.split_assignment)
        write_json_atomic(paths.split_summary, summary)
        return {"summary": summary}

    return _timed(go)


# -- stage 5 -------------------------------------------------------------------------------------
def run_scalers(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        assignment = _read_frame(paths.split_assignment, ["split"])
        fitted = scalers.fit_scalers_from_parquet(paths.labelled_dataset, assignment, contract)
        scalers.save_scalers(paths.scalers_dir, fitted)
        return {"info": fitted.info, "feature_contract_hash": contract.hash}

    return _timed(go)


# -- stage 6 -------------------------------------------------------------------------------------
def run_hdf5(paths: ArtifactPaths, cfg: DataHalfConfig) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        contract = load_contract(paths)
        assignment = _read_frame(paths.split_assignment, ["split", "sample_ok"])
        fitted = scalers.load_scalers(paths.scalers_dir, contract.hash)
        written = hdf5_splits.write_splits_from_parquet(
            paths.labelled_dataset, assignment, contract, fitted, labels.label_params(cfg.labels), paths.hdf5_dir
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
            arrow_path, ok, details = arrow_cache.build_and_check_cache(paths.h5(s), paths.arrow(s))
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
    try:
        results = run_data_half(paths)
    except (ValueError, OSError, MemoryError) as exc:  # the stages' own errors: the cause, not a traceback
        print(f"sentinel-data: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v.get("seconds") for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
