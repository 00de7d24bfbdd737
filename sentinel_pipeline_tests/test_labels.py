"""Stage 3: the numba triple-barrier labeller against hand-computed cases and the per-event reference."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.labels import (
    LabelConfig,
    label_columns,
    label_dataset,
    label_params,
    label_window_bars,
    target_columns,
    triple_barrier,
)
from sentinel_pipeline.data.split_arrays import TARGET_NAMES
from sentinel_pipeline_tests.reference_labeller import reference_label_dataset

T0 = pd.Timestamp("2024-01-02 14:30", tz="UTC")


def bars_frame(symbol: str, close, high=None, low=None, atr=1.0, freq: str = "h") -> pd.DataFrame:
    close = np.asarray(close, dtype=float)
    n = close.size
    return pd.DataFrame(
        {
            "symbol": symbol,
            "timestamp": pd.date_range(T0, periods=n, freq=freq),
            "high": close if high is None else np.asarray(high, dtype=float),
            "low": close if low is None else np.asarray(low, dtype=float),
            "close": close,
            "atr": np.broadcast_to(np.asarray(atr, dtype=float), (n,)).copy(),
        }
    )


def random_panel(rng: np.random.Generator, lengths: list[int], both_rate: float = 0.05) -> pd.DataFrame:
    """Random-walk bars per symbol with NaN/0/inf ATR rows and occasional huge bars that cross both barriers."""
    frames = []
    for s, n in enumerate(lengths):
        close = 50.0 * (s + 1) * np.exp(np.cumsum(rng.normal(0, 0.005, n)))
        spread = np.abs(rng.normal(0, 0.003, (2, n))) * close
        high, low = close + spread[0], close - spread[1]
        wide = rng.random(n) < both_rate
        high[wide] += 0.2 * close[wide]
        low[wide] -= 0.2 * close[wide]
        atr = close * rng.uniform(0.002, 0.03, n)
        atr[rng.random(n) < 0.05] = np.nan
        atr[rng.random(n) < 0.03] = 0.0
        atr[rng.random(n) < 0.01] = np.inf
        steps = rng.choice([1, 1, 1, 2, 5], size=n)  # uneven spacing between bars
        ts = pd.Timestamp("2023-03-01", tz="UTC") + pd.to_timedelta(np.cumsum(steps), unit="h")
        frames.append(
            pd.DataFrame(
                {"symbol": f"S{s:02d}", "timestamp": ts, "high": high, "low": low, "close": close, "atr": atr}
            )
        )
    return pd.concat(frames, ignore_index=True)


def assert_matches_reference(out: pd.DataFrame, ref: pd.DataFrame, rows=None) -> None:
    got = out if rows is None else out.loc[rows]
    assert list(ref.columns) == [c for c in out.columns if c in ref.columns]
    for col in ref.columns:
        a, b = got[col], ref[col]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(
                a.to_numpy(), b.to_numpy(), rtol=1e-12, atol=0, equal_nan=True, err_msg=col
            )
        else:  # ints, bools, timestamps: exact (NaT positions must agree too)
            pd.testing.assert_series_equal(a, b, check_index=False, check_names=False, obj=col)


# -- hand-computed cases -------------------------------------------------------------------------

CFG = LabelConfig(pt=1.0, sl=2.0, horizon=3, fwd_horizons=(1, 2), excursion_bars=2)


def label_one(close, high, low, atr=1.0, config=CFG) -> pd.Series:
    out, _ = label_dataset(bars_frame("X", close, high, low, atr), config)
    return out.iloc[0]


def test_upper_barrier_first() -> None:
    # entry 100, atr 1 -> upper 101, lower 98; bar 2 reaches exactly 101 (>= counts)
    row = label_one([100, 100.5, 100.8, 99, 99], [100, 100.9, 101.0, 99.5, 99], [100, 100.2, 99.5, 98.5, 99])
    assert row["tb_label"] == 1 and not row["tb_both_touched"]
    assert row["tb_bars_to_touch"] == 2
    assert row["tb_touch_time"] == T0 + pd.Timedelta(hours=2)
    assert row["tb_return"] == pytest.approx(1.0 / 100)
    assert row["tb_return_atr"] == pytest.approx(1.0)
    assert row["fwd_ret_1"] == pytest.approx(100.5 / 100 - 1)
    assert row["fwd_ret_2"] == pytest.approx(100.8 / 100 - 1)
    assert row["mfe_2"] == pytest.approx(1.0) and row["mae_2"] == pytest.approx(0.5)
    assert row["early_move"] == pytest.approx(0.5)
    assert row["label_eligible"]


def test_lower_barrier_first_with_asymmetric_widths() -> None:
    # lower = 100 - 2*1 = 98; bar 1 low 98.5 does not touch, bar 3 low 98 does; upper 101 never reached
    row = label_one([100, 99, 99, 98.2, 99], [100, 100.9, 99.5, 99, 99], [100, 98.5, 98.7, 98.0, 99])
    assert row["tb_label"] == -1 and not row["tb_both_touched"]
    assert row["tb_bars_to_touch"] == 3
    assert row["tb_touch_time"] == T0 + pd.Timedelta(hours=3)
    assert row["tb_return"] == pytest.approx(-2.0 / 100)
    assert row["tb_return_atr"] == pytest.approx(-2.0)
    assert row["mfe_2"] == pytest.approx(0.9) and row["mae_2"] == pytest.approx(1.5)


def test_bar_touching_both_is_conservative_minus_one() -> None:
    row = label_one([100, 100, 100, 100, 100], [100, 100.5, 102, 100, 100], [100, 99.5, 97, 100, 100])
    assert row["tb_label"] == -1 and row["tb_both_touched"]
    assert row["tb_bars_to_touch"] == 2
    assert row["tb_return"] == pytest.approx(-0.02)


def test_vertical_barrier() -> None:
    row = label_one(
        [100, 100.3, 99.1, 100.6, 150], [100, 100.5, 100.9, 100.8, 150], [100, 99.9, 98.1, 100.2, 150]
    )
    assert row["tb_label"] == 0 and not row["tb_both_touched"]
    assert row["tb_bars_to_touch"] == 3
    assert row["tb_touch_time"] == T0 + pd.Timedelta(hours=3)  # bar t + horizon
    assert row["tb_return"] == pytest.approx(100.6 / 100 - 1)
    assert row["tb_return_atr"] == pytest.approx(0.6)
    assert row["mfe_2"] == pytest.approx(0.9) and row["mae_2"] == pytest.approx(1.9)


@pytest.mark.parametrize("bad_atr", [np.nan, 0.0, -1.0, np.inf])
def test_invalid_atr_is_ineligible_not_labelled(bad_atr: float) -> None:
    row = label_one(
        [100, 100, 100, 100, 100], [100, 105, 100, 100, 100], [100, 95, 100, 100, 100], atr=bad_atr
    )
    assert not row["label_eligible"]
    assert row["tb_label"] == 0 and not row["tb_both_touched"]
    assert row["tb_bars_to_touch"] == -1 and pd.isna(row["tb_touch_time"])
    assert all(np.isnan(row[c]) for c in target_columns(CFG))


def test_last_window_of_each_symbol_is_ineligible() -> None:
    config = LabelConfig(horizon=4, fwd_horizons=(1, 7), excursion_bars=3)
    w = label_window_bars(config)
    assert w == 7
    df = pd.concat([bars_frame("A", np.linspace(10, 11, 20)), bars_frame("B", np.linspace(20, 19, 12))])
    out, stats = label_dataset(df, config)
    for sym, g in out.groupby("symbol"):
        elig = g["label_eligible"].to_numpy()
        assert not elig[-w:].any(), sym
        assert elig[:-w].all(), sym  # atr = 1 everywhere, so every earlier row is labelled
        tail = g.iloc[-w:]
        assert (tail["tb_label"] == 0).all() and (tail["tb_bars_to_touch"] == -1).all()
        assert tail["tb_touch_time"].isna().all() and tail[target_columns(config)].isna().all().all()
    assert stats["n_eligible"] == (20 - w) + (12 - w)
    # a symbol shorter than the window has no label at all
    out_short, stats_short = label_dataset(bars_frame("C", [1.0] * w), config)
    assert not out_short["label_eligible"].any() and stats_short["n_eligible"] == 0
    assert stats_short["mean_bars_to_touch"] is None


def test_labels_never_use_another_symbols_bars() -> None:
    config = LabelConfig(pt=1.0, sl=1.0, horizon=5, fwd_horizons=(1, 5), excursion_bars=3)
    calm = bars_frame("A", [100.0] * 12, [100.2] * 12, [99.8] * 12, atr=1.0)
    # B's bars would cross both of A's barriers in its first bar if the scan leaked past A's end
    wild = bars_frame("B", [100.0] * 12, [500.0] * 12, [1.0] * 12, atr=1.0)
    alone, _ = label_dataset(calm, config)
    together, _ = label_dataset(pd.concat([calm, wild], ignore_index=True), config)
    a = together[together["symbol"] == "A"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, alone)
    assert (alone["tb_label"][alone["label_eligible"]] == 0).all()
    assert not alone["label_eligible"].iloc[-5:].any()


# -- randomized equality with the reference --------------------------------------------------------

CONFIGS = [
    LabelConfig(),
    LabelConfig(pt=1.0, sl=2.0, horizon=5, fwd_horizons=(1, 3), excursion_bars=6),
    LabelConfig(pt=2.5, sl=0.7, horizon=12, fwd_horizons=(2, 12, 15), excursion_bars=4),
    LabelConfig(pt=0.5, sl=0.5, horizon=1, fwd_horizons=(1,), excursion_bars=1),
]


@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_on_random_panels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    config = CONFIGS[seed % len(CONFIGS)]
    lengths = [int(x) for x in rng.integers(1, 90, size=4)] + [label_window_bars(config) + 1]
    df = random_panel(rng, lengths, both_rate=0.03)
    out, stats = label_dataset(df, config)
    ref = reference_label_dataset(df, config)
    assert_matches_reference(out, ref)
    elig = out["label_eligible"]
    # each panel exercises every outcome, so the comparison above covers them all
    assert set(out.loc[elig, "tb_label"].unique()) == {-1, 0, 1}
    assert stats["n_both_touched"] > 0
    assert stats["n_eligible"] == int(elig.sum())
    assert stats["n_both_touched"] == int(out["tb_both_touched"].sum())
    assert (out.loc[out["tb_both_touched"], "tb_label"] == -1).all()


# -- frame contract, stats, params -----------------------------------------------------------------


def test_output_frame_contract_and_stats() -> None:
    rng = np.random.default_rng(7)
    df = random_panel(rng, [60, 45, 30])
    df["extra"] = np.arange(len(df), dtype=np.int64)
    df.index = pd.RangeIndex(100, 100 + len(df))  # not a default index: output gets one
    config = LabelConfig()
    out, stats = label_dataset(df, config)
    assert isinstance(out.index, pd.RangeIndex) and out.index.start == 0 and len(out) == len(df)
    assert list(out.columns) == [*df.columns, *label_columns(config)]
    np.testing.assert_array_equal(out["extra"].to_numpy(), df["extra"].to_numpy())
    assert out["tb_label"].dtype == np.int8 and out["tb_bars_to_touch"].dtype == np.int32
    assert out["tb_both_touched"].dtype == bool and out["label_eligible"].dtype == bool
    assert out["tb_touch_time"].dtype == df["timestamp"].dtype
    assert target_columns(config) == list(TARGET_NAMES)

    elig = out["label_eligible"]
    assert stats["n_rows"] == len(df) and stats["eligibility_rate"] == pytest.approx(elig.mean())
    balance = stats["class_balance"]
    assert set(balance) == {"-1", "0", "1"} and sum(balance.values()) == pytest.approx(1.0)
    assert balance["1"] == pytest.approx((out.loc[elig, "tb_label"] == 1).mean())
    assert stats["mean_bars_to_touch"] == pytest.approx(out.loc[elig, "tb_bars_to_touch"].mean())
    json.dumps(stats)
    # eligible rows: touch strictly after t, within the horizon, excursions non-negative
    e = out[elig]
    assert (e["tb_touch_time"] > e["timestamp"]).all()
    assert e["tb_bars_to_touch"].between(1, config.horizon).all()
    assert (e["mfe_6"] >= 0).all() and (e["mae_6"] >= 0).all()


def test_triple_barrier_array_api_agrees_with_label_dataset() -> None:
    rng = np.random.default_rng(3)
    df = random_panel(rng, [80, 50])
    config = LabelConfig(pt=1.3, sl=0.9, horizon=8, fwd_horizons=(1,), excursion_bars=2)
    out, _ = label_dataset(df, config)
    codes = pd.factorize(df["symbol"])[0]
    tb = triple_barrier(*(df[c].to_numpy() for c in ("high", "low", "close", "atr")), codes, 1.3, 0.9, 8)
    # label_window == horizon here, so eligibility and outcomes coincide
    np.testing.assert_array_equal(tb["eligible"], out["label_eligible"].to_numpy())
    np.testing.assert_array_equal(tb["tb_label"], out["tb_label"].to_numpy())
    np.testing.assert_array_equal(tb["tb_bars_to_touch"], out["tb_bars_to_touch"].to_numpy())
    np.testing.assert_allclose(tb["tb_return"], out["tb_return"].to_numpy(), equal_nan=True)
    has = tb["tb_touch_row"] >= 0
    np.testing.assert_array_equal(
        df["timestamp"].to_numpy()[tb["tb_touch_row"][has]], out["tb_touch_time"].to_numpy()[has]
    )


def test_label_params_are_json_and_complete() -> None:
    config = LabelConfig(pt=2.0, sl=1.0, horizon=10, fwd_horizons=(1, 30), excursion_bars=6)
    params = json.loads(json.dumps(label_params(config)))
    assert params["pt"] == 2.0 and params["sl"] == 1.0 and params["horizon"] == 10
    assert params["fwd_horizons"] == [1, 30] and params["excursion_bars"] == 6
    assert params["label_window_bars"] == 30 == label_window_bars(config)


@pytest.mark.parametrize(
    "kwargs", [{"pt": 0.0}, {"sl": -1.0}, {"horizon": 0}, {"fwd_horizons": ()}, {"excursion_bars": 0}]
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="LabelConfig"):
        LabelConfig(**kwargs)


def test_bad_input_raises_clear_errors() -> None:
    df = pd.concat([bars_frame("A", [1.0, 2.0, 3.0]), bars_frame("B", [1.0, 2.0]), bars_frame("A", [4.0])])
    with pytest.raises(ValueError, match="symbol 'A' reappears"):
        label_dataset(df, CFG)
    unsorted = bars_frame("A", [1.0, 2.0, 3.0]).iloc[[0, 2, 1]]
    with pytest.raises(ValueError, match="sorted by \\(symbol, timestamp\\)"):
        label_dataset(unsorted, CFG)
    with pytest.raises(ValueError, match="lacks required columns \\['atr'\\]"):
        label_dataset(bars_frame("A", [1.0, 2.0]).drop(columns="atr"), CFG)
    labelled, _ = label_dataset(bars_frame("A", [1.0, 2.0]), CFG)
    with pytest.raises(ValueError, match="already has label columns"):
        label_dataset(labelled, CFG)


@pytest.mark.realdata
def test_real_fx_bars_match_reference(shared_data_dir) -> None:
    bars = pd.read_parquet(shared_data_dir / "fx_eurusd_h1.parquet")
    prev_close = bars["close"].shift(1)
    true_range = np.maximum(bars["high"], prev_close) - np.minimum(bars["low"], prev_close)
    bars["atr"] = true_range.rolling(14).mean()
    config = LabelConfig()
    out, stats = label_dataset(bars, config)
    assert stats["n_eligible"] == len(bars) - 14 - label_window_bars(config)
    rows = np.random.default_rng(0).choice(len(bars), size=400, replace=False)
    rows = np.sort(np.concatenate([rows, np.arange(len(bars) - 25, len(bars))]))
    assert_matches_reference(out, reference_label_dataset(bars, config, rows=rows), rows=rows)
