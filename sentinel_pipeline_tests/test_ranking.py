"""Ranking evaluation on synthetic scored tables whose truth is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.evaluation import ranking
from sentinel_pipeline.evaluation.ranking import RankingConfig

HORIZONS = (1, 5, 10, 20)


def scored_table(n_days: int = 150, n_symbols: int = 60, *, noise: float | None = 3.0, seed: int = 0,
                 constant_score: bool = False, start: str = "2021-01-04") -> pd.DataFrame:
    """A scored table: daily log returns i.i.d. N(0, 1 %); ``fwd_ret_h`` their sums over the next h days;
    score of head h = standardised ``fwd_ret_h`` + ``noise`` x N(0, 1) (``None``: pure noise, no signal;
    ``constant_score``: the symbol's index, the same every day)."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 0.01, (n_days + max(HORIZONS), n_symbols))
    cum = np.vstack([np.zeros((1, n_symbols)), np.cumsum(r, axis=0)])
    days = pd.bdate_range(start, periods=n_days, tz="UTC")
    t, s = np.meshgrid(np.arange(n_days), np.arange(n_symbols), indexing="ij")
    frame: dict[str, np.ndarray] = {"timestamp": days[t.ravel()], "symbol": np.array(
        [f"S{i:03d}" for i in range(n_symbols)])[s.ravel()]}
    for h in HORIZONS:
        fwd = cum[h:h + n_days] - cum[:n_days]
        frame[f"fwd_ret_{h}"] = fwd.ravel()
        if constant_score:
            score = np.broadcast_to(np.arange(n_symbols, dtype=np.float64), fwd.shape)
        elif noise is None:
            score = rng.normal(size=fwd.shape)
        else:
            score = fwd / (0.01 * math.sqrt(h)) + noise * rng.normal(size=fwd.shape)
        frame[f"out_ret_{h}"] = np.asarray(score).ravel()
    return pd.DataFrame(frame)


def spearman_of_normal(rho: float) -> float:
    return 6.0 / math.pi * math.asin(rho / 2.0)


def panel(table: pd.DataFrame) -> ranking.Panel:
    cols = [c for h in HORIZONS for c in (f"out_ret_{h}", f"fwd_ret_{h}")]
    return ranking.panel_from_scored(table, cols, "test table")


def test_planted_ic_is_recovered_with_a_large_hac_t() -> None:
    noise = 3.0
    rho = 1.0 / math.sqrt(1.0 + noise ** 2)
    p = panel(scored_table(noise=noise))
    cfg = RankingConfig(n_random=100)
    for h in HORIZONS:
        st = ranking.ic_statistics(p, h, cfg)
        assert st["rank_ic"]["mean"] == pytest.approx(spearman_of_normal(rho), abs=0.03), h
        assert st["ic"]["mean"] == pytest.approx(rho, abs=0.03), h
        assert st["rank_ic"]["hac_t"] > 3
        assert st["rank_ic"]["lag"] >= h
        assert st["rank_ic"]["n_days"] == 150
        assert st["rank_ic"]["n_windows"] == 150 // h
        assert st["rank_ic"]["lower"] < st["rank_ic"]["mean"] < st["rank_ic"]["upper"]
        assert st["rank_ic"]["icir_annualised"] == pytest.approx(st["rank_ic"]["icir"] * math.sqrt(252))


def test_ic_decay_follows_the_overlap_of_the_horizons() -> None:
    # score_5 = fwd_5 + noise; corr(fwd_5, fwd_k) = sqrt(min(5, k) / max(5, k)) for i.i.d. daily returns
    noise = 1.0
    rho = 1.0 / math.sqrt(1.0 + noise ** 2)
    p = panel(scored_table(noise=noise, n_days=200))
    decay = ranking.ic_decay(p, RankingConfig(decay_horizons=(5,), n_random=100))
    assert list(decay) == ["5"]
    for k in HORIZONS:
        expected = spearman_of_normal(rho * math.sqrt(min(5, k) / max(5, k)))
        assert decay["5"][str(k)]["mean"] == pytest.approx(expected, abs=0.03), k
        assert decay["5"][str(k)]["lag"] >= k
    assert decay["5"]["5"]["mean"] > max(decay["5"]["1"]["mean"], decay["5"]["20"]["mean"])


def test_pure_noise_gives_small_t_over_seeds() -> None:
    cfg = RankingConfig(n_random=100)
    costly = []
    ts = []
    for seed in range(5):
        p = panel(scored_table(noise=None, seed=seed, n_days=200))
        for h in (1, 5):
            ts.append(ranking.ic_statistics(p, h, cfg)["rank_ic"]["hac_t"])
            ls, _ = ranking.quantile_long_short(p, h, cfg)
            ts.append(ls["t_hac_gross"])
            costly.append(ls["t_hac"])
    ts = np.asarray(ts)
    assert np.all(np.abs(ts) < 3), ts
    assert np.mean(np.abs(ts)) < 1.5
    # after costs a noise ranking, which turns its book over every period, loses money
    assert np.mean(costly) < -1


def test_non_overlapping_periods_are_h_days_apart_in_every_phase() -> None:
    p = panel(scored_table(n_days=63))
    for h in (5, 10):
        summary, periods = ranking.quantile_long_short(p, h, RankingConfig(n_random=100))
        assert sorted(periods["phase"].unique()) == list(range(h))
        assert summary["n_phases"] == h
        for phase, g in periods.groupby("phase"):
            idx = g["day_index"].to_numpy()
            assert idx[0] == phase
            assert np.all(np.diff(idx) == h)  # the holding periods [t, t + h) never overlap
            assert list(g["date"]) == list(p.days[idx])
            assert np.all(np.diff(g["period"].to_numpy()) == 1)
        # every day starts exactly one period across the phases
        assert sorted(periods["day_index"]) == list(range(63))


def test_costs_reduce_returns_by_exactly_turnover_times_cost() -> None:
    p = panel(scored_table(n_days=80))
    free = RankingConfig(cost_bps=0.0, n_random=100)
    paid = RankingConfig(cost_bps=10.0, n_random=100)
    _, a = ranking.quantile_long_short(p, 5, free)
    _, b = ranking.quantile_long_short(p, 5, paid)
    np.testing.assert_array_equal(a["gross_return"], b["gross_return"])
    np.testing.assert_array_equal(a["turnover"], b["turnover"])
    np.testing.assert_allclose(a["net_return"] - b["net_return"], b["turnover"] * 10.0 / 1e4, rtol=0, atol=1e-15)
    np.testing.assert_allclose(b["net_return"], b["gross_return"] - b["turnover"] * 1e-3, rtol=0, atol=1e-15)
    assert (b["turnover"] > 0).all()  # a noisy ranking trades every period
    da, db = ranking.daily_long_short(p, free).daily, ranking.daily_long_short(p, paid).daily
    np.testing.assert_allclose(da["net_return"] - db["net_return"], db["turnover"] * 1e-3, rtol=0, atol=1e-15)


def test_a_constant_ranking_trades_only_once() -> None:
    p = panel(scored_table(n_days=60, n_symbols=50, constant_score=True))
    cfg = RankingConfig(quantile=0.2, n_random=100)
    summary, periods = ranking.quantile_long_short(p, 5, cfg)
    first = periods["period"] == 0
    np.testing.assert_array_equal(periods.loc[first, "turnover"], 2.0)  # into both legs from an empty book
    np.testing.assert_array_equal(periods.loc[~first, "turnover"], 0.0)
    assert summary["mean_turnover"] == 0.0
    assert (periods["n_long"] == 10).all()
    bt = ranking.daily_long_short(p, cfg)
    turnover = bt.daily["turnover"].to_numpy()
    lag = cfg.execution_lag
    assert turnover[lag] == pytest.approx(2.0)
    assert np.all(turnover[:lag] == 0) and np.all(turnover[lag + 1:] == 0)
    # the long leg is the 10 highest scores (symbols S040..S049), the short leg the 10 lowest
    w = bt.weights[lag + 1]
    assert np.allclose(w[40:], 0.1) and np.allclose(w[:10], -0.1) and np.all(w[10:40] == 0)


def test_quantile_weights_never_put_a_tied_symbol_in_both_legs() -> None:
    score = np.array([[1.0, 1.0, 1.0, 1.0, 1.0], [3.0, np.nan, 1.0, 2.0, 0.0]])
    w, k = ranking.quantile_weights(score, 0.4, 2)
    assert list(k) == [2, 1]
    assert np.allclose(w.sum(axis=1), 0.0) and np.allclose(np.abs(w).sum(axis=1), 2.0)
    assert w[1, 0] == 1.0 and w[1, 4] == -1.0 and w[1, 1] == 0.0


def test_daily_backtest_metrics_and_random_portfolios_see_a_planted_signal() -> None:
    table = scored_table(n_days=120, n_symbols=40, noise=2.0, seed=3)
    p = panel(table)
    cfg = RankingConfig(execution_lag=0, n_random=200, seed=1)  # the 1-day head predicts the same day's interval
    bt = ranking.daily_long_short(p, cfg)
    m = bt.metrics
    assert m["total_return"] == pytest.approx(bt.daily["equity"].iloc[-1] - 1.0)
    eq = bt.daily["equity"].to_numpy()
    assert m["max_drawdown"] == pytest.approx(np.max(1 - eq / np.maximum.accumulate(np.r_[1.0, eq])[1:]))
    assert m["sharpe_lower"] < m["sharpe"] < m["sharpe_upper"] and m["sharpe"] > 3
    rnd, perm = ranking.random_portfolios(p, bt)
    for base in (rnd, perm):
        assert base["n"] == 200
        assert base["sharpe_daily_gross"]["p_value"] == pytest.approx(1 / 201)
        assert base["band"]["q05"].shape == (120,)
    # permuted rankings keep the model's turnover exactly; random sets turn over far more
    assert perm["mean_daily_turnover"] == pytest.approx(m["mean_daily_turnover"])
    # seeded: the same draws again
    again, _ = ranking.random_portfolios(p, bt)
    assert again["sharpe_daily"]["random_q50"] == rnd["sharpe_daily"]["random_q50"]


def test_random_portfolio_p_values_are_calibrated_under_the_null() -> None:
    """20 null seeds: the model's p-value among random portfolios (and permuted rankings) is below 0.05
    in few of them (expected 1 of 20; 4 or more has probability 1.6 % under a calibrated test)."""
    p_random, p_perm, pct = [], [], []
    for seed in range(20):
        p = panel(scored_table(n_days=100, n_symbols=30, noise=None, seed=100 + seed))
        cfg = RankingConfig(n_random=100, seed=seed)
        bt = ranking.daily_long_short(p, cfg)
        rnd, perm = ranking.random_portfolios(p, bt)
        p_random.append(rnd["sharpe_daily_gross"]["p_value"])
        p_perm.append(perm["sharpe_daily_gross"]["p_value"])
        pct.append(rnd["sharpe_daily_gross"]["percentile"])
    assert sum(v < 0.05 for v in p_random) <= 3, p_random
    assert sum(v < 0.05 for v in p_perm) <= 3, p_perm
    assert 30 < np.mean(pct) < 70  # spread across the distribution, not piled at one end
    assert np.std(pct) > 15


def test_permuted_rankings_stay_calibrated_for_a_persistent_zero_skill_ranking() -> None:
    """Symbols trend over the window (their own drift) and the ranking is persistent but unrelated to the
    drift: a fresh random portfolio each day averages the drifts away, so the persistent ranking lands in
    the tails of the random portfolios far more than 5 % of the time; its own weights on relabelled
    symbols bet on the drifts as it does, and stay calibrated."""
    cfg = RankingConfig(horizons=(1,), backtest_horizon=1, gate_horizon=1, n_random=100)
    p_random, p_perm = [], []
    n_days, n_symbols = 100, 30
    days = pd.bdate_range("2021-01-04", periods=n_days, tz="UTC")
    t, s = np.meshgrid(np.arange(n_days), np.arange(n_symbols), indexing="ij")
    for seed in range(30):
        rng = np.random.default_rng(seed)
        r = rng.normal(0, 0.003, n_symbols) + rng.normal(0, 0.01, (n_days, n_symbols))
        score = 0.05 * np.cumsum(rng.normal(size=(n_days, n_symbols)), axis=0) + rng.normal(size=n_symbols)
        table = pd.DataFrame({"timestamp": days[t.ravel()], "symbol": s.ravel(), "out_ret_1": score.ravel(),
                              "fwd_ret_1": r.ravel()})
        p = ranking.panel_from_scored(table, ["out_ret_1", "fwd_ret_1"])
        bt = ranking.daily_long_short(p, cfg)
        rnd, perm = ranking.random_portfolios(p, bt)
        p_random.append(rnd["sharpe_daily_gross"]["p_value"])
        p_perm.append(perm["sharpe_daily_gross"]["p_value"])
    assert sum(v < 0.05 for v in p_random) >= 6, p_random
    assert sum(v < 0.05 for v in p_perm) <= 4, p_perm  # P(>= 5 of 30) = 1.6 % for a calibrated test


def test_identical_previous_table_gives_a_difference_of_exactly_zero() -> None:
    test = scored_table(n_days=80, n_symbols=30, seed=5)
    report = ranking.run_ranking_evaluation(None, test, test.copy(), RankingConfig(n_random=100))
    vs = report.summary["backtest"]["vs_previous"]
    assert vs["n_days_paired"] == 80
    mdr = vs["mean_daily_return"]
    assert mdr["delta"] == 0.0 and mdr["lower"] == 0.0 and mdr["upper"] == 0.0
    assert vs["total_return"]["delta"] == 0.0
    assert vs["sharpe"]["delta"] == 0.0
    # and a different previous table gives a non-zero one
    other = ranking.run_ranking_evaluation(None, test, scored_table(n_days=80, n_symbols=30, seed=6),
                                           RankingConfig(n_random=100))
    assert other.summary["backtest"]["vs_previous"]["mean_daily_return"]["delta"] != 0.0


def test_directional_gate_passes_a_planted_five_day_signal_and_fails_noise() -> None:
    cfg = RankingConfig(n_random=100)
    planted = ranking.directional_gate(scored_table(noise=3.0), cfg)
    assert planted.passed and planted.value > 3
    assert planted.extra["target"] == "fwd_ret_5" and planted.extra["lag"] >= 5
    assert "out_ret_5" in planted.statistic
    for seed in range(3):
        null = ranking.directional_gate(scored_table(noise=None, seed=seed), cfg)
        assert not null.passed


def test_run_and_write_outputs(tmp_path) -> None:
    val = scored_table(n_days=80, n_symbols=30, seed=7)
    test = scored_table(n_days=80, n_symbols=30, seed=8, start="2021-06-01")
    prev = scored_table(n_days=80, n_symbols=30, seed=9, noise=None, start="2021-06-01")
    report = ranking.run_ranking_evaluation(val, test, prev, RankingConfig(n_random=100), extra={"bundle": "b1"})
    summary = report.to_dict()
    json.dumps(summary, allow_nan=False)
    assert summary["bundle"] == "b1"
    assert set(summary["splits"]) == {"val", "test"}
    assert set(summary["splits"]["test"]["horizons"]) == {"1", "5", "10", "20"}
    assert set(summary["splits"]["val"]["ic_decay"]) == {"1", "5", "10", "20"}
    assert summary["gate"]["name"] == "directional_skill"
    out = tmp_path / "ranking"
    files = ranking.write_ranking_outputs(out, report, title="b1")
    assert set(files) == {"report", "markdown", "ic_decay", "periods", "equity", "daily"}
    for f in files.values():
        assert f.is_file() and f.stat().st_size > 0
    for name in ("ic_decay", "equity"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files["report"].read_text()) == json.loads(json.dumps(summary))
    md = files["markdown"].read_text()
    assert md.startswith("| split | h | IC | RankIC") and "| test | 5 |" in md and "Gate (" in md
    daily = pd.read_parquet(files["daily"])
    assert {"random_q05", "permuted_q95", "previous_equity"} <= set(daily.columns)
    periods = pd.read_parquet(files["periods"])
    assert set(periods["split"]) == {"val", "test"} and set(periods["horizon"]) == set(HORIZONS)
    ranking.write_ranking_outputs(out, report, fingerprint="fp1")  # replaces the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking"]
    record = json.loads((out / ".stage.json").read_text())
    assert record["fingerprint"] == "fp1" and set(record["outputs"]) == {f.name for f in files.values()}


def test_bad_tables_and_configs_fail_with_the_problem_named() -> None:
    table = scored_table(n_days=30, n_symbols=10)
    with pytest.raises(ValueError, match=r"scored test table: missing column\(s\) \['out_ret_5'\]"):
        ranking.run_ranking_evaluation(None, table.drop(columns=["out_ret_5"]), config=RankingConfig(n_random=100))
    with pytest.raises(ValueError, match="my table: duplicate rows"):
        ranking.panel_from_scored(pd.concat([table, table.iloc[:1]]), ["out_ret_1"], "my table")
    with pytest.raises(ValueError, match="no rows"):
        ranking.panel_from_scored(table.iloc[:0], ["out_ret_1"], "t")
    with pytest.raises(ValueError, match="RankingConfig.quantile"):
        RankingConfig(quantile=0.7)
    with pytest.raises(ValueError, match="RankingConfig.score_columns"):
        RankingConfig(score_columns={1: "a"})
    with pytest.raises(ValueError, match="RankingConfig.gate_horizon"):
        RankingConfig(horizons=(1, 10), backtest_horizon=1)
    cfg = RankingConfig(horizons=(5,), score_columns={5: "rank_score"}, backtest_horizon=5, gate_horizon=5,
                        n_random=100)
    assert cfg.score_col(5) == "rank_score" and cfg.to_dict()["score_columns"] == {"5": "rank_score"}
