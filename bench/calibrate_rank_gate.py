"""Calibrate the ranking family's directional gate: its statistic on zero-skill scores over real returns.

The gate every variant passes is ``skill_gates.directional_skill``; for a ranking model it runs on the
5-day head against ``fwd_ret_5`` with a Newey-West lag of 5 (``ranking.directional_gate``) and needs
``t >= 3``. Whether 3 holds a zero-skill ranking to a 5 % (or lower) false-pass rate depends on how the
IC series of a zero-skill score is autocorrelated, and that depends on how persistent the score is and
on the cross-section of the returns. This script measures it without training anything: it takes the
real daily panel (``../shared/data/daily_equities_panel.parquet`` by default), computes ``fwd_ret_5``
per symbol (log close-to-close over the next 5 bars), cuts the panel into non-overlapping windows of
``--window`` days (a test split's length) and, on each window, scores every symbol-day with ``--draws``
zero-skill scores of each kind:

- ``iid``: a fresh N(0, 1) per symbol and day (a ranking redrawn every day);
- ``ar95``: an AR(1) per symbol with coefficient 0.95 (half-life about 14 days: a slowly moving score);
- ``static``: one random value per symbol for the whole window (a fixed zero-skill ranking).

For each kind it prints the share of draws with ``t >= 3`` (the false-pass rate of the gate) and the
95th and 99th percentiles of ``t``, with the gate's lag (5) and with a lag of 20 beside it. A persistent
zero-skill ranking bets on whichever symbols happen to trend over the window: its daily ICs are
correlated far beyond 5 days, so a lag of 5 understates the standard error.

    python bench/calibrate_rank_gate.py                 # 25 draws per kind and window
    python bench/calibrate_rank_gate.py --quick         # 5 draws, 2 windows

Not covered here (needs training; the merge runs it with the graph family in ``calibrate_gate.py``'s
harness): the pass rate of trained ``gat_multi_horizon`` bundles on the synthetic panel with the planted
signal at strength 0 (must fail) and at the default strength (must pass), over several seeds.
"""

from __future__ import annotations

import argparse
import json
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

from sentinel_pipeline.evaluation.ranking import RankingConfig, directional_gate  # noqa: E402

KINDS = ("iid", "ar95", "static")
DEFAULT_PANEL = REPO_ROOT.parent / "shared" / "data" / "daily_equities_panel.parquet"


def forward_returns(path: Path, horizon: int) -> pd.DataFrame:
    """``timestamp``, ``symbol``, ``fwd_ret_<horizon>`` (log, over the symbol's next rows) of the panel."""
    bars = pd.read_parquet(path, columns=["symbol", "timestamp", "close"])
    bars = bars.sort_values(["symbol", "timestamp"], kind="stable").reset_index(drop=True)
    logc = np.log(bars["close"].where(bars["close"] > 0))
    fwd = logc.groupby(bars["symbol"]).shift(-horizon) - logc
    out = bars[["timestamp", "symbol"]].assign(**{f"fwd_ret_{horizon}": fwd})
    return out.dropna().reset_index(drop=True)


def null_scores(kind: str, t_idx: np.ndarray, s_idx: np.ndarray, n_days: int, n_symbols: int,
                rng: np.random.Generator) -> np.ndarray:
    if kind == "iid":
        return rng.normal(size=t_idx.size)
    if kind == "static":
        return rng.normal(size=n_symbols)[s_idx]
    if kind == "ar95":
        phi = 0.95
        eps = rng.normal(size=(n_days, n_symbols)) * np.sqrt(1 - phi ** 2)
        x = np.empty_like(eps)
        x[0] = rng.normal(size=n_symbols)
        for t in range(1, n_days):
            x[t] = phi * x[t - 1] + eps[t]
        return x[t_idx, s_idx]
    raise ValueError(f"unknown null kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panel", type=Path, default=DEFAULT_PANEL)
    ap.add_argument("--window", type=int, default=250, help="days per window (a test split's length)")
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--draws", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lags", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "calibrate_rank_gate.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.draws, args.max_windows = 5, 2
    if not args.panel.is_file():
        print(f"{args.panel}: no such file (pass --panel)")
        return 2
    horizon = 5
    t0 = time.perf_counter()
    table = forward_returns(args.panel, horizon)
    days = np.sort(table["timestamp"].unique())
    n_win = min(args.max_windows, days.size // args.window)
    # the most recent windows: the end of the panel is where a test split lies
    edges = [days[days.size - (i + 1) * args.window: days.size - i * args.window] for i in range(n_win)]
    cfg = RankingConfig(gate_horizon=horizon, gate_min_t=3.0)
    rng = np.random.default_rng(args.seed)
    records = []
    for w, window_days in enumerate(edges):
        sub = table[table["timestamp"].isin(window_days)].reset_index(drop=True)
        t_idx, _ = pd.factorize(sub["timestamp"], sort=True)
        s_idx, syms = pd.factorize(sub["symbol"], sort=True)
        for kind in KINDS:
            for d in range(args.draws):
                sub[f"out_ret_{horizon}"] = null_scores(kind, t_idx, s_idx, len(window_days), len(syms), rng)
                for lag in args.lags:
                    g = directional_gate(sub, cfg, lag=lag)
                    records.append({"window": w, "start": str(pd.Timestamp(window_days[0]).date()),
                                    "kind": kind, "draw": d, "lag": max(lag, horizon), "t": g.value,
                                    "passed": bool(g.passed), "mean_ic": g.extra.get("mean_ic")})
    frame = pd.DataFrame(records)
    seconds = time.perf_counter() - t0
    print(f"{args.panel.name}: {n_win} windows of {args.window} days, {table['symbol'].nunique()} symbols, "
          f"{args.draws} draws per kind and window ({seconds:.0f} s)")
    print(f"{'kind':8s} {'lag':>4s} {'n':>5s} {'share t>=3':>11s} {'t q95':>7s} {'t q99':>7s} {'sd(mean IC)':>12s}")
    rows = []
    for (kind, lag), g in frame.groupby(["kind", "lag"], sort=False):
        t = g["t"].to_numpy(np.float64)
        t = t[np.isfinite(t)]
        row = {"kind": kind, "lag": int(lag), "n": int(t.size), "false_pass": float(np.mean(t >= 3.0)),
               "t_q95": float(np.quantile(t, 0.95)), "t_q99": float(np.quantile(t, 0.99)),
               "sd_mean_ic": float(g["mean_ic"].std())}
        rows.append(row)
        print(f"{kind:8s} {lag:4d} {row['n']:5d} {row['false_pass']:11.3f} {row['t_q95']:7.2f} {row['t_q99']:7.2f} "
              f"{row['sd_mean_ic']:12.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": rows, "records": records}, indent=1) + "\n", encoding="utf-8")
    print(f"records: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
