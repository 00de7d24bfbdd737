"""Benchmark and calibration of the synthetic market generator.

    python bench/synthetic_market.py [--quick]

Prints (1) generation time of the default market with the numba recursion, side by side with the
same generator running the recursion as plain Python (the kernel's ``py_func``: the reference), (2)
the time for a large market (10M bars; ``--quick``: 1M), (3) the planted signal: rank correlation of
the oracle drift with the next 5-bar forward log return at the default strength and at strength 0.
Timings are wall-clock on whatever machine runs this (noisy on shared CPUs).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from sentinel_pipeline.data import synthetic_market as sm


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_rank_corr(market: sm.SyntheticMarket, signal: np.ndarray, horizon: int = 5) -> float:
    """Pooled Spearman correlation of ``signal`` with the next ``horizon``-bar log return."""
    log_close = np.log(market.bars["close"].to_numpy())
    sym = market.bars["symbol"].to_numpy()
    fwd = np.full(len(log_close), np.nan)
    fwd[:-horizon] = log_close[horizon:] - log_close[:-horizon]
    fwd[:-horizon][sym[horizon:] != sym[:-horizon]] = np.nan
    ok = np.isfinite(fwd)
    return float(pd.Series(signal[ok]).rank().corr(pd.Series(fwd[ok]).rank()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1M instead of 10M bars for the large market")
    args = parser.parse_args()

    cfg = sm.SyntheticMarketConfig()
    sm.simulate_market(cfg)  # JIT warm-up (or load from the numba cache)
    t_numba = best_of(lambda: sm.simulate_market(cfg), 3)
    kernel = sm._simulate_returns
    sm._simulate_returns = kernel.py_func  # the reference: the same recursion, interpreted
    try:
        t_python = best_of(lambda: sm.simulate_market(cfg), 1)
    finally:
        sm._simulate_returns = kernel
    n_rows = len(sm.generate_synthetic_market(cfg))
    print(
        f"default market ({n_rows} bars): numba {t_numba:.3f} s | reference (pure-Python recursion) {t_python:.3f} s"
    )

    n_days = 1_429 if args.quick else 14_286  # x 7 bars x 100 symbols = 1M / 10M bars
    big = replace(cfg, n_symbols=100, n_days=n_days)
    t0, c0 = time.perf_counter(), time.process_time()
    bars = sm.generate_synthetic_market(big)
    print(
        f"large market ({len(bars):,} bars, 100 symbols): {time.perf_counter() - t0:.2f} s wall, "
        f"{time.process_time() - c0:.2f} s CPU"
    )
    del bars

    market = sm.simulate_market(cfg)
    zero = sm.simulate_market(replace(cfg, signal_strength=0.0))
    print(
        f"signal_strength={cfg.signal_strength}: rank corr(oracle drift, fwd 5-bar return) = "
        f"{forward_rank_corr(market, market.drift_next):.3f}; strength 0: rank corr(momentum state, fwd) = "
        f"{forward_rank_corr(zero, zero.momentum):.3f}"
    )
    per_seed = [
        forward_rank_corr(m, m.drift_next)
        for m in (sm.simulate_market(replace(cfg, seed=s)) for s in range(7, 12))
    ]
    print(f"seeds 7-11: {np.mean(per_seed):.3f} +- {np.std(per_seed):.3f}")


if __name__ == "__main__":
    main()
