"""Benchmark of the numba triple-barrier labeller against the per-event reference.

    python bench/bench_labels.py [--quick]

(a) On a random-walk panel of 100k bars (20 symbols), times ``label_dataset`` (the stage function,
    pandas in and out) and ``label_arrays`` (the compiled kernel over flat arrays) against
    ``sentinel_pipeline_tests/reference_labeller.py`` (one event at a time, pandas slicing), and checks
    the outputs are identical on every row the reference labelled. The full run labels every bar with
    the reference (a few minutes); ``--quick`` times the reference on 2,000 randomly chosen events and
    extrapolates its per-event time to the whole panel (reported as such).
(b) Throughput of the compiled labeller at horizon 20 on 10M bars (500 symbols), single thread, after
    JIT warm-up: best of 3 for ``label_arrays`` and one ``label_dataset`` call; the reference's rate
    from (a) is printed beside it.

Timings are wall-clock and noisy on shared CPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(REPO_ROOT))

from sentinel_pipeline.data.labels import LabelConfig, label_arrays, label_dataset  # noqa: E402
from sentinel_pipeline_tests.reference_labeller import reference_label_dataset  # noqa: E402


def random_walk_bars(
    n_symbols: int, bars_per_symbol: int, seed: int = 0, atr_period: int = 14
) -> pd.DataFrame:
    """Random-walk OHLC with a simple-moving-average ATR per symbol, sorted by (symbol, timestamp)."""
    rng = np.random.default_rng(seed)
    shape = (n_symbols, bars_per_symbol)
    log_ret = rng.normal(0.0, 0.002, shape)
    close = 100.0 * np.exp(np.cumsum(log_ret, axis=1))
    open_ = np.concatenate([close[:, :1], close[:, :-1]], axis=1)
    wick = np.abs(rng.normal(0.0, 0.0015, (2, *shape)))
    high = np.maximum(open_, close) * (1.0 + wick[0])
    low = np.minimum(open_, close) * (1.0 - wick[1])
    true_range = np.maximum(high, open_) - np.minimum(low, open_)  # open_ is the previous close
    csum = np.pad(np.cumsum(true_range, axis=1), ((0, 0), (1, 0)))  # csum[:, k] = sum of the first k
    atr = np.full(shape, np.nan)
    atr[:, atr_period - 1 :] = (csum[:, atr_period:] - csum[:, :-atr_period]) / atr_period
    timestamps = pd.date_range("2020-01-01", periods=bars_per_symbol, freq="5min", tz="UTC")
    return pd.DataFrame(
        {
            "symbol": np.repeat([f"S{i:04d}" for i in range(n_symbols)], bars_per_symbol),
            "timestamp": np.tile(timestamps, n_symbols),
            "high": high.ravel(),
            "low": low.ravel(),
            "close": close.ravel(),
            "atr": atr.ravel(),
        }
    )


def flat_inputs(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    codes = pd.factorize(df["symbol"])[0]
    return (*(df[c].to_numpy(np.float64) for c in ("high", "low", "close", "atr")), codes)


def compare(out: pd.DataFrame, ref: pd.DataFrame) -> tuple[bool, float]:
    """(all non-float columns equal and floats equal up to NaN positions, max abs float difference)."""
    got = out.loc[ref.index]
    identical, max_diff = True, 0.0
    for col in ref.columns:
        a, b = got[col], ref[col]
        if a.dtype.kind == "f":
            x, y = a.to_numpy(), b.to_numpy()
            same_nan = np.array_equal(np.isnan(x), np.isnan(y))
            finite = ~np.isnan(x)
            diff = float(np.max(np.abs(x[finite] - y[finite]), initial=0.0)) if same_nan else float("inf")
            max_diff = max(max_diff, diff)
            identical &= same_nan and np.allclose(x[finite], y[finite], rtol=1e-12, atol=0.0)
        else:
            identical &= a.reset_index(drop=True).equals(b.reset_index(drop=True))
    return identical, max_diff


def bench_vs_reference(quick: bool, config: LabelConfig) -> float:
    df = random_walk_bars(n_symbols=20, bars_per_symbol=5_000, seed=1)
    n = len(df)
    label_dataset(df.iloc[:1000], config)  # JIT warm-up (or cache load)

    t0 = time.perf_counter()
    out, stats = label_dataset(df, config)
    t_stage = time.perf_counter() - t0
    inputs = flat_inputs(df)
    t0 = time.perf_counter()
    label_arrays(*inputs, config)
    t_kernel = time.perf_counter() - t0

    if quick:
        rows = np.sort(np.random.default_rng(0).choice(n, size=2_000, replace=False))
    else:
        rows = np.arange(n)
    t0 = time.perf_counter()
    ref = reference_label_dataset(df, config, rows=rows)
    t_ref = time.perf_counter() - t0
    per_event_ref = t_ref / len(rows)
    ref_total = per_event_ref * n
    identical, max_diff = compare(out, ref)

    how = "extrapolated from" if quick else "measured on all"
    print(
        f"(a) {n:,} bars, {df['symbol'].nunique()} symbols, eligible {stats['eligibility_rate']:.3f}, "
        f"class balance " + ", ".join(f"{k}: {v:.3f}" for k, v in stats["class_balance"].items())
    )
    print(
        f"    reference (per event, pandas): {per_event_ref * 1e6:9.1f} us/event -> {ref_total:8.2f} s "
        f"for {n:,} bars ({how} {len(rows):,} events, {t_ref:.2f} s)"
    )
    print(f"    label_dataset (numba + pandas): {t_stage:8.4f} s  -> {ref_total / t_stage:9.0f}x faster")
    print(f"    label_arrays  (numba kernel):   {t_kernel:8.4f} s  -> {ref_total / t_kernel:9.0f}x faster")
    print(
        f"    output identical on the {len(rows):,} compared rows: {identical} (max |float diff| {max_diff:.3g})"
    )
    if not identical:
        raise SystemExit("labeller output differs from the reference")
    return 1.0 / per_event_ref


def bench_throughput(n_bars: int, config: LabelConfig, ref_rate: float) -> None:
    n_symbols = 500
    df = random_walk_bars(n_symbols=n_symbols, bars_per_symbol=n_bars // n_symbols, seed=2)
    inputs = flat_inputs(df)
    label_arrays(*(a[:1000] for a in inputs), config)  # JIT warm-up (or cache load)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        label_arrays(*inputs, config)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    label_dataset(df, config)
    t_stage = time.perf_counter() - t0
    best = min(times)
    print(f"(b) {len(df):,} bars, {n_symbols} symbols, horizon {config.horizon}, single thread")
    print(
        f"    label_arrays  (numba kernel):   {len(df) / best / 1e6:8.2f} M bars/s (best of 3: "
        + ", ".join(f"{t:.3f}" for t in times)
        + " s)"
    )
    print(f"    label_dataset (numba + pandas): {len(df) / t_stage / 1e6:8.2f} M bars/s ({t_stage:.3f} s)")
    print(f"    reference (from (a)):           {ref_rate / 1e6:8.6f} M bars/s ({ref_rate:,.0f} bars/s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="time the reference on 2,000 events only")
    parser.add_argument("--bars", type=int, default=10_000_000, help="bars for the throughput run (b)")
    args = parser.parse_args()
    config = LabelConfig()  # horizon 20, pt = sl = 1.5
    ref_rate = bench_vs_reference(args.quick, config)
    bench_throughput(args.bars, config, ref_rate)


if __name__ == "__main__":
    main()
