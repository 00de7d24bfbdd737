"""Benchmark of raw bar ingestion (``load_raw_bars``) on a large synthetic raw directory.

    python bench/raw_bars.py [--quick]

Writes a synthetic market of 10M bars (``--quick``: 1M) to a temporary raw directory as two parquet
files, with 0.1% of the rows broken (NaN prices, high < low, negative volume) and 0.1% duplicated
into the second file, in two layouts: ``partitioned`` (the files split the time range, each sorted
by (symbol, timestamp), as a feed delivers them) and ``shuffled`` (rows in random order, the worst
case for the sort). Times ``load_raw_bars`` side by side with a straightforward pandas reference
(``read_parquet`` + boolean masks + ``duplicated`` + ``sort_values``) on the same files, and checks
both keep the same rows. Wall-clock timings are noisy on shared CPUs; CPU seconds less so.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from sentinel_pipeline.data.raw_bars import list_parquet_files, load_raw_bars
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market


def make_raw_dir(raw_dir: Path, n_days: int, layout: str) -> int:
    bars = generate_synthetic_market(replace(SyntheticMarketConfig(), n_symbols=100, n_days=n_days))
    rng = np.random.default_rng(0)
    n = len(bars)
    bad = rng.choice(n, n // 1000, replace=False)
    third = len(bad) // 3
    bars.loc[bad[:third], "close"] = np.nan
    bars.loc[bad[third : 2 * third], "low"] = bars.loc[bad[third : 2 * third], "high"] * 1.01
    bars.loc[bad[2 * third :], "volume"] = -1.0
    dupes = bars.iloc[rng.choice(n, n // 1000, replace=False)]
    if layout == "partitioned":
        first = (bars["timestamp"] < bars["timestamp"].median()).to_numpy()
    else:
        bars = bars.sample(frac=1.0, random_state=0)
        first = np.arange(n) < n // 2
    bars[first].to_parquet(raw_dir / "a.parquet", index=False)
    pd.concat([bars[~first], dupes]).to_parquet(raw_dir / "b.parquet", index=False)
    return n + len(dupes)


def pandas_reference(raw_dir: Path) -> int:
    """The obvious pandas version of the same checks; returns the number of rows kept."""
    df = pd.concat([pd.read_parquet(p) for p in list_parquet_files(raw_dir)], ignore_index=True)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    prices = df[["open", "high", "low", "close"]]
    bad = (
        df["symbol"].isna()
        | df["timestamp"].isna()
        | ~np.isfinite(prices).all(axis=1)
        | (prices <= 0).any(axis=1)
        | (df["high"] < df["low"])
        | (df["high"] < df[["open", "close"]].max(axis=1))
        | (df["low"] > df[["open", "close"]].min(axis=1))
        | ~np.isfinite(df["volume"])
        | (df["volume"] < 0)
    )
    good = df[~bad]
    good = good[~good.duplicated(["symbol", "timestamp"])]
    good = good.sort_values(["symbol", "timestamp"], kind="stable").reset_index(drop=True)
    return len(good)


def timed(fn, *args):
    """``(fn(*args), (wall seconds, CPU seconds of this process))``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1M instead of 10M rows")
    args = parser.parse_args()
    for layout in ("partitioned", "shuffled"):
        with tempfile.TemporaryDirectory() as tmp:
            raw_dir = Path(tmp)
            n_in = make_raw_dir(raw_dir, 1_429 if args.quick else 14_286, layout)
            (result, t_ours) = timed(load_raw_bars, raw_dir)
            (n_ref, t_ref) = timed(pandas_reference, raw_dir)
        rep = result.report
        assert rep["n_rows_in"] == n_in == rep["n_rows_out"] + rep["n_quarantined"]
        assert rep["n_rows_out"] == n_ref, (rep["n_rows_out"], n_ref)
        print(
            f"[{layout}] rows in {n_in:,}, kept {rep['n_rows_out']:,}, quarantined {rep['n_quarantined']:,}"
        )
        print(
            f"[{layout}] load_raw_bars {t_ours[0]:.2f} s wall, {t_ours[1]:.2f} s CPU | "
            f"pandas reference {t_ref[0]:.2f} s wall, {t_ref[1]:.2f} s CPU"
        )
        by_reason = {k: v for k, v in rep["quarantine_by_reason"].items() if v}
        print(f"[{layout}] quarantined by reason: {by_reason}")
        del result


if __name__ == "__main__":
    main()
