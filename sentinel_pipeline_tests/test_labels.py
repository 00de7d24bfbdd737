"""Stage 3: the numba triple-barrier labeller against hand-computed cases and the per-event reference."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_pipeline.data.bar_quality import QUIRK_BITS, BarQualityConfig, assess_bars
from sentinel_pipeline.data.labels import (
    LABEL_CLIPPED,
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
    assert out["label_quirks"].dtype == np.uint8
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


# -- bar quirks and clipped targets ----------------------------------------------------------------

QUIRK_CONFIGS = [
    LabelConfig(),
    LabelConfig(pt=1.0, sl=2.0, horizon=5, fwd_horizons=(1, 3), excursion_bars=6, protect_from=("hole",),
                target_clip_atr=2.5),
    LabelConfig(pt=2.5, sl=0.7, horizon=12, fwd_horizons=(2, 12, 15), excursion_bars=4,
                protect_from=("jump", "spike", "hole", "flat_run", "zero_volume_run"), target_clip_atr=None),
    LabelConfig(pt=0.5, sl=0.5, horizon=1, fwd_horizons=(1,), excursion_bars=1, protect_from=(),
                target_clip_atr=0.8),
]


def random_quirks(rng: np.random.Generator, n: int, rate: float = 0.02) -> np.ndarray:
    q = np.zeros(n, dtype=np.uint8)
    for bit in QUIRK_BITS.values():
        q[rng.random(n) < rate] |= bit
    return q


@pytest.mark.parametrize("seed", range(8))
def test_quirks_and_clipping_match_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    config = QUIRK_CONFIGS[seed % len(QUIRK_CONFIGS)]
    lengths = [int(x) for x in rng.integers(1, 120, size=4)] + [label_window_bars(config) + 1]
    df = random_panel(rng, lengths, both_rate=0.03)
    quirks = random_quirks(rng, len(df))
    out, stats = label_dataset(df, config, quirks)
    ref = reference_label_dataset(df.assign(quirks=quirks), config)
    assert_matches_reference(out, ref)
    assert stats["quirks_given"] and stats["n_eligible"] == int(out["label_eligible"].sum())
    prot = stats["quirk_protection"]
    assert prot["protect_from"] == list(config.protect_from)
    if config.protect_from:
        assert prot["n_ineligible_quirk_total"] > 0  # the random flags do block some windows
    # the same panel without quirks: exactly the blocked rows lose their label
    plain, plain_stats = label_dataset(df, config)
    lost = plain["label_eligible"] & ~out["label_eligible"]
    assert int(lost.sum()) == prot["n_ineligible_quirk_total"]
    assert not (out["label_eligible"] & ~plain["label_eligible"]).any()
    assert plain_stats["quirk_protection"]["n_ineligible_quirk_total"] == 0 and not plain_stats["quirks_given"]


def test_window_quirk_rule_by_hand() -> None:
    # W = 3: row t's window is bars t+1..t+3 for jumps/holes and t..t+3 for spikes and runs
    config = LabelConfig(pt=1.0, sl=1.0, horizon=3, fwd_horizons=(1,), excursion_bars=2)
    df = bars_frame("A", [100.0] * 12, [100.5] * 12, [99.5] * 12)
    quirks = np.zeros(12, dtype=np.uint8)
    quirks[5] = QUIRK_BITS["hole"]  # the step from bar 4 into bar 5
    quirks[9] = QUIRK_BITS["spike"]
    out, stats = label_dataset(df, config, quirks)
    elig = out["label_eligible"].to_numpy()
    # hole at 5 blocks rows 2, 3, 4 (not 5: its window starts after the hole); spike at 9 blocks 6..9
    # (9 and later lack a full window anyway: rows 9, 10, 11)
    assert np.flatnonzero(elig).tolist() == [0, 1, 5]
    assert stats["quirk_protection"]["n_ineligible_by_quirk"] == {"jump": 0, "spike": 3, "hole": 3}
    assert stats["quirk_protection"]["n_ineligible_quirk_total"] == 6
    lq = out["label_quirks"].to_numpy()
    assert lq[2] == lq[4] == QUIRK_BITS["hole"] and lq[5] == 0 and lq[6] == QUIRK_BITS["spike"]
    assert lq[9] == QUIRK_BITS["spike"] and lq[10] == 0  # bar quirks count on the entry bar too
    # the quirk stops at the symbol's end: another symbol's flags never reach into A
    both = pd.concat([df, bars_frame("B", [50.0] * 4)], ignore_index=True)
    q2 = np.concatenate([np.zeros(12, np.uint8), np.full(4, QUIRK_BITS["jump"], np.uint8)])
    out2, _ = label_dataset(both, config, q2)
    assert (out2["label_quirks"].iloc[:12] == 0).all()


def test_flat_and_zero_volume_runs_block_only_when_asked() -> None:
    config = LabelConfig(pt=1.0, sl=1.0, horizon=3, fwd_horizons=(1,), excursion_bars=2)
    df = bars_frame("A", [100.0] * 10, [100.5] * 10, [99.5] * 10)
    quirks = np.zeros(10, dtype=np.uint8)
    quirks[4] = QUIRK_BITS["flat_run"] | QUIRK_BITS["zero_volume_run"]
    default, _ = label_dataset(df, config, quirks)
    assert default["label_eligible"].sum() == 7  # only the last window_bars rows
    strict, st = label_dataset(df, LabelConfig(pt=1.0, sl=1.0, horizon=3, fwd_horizons=(1,), excursion_bars=2,
                                               protect_from=("flat_run",)), quirks)
    assert np.flatnonzero(strict["label_eligible"]).tolist() == [0, 5, 6]
    assert st["quirk_protection"]["n_ineligible_by_quirk"] == {"flat_run": 4}


def test_bad_tick_target_is_protected_or_clipped() -> None:
    close = np.full(60, 50.0)
    high, low = close + 0.25, close - 0.25
    low[30] = 0.01  # a bad tick: 50 ATR below the entry of the rows before it
    df = bars_frame("A", close, high, low, atr=1.0)
    quirks = np.zeros(60, dtype=np.uint8)
    quirks[30] = QUIRK_BITS["spike"]
    # default: every row whose window (t .. t+20) holds the spike is ineligible, the others are untouched
    out, stats = label_dataset(df, LabelConfig(), quirks)
    assert np.flatnonzero(out["label_eligible"]).tolist() == [*range(10), *range(31, 40)]
    assert stats["quirk_protection"]["n_ineligible_by_quirk"]["spike"] == 21
    assert np.nanmax(np.abs(out["early_move"])) <= 0.25
    # without protection the target is winsorised at the bound, and counted
    bound = 20.0
    loose = LabelConfig(protect_from=(), target_clip_atr=bound)
    out2, st2 = label_dataset(df, loose, quirks)
    assert np.nanmax(out2["mae_6"]) == bound and np.nanmin(out2["early_move"]) == pytest.approx(0.25 - bound)
    assert np.nanmax(np.abs(out2[["mfe_6", "mae_6", "early_move", "tb_return_atr"]].to_numpy())) <= bound
    clipped = (out2["label_quirks"].to_numpy() & LABEL_CLIPPED) != 0
    # the rows whose first 6 bars hold the tick: 24..29
    assert np.flatnonzero(clipped).tolist() == list(range(24, 30))
    assert clipped.sum() == st2["target_clip"]["n_rows_clipped"] == st2["target_clip"]["n_clipped"]["mae_6"] == 6
    assert st2["target_clip"]["max_abs_before_clip"]["mae_6"] == pytest.approx(49.99)
    assert st2["target_clip"]["max_abs_before_clip"]["early_move"] == pytest.approx(49.99 - 0.25)
    assert out2.loc[clipped, "label_eligible"].all()  # clipped rows keep their label
    np.testing.assert_allclose(out2["early_move"], out2["mfe_6"] - out2["mae_6"], equal_nan=True)
    # neither: the raw target the issue saw
    out3, st3 = label_dataset(df, LabelConfig(protect_from=(), target_clip_atr=None), quirks)
    assert np.nanmax(np.abs(out3["early_move"])) == pytest.approx(49.74) and st3["target_clip"]["n_rows_clipped"] == 0


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=4),
    gaps=st.lists(st.integers(min_value=1, max_value=400), min_size=0, max_size=6),
    window=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**16),
)
@settings(max_examples=60, deadline=None)
def test_no_eligible_label_window_spans_a_hole(lengths, gaps, window, seed) -> None:
    """Daily bars with holes of random length at random places: after the raw stage's flags, no
    eligible row has a long hole between its entry and the last bar of its label window."""
    rng = np.random.default_rng(seed)
    frames = []
    for s, n in enumerate(lengths):
        steps = np.ones(n, dtype=np.int64)
        for g in gaps:
            steps[rng.integers(0, n)] += g  # business days skipped before that bar
        days = pd.Timestamp("2001-01-01") + pd.offsets.BDay(0)
        ts = pd.DatetimeIndex([days + pd.offsets.BDay(int(k)) for k in np.cumsum(steps)]).tz_localize("UTC")
        close = 20.0 * (s + 1) * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
        frames.append(pd.DataFrame({"symbol": f"S{s}", "timestamp": ts, "open": close, "high": close * 1.01,
                                    "low": close * 0.99, "close": close, "volume": 100.0}))
    bars = pd.concat(frames, ignore_index=True)
    flags = assess_bars(bars, BarQualityConfig(hole_bars=5)).flags
    df = bars.assign(atr=bars["close"] * 0.02)
    config = LabelConfig(horizon=window, fwd_horizons=(1,), excursion_bars=1)
    out, stats = label_dataset(df, config, flags["quirks"].to_numpy())
    w = label_window_bars(config)
    hole = flags["after_hole"].to_numpy()
    sym = bars["symbol"].to_numpy()
    for i in np.flatnonzero(out["label_eligible"].to_numpy()):
        j = np.arange(i + 1, i + w + 1)
        assert (sym[j] == sym[i]).all()
        assert not hole[j].any(), f"row {i}: label window crosses a hole"
    # and exactly the rows with a full window that holds a hole lost their label to it
    pos = bars.groupby("symbol").cumcount().to_numpy()
    size = bars.groupby("symbol")["symbol"].transform("size").to_numpy()
    full = pos + w < size
    spans = np.array([full[i] and hole[i + 1 : i + w + 1].any() for i in range(len(bars))], dtype=bool)
    assert stats["quirk_protection"]["n_ineligible_by_quirk"]["hole"] == int(spans.sum())
    np.testing.assert_array_equal(out["label_eligible"].to_numpy(), full & ~spans)


def test_quirk_config_validation_and_params() -> None:
    with pytest.raises(ValueError, match="protect_from"):
        LabelConfig(protect_from=("gap",))
    with pytest.raises(ValueError, match="protect_from"):
        LabelConfig(protect_from=("hole", "hole"))
    with pytest.raises(ValueError, match="target_clip_atr"):
        LabelConfig(target_clip_atr=0.0)
    with pytest.raises(ValueError, match="at least max\\(pt, sl\\)"):
        LabelConfig(pt=3.0, target_clip_atr=2.0)
    assert LabelConfig(protect_from=["hole", "jump"]).protect_from == ("jump", "hole")  # canonical order
    params = json.loads(json.dumps(label_params(LabelConfig())))
    assert params["protect_from"] == ["jump", "spike", "hole"] and params["target_clip_atr"] == 20.0
    with pytest.raises(ValueError, match="one bit mask per row"):
        label_dataset(bars_frame("A", [1.0, 2.0]), CFG, np.zeros(3, np.uint8))
