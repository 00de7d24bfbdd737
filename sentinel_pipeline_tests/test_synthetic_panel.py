"""The synthetic panel preset: deterministic, valid bars, sector clusters, a planted cross-sectional signal
that is measurable (oracle and a plain momentum feature) and absent at strength 0."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.features import compute_features, daily_feature_config
from sentinel_pipeline.data.raw_bars import RAW_COLUMNS, load_raw_bars
from sentinel_pipeline.data.synthetic_panel import (
    SyntheticPanelConfig,
    centred_ranks,
    daily_rank_ic,
    describe_panel,
    ensure_synthetic_panel,
    generate_synthetic_panel,
    panel_sector_file,
    sector_correlations,
    signal_report,
    simulate_panel,
)

DEFAULT = SyntheticPanelConfig()
NULL = replace(DEFAULT, signal_strength=0.0)


@pytest.fixture(scope="module")
def panel():
    return simulate_panel(DEFAULT)


@pytest.fixture(scope="module")
def null_panel():
    return simulate_panel(NULL)


def test_default_size_and_shape(panel) -> None:
    bars = panel.bars
    assert DEFAULT.n_symbols >= 300 and DEFAULT.n_days >= 4 * 252
    assert list(bars.columns) == list(RAW_COLUMNS)
    assert len(bars) == DEFAULT.n_symbols * DEFAULT.n_days
    assert bars["symbol"].nunique() == DEFAULT.n_symbols
    assert bars.groupby("symbol").size().eq(DEFAULT.n_days).all()
    assert str(bars["timestamp"].dtype) == "datetime64[ns, UTC]"
    ts = bars["timestamp"]
    assert (ts.dt.hour == 0).all() and (ts.dt.day_of_week < 5).all()
    # sorted by (symbol, timestamp), strictly increasing within a symbol
    assert bars.equals(bars.sort_values(["symbol", "timestamp"], ignore_index=True))
    assert (bars.groupby("symbol")["timestamp"].diff().dropna() > pd.Timedelta(0)).all()
    assert len(panel.characteristic_rank) == len(panel.drift_next) == len(panel.row_sector) == len(bars)
    assert 8 <= len(np.unique(panel.sector)) == DEFAULT.n_sectors <= 11


def test_same_config_same_frame_other_seed_other_frame() -> None:
    small = SyntheticPanelConfig(n_symbols=30, n_days=120)
    a, b = generate_synthetic_panel(small), generate_synthetic_panel(small)
    pd.testing.assert_frame_equal(a, b)
    c = generate_synthetic_panel(replace(small, seed=1))
    assert not np.allclose(a["close"].to_numpy(), c["close"].to_numpy())


def test_bars_are_valid_by_construction(panel) -> None:
    b = panel.bars
    o, h, lo, c, v = (b[k].to_numpy() for k in ("open", "high", "low", "close", "volume"))
    assert np.isfinite(np.c_[o, h, lo, c, v]).all()
    assert (lo > 0).all() and (v >= 1).all() and (v == np.round(v)).all()
    assert (h >= np.maximum(o, c)).all() and (lo <= np.minimum(o, c)).all()
    assert (h > lo).mean() > 0.999  # bars have a range


def test_raw_stage_quarantines_nothing(tmp_path) -> None:
    cfg = SyntheticPanelConfig(n_symbols=25, n_days=80)
    path = ensure_synthetic_panel(tmp_path / "synthetic_panel", cfg)
    result = load_raw_bars(path)
    assert result.report["n_quarantined"] == 0 and len(result.bars) == 25 * 80


def test_strength_zero_has_exactly_zero_drift_and_the_same_shocks(panel, null_panel) -> None:
    assert not null_panel.drift_next.any()
    assert np.abs(panel.drift_next).max() > 0
    # drift is the only difference: log returns differ by exactly the planted drift
    n, t = DEFAULT.n_symbols, DEFAULT.n_days
    lr = np.diff(np.log(panel.bars["close"].to_numpy()).reshape(n, t), axis=1)
    lr0 = np.diff(np.log(null_panel.bars["close"].to_numpy()).reshape(n, t), axis=1)
    np.testing.assert_allclose(lr - lr0, panel.drift_next.reshape(n, t)[:, :-1], atol=1e-9)
    # the drift is strength x sigma(next day) x centred rank, so it is zero-sum in rank across symbols
    q = panel.characteristic_rank.reshape(n, t)
    assert np.allclose(q.sum(axis=0), 0.0) and q.min() == -1.0 and q.max() == 1.0
    sign_agrees = np.sign(panel.drift_next) == np.sign(panel.characteristic_rank)
    assert sign_agrees[panel.characteristic_rank != 0].all()


def test_sector_clusters_show_in_return_correlations(panel) -> None:
    corr = sector_correlations(panel)
    assert corr["within_sector"] > corr["across_sectors"] + 0.08
    assert 0.1 < corr["across_sectors"] < corr["within_sector"] < 0.6


def test_planted_signal_is_measurable_by_the_oracle_and_by_momentum(panel) -> None:
    report = signal_report(panel)
    oracle, mom = report["oracle"], report["xs_rank_ret_60"]
    assert report["tail_days"] >= 140 and report["hac_lag"] == 4
    assert oracle["ic_tail"] > 0.05 and oracle["t_tail"] > 3
    # learnable from a feature the pipeline computes: the momentum rank alone clears t > 3, weakly
    assert 0.02 < mom["ic_tail"] < 0.16 and mom["t_tail"] > 3
    assert mom["ic_tail"] < oracle["ic_tail"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strength_zero_is_a_null(seed: int) -> None:
    report = signal_report(simulate_panel(replace(NULL, seed=seed)))
    for name in ("oracle", "xs_rank_ret_60"):
        assert abs(report[name]["ic_tail"]) < 0.03 and abs(report[name]["t_tail"]) < 3, (name, report[name])


def test_the_feature_stage_sees_the_signal_in_its_momentum_rank() -> None:
    """The pipeline's own daily feature ``xs_rank_ret_60`` carries the planted signal."""
    cfg = SyntheticPanelConfig(n_symbols=120, n_days=500, seed=4)
    sim = simulate_panel(cfg)
    frame = compute_features(sim.bars, daily_feature_config())
    rank = frame["xs_rank_ret_60"].to_numpy(np.float64).reshape(cfg.n_symbols, cfg.n_days)
    lc = np.log(sim.bars["close"].to_numpy()).reshape(cfg.n_symbols, cfg.n_days)
    fwd = np.full_like(lc, np.nan)
    fwd[:, :-5] = lc[:, 5:] - lc[:, :-5]
    ic = daily_rank_ic(rank, fwd)
    assert np.nanmean(ic) > 0.02
    # and its rank of the latent characteristic agrees with the oracle's
    q = sim.characteristic_rank.reshape(cfg.n_symbols, cfg.n_days)
    assert np.nanmean(daily_rank_ic(rank, q)) > 0.2


def test_daily_rank_ic_and_centred_ranks_match_pandas() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    a[3, 2] = np.nan
    ic = daily_rank_ic(a, b)
    for j in range(6):
        ok = ~np.isnan(a[:, j])
        assert ic[j] == pytest.approx(pd.Series(a[ok, j]).corr(pd.Series(b[ok, j]), method="spearman"))
    r = centred_ranks(np.array([[3.0], [1.0], [2.0]]))
    np.testing.assert_array_equal(r[:, 0], [1.0, -1.0, 0.0])


def test_ensure_writes_its_own_folder_names_it_and_replaces_older_panels(tmp_path) -> None:
    folder = tmp_path / "synthetic_panel"
    a = SyntheticPanelConfig(n_symbols=20, n_days=30)
    first = ensure_synthetic_panel(folder, a)
    mtime = first.stat().st_mtime_ns
    assert ensure_synthetic_panel(folder, a) == first and first.stat().st_mtime_ns == mtime  # reused
    side = json.loads(first.with_suffix(".json").read_text())
    assert side["description"] == describe_panel(a) and describe_panel(a).startswith("synthetic panel")
    sectors = pd.read_csv(panel_sector_file(folder, a))
    sim = simulate_panel(a)
    assert list(sectors["symbol"]) == sim.symbols and list(sectors.columns) == ["symbol", "sector"]
    assert sectors["sector"].nunique() == a.n_sectors
    assert (pd.factorize(sectors["sector"], sort=True)[0] == sim.sector).all()
    second = ensure_synthetic_panel(folder, replace(a, seed=5))
    assert second != first and not first.exists() and sorted(p.name for p in folder.iterdir()) == sorted(
        [second.name, second.with_suffix(".json").name, panel_sector_file(folder, replace(a, seed=5)).name])
    with pytest.raises(ValueError, match="signal_strength"):
        SyntheticPanelConfig(signal_strength=-0.1)
