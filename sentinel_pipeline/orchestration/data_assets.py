"""Dagster assets of the data half: raw bars -> features -> labels -> splits -> scalers -> HDF5 -> Arrow.

Each asset is a thin wrapper around a ``sentinel_pipeline.data_half.run_*`` function: it computes the
stage's input fingerprint, reuses the stage when nothing changed, otherwise runs it under the stage
lock, and reports the stage summary as UI metadata.
"""


from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg

from sentinel_pipeline import data_half
from sentinel_pipeline.data import labels as labels_mod
from sentinel_pipeline.data import raw_bars as raw_mod
from sentinel_pipeline.data.features import FeatureConfig
from sentinel_pipeline.data.splits import SplitConfig
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
from sentinel_pipeline.locking import exclusive_lock
from sentinel_pipeline.orchestration.metadata import file_size_mb, md_kv_table, md_table
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import (
    files_fingerprint,
    fingerprint,
    fresh_record,
    read_record,
    write_record,
)


class DataHalfSettings(dg.ConfigurableResource):
    """The data half's parameters, shared by every stage of a run (so labels, splits and HDF5 agree)."""

    # ingest
    max_quarantine_fraction: float = 0.05
    generate_default_when_empty: bool = True
    # embedded synthetic default market (used only when the raw directory holds no parquet)
    synthetic_seed: int = SyntheticMarketConfig.seed
    synthetic_n_symbols: int = SyntheticMarketConfig.n_symbols
    synthetic_n_days: int = SyntheticMarketConfig.n_days
    signal_strength: float | None = None  # None: the generator's documented default
    # features
    seq_len: int = 30
    context_features: bool = True
    # triple-barrier labels
    pt: float = 1.5
    sl: float = 1.5
    horizon: int = 20
    # splits
    train_frac: float = 0.70
    val_frac: float = 0.15
    train_end: str | None = None
    val_end: str | None = None
    embargo_bars: int = 5

    def to_config(self) -> data_half.DataHalfConfig:
        synth_kwargs: dict[str, Any] = {
            "seed": self.synthetic_seed,
            "n_symbols": self.synthetic_n_symbols,
            "n_days": self.synthetic_n_days,
        }
        if self.signal_strength is not None:
            synth_kwargs["signal_strength"] = self.signal_strength
        return data_half.DataHalfConfig(
            ingest=raw_mod.IngestConfig(max_quarantine_fraction=self.max_quarantine_fraction),
            synthetic=SyntheticMarketConfig(**synth_kwargs),
            generate_default_when_empty=self.generate_default_when_empty,
            features=FeatureConfig(seq_len=self.seq_len, context_features=self.context_features),
            labels=labels_mod.LabelConfig(pt=self.pt, sl=self.sl, horizon=self.horizon),
            splits=SplitConfig(
                train_frac=self.train_frac,
                val_frac=self.val_frac,
                train_end=self.train_end,
                val_end=self.val_end,
                embargo_bars=self.embargo_bars,
            ),
        )


def upstream_fingerprint(stage_dir: Path, name: str) -> str:
    record = read_record(stage_dir)
    if record is None:
        raise dg.Failure(description=f"upstream stage '{name}' has not been materialised ({stage_dir} has no record)")
    return str(record["fingerprint"])


def run_stage(
    context: dg.AssetExecutionContext,
    stage_dir: Path,
    fp: str,
    build: Callable[[], dict[str, Any]],
    ui: Callable[[dict[str, Any]], dict[str, Any]],
) -> dg.MaterializeResult:
    """Reuse the stage when its fingerprint and outputs are unchanged, else build it under the stage lock."""
    reused = True
    record = fresh_record(stage_dir, fp)
    if record is None:
        with exclusive_lock(stage_dir):
            record = fresh_record(stage_dir, fp)  # another run may have built it while we waited
            if record is None:
                reused = False
                summary = build()
                outputs = [p for p in sorted(stage_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]
                record = write_record(stage_dir, fp, outputs, summary)
    if reused:
        context.log.info(f"inputs unchanged (fingerprint {fp[:12]}): reusing {stage_dir}")
    metadata = ui(record["metadata"])
    metadata.update({"input_fingerprint": fp[:16], "reused": reused, "path": dg.MetadataValue.path(str(stage_dir))})
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(fp[:16]))


def _paths(settings: PipelineSettings) -> ArtifactPaths:
    return settings.paths()


# -- 1. raw bars -------------------------------------------------------------------------------------
@dg.asset(group_name="ingest", kinds={"parquet"}, pool=WRITE_POOL)
def raw_bars(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Every raw OHLCV parquet file of the landing zone, validated; bad rows quarantined with a reason."""
    paths, cfg = _paths(settings), data_settings.to_config()
    files = data_half.raw_input_files(paths, cfg)
    fp = fingerprint(stage="raw_bars", files=files_fingerprint(files), ingest=asdict(cfg.ingest))

    def build() -> dict[str, Any]:
        try:
            return data_half.run_raw_bars(paths, cfg)
        except raw_mod.QuarantineLimitError as exc:
            raise dg.Failure(
                description=str(exc),
                metadata={"quarantine": dg.MetadataValue.path(str(paths.quarantine))},
            ) from exc
        except raw_mod.RawDataError as exc:
            raise dg.Failure(description=str(exc)) from exc

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        r = s["report"]
        return {
            "dagster/row_count": r["n_rows_out"],
            "rows_in": r["n_rows_in"],
            "quarantined": r["n_quarantined"],
            "quarantine_fraction": float(r["quarantine_fraction"]),
            "quarantine_by_reason": md_kv_table(r.get("quarantine_by_reason", {}), "reason", "rows"),
            "symbols": r["n_symbols"],
            "time_min": str(r["time_min"]),
            "time_max": str(r["time_max"]),
            "files": md_table(r.get("files", [])),
            "size_mb": file_size_mb(paths.bars),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, paths.raw_bars_dir, fp, build, ui)


# -- 2. feature contract + features --------------------------------------------------------------------
@dg.asset(group_name="features", kinds={"json"}, pool=WRITE_POOL)
def feature_contract(settings: PipelineSettings, data_settings: DataHalfSettings):
    """The ordered feature list (name, group, dtype, params) + code version, and its sha256 hash."""
    paths, cfg = _paths(settings), data_settings.to_config()
    s = data_half.run_feature_contract(paths, cfg)
    contract = data_half.load_contract(paths)
    rows = [{"name": f.name, "group": f.group, "dtype": f.dtype, "params": f.params} for f in contract.features]
    return dg.MaterializeResult(
        metadata={
            "feature_contract_hash": s["feature_contract_hash"],
            "dims": md_kv_table(s["dims"], "group", "features"),
            "features": md_table(rows),
            "path": dg.MetadataValue.path(str(paths.feature_contract)),
        },
        data_version=dg.DataVersion(s["feature_contract_hash"]),
    )


@dg.asset(group_name="features", deps=[raw_bars, feature_contract], kinds={"parquet"}, pool=WRITE_POOL)
def features(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Causal per-symbol features in the seq / snap / ctx_cat / ctx_cont groups of the contract."""
    paths, cfg = _paths(settings), data_settings.to_config()
    contract = data_half.load_contract(paths)
    fp = fingerprint(stage="features", raw=upstream_fingerprint(paths.raw_bars_dir, "raw_bars"), contract=contract.hash)

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        return {
            "dagster/row_count": s["rows"],
            "symbols": s["symbols"],
            "valid_fraction": s["valid_fraction"],
            "feature_contract_hash": s["feature_contract_hash"],
            "dims": md_kv_table(s["dims"], "group", "features"),
            "size_mb": file_size_mb(paths.features),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, paths.features_dir, fp, lambda: data_half.run_features(paths, cfg), ui)


# -- 3. labels -------------------------------------------------------------------------------------------
@dg.asset(group_name="labels", deps=[features], kinds={"parquet", "numba"}, pool=WRITE_POOL)
def labelled_dataset(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Triple-barrier labels, forward returns and entry-quality targets per bar."""
    paths, cfg = _paths(settings), data_settings.to_config()
    fp = fingerprint(
        stage="labels",
        features=upstream_fingerprint(paths.features_dir, "features"),
        labels=labels_mod.label_params(cfg.labels),
    )

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        st = s["stats"]
        return {
            "dagster/row_count": s["rows"],
            "eligible_rows": st["n_eligible"],
            "eligibility_rate": float(st["eligibility_rate"]),
            "class_balance": md_kv_table(st["class_balance"], "tb_label", "fraction"),
            "both_touched": st.get("n_both_touched", 0),
            "label_params": md_kv_table(s["label_params"], "param", "value"),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, paths.labelled_dataset.parent, fp, lambda: data_half.run_labels(paths, cfg), ui)


# -- 4. splits -------------------------------------------------------------------------------------------
@dg.asset(group_name="splits", deps=[labelled_dataset], kinds={"parquet"}, pool=WRITE_POOL)
def dataset_splits(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Chronological train/val/test by global cut points, purged by the label window and embargoed."""
    paths, cfg = _paths(settings), data_settings.to_config()
    fp = fingerprint(
        stage="splits",
        labels=upstream_fingerprint(paths.labelled_dataset.parent, "labelled_dataset"),
        splits=asdict(cfg.splits),
    )

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        summ = s["summary"]
        per = summ.get("splits", {})
        rows = [{"split": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}} for k, v in per.items()]
        return {"splits": md_table(rows), "cuts": md_kv_table(summ.get("cuts", {}), "cut", "timestamp"),
                "seconds": s.get("seconds", 0.0)}

    return run_stage(context, paths.split_assignment.parent, fp, lambda: data_half.run_splits(paths, cfg), ui)


# -- 5. scalers ------------------------------------------------------------------------------------------
@dg.multi_asset(
    specs=[
        dg.AssetSpec("seq_scaler", group_name="scaling", kinds={"joblib", "sklearn"}, deps=[dataset_splits]),
        dg.AssetSpec("snap_scaler", group_name="scaling", kinds={"joblib", "sklearn"}, deps=[dataset_splits]),
    ],
    pool=WRITE_POOL,
)
def scalers(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Robust scalers (with clipping) for the seq and snap groups, fitted on train rows only."""
    paths, cfg = _paths(settings), data_settings.to_config()
    fp = fingerprint(stage="scalers", splits=upstream_fingerprint(paths.split_assignment.parent, "dataset_splits"))
    result = run_stage(context, paths.scalers_dir, fp, lambda: data_half.run_scalers(paths, cfg), _scaler_ui)
    md = dict(result.metadata or {})
    yield dg.MaterializeResult(asset_key="seq_scaler", metadata={**md, "file": dg.MetadataValue.path(str(paths.seq_scaler))},
                               data_version=result.data_version)
    yield dg.MaterializeResult(asset_key="snap_scaler", metadata={**md, "file": dg.MetadataValue.path(str(paths.snap_scaler))},
                               data_version=result.data_version)


def _scaler_ui(s: dict[str, Any]) -> dict[str, Any]:
    info = s["info"]
    flat = {k: v for k, v in info.items() if not isinstance(v, dict | list)}
    return {"feature_contract_hash": s["feature_contract_hash"], "fit_window": md_kv_table(flat, "field", "value"),
            "seconds": s.get("seconds", 0.0)}


# -- 6. HDF5 splits --------------------------------------------------------------------------------------
@dg.asset(group_name="storage", deps=["seq_scaler", "snap_scaler"], kinds={"hdf5"}, pool=WRITE_POOL)
def hdf5_splits(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """train.h5 / val.h5 / test.h5: scaled per-bar rows, targets and sample end-rows (the training contract)."""
    paths, cfg = _paths(settings), data_settings.to_config()
    fp = fingerprint(stage="hdf5", scalers=upstream_fingerprint(paths.scalers_dir, "scalers"),
                     labels=labels_mod.label_params(cfg.labels))

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        rows = [{"split": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}}
                for k, v in s["splits"].items()]
        return {
            "feature_contract_hash": s["feature_contract_hash"],
            "splits": md_table(rows),
            "dagster/row_count": sum(int(v["n_rows"]) for v in s["splits"].values()),
            "size_mb": file_size_mb(*(paths.h5(x) for x in SPLITS)),
            "seconds": s.get("seconds", 0.0),
        }

    return run_stage(context, paths.hdf5_dir, fp, lambda: data_half.run_hdf5(paths, cfg), ui)


# -- 7. Arrow cache --------------------------------------------------------------------------------------
@dg.asset(group_name="storage", deps=[hdf5_splits], kinds={"arrow"}, pool=WRITE_POOL)
def arrow_cache(context: dg.AssetExecutionContext, settings: PipelineSettings, data_settings: DataHalfSettings):
    """Uncompressed Arrow IPC copies of the splits that the training loader memory-maps without copying."""
    paths, cfg = _paths(settings), data_settings.to_config()
    fp = fingerprint(stage="arrow", hdf5=upstream_fingerprint(paths.hdf5_dir, "hdf5_splits"))

    def ui(s: dict[str, Any]) -> dict[str, Any]:
        rows = [{"split": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict | list)}}
                for k, v in s["splits"].items()]
        return {"splits": md_table(rows), "size_mb": file_size_mb(*(paths.arrow(x) for x in SPLITS)),
                "seconds": s.get("seconds", 0.0)}

    return run_stage(context, paths.arrow_dir, fp, lambda: data_half.run_arrow_cache(paths, cfg), ui)


DATA_ASSETS = [raw_bars, feature_contract, features, labelled_dataset, dataset_splits, scalers, hdf5_splits, arrow_cache]
