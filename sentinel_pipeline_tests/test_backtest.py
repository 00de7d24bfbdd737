"""The test-period backtest (``evaluation.backtest``) on tables built by hand.

Accounting is checked against weight paths and equity worked out by hand; the random baseline by its
calibration (a zero-skill signal lands mid-distribution, a signal that sees the next return on top)
and by preserving the model's trade count; the comparison by its paired deltas.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.evaluation.backtest import (
    BacktestConfig,
    backtest_report,
    compare_backtests,
    plot_backtest,
    resolve_entry_rule,
    rounded,
    run_backtest,
    threshold_from_validation,
)
from sentinel_pipeline.evaluation.backtest_stage import (
    COMPARISON_COLUMNS,
    comparison_markdown,
    comparison_row,
    scaler_problem,
    window_problem,
)

RATE_10BPS = {"cost_bps": 10.0, "slippage_bps": 0.0}


def one_symbol(returns, signal, *, symbol="A", start="2024-01-02 10:00", freq="1h") -> pd.DataFrame:
    n = len(returns)
    return pd.DataFrame({
        "symbol": symbol,
        "timestamp": pd.date_range(start, periods=n, freq=freq, tz="UTC"),
        "row": np.arange(n),
        "signal": np.asarray(signal, dtype=float),
        "fwd_ret_1": np.asarray(returns, dtype=float),
    })


def random_walk_panel(n_symbols: int, n_days: int, bars_per_day: int = 7, seed: int = 0,
                      vol: float = 0.004) -> pd.DataFrame:
    """Hourly bars of independent random walks (weekdays, 14:00 UTC on), with a pure-noise signal."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2024-01-01", periods=n_days, tz="UTC")
    hours = pd.to_timedelta(14 + np.arange(bars_per_day), unit="h")
    ts = pd.DatetimeIndex([d + h for d in days for h in hours])
    parts = []
    for s in range(n_symbols):
        parts.append(pd.DataFrame({
            "symbol": f"S{s:02d}", "timestamp": ts, "row": np.arange(len(ts)),
            "signal": rng.normal(size=len(ts)), "fwd_ret_1": rng.normal(0.0, vol, size=len(ts)),
        }))
    return pd.concat(parts).sort_values(["timestamp", "symbol"], kind="stable").reset_index(drop=True)


def sees_next_return(table: pd.DataFrame, lag: int) -> pd.DataFrame:
    """The signal is the return of the first bar the entry will be exposed to (an oracle)."""
    out = table.sort_values(["symbol", "timestamp"]).copy()
    out["signal"] = out.groupby("symbol")["fwd_ret_1"].shift(-lag).fillna(0.0).to_numpy()
    return out


def weights_of(result, symbol: str = "A") -> np.ndarray:
    p = result.positions
    return p[p["symbol"] == symbol].sort_values("timestamp")["weight"].to_numpy()


# -- accounting ---------------------------------------------------------------------------------------


def test_known_position_path_gives_the_known_equity_costs_and_trades() -> None:
    r = [0.01, -0.02, 0.03, 0.0, 0.01, -0.01, 0.02, 0.0]
    table = one_symbol(r, [1, 0, 0, 0, -1, 0, 0, 0])
    cfg = BacktestConfig(entry="threshold", threshold=0.5, holding_bars=2, execution_lag=0, **RATE_10BPS)
    res = run_backtest(table, cfg)
    # one long cohort at bar 0, one short at bar 4, each weight 1/H = 0.5 for two bars
    w = np.array([0.5, 0.5, 0, 0, -0.5, -0.5, 0, 0])
    np.testing.assert_allclose(weights_of(res), w)
    turnover = np.array([0.5, 0, 0.5, 0, 0.5, 0, 0.5, 0])  # open, close, open, close
    np.testing.assert_allclose(res.bars["turnover"], turnover)
    net = w * np.array(r) - 0.001 * turnover
    np.testing.assert_allclose(res.bars["net_return"], net, atol=1e-15)
    np.testing.assert_allclose(res.bars["equity"], np.cumprod(1 + net), rtol=1e-12)
    assert res.metrics["total_return"] == pytest.approx(np.prod(1 + net) - 1, rel=1e-12)
    assert res.metrics["total_cost"] == pytest.approx(0.002)
    peak = np.maximum.accumulate(np.concatenate([[1.0], np.cumprod(1 + net)]))[1:]
    assert res.metrics["max_drawdown"] == pytest.approx(np.max(1 - np.cumprod(1 + net) / peak))
    # trades: long -> 0.01 - 0.02; short -> -(0.01 - 0.01); each pays a 20 bps round trip
    assert list(res.trades["side"]) == [1, -1]
    np.testing.assert_allclose(res.trades["gross_return"], [-0.01, 0.0], atol=1e-15)
    np.testing.assert_allclose(res.trades["net_return"], [-0.012, -0.002], atol=1e-15)
    assert res.metrics["n_trades"] == 2 and res.metrics["hit_rate"] == 0.0
    assert res.metrics["fraction_bars_invested"] == pytest.approx(0.5)
    assert res.metrics["mean_gross_exposure"] == pytest.approx(0.25)


def test_execution_lag_fills_one_bar_later_and_an_entry_without_a_fill_bar_is_no_trade() -> None:
    r = [0.01, -0.02, 0.03, 0.0, 0.01, -0.01, 0.02, 0.0]
    table = one_symbol(r, [1, 0, 0, 0, -1, 0, 0, 1])  # the last signal has no next bar to fill at
    cfg = BacktestConfig(entry="threshold", threshold=0.5, holding_bars=2, execution_lag=1, **RATE_10BPS)
    res = run_backtest(table, cfg)
    np.testing.assert_allclose(weights_of(res), [0, 0.5, 0.5, 0, 0, -0.5, -0.5, 0])
    assert res.metrics["n_trades"] == 2 and res.metrics["n_entries_without_fill"] == 1
    np.testing.assert_allclose(res.trades["gross_return"], [-0.02 + 0.03, 0.01 - 0.02], atol=1e-15)
    assert list(res.trades["fill_time"]) == [table["timestamp"][1], table["timestamp"][5]]


def test_costs_are_charged_on_every_weight_change_including_flips_and_the_final_close() -> None:
    a = one_symbol([0.001] * 6, [1, -1, 0, 1, 1, 1], symbol="A")
    b = one_symbol([0.002] * 6, [0, 1, 0, 0, 0, 0], symbol="B")
    cfg = BacktestConfig(entry="threshold", threshold=0.5, holding_bars=1, execution_lag=0, **RATE_10BPS)
    res = run_backtest(pd.concat([a, b], ignore_index=True), cfg)
    # bar 1: A short and B long share one cohort (gross 1): -0.5 / +0.5
    np.testing.assert_allclose(weights_of(res, "A"), [1, -0.5, 0, 1, 1, 1])
    np.testing.assert_allclose(weights_of(res, "B"), [0, 0.5, 0, 0, 0, 0])
    # |dw| per bar: A 1, 1.5, .5, 1, 0, 0 (+1 closing); B 0, .5, .5, 0, 0, 0
    np.testing.assert_allclose(res.bars["turnover"], [1, 2, 1, 1, 0, 1])
    np.testing.assert_allclose(res.bars["cost"], 0.001 * np.array([1, 2, 1, 1, 0, 1]))
    assert res.positions["cost"].sum() == pytest.approx(0.006)
    assert res.metrics["total_cost"] == pytest.approx(0.006)
    # the same positions without costs earn exactly the gross P&L
    free = run_backtest(pd.concat([a, b], ignore_index=True),
                        BacktestConfig(entry="threshold", threshold=0.5, holding_bars=1, execution_lag=0,
                                       cost_bps=0.0, slippage_bps=0.0))
    np.testing.assert_allclose(free.bars["net_return"], res.bars["gross_return"])


def test_overlapping_signals_net_into_one_position_and_are_not_double_counted() -> None:
    n, hold, r = 40, 4, 0.001
    table = one_symbol([r] * n, [1.0] * n)  # a new entry on every bar, each held 4 bars
    cfg = BacktestConfig(entry="threshold", threshold=0.5, holding_bars=hold, execution_lag=0, **RATE_10BPS)
    res = run_backtest(table, cfg)
    w = np.minimum(np.arange(1, n + 1), hold) / hold  # ramps to 1, never to 4
    np.testing.assert_allclose(weights_of(res), w)
    assert res.bars["gross_exposure"].max() == pytest.approx(1.0)
    # costs: the ramp in (4 x 1/4) and the close (1); not 40 trades x 2 sides
    assert res.metrics["total_cost"] == pytest.approx(0.001 * 2.0)
    expected = np.prod(1 + w * r - 0.001 * np.r_[np.full(hold, 1 / hold), np.zeros(n - hold - 1), 1.0]) - 1
    assert res.metrics["total_return"] == pytest.approx(expected, rel=1e-12)
    naive = res.trades["gross_return"].sum()  # summing the overlapping trades' returns
    assert naive > 3.5 * res.metrics["total_return_gross"]
    # the trades near the end are cut at the last bar
    assert list(res.trades["n_bars"].tail(4)) == [4, 3, 2, 1]


def test_a_gap_in_the_rows_closes_the_position() -> None:
    table = one_symbol([0.01] * 6, [1, 0, 0, 0, 0, 0])
    table.loc[2:, "row"] += 5  # rows 0, 1 | 7, 8, 9, 10: a gap after the second bar
    cfg = BacktestConfig(entry="threshold", threshold=0.5, holding_bars=4, execution_lag=0, **RATE_10BPS)
    res = run_backtest(table, cfg)
    np.testing.assert_allclose(weights_of(res), [0.25, 0.25, 0, 0, 0, 0])
    np.testing.assert_allclose(res.bars["turnover"], [0.25, 0.25, 0, 0, 0, 0])  # closed at the gap
    assert list(res.trades["n_bars"]) == [2]


def test_cross_sectional_rule_takes_top_and_bottom_fraction_with_the_signal_sign() -> None:
    ts = pd.date_range("2024-01-02 10:00", periods=3, freq="1h", tz="UTC")
    sig = np.arange(-5, 5, dtype=float)  # 10 symbols
    rows = [{"symbol": f"S{i}", "timestamp": t, "row": j, "signal": sig[i] if j == 0 else 0.0, "fwd_ret_1": 0.0}
            for i in range(10) for j, t in enumerate(ts)]
    table = pd.DataFrame(rows)
    cfg = BacktestConfig(entry="cross_section", fraction=0.2, holding_bars=1, execution_lag=0)
    res = run_backtest(table, cfg, random_baseline=False)
    first = res.positions[res.positions["timestamp"] == ts[0]].set_index("symbol")["entry_side"]
    assert first[first != 0].to_dict() == {"S0": -1, "S1": -1, "S8": 1, "S9": 1}
    assert resolve_entry_rule(table, BacktestConfig()) == "cross_section"
    # all-positive signals: longs only (side = sign of the signal)
    pos = table.assign(signal=table["signal"] + 10)
    res = run_backtest(pos, cfg, random_baseline=False)
    assert res.metrics["n_short"] == 0 and res.metrics["n_long"] == 2 * 3
    # signal weighting: each entry's share of the cohort is |signal| / sum |signal|
    weighted = run_backtest(table, BacktestConfig(entry="cross_section", fraction=0.2, holding_bars=1,
                                                  execution_lag=0, weighting="signal"), random_baseline=False)
    w = weighted.positions[weighted.positions["timestamp"] == ts[0]].set_index("symbol")["weight"]
    np.testing.assert_allclose(w[["S0", "S1", "S8", "S9"]], np.array([-5, -4, 3, 4]) / 16)


def test_long_only_ignores_negative_signals() -> None:
    table = one_symbol([0.001] * 10, [1, -1] * 5)
    res = run_backtest(table, BacktestConfig(entry="threshold", threshold=0.5, holding_bars=1, execution_lag=0,
                                             allow_short=False))
    assert res.metrics["n_short"] == 0 and res.metrics["n_long"] == 5
    assert (res.positions["weight"] >= 0).all()
    assert res.random is not None and res.random.summary["side"].startswith("+1")


# -- the random baseline ------------------------------------------------------------------------------


def test_zero_skill_signal_sits_mid_distribution_and_an_oracle_on_top() -> None:
    percentiles = []
    for seed in range(8):
        table = random_walk_panel(10, 40, seed=seed)
        res = run_backtest(table, BacktestConfig(seed=seed), horizon=10)
        percentiles.append([b.summary[stat]["percentile"] for b in (res.random, res.shifted)
                            for stat in ("sharpe_daily", "total_return")])
    mean = np.mean(percentiles, axis=0)
    assert ((25 < mean) & (mean < 75)).all(), percentiles
    for lag in (0, 1):
        oracle = sees_next_return(random_walk_panel(10, 40, seed=99), lag)
        res = run_backtest(oracle, BacktestConfig(execution_lag=lag), horizon=10)
        for baseline in (res.random, res.shifted):
            for stat in ("sharpe_daily", "total_return"):
                s = baseline.summary[stat]
                assert s["percentile"] == 100.0 and s["p_value"] == pytest.approx(1 / 1001), (lag, stat, s)
        assert res.metrics["total_return"] > res.random.band["q95"].iloc[-1] - 1


def persistent_signal(table: pd.DataFrame, seed: int, run_bars: int = 35) -> pd.DataFrame:
    """A zero-skill signal that keeps its sign for ``run_bars`` bars (as a trend feature would)."""
    out = table.sort_values(["symbol", "timestamp"]).copy()
    n = len(out)
    out["signal"] = np.repeat(np.random.default_rng(seed).choice([-1.0, 1.0], size=n // run_bars + 1), run_bars)[:n]
    return out


def test_the_shifted_baseline_is_calibrated_for_a_persistent_zero_skill_signal() -> None:
    """Random-side trades turn over far more than a persistent position: against them a zero-skill
    persistent signal lands in the tails; against its own schedule moved in time it does not."""
    random_pct, shifted_pct = [], []
    for seed in range(12):
        table = persistent_signal(random_walk_panel(1, 40, seed=seed), seed)
        res = run_backtest(table, BacktestConfig(entry="threshold", threshold=0.5, seed=seed), horizon=10)
        random_pct.append(res.random.summary["total_return"]["percentile"])
        shifted_pct.append(res.shifted.summary["total_return"]["percentile"])
        assert (res.shifted.trades_per_strategy == res.metrics["n_trades"]).all()
    extreme = lambda p: sum(v <= 1 or v >= 99 for v in p)  # noqa: E731
    assert extreme(random_pct) >= 4, random_pct  # what the shifted baseline is for
    assert extreme(shifted_pct) <= 2 and 25 < np.mean(shifted_pct) < 75, shifted_pct


def test_caveats_flag_a_negative_sharpe_rank_random_only_edges_and_net_market_exposure() -> None:
    # a market that only rises, a model that is always long: it beats random-sign strategies by beta
    table = random_walk_panel(1, 40, seed=21)
    table["fwd_ret_1"] = np.abs(table["fwd_ret_1"]) * 0.2
    res = run_backtest(table.assign(signal=1.0), BacktestConfig(entry="threshold", threshold=0.5), horizon=5)
    assert any("net long 100% of its gross exposure" in n for n in res.notes), res.notes
    # a persistent zero-skill signal with heavy costs: it loses what random trades lose, more volatile,
    # and beats random trades on cost alone, but not its own schedule moved in time
    noise = persistent_signal(random_walk_panel(1, 40, seed=25), 25)
    res = run_backtest(noise, BacktestConfig(entry="threshold", threshold=0.5, cost_bps=30.0), horizon=5)
    s = res.random.summary["sharpe_daily"]
    assert s["model"] < 0 and s["percentile"] > 90
    assert any("flatters it" in n and "random strategies" in n for n in res.notes), res.notes
    assert res.random.summary["total_return"]["p_value"] < 0.05 < res.shifted.summary["total_return"]["p_value"]
    assert any("not from when" in n for n in res.notes), res.notes


def test_random_baseline_keeps_the_trade_count_holding_rule_and_capacity() -> None:
    # a ragged panel: every other timestamp only 2 of 6 symbols trade, and gaps in the rows, so cohorts
    # dealt to thin timestamps overflow their capacity
    table = random_walk_panel(6, 12, seed=3)
    t_codes = pd.factorize(table["timestamp"], sort=True)[0]
    thin = (t_codes % 2 == 1) & ~table["symbol"].isin(["S00", "S01"])
    table = table[~thin].reset_index(drop=True)
    cfg = BacktestConfig(entry="cross_section", fraction=0.5, min_cross_section=2, n_random=1000, seed=1)
    res = run_backtest(table, cfg, horizon=5)
    assert res.metrics["n_trades"] > 0
    assert res.random.trades_per_strategy.shape == res.shifted.trades_per_strategy.shape == (1000,)
    assert (res.random.trades_per_strategy == res.metrics["n_trades"]).all()
    assert (res.shifted.trades_per_strategy == res.metrics["n_trades"]).all()
    # a single symbol: only timing and side are random, the count is still the model's
    single = random_walk_panel(1, 20, seed=4)
    res = run_backtest(single, BacktestConfig(entry="threshold", threshold=1.0), horizon=7)
    assert res.metrics["n_trades"] > 0
    assert (res.random.trades_per_strategy == res.metrics["n_trades"]).all()
    band = res.random.band
    assert list(band.columns) == ["q05", "q50", "q95"] and len(band) == res.metrics["n_days"]
    assert (band["q05"] <= band["q50"]).all() and (band["q50"] <= band["q95"]).all()


def test_random_baseline_is_reproducible_and_fast_enough_for_the_pipeline() -> None:
    table = random_walk_panel(24, 300, seed=5)  # 50,400 samples
    assert len(table) == 50_400
    res = run_backtest(table, BacktestConfig(seed=7), horizon=10)
    again = run_backtest(table, BacktestConfig(seed=7), horizon=10)
    np.testing.assert_array_equal(res.random.sharpe_daily, again.random.sharpe_daily)
    assert res.random.n == 1000 and res.random.seconds < 60  # ~3.5 s on one core


# -- Sharpe, annualisation, refusal -------------------------------------------------------------------


def test_sharpe_is_refused_below_min_days_and_min_trades_with_a_note() -> None:
    short = random_walk_panel(1, 20, seed=1)
    res = run_backtest(short, BacktestConfig(entry="threshold", threshold=0.1), horizon=5)
    assert res.metrics["n_days"] == 20 and res.metrics["n_trades"] >= 30
    assert res.metrics["sharpe"] is None and res.metrics["sortino"] is None
    assert res.metrics["annualised_return"] is None
    assert any("20 days < min_days 30" in n for n in res.notes)
    assert math.isfinite(res.metrics["daily_sharpe"])  # daily figures are still there

    few = random_walk_panel(1, 80, bars_per_day=1, seed=2)
    few["signal"] = 0.0
    few.loc[[10, 40, 60], "signal"] = 1.0
    res = run_backtest(few, BacktestConfig(entry="threshold", threshold=0.5), horizon=5)
    assert res.metrics["n_trades"] == 3 and res.metrics["sharpe"] is None
    assert any("3 trades < min_trades 30" in n for n in res.notes)

    enough = random_walk_panel(1, 80, bars_per_day=1, seed=2)
    res = run_backtest(enough, BacktestConfig(entry="threshold", threshold=0.5), horizon=5)
    m = res.metrics
    assert m["n_trades"] >= 30 and m["sharpe_lower"] < m["sharpe"] < m["sharpe_upper"]
    assert m["sharpe"] == pytest.approx(m["daily_sharpe"] * math.sqrt(252), rel=0.02)


def test_annualisation_follows_the_bars() -> None:
    daily = random_walk_panel(1, 60, bars_per_day=1, seed=1)
    res = run_backtest(daily, BacktestConfig(entry="threshold", threshold=0.5), horizon=5, random_baseline=False)
    assert (res.info["bars_per_day"], res.info["periods_per_year"], res.info["sharpe_lag_days"]) == (1.0, 252.0, 5)
    # crypto: 24 hourly bars every day of the week
    n = 24 * 60
    crypto = one_symbol(np.random.default_rng(0).normal(0, 0.003, n), np.random.default_rng(1).normal(size=n),
                        start="2024-01-01 00:00")
    res = run_backtest(crypto, BacktestConfig(entry="threshold", threshold=1.0), horizon=30, random_baseline=False)
    assert (res.info["bars_per_day"], res.info["periods_per_year"], res.info["sharpe_lag_days"]) == (24.0, 365.0, 2)
    assert res.metrics["n_days"] == 60 and res.info["bar_seconds"] == 3600.0
    # FX: hourly from Sunday 22:00 to Friday 21:00 UTC; the Sunday bars open Monday's session
    week = pd.date_range("2024-01-07 22:00", "2024-01-12 21:00", freq="1h", tz="UTC")
    ts = pd.DatetimeIndex(np.concatenate([(week + pd.Timedelta(weeks=i)).to_numpy() for i in range(8)]), tz="UTC")
    fx = one_symbol(np.zeros(len(ts)), np.ones(len(ts)))
    fx["timestamp"] = ts
    res = run_backtest(fx, BacktestConfig(entry="threshold", threshold=0.5), horizon=24, random_baseline=False)
    assert res.info["periods_per_year"] == 252.0 and res.metrics["n_days"] == 8 * 5
    assert res.info["bars_per_day"] == 24.0 and (res.daily["date"].dt.day_of_week < 5).all()


def test_single_symbol_input_works_and_needs_a_threshold_from_outside_the_window() -> None:
    table = random_walk_panel(1, 40, seed=8)
    assert resolve_entry_rule(table, BacktestConfig()) == "threshold"
    with pytest.raises(ValueError, match="validation"):
        run_backtest(table, BacktestConfig(), horizon=10)
    validation = random_walk_panel(1, 40, seed=9)
    thr = threshold_from_validation(validation["signal"], 0.1)
    assert np.mean(np.abs(validation["signal"]) >= thr) == pytest.approx(0.2, abs=0.01)
    res = run_backtest(table, BacktestConfig(threshold=thr), horizon=10)
    assert res.info["entry_rule"] == "threshold" and res.metrics["n_symbols"] == 1
    assert res.metrics["n_trades"] == int((np.abs(table["signal"]) >= thr).sum()) - res.metrics["n_entries_without_fill"]
    assert res.metrics["sharpe"] is not None


@pytest.mark.parametrize("bad", [
    {"cost_bps": -1.0}, {"slippage_bps": float("nan")}, {"weighting": "kelly"}, {"entry": "magic"},
    {"fraction": 0.0}, {"fraction": 0.6}, {"threshold": -0.1}, {"holding_bars": 0}, {"execution_lag": -1},
    {"min_days": 1}, {"min_trades": 0}, {"n_random": 999}, {"level": 1.0},
])
def test_config_is_validated(bad) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        BacktestConfig(**bad)


def test_input_problems_are_refused() -> None:
    table = one_symbol([0.0] * 5, [1.0] * 5)
    with pytest.raises(ValueError, match="holding period"):
        run_backtest(table, BacktestConfig(threshold=0.5))
    with pytest.raises(ValueError, match="missing"):
        run_backtest(table.drop(columns="fwd_ret_1"), BacktestConfig(threshold=0.5), horizon=2)
    with pytest.raises(ValueError, match="unique"):
        run_backtest(pd.concat([table, table]), BacktestConfig(threshold=0.5), horizon=2)


# -- comparison, report, plot -------------------------------------------------------------------------


def test_comparison_reports_paired_deltas_with_intervals(tmp_path) -> None:
    base = random_walk_panel(10, 60, seed=11)
    good = run_backtest(sees_next_return(base, 1), BacktestConfig(), horizon=10, random_baseline=False)
    noise = run_backtest(base, BacktestConfig(), horizon=10, random_baseline=False)
    comp = compare_backtests(good, noise)
    diff = good.daily["net_return"].to_numpy() - noise.daily["net_return"].to_numpy()
    mean = comp["mean_daily_return"]
    assert comp["n_days_paired"] == 60 and comp["block_days"] == 2
    assert mean["delta"] == pytest.approx(diff.mean())
    assert 0 < mean["lower"] <= mean["delta"] <= mean["upper"]
    sr = comp["sharpe"]
    assert sr["delta"] == pytest.approx(good.metrics["sharpe"] - noise.metrics["sharpe"])
    assert 0 < sr["lower"] < sr["delta"] < sr["upper"]
    back = compare_backtests(noise, good)
    assert back["mean_daily_return"]["delta"] == pytest.approx(-mean["delta"])
    assert back["sharpe"]["upper"] < 0
    same = compare_backtests(noise, noise)
    assert same["mean_daily_return"]["delta"] == 0 and same["sharpe"]["delta"] == 0

    # a window too short for an annualised Sharpe: the Sharpe delta is withheld, the mean is not
    short = base[base["timestamp"] < base["timestamp"].min() + pd.Timedelta(days=14)]
    a = run_backtest(sees_next_return(short, 1), BacktestConfig(), horizon=10, random_baseline=False)
    b = run_backtest(short, BacktestConfig(), horizon=10, random_baseline=False)
    comp_short = compare_backtests(a, b)
    assert comp_short["sharpe"] is None and comp_short["mean_daily_return"]["delta"] > 0
    assert any("Sharpe delta not reported" in n for n in comp_short["notes"])


def test_report_is_strict_json_and_the_plot_is_a_png(tmp_path) -> None:
    table = random_walk_panel(8, 35, seed=12)
    res = run_backtest(table, BacktestConfig(), horizon=10)
    prev = run_backtest(table.assign(signal=-table["signal"]), BacktestConfig(), horizon=10, random_baseline=False)
    report = rounded(backtest_report(res, compare_backtests(res, prev), extra={"variant": "x"}))
    text = json.dumps(report, allow_nan=False)
    back = json.loads(text)
    assert back["variant"] == "x" and back["rule"]["entry_rule"] == "cross_section"
    assert back["metrics"]["n_trades"] == res.metrics["n_trades"]
    assert back["random_baseline"]["sharpe_daily"]["p_value"] > 0
    assert back["shifted_baseline"]["total_return"]["n"] == 1000
    assert back["vs_previous"]["mean_daily_return"]["delta"] is not None
    assert rounded(0.123456, 3) == 0.123 and rounded(123456.0, 2) == 120000.0 and rounded(7) == 7
    png = plot_backtest(res, tmp_path / "bt.png", previous=prev, title="x")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the stage's helpers ------------------------------------------------------------------------------


def test_a_bundle_is_judged_only_on_its_contract_and_a_window_it_has_not_seen() -> None:
    start = pd.Timestamp("2024-03-01 14:00", tz="UTC")
    meta = {"feature_contract_hash": "abc", "data_windows": {
        "train": {"end": "2024-01-31T20:00:00Z"}, "val": {"end": "2024-02-20T20:00:00Z"}}}
    assert window_problem(meta, "abc", start) is None
    assert "feature contract" in window_problem(meta, "xyz", start)
    late = {**meta, "data_windows": {**meta["data_windows"], "val": {"end": "2024-03-05T20:00:00Z"}}}
    assert "inside this test window" in window_problem(late, "abc", start)
    assert "not recorded" in window_problem({**meta, "data_windows": {}}, "abc", start)


def test_a_bundle_must_expect_the_scalers_that_scaled_the_test_split(tmp_path) -> None:
    bundle, scalers = tmp_path / "bundle", tmp_path / "scalers"
    info = {"feature_contract_hash": "abc", "clip": 5.0, "quantile_range": [25.0, 75.0],
            "feature_names": {"seq": ["a"], "snap": ["b", "c"]},
            "center": {"seq": [0.1], "snap": [0.2, 0.3]}, "scale": {"seq": [1.0], "snap": [2.0, 3.0]}}
    for d in (bundle, scalers):
        d.mkdir()
        (d / "scalers.json").write_text(json.dumps(info))
        (d / "snap_scaler.joblib").write_bytes(b"a pickle is never read " + d.name.encode())
    assert scaler_problem(bundle, scalers) is None  # the joblib copies differ: not what scaling uses
    refit = {**info, "center": {"seq": [0.1], "snap": [0.2, 0.53]}}  # another dataset, same contract
    (scalers / "scalers.json").write_text(json.dumps(refit))
    assert "snap center differs by up to 0.23" in scaler_problem(bundle, scalers)
    (scalers / "scalers.json").unlink()
    assert "missing" in scaler_problem(bundle, scalers)


def test_comparison_rows_round_and_mark_missing_backtests() -> None:
    res = run_backtest(random_walk_panel(8, 35, seed=13), BacktestConfig(), horizon=10)
    report = backtest_report(res, extra={"bundle": "b1"})
    row = comparison_row("v1", report, "current")
    assert row["bundle"] == "b1" and row["n_trades"] == res.metrics["n_trades"]
    assert row["sharpe"] == rounded(res.metrics["sharpe"], 3) and row["sharpe_ci"].startswith("[")
    assert row["total_return"] == rounded(res.metrics["total_return"], 3)
    empty = comparison_row("v2", None, "no backtest")
    table = comparison_markdown([row, empty]).splitlines()
    assert table[0] == "| " + " | ".join(COMPARISON_COLUMNS) + " |" and len(table) == 4
    assert table[3].startswith("| v2 | no backtest |")
