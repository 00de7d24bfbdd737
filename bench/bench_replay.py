"""Benchmark: replay trade simulation (numba) vs a per-trade Python loop, and the replay runtime's
per-timestamp feature recomputation vs computing the features once.

1. ``simulate_trades`` on a random-walk panel (default 100 symbols x 20,000 hourly bars = 2M bars, a
   signal on ~30% of the bars) against a plain Python implementation of the same rules, timed on the
   first ``--ref-symbols`` symbols only and scaled up per bar; the trades of those symbols are compared.
2. ``replay_bundle`` on the default synthetic market (24 symbols, a year of 7 hourly bars a day, the
   last week = 35 steps) with a small untrained ``seq_ctx_fusion`` model: total seconds and seconds per
   step, next to one ``compute_features`` call on the whole table (what a precomputed-table replay
   would pay).

Single-threaded; timings on a shared machine are noisy.

    python bench/bench_replay.py            # 2M bars
    python bench/bench_replay.py --quick    # 200k bars, a 2-day replay window
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sentinel_pipeline.data.feature_contract import FeatureContract  # noqa: E402
from sentinel_pipeline.data.features import FeatureConfig, build_contract, compute_features  # noqa: E402
from sentinel_pipeline.data.scalers import ClippedRobustScaler, FittedScalers  # noqa: E402
from sentinel_pipeline.data.synthetic_market import generate_synthetic_market  # noqa: E402
from sentinel_pipeline.replay import ReplayConfig, replay_bundle, replay_window_mask, simulate_trades  # noqa: E402
from sentinel_pipeline.training.models import build_model, resolve_arch  # noqa: E402

LABEL_PARAMS = {"pt": 1.5, "sl": 1.5, "horizon": 20}


def make_bars(n_symbols: int, bars_per_symbol: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_symbols * bars_per_symbol
    lr = rng.normal(0.0, 0.01, (n_symbols, bars_per_symbol))
    close = np.exp(np.log(100.0) + np.cumsum(lr, axis=1)).ravel()
    prev = np.exp(np.log(100.0) + np.cumsum(lr, axis=1) - lr).ravel()
    opn = prev * np.exp(rng.normal(0.0, 0.002, n))
    high = np.maximum(opn, close) * np.exp(np.abs(rng.normal(0.0, 0.004, n)))
    low = np.minimum(opn, close) * np.exp(-np.abs(rng.normal(0.0, 0.004, n)))
    grid = pd.date_range("2000-01-03", periods=bars_per_symbol, freq="h", tz="UTC", unit="ns")
    return pd.DataFrame({
        "symbol": np.repeat([f"S{i:04d}" for i in range(n_symbols)], bars_per_symbol),
        "timestamp": np.tile(grid, n_symbols),
        "open": opn, "high": high, "low": low, "close": close,
    })


def reference_trades(bars: pd.DataFrame, sig: np.ndarray, atr: np.ndarray, pt: float, sl: float, h: int,
                     thr: float) -> list[tuple[int, int, float]]:
    """Per-trade Python loop over the same rules: (signal row, exit row, exit price) per trade."""
    out = []
    o, hi, lo, c = (bars[k].to_numpy() for k in ("open", "high", "low", "close"))
    for idx in bars.groupby("symbol", sort=False).indices.values():
        first, last = idx[0], idx[-1]
        free_from = first
        for s in range(first, last + 1):
            if not (abs(sig[s]) >= thr) or s < free_from or s == last or not atr[s] > 0:
                continue
            side, entry, a = (1 if sig[s] > 0 else -1), o[s + 1], atr[s]
            take, stop = entry + side * pt * a, entry - side * sl * a
            exit_row, price = min(s + h, last), c[min(s + h, last)]
            for r in range(s + 1, min(s + h, last) + 1):
                hit_stop = lo[r] <= stop if side > 0 else hi[r] >= stop
                hit_take = hi[r] >= take if side > 0 else lo[r] <= take
                if hit_stop or hit_take:
                    exit_row = r
                    price = (min(stop, o[r]) if side > 0 else max(stop, o[r])) if hit_stop else take
                    break
            out.append((s, exit_row, price))
            free_from = exit_row
    return out


def bench_trades(n_symbols: int, bars_per_symbol: int, ref_symbols: int) -> None:
    bars = make_bars(n_symbols, bars_per_symbol)
    n = len(bars)
    rng = np.random.default_rng(1)
    atr = bars["close"].to_numpy() * 0.01
    sig = np.where(rng.random(n) < 0.3, rng.normal(0, 1, n), np.nan)
    cfg = ReplayConfig(threshold=0.5)
    simulate_trades(bars.iloc[:1000], sig[:1000], atr[:1000], LABEL_PARAMS, cfg)  # load/compile
    t = time.perf_counter()
    trades = simulate_trades(bars, sig, atr, LABEL_PARAMS, cfg)
    t_numba = time.perf_counter() - t
    m = ref_symbols * bars_per_symbol
    t = time.perf_counter()
    ref = reference_trades(bars.iloc[:m], sig[:m], atr[:m], 1.5, 1.5, 20, 0.5)
    t_ref = time.perf_counter() - t
    sub = trades[trades["symbol"].isin(bars["symbol"].iloc[:m].unique())]
    same = len(sub) == len(ref) and np.allclose(sub["exit_price"].to_numpy(), [r[2] for r in ref])
    print(f"simulate_trades: {n:,} bars, {len(trades):,} trades")
    print(f"  numba kernel : {t_numba:8.3f} s  {n / t_numba / 1e6:8.2f} M bars/s")
    print(f"  python loop  : {t_ref:8.3f} s on {m:,} bars  {m / t_ref / 1e6:8.2f} M bars/s "
          f"(x{(n / t_numba) / (m / t_ref):.0f} slower); same trades: {same}")


@dataclass
class _Bundle:
    path: Path
    model: torch.nn.Module
    arch: dict[str, Any]
    variant: str
    contract: FeatureContract
    scalers: FittedScalers
    metadata: dict[str, Any] = field(default_factory=lambda: {"label_params": dict(LABEL_PARAMS)})


def bench_runtime(window_days: float) -> None:
    bars = generate_synthetic_market()
    fcfg = FeatureConfig()
    contract = build_contract(fcfg)
    cfg = ReplayConfig(window_days=window_days)
    t = time.perf_counter()
    feats = compute_features(bars, fcfg)
    t_once = time.perf_counter() - t
    fit = ~replay_window_mask(bars["timestamp"], cfg) & feats["feature_valid"].to_numpy()
    sc = {g: ClippedRobustScaler().fit(feats.loc[fit, contract.names(g)].to_numpy(np.float64)) for g in ("seq", "snap")}
    arch = resolve_arch("seq_ctx_fusion", contract.dims(), contract.ctx_cat_cardinalities, fcfg.seq_len, None)
    torch.manual_seed(0)
    bundle = _Bundle(Path("bench"), build_model(arch), arch, "seq_ctx_fusion", contract,
                     FittedScalers(seq=sc["seq"], snap=sc["snap"], info={}))
    t = time.perf_counter()
    result = replay_bundle(bundle, bars, cfg)
    t_replay = time.perf_counter() - t
    steps = result.info["n_steps"]
    print(f"replay_bundle: {len(bars):,} bars, {bars['symbol'].nunique()} symbols, {steps} steps, "
          f"{len(result.trades)} trades, prefix consistent: {result.info['prefix_consistency']['ok']}")
    print(f"  per-timestamp runtime : {t_replay:8.3f} s  ({t_replay / steps * 1e3:.1f} ms/step; "
          f"features {result.info['seconds']['features']:.3f} s, model {result.info['seconds']['model']:.3f} s)")
    print(f"  features once (ref.)  : {t_once:8.3f} s  (a precomputed-table replay's feature cost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--bars", type=int, default=20_000, help="bars per symbol")
    parser.add_argument("--ref-symbols", type=int, default=5, help="symbols the Python reference runs on")
    args = parser.parse_args()
    if args.quick:
        args.symbols, args.bars, args.ref_symbols = 20, 10_000, 2
    bench_trades(args.symbols, args.bars, args.ref_symbols)
    bench_runtime(2.0 if args.quick else 7.0)


if __name__ == "__main__":
    main()
