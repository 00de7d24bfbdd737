"""The panel preset's data half on a subset of the real daily S&P 500 panel (skipped where absent).

60 symbols of ``../shared/data/daily_equities_panel.parquet`` (about 74k daily bars, 2013-2018) are
written to one file beside a decoy; the data half reads that single file under the panel preset and
must give the daily contract: no hour bucket or session bar, month and weekday, cross-sectional ranks
within [-1, 1] that are computed at each date from that date's symbols only (the features of a date
prefix of the bars are the prefix of the features), labels at daily horizons.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.dataset import read_dataset
from sentinel_pipeline.data.features import build_contract, compute_features
from sentinel_pipeline.data.raw_bars import QUARANTINE_REASONS
from sentinel_pipeline.data.tables import read_frame
from sentinel_pipeline.data_half import panel_config, run_data_half
from sentinel_pipeline.paths import SPLITS, ArtifactPaths

pytestmark = pytest.mark.realdata

CFG = panel_config(generate_default_when_empty=False)
XS_RANKS = ["xs_rank_ret_20", "xs_rank_ret_60", "xs_rank_rv_20", "xs_rank_vol_z_20"]


@pytest.fixture(scope="module")
def run(shared_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("panel_real")
    panel = pd.read_parquet(shared_data_dir / "daily_equities_panel.parquet")
    symbols = sorted(panel["symbol"].unique())[::8][:60]
    subset = panel[panel["symbol"].isin(symbols)].reset_index(drop=True)
    folder = root / "shared"
    folder.mkdir()
    subset.to_parquet(folder / "panel_subset.parquet", index=False)
    subset.iloc[:100].to_parquet(folder / "decoy.parquet", index=False)  # must not be ingested
    paths = ArtifactPaths(data_dir=root / "data", raw_dir_override=folder / "panel_subset.parquet")
    t0 = time.perf_counter()
    results = run_data_half(paths, CFG, log=lambda _m: None)
    print(f"\npanel preset on {len(symbols)} real symbols ({len(subset)} rows): {time.perf_counter() - t0:.1f}s")
    return subset, paths, results


def test_one_file_in_every_row_accounted_for(run):
    subset, paths, results = run
    report = json.loads(paths.quality_report.read_text())
    assert [f["path"] for f in report["files"]] == [str(paths.raw_dir)]
    assert report["n_rows_in"] == len(subset) == report["n_rows_out"] + report["n_quarantined"]
    assert set(report["quarantine_by_reason"]) <= set(QUARANTINE_REASONS)
    assert report["data_source"] == f"raw file: {paths.raw_dir}" and report["synthetic"] is False


def test_daily_contract_on_real_bars(run):
    _, paths, results = run
    contract = build_contract(CFG.features)
    ds = read_dataset(paths.features, paths.labels)
    assert "hour_bucket" not in ds.columns and "session_bar" not in ds.columns
    assert contract.names("ctx_cat")[:2] == ["weekday", "month"]
    np.testing.assert_array_equal(ds["month"].to_numpy(), ds["timestamp"].dt.month.to_numpy() - 1)
    valid = ds["feature_valid"].to_numpy()
    assert valid.mean() > 0.9
    for name in XS_RANKS:
        x = ds[name].to_numpy()
        assert np.isfinite(x[valid]).all() and x[valid].min() == -1.0 and x[valid].max() == 1.0, name
        # centred: the mean of a date's ranks (over the symbols with a value that date) is 0
        finite = np.isfinite(x)
        per_day = pd.Series(x[finite], dtype=np.float64).groupby(ds.loc[finite, "timestamp"].to_numpy()).mean()
        assert per_day.abs().max() < 1e-6, name
    # labels at daily horizons: a 10-day triple barrier, forward returns up to 20 days
    assert results["labels"]["label_params"]["horizon"] == 10
    assert results["labels"]["label_params"]["label_window_bars"] == 20
    balance = results["labels"]["stats"]["class_balance"]
    assert all(0.2 < balance[k] < 0.45 for k in ("-1", "0", "1")), balance
    assert all(results["splits"]["summary"]["splits"][s]["samples"] > 1000 for s in SPLITS)


def test_features_of_a_date_prefix_are_the_prefix_of_the_features(run):
    _, paths, _ = run
    bars = read_frame(paths.bars)
    full = compute_features(bars, CFG.features)
    cut = np.sort(bars["timestamp"].unique())[700]
    keep = (bars["timestamp"] <= cut).to_numpy()
    part = compute_features(bars[keep].reset_index(drop=True), CFG.features)
    expected = full[keep].reset_index(drop=True)
    for col in ["atr", *build_contract(CFG.features).all_names, "feature_valid"]:
        np.testing.assert_array_equal(part[col].to_numpy(), expected[col].to_numpy(), err_msg=col)
