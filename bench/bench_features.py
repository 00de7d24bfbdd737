"""Benchmark: stage-2 features (numba kernels) vs a plain pandas groupby/rolling reference.

Generates a random-walk OHLCV panel (default 100 symbols x 100,000 hourly bars = 10M bars), times
``compute_features`` on the whole feature set (after one small call that loads/compiles the numba
kernels) and a pandas ``groupby(...).shift/rolling/ewm`` implementation of seven of the same features
(ret_1, ret_5, ret_20, rv_20, vol_z_20, plus a Wilder-style ATR via ``ewm`` and the 20-bar rolling high),
and prints bars/s for both. The features that are defined identically in both are compared as a sanity
check (max abs difference). Single-threaded numba/pandas; timings on a shared machine are noisy.

    python bench/bench_features.py            # 10M bars
    python bench/bench_features.py --quick    # 1M bars smoke run
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sentinel_pipeline.data.features import FeatureConfig, build_contract, compute_features  # noqa: E402


def make_bars(n_symbols: int, bars_per_symbol: int, seed: int = 0) -> pd.DataFrame:
    """Random-walk OHLCV bars, sorted by (symbol, timestamp), hourly, all symbols on one time grid."""
    rng = np.random.default_rng(seed)
    n = n_symbols * bars_per_symbol
    lr = rng.normal(0.0, 0.01, n).reshape(n_symbols, bars_per_symbol)
    level = rng.uniform(np.log(5.0), np.log(500.0), (n_symbols, 1))
    close = np.exp(level + np.cumsum(lr, axis=1)).ravel()
    prev = np.exp(level + np.cumsum(lr, axis=1) - lr).ravel()
    opn = prev * np.exp(rng.normal(0.0, 0.002, n))
    high = np.maximum(opn, close) * np.exp(np.abs(rng.normal(0.0, 0.004, n)))
    low = np.minimum(opn, close) * np.exp(-np.abs(rng.normal(0.0, 0.004, n)))
    grid = pd.date_range("2000-01-03", periods=bars_per_symbol, freq="h", tz="UTC", unit="ns")
    names = np.array([f"SYM{i:04d}" for i in range(n_symbols)], dtype=object)
    return pd.DataFrame({
        "symbol": pd.array(np.repeat(names, bars_per_symbol), dtype="str"),
        "timestamp": np.tile(grid.asi8, n_symbols).view("datetime64[ns]"),
        "open": opn, "high": high, "low": low, "close": close,
        "volume": rng.lognormal(10.0, 1.0, n),
    }).assign(timestamp=lambda d: d["timestamp"].dt.tz_localize("UTC"))


def pandas_reference(bars: pd.DataFrame, atr_window: int = 14) -> pd.DataFrame:
    """Seven features with plain pandas groupby/rolling (the way one would write them first)."""
    out = pd.DataFrame(index=bars.index)
    key = bars["symbol"]
    logc = np.log(bars["close"])
    g_logc = logc.groupby(key, sort=False)
    for k in (1, 5, 20):
        out[f"ret_{k}"] = logc - g_logc.shift(k)
    sq = (out["ret_1"] ** 2).groupby(key, sort=False).rolling(20).mean()
    out["rv_20"] = np.sqrt(sq.reset_index(level=0, drop=True))
    x = np.log1p(bars["volume"]).groupby(key, sort=False).rolling(20)
    mean = x.mean().reset_index(level=0, drop=True)
    std = x.std(ddof=0).reset_index(level=0, drop=True)
    out["vol_z_20"] = (np.log1p(bars["volume"]) - mean) / std
    prev_close = bars["close"].groupby(key, sort=False).shift(1)
    tr = pd.concat([bars["high"] - bars["low"], (bars["high"] - prev_close).abs(),
                    (bars["low"] - prev_close).abs()], axis=1).max(axis=1)
    atr = tr.groupby(key, sort=False).ewm(alpha=1.0 / atr_window, adjust=False).mean()
    out["atr_ewm"] = atr.reset_index(level=0, drop=True)
    out["high_20"] = bars["high"].groupby(key, sort=False).rolling(20).max().reset_index(level=0, drop=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M bars instead of 10M")
    parser.add_argument("--symbols", type=int, default=100)
    args = parser.parse_args()
    n_total = 1_000_000 if args.quick else 10_000_000
    per_symbol = n_total // args.symbols

    config = FeatureConfig()
    contract = build_contract(config)
    t0 = time.perf_counter()
    bars = make_bars(args.symbols, per_symbol)
    print(f"bars: {len(bars):,} ({args.symbols} symbols x {per_symbol:,}), generated in "
          f"{time.perf_counter() - t0:.1f} s; contract {contract.hash}: {contract.dims()}")

    t0 = time.perf_counter()
    compute_features(bars.iloc[:2000])  # numba kernels: load from cache or compile
    print(f"numba warm-up call: {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    feats = compute_features(bars, config)
    t_ours = time.perf_counter() - t0
    n_feat = len(contract.all_names)
    print(f"compute_features ({n_feat} features + atr + feature_valid): {t_ours:6.2f} s  "
          f"{len(bars) / t_ours:12,.0f} bars/s   valid rows {feats['feature_valid'].mean():.4f}")

    t0 = time.perf_counter()
    ref = pandas_reference(bars, config.atr_window)
    t_ref = time.perf_counter() - t0
    print(f"pandas reference ({ref.shape[1]} features):        {t_ref:6.2f} s  "
          f"{len(bars) / t_ref:12,.0f} bars/s")
    print(f"speed-up: {t_ref / t_ours:.1f}x wall for {n_feat / ref.shape[1]:.1f}x the features; feature values/s: "
          f"ours {len(bars) * n_feat / t_ours:,.0f}  pandas {len(bars) * ref.shape[1] / t_ref:,.0f}")

    for name in ("ret_1", "ret_5", "ret_20", "rv_20", "vol_z_20"):
        a = feats[name].to_numpy(np.float64)
        b = ref[name].to_numpy(np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        same_nan = np.array_equal(np.isfinite(a), np.isfinite(b))
        print(f"  check {name:9s} max|ours - pandas| = {np.max(np.abs(a[both] - b[both])):.2e}  "
              f"same NaN pattern: {same_nan}")


if __name__ == "__main__":
    main()
