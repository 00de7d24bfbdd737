"""Benchmark: the ranking evaluation (``evaluation.ranking``) on a panel of the real universe's size.

On a synthetic scored table (default 505 symbols x 250 days, the size of the daily panel's test split;
scores = the realised forward return + noise, so IC ~ 0.24) it times

1. ``evaluate_split``: per-day IC and RankIC of 4 horizons, the 4 x 4 IC-decay grid, the quantile
   long-short on non-overlapping periods (all phases) of 4 horizons;
2. ``daily_long_short`` and ``random_portfolios`` (``n_random`` random portfolios + ``n_random``
   permuted rankings);
3. references, same run: the RankIC series of one horizon computed the plain way (a loop over days
   with ``scipy.stats.spearmanr``), which must equal the module's, scaled to the 24 series of step 1;
   and the daily long-short of one portfolio the pandas way (wide frame, ``rank(axis=1)``, ``shift``,
   ``diff().abs()``), whose net daily returns must equal the module's, scaled to ``2 x n_random``.

The scores see the forward return from the scoring close, so with the default execution lag of 1 the
1-day long-short has no edge and loses its costs: a negative Sharpe ratio is expected here.

Single-threaded; timings on a shared machine are noisy.

    python bench/bench_ranking.py            # 505 symbols x 250 days, n_random 1000
    python bench/bench_ranking.py --quick    # 100 symbols x 120 days, n_random 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats as sps  # noqa: E402

from sentinel_pipeline.evaluation import ranking  # noqa: E402
from sentinel_pipeline.evaluation.ranking import RankingConfig  # noqa: E402

HORIZONS = (1, 5, 10, 20)


def scored_table(n_days: int, n_symbols: int, noise: float = 4.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 0.01, (n_days + max(HORIZONS), n_symbols))
    cum = np.vstack([np.zeros((1, n_symbols)), np.cumsum(r, axis=0)])
    days = pd.bdate_range("2024-01-01", periods=n_days, tz="UTC")
    t, s = np.meshgrid(np.arange(n_days), np.arange(n_symbols), indexing="ij")
    frame = {"timestamp": days[t.ravel()], "symbol": np.array([f"S{i:03d}" for i in range(n_symbols)])[s.ravel()]}
    for h in HORIZONS:
        fwd = cum[h:h + n_days] - cum[:n_days]
        frame[f"fwd_ret_{h}"] = fwd.ravel()
        frame[f"out_ret_{h}"] = (fwd / (0.01 * np.sqrt(h)) + noise * rng.normal(size=fwd.shape)).ravel()
    return pd.DataFrame(frame)


def loop_rank_ic(table: pd.DataFrame, score: str, target: str) -> np.ndarray:
    out = []
    for _, g in table.groupby("timestamp", sort=True):
        out.append(sps.spearmanr(g[score], g[target]).statistic)
    return np.asarray(out)


def pandas_long_short(table: pd.DataFrame, score: str, quantile: float, lag: int, rate: float) -> np.ndarray:
    wide = table.pivot(index="timestamp", columns="symbol", values=score)
    ret = np.expm1(table.pivot(index="timestamp", columns="symbol", values="fwd_ret_1"))
    n = wide.notna().sum(axis=1)
    k = np.maximum(1, np.floor(quantile * n))
    rank = wide.rank(axis=1, ascending=False, method="first")
    w = (rank <= k.to_numpy()[:, None]).astype(float).div(k, axis=0) - \
        (rank > (n - k).to_numpy()[:, None]).astype(float).div(k, axis=0)
    held = w.shift(lag).fillna(0.0)
    turnover = held.diff().abs().sum(axis=1)
    turnover.iloc[0] = held.iloc[0].abs().sum()
    return ((held * ret.fillna(0.0)).sum(axis=1) - rate * turnover).to_numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symbols", type=int, default=505)
    ap.add_argument("--days", type=int, default=250)
    ap.add_argument("--n-random", type=int, default=1000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.symbols, args.days, args.n_random = 100, 120, 200
    table = scored_table(args.days, args.symbols)
    cfg = RankingConfig(n_random=args.n_random)
    print(f"scored table: {args.symbols} symbols x {args.days} days = {len(table):,} rows; n_random {args.n_random}")

    t0 = time.perf_counter()
    summary, _ = ranking.evaluate_split(table, cfg, "bench table")
    t_split = time.perf_counter() - t0
    cols = ["out_ret_1", "fwd_ret_1"]
    panel = ranking.panel_from_scored(table, cols, "bench table")
    t0 = time.perf_counter()
    bt = ranking.daily_long_short(panel, cfg)
    t_daily = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranking.random_portfolios(panel, bt)
    t_random = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_ic = loop_rank_ic(table, "out_ret_5", "fwd_ret_5")
    t_ref_ic = time.perf_counter() - t0
    ours = ranking.daily_ic(ranking.panel_from_scored(table, ["out_ret_5", "fwd_ret_5"]), "out_ret_5", "fwd_ret_5",
                            rank=True, min_symbols=cfg.min_symbols)
    ic_diff = float(np.max(np.abs(ours - ref_ic)))
    t0 = time.perf_counter()
    ref_net = pandas_long_short(table, "out_ret_1", cfg.quantile, cfg.execution_lag, cfg.cost_rate)
    t_ref_ls = time.perf_counter() - t0
    ls_diff = float(np.max(np.abs(ref_net - bt.daily["net_return"].to_numpy())))

    n_series = 2 * len(HORIZONS) + len(HORIZONS) ** 2
    rank_ic_5 = summary["horizons"]["5"]["rank_ic"]
    print(f"5-day RankIC {rank_ic_5['mean']:.4f} (HAC t {rank_ic_5['hac_t']:.1f}); daily long-short Sharpe "
          f"{bt.metrics['sharpe']:.2f}")
    print(f"evaluate_split (IC/RankIC x 4, decay 4 x 4, long-short x 4): {t_split:7.2f} s")
    print(f"  reference: scipy spearmanr loop, one series {t_ref_ic:.3f} s -> x{n_series} series "
          f"{t_ref_ic * n_series:7.2f} s  (max |difference| {ic_diff:.1e})")
    print(f"daily_long_short:                                  {t_daily:7.3f} s")
    print(f"random_portfolios ({args.n_random} random + {args.n_random} permuted):   {t_random:7.2f} s")
    print(f"  reference: pandas long-short, one portfolio {t_ref_ls:.3f} s -> x{2 * args.n_random} "
          f"{t_ref_ls * 2 * args.n_random:7.1f} s  (max |difference| of net daily returns {ls_diff:.1e})")
    if ic_diff > 1e-9 or ls_diff > 1e-12:
        print("MISMATCH with the reference")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
