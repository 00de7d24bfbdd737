"""Benchmark: the test-period backtest with its 1000 random strategies (``evaluation.backtest``).

On a random-walk panel (default 24 symbols x 300 days x 7 hourly bars = 50,400 samples, the size of a
few years of the default market's test split; a weakly informative signal) it times

1. ``run_backtest`` end to end with ``n_random=1000`` (the model's accounting, trades, Sharpe, and the
   two baselines of 1000 strategies each), and each baseline alone (``result.random/shifted.seconds``);
2. reference, same run: the textbook pandas backtest of one strategy (wide time x symbol frame,
   ``shift`` + ``rolling(H).sum()`` for the overlapping holdings, ``diff().abs()`` for the costs,
   ``groupby(date)`` for the daily returns), timed on the model's own entries and scaled to 1000
   strategies. Its per-bar net returns are compared with the backtest's (they must agree).

Single-threaded; timings on a shared machine are noisy.

    python bench/bench_backtest.py            # 50,400 samples
    python bench/bench_backtest.py --quick    # 5,040 samples
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sentinel_pipeline.evaluation.backtest import BacktestConfig, run_backtest  # noqa: E402


def panel(n_symbols: int, n_days: int, bars_per_day: int = 7, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2024-01-01", periods=n_days, tz="UTC")
    ts = pd.DatetimeIndex([d + pd.Timedelta(hours=14 + h) for d in days for h in range(bars_per_day)])
    r = rng.normal(0.0, 0.004, (n_symbols, ts.size))
    nxt = np.concatenate([r[:, 1:], np.zeros((n_symbols, 1))], axis=1)
    signal = 0.05 * nxt / 0.004 + rng.normal(size=r.shape)  # weakly sees the next bar
    frame = pd.DataFrame({
        "symbol": np.repeat([f"S{i:03d}" for i in range(n_symbols)], ts.size),
        "timestamp": np.tile(ts, n_symbols), "row": np.tile(np.arange(ts.size), n_symbols),
        "signal": signal.ravel(), "fwd_ret_1": r.ravel(),
    })
    return frame.sort_values(["timestamp", "symbol"], kind="stable").reset_index(drop=True)


def pandas_backtest(table: pd.DataFrame, entry_weight: pd.Series, hold: int, lag: int, rate: float) -> pd.Series:
    """Per-bar net returns of one strategy, the textbook way (wide frames; no gaps in the rows)."""
    wide_entry = entry_weight.unstack("symbol").fillna(0.0)
    ret = table.set_index(["timestamp", "symbol"])["fwd_ret_1"].unstack("symbol").reindex_like(wide_entry)
    w = wide_entry.shift(lag).fillna(0.0).rolling(hold, min_periods=1).sum() / hold
    turnover = w.diff().abs()
    turnover.iloc[0] = w.iloc[0].abs()
    turnover.iloc[-1] += w.iloc[-1].abs()  # close everything after the last bar
    return (w * ret).sum(axis=1) - rate * turnover.sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ref-strategies", type=int, default=5, help="pandas strategies actually timed")
    args = ap.parse_args()
    n_days = 30 if args.quick else 300
    table = panel(24, n_days)
    cfg = BacktestConfig(seed=1)
    hold = 20
    run_backtest(table.head(2000), cfg, horizon=hold)  # warm-up (imports, first allocations)

    t0 = time.perf_counter()
    res = run_backtest(table, cfg, horizon=hold)
    total = time.perf_counter() - t0
    assert res.random is not None and res.shifted is not None
    both = res.random.seconds + res.shifted.seconds
    print(f"samples {len(table):,} ({table['symbol'].nunique()} symbols x {res.metrics['n_timestamps']:,} "
          f"timestamps), trades {res.metrics['n_trades']:,}, hold {hold} bars")
    print(f"run_backtest with 2 x {res.random.n} baseline strategies: {total:.2f} s (random trades "
          f"{res.random.seconds:.2f} s = {1e3 * res.random.seconds / res.random.n:.2f} ms per strategy; own schedule "
          f"moved in time {res.shifted.seconds:.2f} s; model accounting and metrics {total - both:.2f} s)")

    # reference: the model's own entries through the pandas backtest
    tr = res.trades
    entry = tr.groupby(["signal_time", "symbol"])["cohort_weight"].sum()
    entry.index = entry.index.set_names(["timestamp", "symbol"])
    full = table.set_index(["timestamp", "symbol"])["fwd_ret_1"] * 0.0
    entry = entry.reindex(full.index, fill_value=0.0)
    t0 = time.perf_counter()
    for _ in range(args.ref_strategies):
        ref = pandas_backtest(table, entry, hold, cfg.execution_lag, cfg.cost_rate)
        daily = (1 + ref).groupby(ref.index.normalize()).prod() - 1  # what the Sharpe needs
    per = (time.perf_counter() - t0) / args.ref_strategies
    gap = float(np.max(np.abs(ref.to_numpy() - res.bars["net_return"].to_numpy())))
    print(f"reference, pandas per strategy: {1e3 * per:.1f} ms -> {per * res.random.n:.1f} s for "
          f"{res.random.n} strategies; vectorised baseline is {per * res.random.n / res.random.seconds:.1f}x faster")
    print(f"pandas vs backtest per-bar net returns: max abs difference {gap:.2e} over {len(ref):,} bars; "
          f"{len(daily)} days")
    assert gap < 1e-12, "the reference and the backtest disagree"


if __name__ == "__main__":
    main()
