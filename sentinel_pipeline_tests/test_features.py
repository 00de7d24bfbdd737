"""Stage 2 features: causality, no leakage, the contract, warm-up, scale-freeness, reference values."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data import features as feat
from sentinel_pipeline.data.feature_contract import GROUP_DTYPES, read_contract, read_feature_schema
from sentinel_pipeline.data.features import (
    BAR_COLUMNS,
    FeatureConfig,
    build_contract,
    compute_features,
    cross_sectional_rank,
    daily_feature_config,
    feature_report,
    warmup_bars,
    write_features,
)

SYMBOL_POOL = ("AAA", "BRK.B", "CC", "DX-1", "EEEE", "ZZ")


def make_bars(seed: int, lengths: list[int], *, gaps: bool = False, daily: bool = False) -> pd.DataFrame:
    """Random-walk OHLCV bars of len(lengths) symbols, sorted by (symbol, timestamp), ns UTC.

    Symbols start at random hours of one hourly grid so that they share some timestamps; with
    ``gaps`` the steps between bars are random 1..72 hours, with ``daily`` bars sit at 00:00 UTC.
    """
    rng = np.random.default_rng(seed)
    names = sorted(rng.choice(SYMBOL_POOL, size=len(lengths), replace=False))
    frames = []
    for name, n in zip(names, lengths, strict=True):
        step = 24 if daily else 1
        steps = rng.integers(1, 73, n) if gaps else np.full(n, step)
        hours = int(rng.integers(0, 40)) * step + np.cumsum(steps) - steps[0]
        ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(hours, unit="h")
        lr = rng.normal(0.0, 0.01, n)
        close = rng.uniform(1.0, 1000.0) * np.exp(np.cumsum(lr))
        opn = close * np.exp(-lr + rng.normal(0.0, 0.002, n))
        high = np.maximum(opn, close) * np.exp(np.abs(rng.normal(0.0, 0.004, n)))
        low = np.minimum(opn, close) * np.exp(-np.abs(rng.normal(0.0, 0.004, n)))
        frames.append(pd.DataFrame({
            "symbol": name, "timestamp": ts.as_unit("ns"), "open": opn, "high": high, "low": low,
            "close": close, "volume": rng.lognormal(9.0, 1.0, n),
        }))
    return pd.concat(frames, ignore_index=True)


CONTRACT = build_contract()
FLOAT_FEATURES = [f.name for f in CONTRACT.features if f.group != "ctx_cat"]
CAT_FEATURES = CONTRACT.names("ctx_cat")
COMPUTED = ["atr", *CONTRACT.all_names, "feature_valid"]
# features that read other symbols' bars (at the same timestamp only)
CROSS_SECTIONAL = ["xs_ret_z"]
DAILY = daily_feature_config()
DAILY_CONTRACT = build_contract(DAILY)
DAILY_COMPUTED = ["atr", *DAILY_CONTRACT.all_names, "feature_valid"]
XS_RANKS = [n for n in DAILY_CONTRACT.all_names if n.startswith("xs_rank_")]
# the default (intraday) contract's hash: a change here re-labels every existing artefact
DEFAULT_CONTRACT_HASH = "008f7c97c7e8d4f3"


def assert_frames_identical(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> None:
    assert len(a) == len(b)
    for col in columns:
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)


# ---------------------------------------------------------------------------------------------
# causality
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(25))
def test_features_of_a_prefix_equal_the_prefix_of_the_features(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    lengths = [int(x) for x in rng.integers(1, 260, rng.integers(1, 5))]
    bars = make_bars(seed, lengths, gaps=bool(seed % 3 == 0))
    full = compute_features(bars)
    cut = rng.choice(bars["timestamp"].to_numpy())
    keep = (bars["timestamp"] <= cut).to_numpy()
    part = compute_features(bars[keep].reset_index(drop=True))
    expected = full[keep].reset_index(drop=True)
    assert_frames_identical(part, expected, ["symbol", "timestamp", *COMPUTED])  # bit-for-bit


@pytest.mark.parametrize("seed", range(12))
def test_daily_features_of_a_prefix_equal_the_prefix_of_the_features(seed: int) -> None:
    """The daily config (month, cross-sectional ranks) is causal too: ranks read the same timestamp only."""
    rng = np.random.default_rng(2000 + seed)
    lengths = [int(x) for x in rng.integers(1, 200, rng.integers(2, 6))]
    bars = make_bars(seed, lengths, daily=True)
    full = compute_features(bars, DAILY)
    cut = rng.choice(bars["timestamp"].to_numpy())
    keep = (bars["timestamp"] <= cut).to_numpy()
    part = compute_features(bars[keep].reset_index(drop=True), DAILY)
    assert_frames_identical(part, full[keep].reset_index(drop=True), ["symbol", "timestamp", *DAILY_COMPUTED])
    # the future bars of every symbol perturbed: the past (ranks included) does not move
    moved = bars.copy()
    future = ~keep
    moved.loc[future, ["open", "high", "low", "close"]] *= np.exp(rng.normal(0, 0.3, (future.sum(), 1)))
    moved.loc[future, "volume"] *= 5.0
    assert_frames_identical(compute_features(moved, DAILY)[keep], full[keep], DAILY_COMPUTED)


def test_perturbing_future_bars_leaves_past_features_unchanged() -> None:
    bars = make_bars(7, [300, 280, 320])
    cut = bars["timestamp"].sort_values().iloc[len(bars) // 2]
    future = (bars["timestamp"] > cut).to_numpy()
    perturbed = bars.copy()
    perturbed.loc[future, ["open", "high", "low", "close"]] *= 10.0
    perturbed.loc[future, "volume"] *= 7.0
    base, moved = compute_features(bars), compute_features(perturbed)
    assert_frames_identical(base[~future], moved[~future], COMPUTED)
    # the detector can fail: the bar right after the cut sees the 10x jump in every return feature
    first_after = np.flatnonzero(future)[0]
    assert base.at[first_after, "ret_1"] != moved.at[first_after, "ret_1"]


def test_changing_one_symbol_does_not_change_another() -> None:
    bars = make_bars(11, [250, 250, 250])
    a, b, c = sorted(bars["symbol"].unique())
    changed = bars.copy()
    rows_b = (changed["symbol"] == b).to_numpy()
    noise = np.exp(np.random.default_rng(0).normal(0.0, 0.05, rows_b.sum()))
    for col in ("open", "high", "low", "close"):
        changed.loc[rows_b, col] *= noise
    changed.loc[rows_b, "high"] = changed.loc[rows_b, ["open", "high", "low", "close"]].max(axis=1)
    changed.loc[rows_b, "low"] = changed.loc[rows_b, ["open", "high", "low", "close"]].min(axis=1)
    changed.loc[rows_b, "volume"] *= np.exp(np.random.default_rng(1).normal(0.0, 1.0, rows_b.sum()))
    base, other = compute_features(bars), compute_features(changed)
    rows_ac = (bars["symbol"] != b).to_numpy()
    per_symbol = [col for col in COMPUTED if col not in CROSS_SECTIONAL]
    assert_frames_identical(base[rows_ac], other[rows_ac], per_symbol)
    # xs_ret_z is the documented exception: it averages all symbols at the same timestamp
    assert not np.array_equal(base.loc[rows_ac, "xs_ret_z"].to_numpy(), other.loc[rows_ac, "xs_ret_z"].to_numpy(),
                              equal_nan=True)
    # a symbol computed alone gets the same per-symbol features as inside the panel
    alone = compute_features(bars[bars["symbol"] == c].reset_index(drop=True))
    assert_frames_identical(alone, base[(bars["symbol"] == c).to_numpy()].reset_index(drop=True), per_symbol)
    # daily config: the cross-sectional ranks move with the other symbol, nothing else does
    base_d, other_d = compute_features(bars, DAILY), compute_features(changed, DAILY)
    per_symbol_d = [col for col in DAILY_COMPUTED if col not in [*CROSS_SECTIONAL, *XS_RANKS]]
    assert_frames_identical(base_d[rows_ac], other_d[rows_ac], per_symbol_d)
    for name in XS_RANKS:
        assert not np.array_equal(base_d.loc[rows_ac, name].to_numpy(), other_d.loc[rows_ac, name].to_numpy(),
                                  equal_nan=True), name


# ---------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------
def _changed_value(name: str, value: object) -> object:
    if name == "bar_frequency":
        return "daily" if value == "intraday" else "intraday"
    if name == "ffd":  # the optional FFD group (off by default): switching it on adds a feature
        return feat.FFDConfig(d=0.4) if value is None else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, int):
        return value + 1
    assert isinstance(value, tuple)
    return (*value[:-1], value[-1] + 1)


# parameters of features that exist at one bar frequency only (they cannot move the other's hash)
DAILY_ONLY = {"xs_rank_return_lags", "xs_rank_rv_window", "xs_rank_volume_z_window"}
INTRADAY_ONLY = {"hours_per_bucket", "session_bar_scale"}


@pytest.mark.parametrize("default, ignored", [(FeatureConfig(), DAILY_ONLY), (DAILY, INTRADAY_ONLY)],
                         ids=["intraday", "daily"])
def test_contract_hash_is_stable_and_follows_every_parameter(monkeypatch: pytest.MonkeyPatch, default, ignored) -> None:
    first, second = build_contract(default), build_contract(dataclasses.replace(default))
    assert first.hash == second.hash and first.canonical_json() == second.canonical_json()
    seen = {first.hash}
    for field in dataclasses.fields(FeatureConfig):
        changed = dataclasses.replace(default, **{field.name: _changed_value(field.name, getattr(default, field.name))})
        h = build_contract(changed).hash
        if field.name in ignored:
            assert h == first.hash, f"FeatureConfig.{field.name} should not act at this bar frequency"
            continue
        assert h not in seen, f"changing FeatureConfig.{field.name} does not change the contract hash"
        seen.add(h)
    monkeypatch.setattr(feat, "FEATURE_CODE_VERSION", "bumped")
    assert build_contract(default).hash != first.hash


def test_default_intraday_contract_hash_is_unchanged() -> None:
    """The daily option must not re-label the default contract (or its artefacts and bundles)."""
    assert CONTRACT.hash == DEFAULT_CONTRACT_HASH
    assert DAILY_CONTRACT.hash != DEFAULT_CONTRACT_HASH
    assert not any("bar_frequency" in f.params for f in CONTRACT.features)
    assert {f.name for f in DAILY_CONTRACT.features if f.params.get("bar_frequency") == "daily"} == {"month", *XS_RANKS}


def test_daily_contract_has_month_and_ranks_and_no_intraday_features() -> None:
    bars = make_bars(4, [260, 240, 200, 90], daily=True)
    frame = compute_features(bars, DAILY)
    names = DAILY_CONTRACT.all_names
    assert "hour_bucket" not in names and "session_bar" not in names
    assert "hour_bucket" not in frame.columns and "session_bar" not in frame.columns
    assert XS_RANKS == ["xs_rank_ret_20", "xs_rank_ret_60", "xs_rank_rv_20", "xs_rank_vol_z_20"]
    assert DAILY_CONTRACT.names("ctx_cat") == ["weekday", "month", "vol_regime", "trend_regime", "symbol_bucket"]
    assert DAILY_CONTRACT.ctx_cat_cardinalities == [7, 12, 3, 3, 8]
    assert list(frame.columns) == [*BAR_COLUMNS, "atr", *names, "feature_valid"]
    for spec in DAILY_CONTRACT.features:
        assert str(frame[spec.name].dtype) == spec.dtype
    np.testing.assert_array_equal(frame["month"].to_numpy(), bars["timestamp"].dt.month.to_numpy() - 1)
    # the per-symbol features are those of the intraday config
    intraday = compute_features(bars)
    shared = [n for n in CONTRACT.all_names if n in names]
    assert len(shared) == len(CONTRACT.all_names) - 2
    assert_frames_identical(frame, intraday, ["atr", *shared])
    # every rank is the pandas percentile rank of its source across the symbols of its timestamp
    sources = {"xs_rank_ret_20": np.log(bars["close"]).groupby(bars["symbol"]).diff(20),
               "xs_rank_ret_60": np.log(bars["close"]).groupby(bars["symbol"]).diff(60),
               "xs_rank_rv_20": intraday["rv_20"].astype(np.float64),
               "xs_rank_vol_z_20": intraday["vol_z_20"].astype(np.float64)}
    for name, src in sources.items():
        got = frame[name].to_numpy(np.float64)
        ref = src.groupby(bars["timestamp"]).rank(method="average")
        m = src.groupby(bars["timestamp"]).transform("count")
        expected = np.where(m > 1, 2 * (ref - 1) / (m - 1) - 1, 0.0)
        np.testing.assert_array_equal(np.isnan(got), src.isna().to_numpy(), err_msg=name)
        ok = ~np.isnan(got)
        np.testing.assert_allclose(got[ok], expected[ok], atol=2e-6, err_msg=name)  # float32 sources: ties alike
        assert got[ok].min() >= -1.0 and got[ok].max() <= 1.0
        # an extreme of a timestamp with several symbols is -1 or +1
        assert got[ok].min() == -1.0 and got[ok].max() == 1.0
    # validity: the ranks' warm-up is their source's
    index_in_symbol = frame.groupby("symbol", sort=False).cumcount().to_numpy()
    np.testing.assert_array_equal(frame["feature_valid"].to_numpy(), index_in_symbol >= warmup_bars(DAILY))


def test_cross_sectional_rank_ties_lone_values_and_nan() -> None:
    values = np.array([3.0, 1.0, 1.0, np.nan, 5.0, 2.0, np.inf], dtype=np.float32)
    codes = np.array([0, 0, 0, 0, 1, 2, 2])
    got = cross_sectional_rank(values, codes)
    # group 0: 1, 1 (tied: rank 1.5 of 3), 3; group 1 alone -> 0; group 2: 2 alone among finite -> 0
    np.testing.assert_array_equal(got, np.array([1.0, -0.5, -0.5, np.nan, 0.0, 0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="bar_frequency"):
        FeatureConfig(bar_frequency="weekly")


def test_contract_matches_the_frame() -> None:
    bars = make_bars(3, [150, 90])
    frame = compute_features(bars)
    assert list(frame.columns) == [*BAR_COLUMNS, "atr", *CONTRACT.all_names, "feature_valid"]
    assert isinstance(frame.index, pd.RangeIndex)
    assert_frames_identical(frame, bars, list(BAR_COLUMNS))
    for spec in CONTRACT.features:
        assert str(frame[spec.name].dtype) == spec.dtype == GROUP_DTYPES[spec.group]
    assert frame["feature_valid"].dtype == bool and frame["atr"].dtype == np.float64
    dims = CONTRACT.dims()
    assert 10 <= dims["seq"] <= 16 and 8 <= dims["snap"] <= 12
    assert dims["ctx_cat"] == 5 and dims["ctx_cont"] == 2
    cards = dict(zip(CAT_FEATURES, CONTRACT.ctx_cat_cardinalities, strict=True))
    assert cards == {"hour_bucket": 8, "weekday": 7, "vol_regime": 3, "trend_regime": 3, "symbol_bucket": 8}
    for name, card in cards.items():
        values = frame[name].to_numpy()
        assert values.min() >= 0 and values.max() < card, name


def test_context_switch_drops_ctx_and_keeps_the_rest() -> None:
    bars = make_bars(5, [200, 120])
    off = FeatureConfig(context_features=False)
    contract = build_contract(off)
    assert not any(f.group.startswith("ctx") for f in contract.features)
    assert contract.hash != CONTRACT.hash
    frame_off, frame_on = compute_features(bars, off), compute_features(bars)
    assert not [c for c in frame_off.columns if c in CAT_FEATURES or c in CONTRACT.names("ctx_cont")]
    assert list(frame_off.columns) == [*BAR_COLUMNS, "atr", *contract.all_names, "feature_valid"]
    assert_frames_identical(frame_off, frame_on, ["atr", *contract.all_names])


def test_duplicate_feature_names_and_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate feature names"):
        build_contract(FeatureConfig(rsi_window=28))  # rsi_28 would be in seq and snap
    with pytest.raises(ValueError, match="hours_per_bucket"):
        FeatureConfig(hours_per_bucket=5)
    with pytest.raises(ValueError, match="return_lags"):
        FeatureConfig(return_lags=(1, 1))


# ---------------------------------------------------------------------------------------------
# warm-up and validity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("config", [FeatureConfig(), DAILY, FeatureConfig(
    return_lags=(1, 3), rv_windows=(4,), range_windows=(8,), sma_windows=(6,), vol_ratio_windows=(3, 9),
    zret_lags=(12,), zret_rv_window=9, snap_rsi_window=7, snap_volume_z_window=9, macd_slow=15,
    vol_regime_min_periods=5, vol_regime_history=30, trend_ema_window=10, trend_slope_bars=3)])
def test_feature_valid_is_false_exactly_during_warm_up(config: FeatureConfig, gaps: bool) -> None:
    bars = make_bars(21, [400, 150, 40], gaps=gaps)
    frame = compute_features(bars, config)
    contract = build_contract(config)
    warm = warmup_bars(config)
    index_in_symbol = frame.groupby("symbol", sort=False).cumcount().to_numpy()
    np.testing.assert_array_equal(frame["feature_valid"].to_numpy(), index_in_symbol >= warm)
    floats = [f.name for f in contract.features if f.group != "ctx_cat"]
    valid = frame.loc[frame["feature_valid"], floats].to_numpy()
    assert valid.shape[0] > 0 and np.isfinite(valid).all()
    cats = frame[contract.names("ctx_cat")].to_numpy()
    assert (cats >= 0).all() and (cats < np.array(contract.ctx_cat_cardinalities)).all()
    atr_nan = np.isnan(frame["atr"].to_numpy())
    np.testing.assert_array_equal(atr_nan, index_in_symbol < config.atr_window - 1)


def test_empty_bars_give_an_empty_frame_with_all_columns() -> None:
    frame = compute_features(make_bars(1, [5]).iloc[:0])
    assert len(frame) == 0
    assert list(frame.columns) == [*BAR_COLUMNS, "atr", *CONTRACT.all_names, "feature_valid"]


def test_daily_bars_share_one_hour_bucket_and_session_bar_is_zero() -> None:
    frame = compute_features(make_bars(2, [120, 80], daily=True))
    assert set(frame["hour_bucket"].unique()) == {0}
    assert (frame["session_bar"] == 0.0).all()
    assert frame["feature_valid"].sum() == (120 - warmup_bars()) + (80 - warmup_bars())


# ---------------------------------------------------------------------------------------------
# scale-freeness
# ---------------------------------------------------------------------------------------------
def test_scaling_one_symbols_prices_leaves_its_float_features_unchanged() -> None:
    bars = make_bars(13, [300, 260])
    rows = (bars["symbol"] == bars["symbol"].iloc[0]).to_numpy()
    scaled = bars.copy()
    scaled.loc[rows, ["open", "high", "low", "close"]] *= 100.0
    base, other = compute_features(bars), compute_features(scaled)
    for name in FLOAT_FEATURES:
        np.testing.assert_allclose(other[name].to_numpy(np.float64), base[name].to_numpy(np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(other.loc[rows, "atr"], base.loc[rows, "atr"] * 100.0, rtol=1e-12)
    np.testing.assert_array_equal(other["feature_valid"], base["feature_valid"])


# ---------------------------------------------------------------------------------------------
# values against straightforward pandas formulas
# ---------------------------------------------------------------------------------------------
def _wilder(x: pd.Series, n: int, seed_from: int) -> pd.Series:
    """Wilder smoothing: mean of x[seed_from : seed_from + n] at its last bar, then alpha = 1/n."""
    seeded = x.iloc[seed_from + n - 1:].copy()
    seeded.iloc[0] = x.iloc[seed_from:seed_from + n].mean()
    return seeded.ewm(alpha=1.0 / n, adjust=False).mean().reindex(x.index)


def test_features_match_pandas_reference_formulas() -> None:
    cfg = FeatureConfig()
    bars = make_bars(17, [400, 330, 370])
    frame = compute_features(bars, cfg)
    close = np.log(bars["close"])
    for sym, b in bars.groupby("symbol", sort=False):
        f = frame.loc[b.index]
        lr = close[b.index].diff()
        prev = b["close"].shift(1)
        tr = pd.concat([b["high"] - b["low"], (b["high"] - prev).abs(), (b["low"] - prev).abs()], axis=1).max(axis=1)
        atr = _wilder(tr, cfg.atr_window, 0)
        rv20 = np.sqrt((lr**2).rolling(20).mean())
        rv60 = np.sqrt((lr**2).rolling(60).mean())
        change = b["close"].diff()
        gain = _wilder(change.clip(lower=0), 14, 1)
        loss = _wilder((-change).clip(lower=0), 14, 1)
        macd = b["close"].ewm(span=12, adjust=False).mean() - b["close"].ewm(span=26, adjust=False).mean()
        hist = macd - macd.ewm(span=9, adjust=False).mean()
        lv = np.log1p(b["volume"])
        ema50 = b["close"].ewm(span=50, adjust=False).mean()
        slope = (ema50 - ema50.shift(10)) / atr
        expected = {
            "atr": atr,
            "ret_1": lr, "ret_5": close[b.index].diff(5), "ret_20": close[b.index].diff(20),
            "ret_10_vn": close[b.index].diff(10) / (rv20 * np.sqrt(10)),
            "atr_pct": atr / b["close"],
            "rv_20": rv20,
            "rsi_14": (gain - loss) / (gain + loss),
            "macd_line": (macd / atr).where(np.arange(len(b)) >= 25),
            "macd_hist": (hist / atr).where(np.arange(len(b)) >= 33),
            "close_pos": (b["close"] - b["low"]) / (b["high"] - b["low"]),
            "range_atr": (b["high"] - b["low"]) / atr,
            "vol_z_20": (lv - lv.rolling(20).mean()) / lv.rolling(20).std(ddof=0),
            "gap": np.log(b["open"] / prev),
            "dist_high_60": (b["close"] - b["high"].rolling(60).max()) / atr,
            "dist_low_20": (b["close"] - b["low"].rolling(20).min()) / atr,
            "px_sma_60": (b["close"] - b["close"].rolling(60).mean()) / atr,
            "vol_ratio_5_60": np.sqrt((lr**2).rolling(5).mean()) / rv60,
            "ret_60_z": close[b.index].diff(60) / (rv60 * np.sqrt(60)),
            "session_bar": b.groupby(b["timestamp"].dt.floor("D")).cumcount().clip(upper=24) / 24.0,
        }
        for name, ref in expected.items():
            got = f[name].to_numpy(np.float64)
            want = ref.to_numpy(np.float64)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{sym} {name} NaN pattern")
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, equal_nan=True, err_msg=f"{sym} {name}")
        np.testing.assert_array_equal(f["hour_bucket"], b["timestamp"].dt.hour // 3)
        np.testing.assert_array_equal(f["weekday"], b["timestamp"].dt.day_of_week)
        np.testing.assert_array_equal(f["symbol_bucket"], zlib.crc32(str(sym).encode()) % 8)
        trend = np.where(slope > 0.5, 2, np.where(slope < -0.5, 0, 1))
        np.testing.assert_array_equal(f["trend_regime"].to_numpy()[59:], trend[59:])
        # vol regime: tercile of rv_20's rank among the previous (up to) 250 rv_20 values
        rv = rv20.to_numpy()
        for t in range(60, len(b), 7):
            hist_rv = rv[max(20, t - 250):t]
            frac = ((hist_rv < rv[t]).sum() + 0.5 * (hist_rv == rv[t]).sum()) / hist_rv.size
            assert f["vol_regime"].iloc[t] == int(frac >= 1 / 3) + int(frac >= 2 / 3), (sym, t)
    # cross-sectional: mean over symbols at the timestamp of clip(ret_1 / rv_20, -5, 5)
    z = (frame["ret_1"].astype(np.float64) / frame["rv_20"].astype(np.float64)).clip(-5, 5).astype(np.float32)
    xs = z.astype(np.float64).groupby(frame["timestamp"]).transform("mean")
    np.testing.assert_allclose(frame["xs_ret_z"], xs.where(z.notna()), rtol=1e-5, atol=1e-6)
    assert frame.groupby("timestamp")["symbol"].count().max() > 1  # the panel really overlaps


# ---------------------------------------------------------------------------------------------
# bad input, report, writing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.drop(columns="volume"), "missing columns"),
    (lambda b: b.assign(timestamp=b["timestamp"].dt.tz_localize(None)), "timestamp"),
    (lambda b: b.iloc[np.r_[0:10, 60:70, 10:60, 70:len(b)]], "not contiguous|strictly increasing"),
    (lambda b: b.assign(close=b["close"].where(b.index != 5, 0.0)), "'close'.*row 5"),
    (lambda b: b.assign(volume=b["volume"].where(b.index != 3, np.nan)), "'volume'.*row 3"),
])
def test_bad_bars_are_refused_with_a_clear_message(mutate, message: str) -> None:
    bars = make_bars(1, [60, 40])
    with pytest.raises(ValueError, match=message):
        compute_features(mutate(bars).reset_index(drop=True))


def test_duplicate_timestamps_are_refused() -> None:
    bars = make_bars(1, [30])
    bars.loc[4, "timestamp"] = bars.loc[3, "timestamp"]
    with pytest.raises(ValueError, match="strictly increasing.*row 4"):
        compute_features(bars)


def test_report_and_written_files(tmp_path) -> None:
    bars = make_bars(9, [120, 100])
    frame = compute_features(bars)
    report = feature_report(frame, CONTRACT)
    assert report["n_rows"] == 220 and report["n_symbols"] == 2
    assert report["n_valid_rows"] == 220 - 2 * warmup_bars()
    paths = write_features(frame, CONTRACT, tmp_path / "features.parquet", tmp_path)
    back = pd.read_parquet(paths["features"])
    assert_frames_identical(back, frame, ["timestamp", *COMPUTED])
    assert read_contract(paths["contract"], expected_hash=CONTRACT.hash).all_names == CONTRACT.all_names
    assert read_feature_schema(paths["schema"])["seq"] == CONTRACT.names("seq")


# ---------------------------------------------------------------------------------------------
# real bars
# ---------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["goog_daily.parquet", "fx_eurusd_h1.parquet"])
def test_real_bars(shared_data_dir, name: str) -> None:
    bars = pd.read_parquet(shared_data_dir / name)
    frame = compute_features(bars)
    valid = frame["feature_valid"].to_numpy()
    assert valid.mean() > 0.95
    assert not valid[: warmup_bars()].any()
    assert np.isfinite(frame.loc[valid, FLOAT_FEATURES].to_numpy()).all()
    cut = bars["timestamp"].iloc[len(bars) // 2]
    part = compute_features(bars[bars["timestamp"] <= cut].reset_index(drop=True))
    assert_frames_identical(part, frame.iloc[: len(part)], COMPUTED)


@pytest.mark.parametrize("config", [DAILY, daily_feature_config(context_features=False, seq_len=20),
                                    daily_feature_config(xs_rank_return_lags=(5, 120), xs_rank_rv_window=10,
                                                         xs_rank_volume_z_window=30)])
def test_daily_contracts_rebuild_their_config_for_replay(config: FeatureConfig) -> None:
    from sentinel_pipeline.replay.feature_config import feature_config_from_contract

    contract = build_contract(config)
    assert feature_config_from_contract(contract) == config


@pytest.mark.parametrize("daily", [False, True])
def test_features_are_identical_for_any_thread_count(daily: bool) -> None:
    """The kernel spreads contiguous groups of symbols over threads; symbols are independent, so every
    column is bit-identical to the one-thread result (more threads than symbols, uneven lengths too)."""
    bars = make_bars(7, [300, 40, 1, 520, 260], gaps=True, daily=daily)
    config = daily_feature_config() if daily else FeatureConfig()
    one = compute_features(bars, config, threads=1)
    for threads in (2, 3, 8, 20):
        assert_frames_identical(compute_features(bars, config, threads=threads), one, list(one.columns))
    assert feat.feature_threads() >= 1
