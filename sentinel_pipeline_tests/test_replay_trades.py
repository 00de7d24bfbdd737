"""Replay part A: trade simulation, random-entry baseline, metrics and reporting on hand-built bars."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.labels import LabelConfig, triple_barrier
from sentinel_pipeline.replay import (
    ReplayConfig,
    compare_reports,
    equity_curve,
    plot_equity_curves,
    random_entry_baseline,
    replay_window_mask,
    simulate_trades,
    trade_metrics,
    write_replay_report,
)
from sentinel_pipeline.replay.config import barrier_params, periods_per_year
from sentinel_pipeline.replay.metrics import forward_simple_returns, max_drawdown, signal_ic

LP = {"pt": 2.0, "sl": 1.0, "horizon": 3}
START = pd.Timestamp("2024-01-02 00:00", tz="UTC")


def make_bars(ohlc: dict[str, list[tuple[float, float, float, float]]], freq: str = "h") -> pd.DataFrame:
    """Bars sorted by (symbol, timestamp) from per-symbol lists of (open, high, low, close)."""
    frames = []
    for sym in sorted(ohlc):
        rows = np.asarray(ohlc[sym], dtype=np.float64)
        frames.append(
            pd.DataFrame(
                {
                    "symbol": sym,
                    "timestamp": pd.date_range(START, periods=len(rows), freq=freq),
                    "open": rows[:, 0],
                    "high": rows[:, 1],
                    "low": rows[:, 2],
                    "close": rows[:, 3],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


FLAT = (100.0, 100.5, 99.5, 100.0)  # a bar that touches no barrier of width >= 1 around 100


def signal_at(n: int, **rows: float) -> np.ndarray:
    sig = np.full(n, np.nan)
    for key, value in rows.items():
        sig[int(key[1:])] = value
    return sig


def one(trades: pd.DataFrame) -> pd.Series:
    assert len(trades) == 1, trades
    return trades.iloc[0]


# --- exits ---------------------------------------------------------------------------------------


def test_long_profit_take_enters_at_next_open_and_exits_at_barrier() -> None:
    bars = make_bars({"A": [FLAT, (100.2, 100.6, 99.6, 100.3), (100.3, 102.5, 100.0, 102.0), FLAT, FLAT]})
    t = one(simulate_trades(bars, signal_at(5, r0=0.5), np.ones(5), LP))
    assert t["entry_time"] == bars["timestamp"][1] and t["entry_price"] == 100.2  # next bar's open, not close[0]
    assert t["signal_time"] == bars["timestamp"][0]
    assert t["exit_reason"] == "upper" and t["side"] == 1
    assert t["exit_price"] == pytest.approx(102.2)  # entry + pt * atr
    assert t["exit_time"] == bars["timestamp"][2] and t["bars_held"] == 2
    assert t["return"] == pytest.approx(102.2 / 100.2 - 1)
    assert not t["censored"]


def test_long_stop_fills_at_barrier_or_at_a_gapped_open() -> None:
    touch = make_bars({"A": [FLAT, FLAT, (99.8, 100.0, 98.9, 99.0), FLAT, FLAT]})
    t = one(simulate_trades(touch, signal_at(5, r0=1.0), np.ones(5), LP))
    assert t["exit_reason"] == "lower" and t["exit_price"] == pytest.approx(99.0) and t["bars_held"] == 2
    gap = make_bars({"A": [FLAT, FLAT, (97.0, 97.5, 96.5, 97.2), FLAT, FLAT]})
    t = one(simulate_trades(gap, signal_at(5, r0=1.0), np.ones(5), LP))
    assert t["exit_reason"] == "lower" and t["exit_price"] == pytest.approx(97.0)  # worse than the 99 stop
    assert t["return"] == pytest.approx(97.0 / 100.0 - 1)


def test_bar_touching_both_barriers_counts_as_the_stop() -> None:
    bars = make_bars({"A": [FLAT, FLAT, (100.0, 102.5, 98.5, 101.0), FLAT, FLAT]})
    t = one(simulate_trades(bars, signal_at(5, r0=1.0), np.ones(5), LP))
    assert t["exit_reason"] == "lower" and t["exit_price"] == pytest.approx(99.0) and t["return"] < 0
    short = one(simulate_trades(bars, signal_at(5, r0=-1.0), np.ones(5), LP))
    assert short["exit_reason"] == "lower" and short["exit_price"] == pytest.approx(101.0)  # the short's stop
    assert short["return"] == pytest.approx(-(101.0 / 100.0 - 1))


def test_vertical_exit_at_close_of_bar_signal_plus_horizon() -> None:
    bars = make_bars({"A": [FLAT, FLAT, FLAT, (100.0, 100.5, 99.5, 100.4), FLAT, FLAT]})
    t = one(simulate_trades(bars, signal_at(6, r0=1.0), np.ones(6), LP))
    assert t["exit_reason"] == "vertical" and t["exit_time"] == bars["timestamp"][3]
    assert t["exit_price"] == 100.4 and t["bars_held"] == 3 and t["return"] == pytest.approx(0.004)


def test_short_profit_take_is_below_entry_and_return_is_side_adjusted() -> None:
    bars = make_bars({"A": [FLAT, FLAT, (100.0, 100.3, 97.5, 98.0), FLAT, FLAT]})
    t = one(simulate_trades(bars, signal_at(5, r0=-0.3), np.ones(5), LP))
    assert t["side"] == -1 and t["exit_reason"] == "upper"
    assert t["exit_price"] == pytest.approx(98.0)  # entry - pt * atr
    assert t["return"] == pytest.approx(0.02)
    long_t = one(simulate_trades(bars, signal_at(5, r0=0.3), np.ones(5), LP))
    assert long_t["exit_reason"] == "lower" and long_t["return"] == pytest.approx(-0.01)


def test_short_stop_above_entry() -> None:
    bars = make_bars({"A": [FLAT, FLAT, (100.0, 101.2, 99.8, 101.0), FLAT, FLAT]})
    t = one(simulate_trades(bars, signal_at(5, r0=-0.3), np.ones(5), LP))
    assert t["exit_reason"] == "lower" and t["exit_price"] == pytest.approx(101.0)
    assert t["return"] == pytest.approx(-0.01)


def test_censored_when_vertical_bar_lies_beyond_the_data() -> None:
    bars = make_bars({"A": [FLAT, FLAT, FLAT, (100.0, 100.5, 99.5, 100.2)], "B": [FLAT] * 6})
    sig = signal_at(10, r1=1.0)
    t = one(simulate_trades(bars, sig, np.ones(10), LP))
    assert t["exit_reason"] == "censored" and t["censored"]
    assert t["exit_time"] == bars["timestamp"][3] and t["exit_price"] == 100.2  # A's last bar, not B's
    assert t["bars_held"] == 2
    # a barrier touched before the end is a normal exit even when the vertical bar is missing
    bars.loc[3, "high"] = 103.0
    t = one(simulate_trades(bars, sig, np.ones(10), LP))
    assert t["exit_reason"] == "upper" and not t["censored"]


def test_excursions_over_first_bars_in_atr_units() -> None:
    rows = [FLAT, (100.0, 101.0, 99.6, 100.0), (100.0, 101.4, 99.8, 100.0), (100.0, 100.2, 99.7, 100.0), FLAT]
    bars = make_bars({"A": rows})
    cfg = ReplayConfig(excursion_bars=2)
    t = one(simulate_trades(bars, signal_at(5, r0=1.0), np.full(5, 2.0), {"pt": 5, "sl": 5, "horizon": 3}, cfg))
    assert t["mfe_2"] == pytest.approx(1.4 / 2) and t["mae_2"] == pytest.approx(0.4 / 2)  # bars 1..2 only
    assert not t["goes_against_us"]
    s = one(simulate_trades(bars, signal_at(5, r0=-1.0), np.full(5, 2.0), {"pt": 5, "sl": 5, "horizon": 3}, cfg))
    assert s["mfe_2"] == pytest.approx(0.4 / 2) and s["mae_2"] == pytest.approx(1.4 / 2)
    assert s["goes_against_us"]


# --- candidates and positions ----------------------------------------------------------------------


def test_one_position_per_symbol_skips_and_counts_candidates() -> None:
    bars = make_bars({"A": [FLAT] * 10, "B": [FLAT] * 10})
    # A: trade at 0 holds rows 1..3 (vertical at 3); candidates at 1, 2 are skipped, at 3 (the exit bar) trades
    sig = signal_at(20, r0=1.0, r1=1.0, r2=-1.0, r3=-1.0, r11=1.0)  # r11 = B's second bar: not blocked by A
    trades = simulate_trades(bars, sig, np.ones(20), LP)
    assert trades["symbol"].tolist() == ["A", "A", "B"]
    assert trades["signal_time"].tolist() == [bars["timestamp"][i] for i in (0, 3, 11)]
    assert trades["side"].tolist() == [1, -1, 1]
    assert trades["exit_time"].iloc[0] == bars["timestamp"][3]
    c = trades.attrs["counts"]
    assert c == {"n_candidates": 5, "n_trades_created": 3, "n_skipped_position_open": 2,
                 "n_skipped_no_next_bar": 0, "n_skipped_invalid_atr": 0}


def test_threshold_allow_short_last_bar_and_invalid_atr() -> None:
    bars = make_bars({"A": [FLAT] * 12})
    atr = np.ones(12)
    atr[8] = np.nan
    sig = signal_at(12, r0=0.05, r1=-0.5, r8=0.9, r11=0.9)
    trades = simulate_trades(bars, sig, atr, LP, ReplayConfig(threshold=0.1))
    assert trades["side"].tolist() == [-1]
    assert trades.attrs["counts"]["n_candidates"] == 3  # 0.05 is below the threshold
    assert trades.attrs["counts"]["n_skipped_invalid_atr"] == 1
    assert trades.attrs["counts"]["n_skipped_no_next_bar"] == 1
    long_only = simulate_trades(bars, sig, atr, LP, ReplayConfig(allow_short=False))
    assert long_only.empty and long_only.attrs["counts"]["n_candidates"] == 2


def test_bad_input_is_refused_with_a_clear_message() -> None:
    bars = make_bars({"A": [FLAT] * 4, "B": [FLAT] * 4})
    with pytest.raises(ValueError, match="signal must hold one value per bar"):
        simulate_trades(bars, np.zeros(3), np.ones(8), LP)
    with pytest.raises(ValueError, match="sorted by"):
        simulate_trades(bars.iloc[::-1].reset_index(drop=True), np.zeros(8), np.ones(8), LP)
    with pytest.raises(ValueError, match="lack"):
        simulate_trades(bars, np.zeros(8), np.ones(8), {"pt": 1.0})


# --- against references --------------------------------------------------------------------------


def reference_trades(bars: pd.DataFrame, sig: np.ndarray, atr: np.ndarray, pt: float, sl: float, h: int,
                     thr: float, exc: int) -> list[tuple]:
    """Slow per-trade implementation of the documented rules."""
    out = []
    o, hi, lo, c = (bars[k].to_numpy() for k in ("open", "high", "low", "close"))
    for sym, idx in bars.groupby("symbol", sort=False).indices.items():
        first, last = idx[0], idx[-1]
        free_from = first
        for s in range(first, last + 1):
            if not (abs(sig[s]) >= thr) or s < free_from or s == last or not atr[s] > 0:
                continue
            side, entry, a = (1 if sig[s] > 0 else -1), o[s + 1], atr[s]
            take, stop = entry + side * pt * a, entry - side * sl * a
            exit_row, price, reason = min(s + h, last), c[min(s + h, last)], ("vertical" if s + h <= last else "censored")
            for r in range(s + 1, min(s + h, last) + 1):
                hit_stop = lo[r] <= stop if side > 0 else hi[r] >= stop
                hit_take = hi[r] >= take if side > 0 else lo[r] <= take
                if hit_stop or hit_take:
                    exit_row, reason = r, ("lower" if hit_stop else "upper")
                    price = (min(stop, o[r]) if side > 0 else max(stop, o[r])) if hit_stop else take
                    break
            ex = range(s + 1, min(s + exc, last) + 1)
            mfe = max(0.0, *[(hi[r] - entry if side > 0 else entry - lo[r]) / a for r in ex])
            mae = max(0.0, *[(entry - lo[r] if side > 0 else hi[r] - entry) / a for r in ex])
            out.append((sym, s, side, exit_row, price, reason, side * (price / entry - 1), mfe, mae))
            free_from = exit_row
    return out


def random_bars(rng: np.random.Generator, n_per: int, symbols: tuple[str, ...], gaps: bool) -> pd.DataFrame:
    data = {}
    for sym in symbols:
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n_per)))
        prev = np.r_[100.0, close[:-1]]
        open_ = prev * np.exp(rng.normal(0, 0.004, n_per)) if gaps else prev
        high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.006, n_per)))
        low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.006, n_per)))
        data[sym] = list(zip(open_, high, low, close, strict=True))
    return make_bars(data)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_slow_reference_on_random_bars(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bars = random_bars(rng, 120, ("AAA", "BBB", "CCC"), gaps=True)
    n = len(bars)
    atr = np.abs(rng.normal(1.0, 0.3, n))
    atr[rng.random(n) < 0.03] = np.nan
    sig = rng.normal(0, 0.3, n)
    sig[rng.random(n) < 0.3] = np.nan
    cfg = ReplayConfig(threshold=0.2, excursion_bars=4)
    trades = simulate_trades(bars, sig, atr, {"pt": 1.2, "sl": 0.9, "horizon": 7}, cfg)
    ref = reference_trades(bars, sig, atr, 1.2, 0.9, 7, 0.2, 4)
    assert len(trades) == len(ref) > 10
    ts = bars["timestamp"]
    assert trades["symbol"].tolist() == [r[0] for r in ref]
    assert trades["signal_time"].tolist() == [ts[r[1]] for r in ref]
    assert trades["side"].tolist() == [r[2] for r in ref]
    assert trades["exit_time"].tolist() == [ts[r[3]] for r in ref]
    np.testing.assert_allclose(trades["exit_price"], [r[4] for r in ref])
    assert trades["exit_reason"].astype(str).tolist() == [r[5] for r in ref]
    np.testing.assert_allclose(trades["return"], [r[6] for r in ref])
    np.testing.assert_allclose(trades["mfe_4"], [r[7] for r in ref])
    np.testing.assert_allclose(trades["mae_4"], [r[8] for r in ref])


def test_longs_on_gapless_bars_reproduce_the_triple_barrier_labels() -> None:
    rng = np.random.default_rng(7)
    bars = random_bars(rng, 200, ("A", "B"), gaps=False)  # open[t+1] == close[t]: same anchor as the labels
    n = len(bars)
    atr = np.full(n, 0.8)
    lab = triple_barrier(bars["high"], bars["low"], bars["close"], atr, pd.factorize(bars["symbol"])[0],
                         pt=1.5, sl=1.0, horizon=5)
    rows = np.flatnonzero(lab["eligible"])[::6]  # spaced wider than the horizon: no position overlap
    sig = np.full(n, np.nan)
    sig[rows] = 1.0
    trades = simulate_trades(bars, sig, atr, {"pt": 1.5, "sl": 1.0, "horizon": 5})
    assert len(trades) == len(rows)
    mapping = {1: "upper", -1: "lower", 0: "vertical"}
    assert trades["exit_reason"].astype(str).tolist() == [mapping[int(v)] for v in lab["tb_label"][rows]]
    np.testing.assert_allclose(trades["return"], lab["tb_return"][rows], rtol=1e-12, atol=1e-12)
    assert trades["bars_held"].tolist() == lab["tb_bars_to_touch"][rows].tolist()


# --- baseline -------------------------------------------------------------------------------------


def test_random_baseline_has_the_trade_count_is_seeded_and_respects_positions() -> None:
    rng = np.random.default_rng(3)
    bars = random_bars(rng, 150, ("A", "B", "C", "D"), gaps=True)
    atr = np.full(len(bars), 0.7)
    cfg = ReplayConfig(window_bars=60, baseline_seed=11)
    a = random_entry_baseline(bars, atr, 25, LP, cfg)
    b = random_entry_baseline(bars, atr, 25, LP, cfg)
    c = random_entry_baseline(bars, atr, 25, LP, ReplayConfig(window_bars=60, baseline_seed=12))
    assert len(a) == 25 and a.attrs["counts"]["n_trades_created"] == 25
    pd.testing.assert_frame_equal(a, b)
    assert not a[["symbol", "signal_time", "side"]].equals(c[["symbol", "signal_time", "side"]])
    window_start = np.sort(bars["timestamp"].unique())[-60]
    assert (a["signal_time"] >= window_start).all()
    assert set(a["side"]) == {-1, 1}
    # positions never overlap: re-simulating the baseline's own entries sequentially skips none
    sig = np.full(len(bars), np.nan)
    key = pd.MultiIndex.from_frame(bars[["symbol", "timestamp"]])
    sig[key.get_indexer(pd.MultiIndex.from_frame(a[["symbol", "signal_time"]]))] = a["side"].to_numpy()
    again = simulate_trades(bars, sig, atr, LP, cfg)
    assert again.attrs["counts"]["n_skipped_position_open"] == 0
    pd.testing.assert_frame_equal(again.reset_index(drop=True), a.reset_index(drop=True))
    longs = random_entry_baseline(bars, atr, 10, LP, ReplayConfig(window_bars=60, allow_short=False))
    assert (longs["side"] == 1).all() and len(longs) == 10
    # a model that is in the market whenever it can be: the baseline still matches most of its count
    always = np.where(replay_window_mask(bars["timestamp"], cfg), 1.0, np.nan)
    n_max = len(simulate_trades(bars, always, atr, LP, cfg))
    dense = random_entry_baseline(bars, atr, int(0.9 * n_max), LP, cfg)
    assert len(dense) == int(0.9 * n_max) > 40


def test_random_baseline_returns_fewer_when_the_window_cannot_hold_them() -> None:
    bars = make_bars({"A": [FLAT] * 8})
    t = random_entry_baseline(bars, np.ones(8), 50, LP, ReplayConfig())
    assert 0 < len(t) < 50 and t.attrs["counts"]["n_trades_created"] == len(t)
    assert random_entry_baseline(bars, np.ones(8), 0, LP).empty


# --- metrics --------------------------------------------------------------------------------------


def hand_trades(days: list[str], returns: list[float]) -> pd.DataFrame:
    exit_time = pd.to_datetime(days, utc=True) + pd.Timedelta(hours=15)
    return pd.DataFrame({
        "symbol": "A", "signal_time": exit_time, "entry_time": exit_time, "entry_price": 1.0, "side": 1,
        "exit_time": exit_time, "exit_price": 1.0, "exit_reason": "vertical", "return": returns,
        "bars_held": 1, "mfe_6": [1.0, 0.5, 2.0, 0.0][: len(returns)], "mae_6": [0.5, 1.0, 1.0, 0.5][: len(returns)],
        "goes_against_us": [False, True, False, True][: len(returns)], "censored": False,
    })


def daily_bars(n_days: int) -> pd.DataFrame:
    ts = pd.date_range("2024-01-01 14:00", periods=n_days, freq="D", tz="UTC")
    return pd.DataFrame({"symbol": "A", "timestamp": ts, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0})


def test_sharpe_and_drawdown_match_a_hand_computation() -> None:
    bars = daily_bars(5)  # Mon..Fri; Thursday has no exit
    trades = hand_trades(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-05"], [0.02, -0.03, 0.01, 0.04])
    counts = {"n_candidates": 6, "n_trades_created": 4, "n_skipped_position_open": 2}
    m = trade_metrics(trades, bars, None, counts=counts)
    daily = np.array([0.02, -0.03, 0.01, 0.0, 0.04])
    assert m["sharpe"] == pytest.approx(daily.mean() / daily.std(ddof=1) * math.sqrt(252))
    equity = 1 + np.cumsum(daily)  # 1.02, 0.99, 1.00, 1.00, 1.04
    assert m["max_drawdown"] == pytest.approx((1.02 - 0.99) / 1.02)
    np.testing.assert_allclose(equity_curve(trades, bars).to_numpy(), equity)
    assert m["n_days"] == 5 and m["sharpe_periods_per_year"] == 252.0
    assert m["hit_rate"] == 0.75 and m["mean_return_per_trade"] == pytest.approx(0.01)
    assert m["goes_against_us_rate"] == 0.5
    assert m["entry_quality"]["mfe_6_mean"] == pytest.approx(0.875)
    assert m["entry_quality"]["mae_6_median"] == pytest.approx(0.75)
    assert m["n_skipped_position_open"] == 2 and m["ic"] is None
    assert m["sharpe"] == pytest.approx(trade_metrics(trades, bars, None, counts=counts, annualisation=252)["sharpe"])
    json.dumps(m, allow_nan=False)


def test_sharpe_is_zero_with_a_note_when_undefined() -> None:
    bars = daily_bars(3)
    empty = hand_trades([], [])
    m = trade_metrics(empty, bars, None, counts={"n_candidates": 0, "n_trades_created": 0})
    assert m["sharpe"] == 0.0 and m["max_drawdown"] == 0.0 and m["mean_return_per_trade"] is None
    assert any("zero variance" in n for n in m["notes"]) and any("no trades" in n for n in m["notes"])
    json.dumps(m, allow_nan=False)
    one_day = trade_metrics(hand_trades(["2024-01-01"], [0.01]), daily_bars(1), None, counts={})
    assert one_day["sharpe"] == 0.0 and any("need 2" in n for n in one_day["notes"])


def test_max_drawdown_and_periods_per_year() -> None:
    assert max_drawdown(np.array([1.1, 0.88, 1.2, 0.9])) == pytest.approx(0.25)
    assert max_drawdown(np.array([0.9, 0.95])) == pytest.approx(0.1)  # peak starts at the initial 1.0
    assert periods_per_year(pd.date_range("2024-01-01", periods=7, freq="D", tz="UTC")) == 365.0
    assert periods_per_year(pd.bdate_range("2024-01-01", periods=10, tz="UTC")) == 252.0


def test_ic_per_timestamp_and_pooled_fallback() -> None:
    rng = np.random.default_rng(5)
    bars = random_bars(rng, 40, ("A", "B", "C", "D"), gaps=True)
    fwd = forward_simple_returns(bars)
    c = bars["close"].to_numpy()
    assert fwd[0] == pytest.approx(c[5] / c[0] - 1) and np.isnan(fwd[35:40]).all()  # no crossing into B
    ts = bars["timestamp"].to_numpy("datetime64[ns]")
    perfect = signal_ic(fwd * 3.0, fwd, ts)
    assert perfect["ic_method"] == "per_timestamp" and perfect["ic"] == pytest.approx(1.0)
    assert perfect["rank_ic"] == pytest.approx(1.0) and perfect["ic_n_timestamps"] == 35
    monotone = signal_ic(np.exp(fwd * 50), fwd, ts)  # non-linear but monotone
    assert monotone["rank_ic"] == pytest.approx(1.0) and monotone["ic"] < 1.0
    assert signal_ic(-fwd, fwd, ts)["ic"] == pytest.approx(-1.0)
    two = bars[bars["symbol"].isin(["A", "B"])].reset_index(drop=True)
    f2 = forward_simple_returns(two)
    pooled = signal_ic(f2, f2, two["timestamp"].to_numpy("datetime64[ns]"))
    assert pooled["ic_method"] == "pooled" and pooled["ic"] == pytest.approx(1.0)
    sig = np.where(np.arange(len(bars)) % 2 == 0, fwd, np.nan)
    m = trade_metrics(simulate_trades(bars, sig, np.ones(len(bars)), LP), bars, sig)
    assert m["ic"] == pytest.approx(signal_ic(sig, fwd, ts)["ic"])


# --- window, comparison, files ----------------------------------------------------------------------


def test_replay_window_is_the_tail_of_the_data() -> None:
    ts = pd.Series(pd.date_range("2024-01-01", periods=20 * 24, freq="h", tz="UTC")).repeat(2).reset_index(drop=True)
    week = replay_window_mask(ts, ReplayConfig())
    assert week.sum() == 2 * 7 * 24 and week[-1] and not week[0]
    assert ts[week].min() == ts.max() - pd.Timedelta(hours=7 * 24 - 1)
    bars_mask = replay_window_mask(ts, ReplayConfig(window_bars=5))
    assert bars_mask.sum() == 10 and ts[bars_mask].nunique() == 5
    with pytest.raises(ValueError, match="window_bars"):
        ReplayConfig(window_bars=0)
    assert barrier_params(LabelConfig(pt=2.0, sl=1.0, horizon=4)).horizon == 4


def test_compare_reports_deltas_and_missing_previous() -> None:
    cur = {"sharpe": 1.5, "n_trades_created": 10, "entry_quality": {"mae_6_mean": 0.4}, "ic_method": "pooled",
           "ic": None, "notes": ["x"]}
    prev = {"sharpe": 1.0, "n_trades_created": 12, "entry_quality": {"mae_6_mean": 0.6}}
    base = {"sharpe": -0.2, "n_trades_created": 10, "entry_quality": {"mae_6_mean": 0.9}}
    table = compare_reports(cur, prev, base)
    assert list(table.index) == ["sharpe", "n_trades_created", "entry_quality.mae_6_mean", "ic"]
    assert table.loc["sharpe", "delta_vs_previous"] == pytest.approx(0.5)
    assert table.loc["sharpe", "delta_vs_baseline"] == pytest.approx(1.7)
    assert table.loc["entry_quality.mae_6_mean", "delta_vs_baseline"] == pytest.approx(-0.5)
    assert np.isnan(table.loc["ic", "current"])
    no_prev = compare_reports(cur, None, base)
    assert no_prev["previous"].isna().all() and no_prev["delta_vs_previous"].isna().all()
    assert no_prev.loc["n_trades_created", "delta_vs_baseline"] == 0.0


def test_report_json_is_strict_and_plot_is_a_png(tmp_path) -> None:
    path = write_replay_report(tmp_path / "r" / "replay.json", {"a": float("nan"), "b": np.float32(1.5),
                                                               "c": {"d": np.int64(3)}, "t": pd.Timestamp(START)})
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert loaded == {"a": None, "b": 1.5, "c": {"d": 3}, "t": START.isoformat()}
    curve = pd.Series([1.0, 1.01, 0.99], index=pd.date_range("2024-01-01", periods=3, tz="UTC"))
    png = plot_equity_curves({"current": curve, "baseline": curve * 0.99}, tmp_path / "eq.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eq.png", "r"]  # no temporary files left
