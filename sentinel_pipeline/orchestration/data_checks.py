"""Asset checks of the data half: raw data quality, label balance, split purge, cache == HDF5."""


import json

import dagster as dg
import numpy as np
import pandas as pd

from sentinel_pipeline.data import arrow_cache as arrow_mod
from sentinel_pipeline.data import labels as labels_mod
from sentinel_pipeline.data import splits as splits_mod
from sentinel_pipeline.data import tables
from sentinel_pipeline.data.dataset import read_dataset
from sentinel_pipeline.orchestration.data_assets import (
    DataHalfSettings,
    arrow_cache,
    dataset_splits,
    labelled_dataset,
    raw_bars,
)
from sentinel_pipeline.orchestration.metadata import md_kv_table, md_table
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.paths import SPLITS

# label balance sanity: every class of the triple-barrier label between these fractions
# the vertical-barrier ("neutral") class is rare where barriers are hit quickly: 1.5 % of the default
# market's labels (strength 0.2); below 1 % a class is degenerate
MIN_CLASS_FRACTION = 0.01
MAX_CLASS_FRACTION = 0.95


@dg.asset_check(asset=raw_bars, blocking=True, description="Quarantine fraction within the limit; bars sorted, unique, finite.")
def raw_data_quality(settings: PipelineSettings, data_settings: DataHalfSettings) -> dg.AssetCheckResult:
    paths = settings.paths()
    report = json.loads(paths.quality_report.read_text())
    bars = tables.read_frame(paths.bars)
    limit = data_settings.max_quarantine_fraction
    keys_sorted = _sorted_fast(bars)
    unique = not bars.duplicated(["symbol", "timestamp"]).any()
    finite = bool(np.isfinite(bars[["open", "high", "low", "close", "volume"]].to_numpy()).all())
    fraction = float(report["quarantine_fraction"])
    passed = fraction <= limit and keys_sorted and unique and finite
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "quarantine_fraction": fraction,
            "limit": limit,
            "sorted": keys_sorted,
            "unique_keys": unique,
            "finite": finite,
            "by_reason": md_kv_table(report.get("quarantine_by_reason", {}), "reason", "rows"),
            "data_source": str(report.get("data_source")),
        },
        description=None if passed else f"quarantine {fraction:.3%} (limit {limit:.1%}), sorted={keys_sorted}, "
        f"unique={unique}, finite={finite}",
    )


def _sorted_fast(bars: pd.DataFrame) -> bool:
    """Sorted by (symbol, timestamp) with strictly increasing timestamps inside each symbol."""
    sym = bars["symbol"].to_numpy()
    ts = bars["timestamp"].astype("int64").to_numpy()
    same = sym[1:] == sym[:-1]
    sym_ok = bool((sym[1:] >= sym[:-1]).all())
    return sym_ok and bool((ts[1:][same] > ts[:-1][same]).all())


@dg.asset_check(asset=labelled_dataset, description="Eligibility rate plausible for the data (at least half "
                "of the most its symbols' lengths allow; no fixed ceiling) and no triple-barrier class degenerate.")
def label_balance_sanity(settings: PipelineSettings, data_settings: DataHalfSettings) -> dg.AssetCheckResult:
    paths = settings.paths()
    df = read_dataset(paths.features, paths.labels, ["symbol", "tb_label", "label_eligible"])
    elig = df["label_eligible"].to_numpy()
    rate = float(elig.mean()) if len(elig) else 0.0
    # every symbol's last label window has no label: the most the data allows
    window = labels_mod.label_window_bars(data_settings.to_config().labels)
    ceiling = max(0.0, 1.0 - df["symbol"].nunique() * window / len(df)) if len(df) else 0.0
    counts = df.loc[elig, "tb_label"].value_counts(normalize=True).reindex([-1, 0, 1], fill_value=0.0)
    balance = {str(k): float(v) for k, v in counts.items()}
    ok_classes = all(MIN_CLASS_FRACTION <= v <= MAX_CLASS_FRACTION for v in balance.values())
    passed = 0 < rate and rate >= 0.5 * ceiling and ok_classes
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"eligibility_rate": round(rate, 4), "eligibility_ceiling": round(ceiling, 4),
                  "class_balance": md_kv_table(balance, "tb_label", "fraction")},
        description=None if passed else f"eligibility {rate:.3f} (most possible {ceiling:.3f}), class balance {balance}",
    )


@dg.asset_check(asset=dataset_splits, blocking=True,
                description="No training (validation) label window reaches into validation (test); embargo honoured.")
def split_purge(settings: PipelineSettings, data_settings: DataHalfSettings) -> dg.AssetCheckResult:
    paths = settings.paths()
    cfg = data_settings.to_config()
    df = read_dataset(paths.features, paths.labels, ["symbol", "timestamp"])
    assignment = tables.read_frame(paths.split_assignment)
    result = splits_mod.purge_violations(df, assignment, labels_mod.label_window_bars(cfg.labels), cfg.splits.embargo_bars)
    passed = result["n_violations"] == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={k: v for k, v in result.items() if isinstance(v, int | float | str | bool)},
        description=None if passed else f"{result['n_violations']} sample(s) whose label window crosses a split boundary",
    )


@dg.asset_check(asset=arrow_cache, blocking=True, description="Arrow cache equals its HDF5 source (rows, samples, hash, checksum).")
def cache_matches_hdf5(settings: PipelineSettings) -> dg.AssetCheckResult:
    paths = settings.paths()
    rows = []
    passed = True
    for s in SPLITS:
        ok, details = arrow_mod.cache_matches_source(paths.h5(s), paths.arrow(s))
        passed &= ok
        rows.append({"split": s, "ok": ok, **{k: v for k, v in details.items() if isinstance(v, int | float | str | bool)}})
    return dg.AssetCheckResult(passed=passed, metadata={"splits": md_table(rows)},
                               description=None if passed else "Arrow cache differs from HDF5")


DATA_CHECKS = [raw_data_quality, label_balance_sanity, split_purge, cache_matches_hdf5]
