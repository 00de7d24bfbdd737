"""Benchmark: whole-day batches (``DayBatcher``) and the symbol graph build, each beside a plain reference.

Day batches: a synthetic instrument-major split of 505 symbols x 1000 days, seq_len 30, 20 seq features,
a static graph of top-10 neighbours per symbol; one day per batch, shuffled day order (as in training).
The reference is the plainest correct code: a dict {timestamp: [end rows]} built by a Python loop over
the eligible rows, then per day one ``seq[end-L+1:end+1]`` slice per symbol, ``np.stack``, and the
day's edges by a Python loop over the graph's edges with a {symbol: local id} dict. Both produce the
same ``seq``, nodes and edges (checked on the first batches). Printed: day batches/s and nodes/s of
both, their ratio, and the peak memory one batch allocates (tracemalloc) beside the batch's own
``n x L x F`` window and the ``N x L x F`` a pre-windowed split would need.

Graph build: ``select_edges`` (five matrix products + argpartition) on 505 symbols x 1260 daily returns
vs ``pandas.DataFrame.corr`` (pairwise-complete) + a per-row sort for the same edges, and the cost of
point-in-time versions (window 252, step 21).

    python bench/bench_day_batches.py            # 505 symbols x 1000 days
    python bench/bench_day_batches.py --quick    # 505 symbols x 200 days
    python bench/bench_day_batches.py --panel ../shared/data/daily_equities_panel.parquet   # + a real panel's graph
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays  # noqa: E402
from sentinel_pipeline.data.symbol_graph import (  # noqa: E402
    GraphConfig,
    SymbolGraph,
    build_versions,
    edges_frame,
    pairwise_corr,
    select_edges,
)
from sentinel_pipeline.training.batchers.day_batches import DayBatcher  # noqa: E402

DAY_NS = 86_400 * 10**9


def synthetic_split(n_symbols: int, n_days: int, seq_len: int, n_feat: int, seed: int = 0) -> SplitArrays:
    """Instrument-major rows (symbol, day); symbols start on different days; ~90% of rows are sample ends."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n_days // 10, n_symbols)
    lengths = n_days - first
    sym = np.repeat(np.arange(n_symbols), lengths).astype(np.int32)
    day = np.concatenate([np.arange(f, n_days) for f in first])
    n = sym.size
    pos = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ends = np.flatnonzero((pos >= seq_len - 1) & (rng.random(n) < 0.9)).astype(np.int64)
    return SplitArrays(
        split="bench", seq=rng.normal(size=(n, n_feat)).astype(np.float32),
        snap=rng.normal(size=(n, 8)).astype(np.float32), ctx_cat=rng.integers(0, 5, (n, 3)).astype(np.int32),
        ctx_cont=rng.normal(size=(n, 2)).astype(np.float32),
        targets=rng.normal(size=(n, len(TARGET_NAMES))).astype(np.float32),
        tb_label=rng.integers(-1, 2, n).astype(np.int8), symbol_idx=sym,
        timestamp=(day.astype(np.int64) + 19_000) * DAY_NS, sample_end_rows=ends, feature_contract_hash="0" * 16,
        feature_names={}, symbols=[f"S{i:03d}" for i in range(n_symbols)], seq_len=seq_len,
    )


def random_graph(symbols: list[str], k: int, seed: int = 1) -> SymbolGraph:
    rng = np.random.default_rng(seed)
    s = len(symbols)
    ret = rng.normal(size=(300, s)) + rng.normal(size=(300, 20))[:, np.arange(s) % 20]
    times = np.arange(300, dtype=np.int64)
    versions = build_versions(ret, times, GraphConfig(top_k=k, min_abs_corr=0.0), train_window=(0, 299))
    info = {"symbols": symbols, "graph_hash": "bench", "feature_contract_hash": "0" * 16,
            "params": GraphConfig(top_k=k).params()}
    return SymbolGraph(info, edges_frame(versions, symbols), path=Path("bench"))


class PlainDays:
    """The reference: Python dicts and per-symbol slices."""

    def __init__(self, split: SplitArrays, seq_len: int, graph_edges: list[tuple[str, str, float]],
                 order: np.ndarray) -> None:
        self.split, self.L = split, seq_len
        by_day: dict[int, list[int]] = {}
        for r in split.sample_end_rows.tolist():
            by_day.setdefault(int(split.timestamp[r]), []).append(r)
        self.days = sorted(by_day)
        self.by_day = {t: sorted(rows, key=lambda r: int(split.symbol_idx[r])) for t, rows in by_day.items()}
        self.order = order
        self.edges = graph_edges

    def batch(self, i: int) -> dict[str, np.ndarray]:
        s, L = self.split, self.L
        rows = self.by_day[self.days[self.order[i]]]
        seq = np.stack([s.seq[r - L + 1: r + 1] for r in rows])
        local = {s.symbols[int(s.symbol_idx[r])]: j for j, r in enumerate(rows)}
        src, tgt, w = [], [], []
        for a, b, x in self.edges:
            if a in local and b in local:
                src.append(local[a])
                tgt.append(local[b])
                w.append(x)
        return {"seq": seq, "end_rows": np.array(rows), "edge_index": np.array([src, tgt]).reshape(2, -1),
                "edge_weight": np.array(w, dtype=np.float32), "targets": s.targets[rows]}


def bench_batches(n_days: int, seq_len: int, n_feat: int) -> None:
    n_symbols = 505
    t0 = time.perf_counter()
    split = synthetic_split(n_symbols, n_days, seq_len, n_feat)
    graph = random_graph(split.symbols, k=10)
    print(f"split: {split.n_rows:,} rows x {n_feat} seq features, {split.n_samples:,} eligible ends, "
          f"{len(np.unique(split.timestamp)):,} days; graph {sum(v[0].size for v in graph._versions):,} edges "
          f"(built in {time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    b = DayBatcher(split, seq_len=seq_len, shuffle=True, seed=0, graph=graph, keys=("seq",))
    setup = time.perf_counter() - t0
    edges = [(graph.symbols[s], graph.symbols[t], float(w)) for s, t, w in
             zip(*(a.tolist() for a in graph._versions[0]), strict=True)]
    t0 = time.perf_counter()
    plain = PlainDays(split, seq_len, edges, b.day_order())
    plain_setup = time.perf_counter() - t0

    for i in range(3):  # same batches
        ours, ref = b.batch(i), plain.batch(i)
        np.testing.assert_array_equal(ours["seq"].numpy(), ref["seq"])
        np.testing.assert_array_equal(ours["end_rows"].numpy(), ref["end_rows"])
        got = set(zip(*ours["edge_index"].numpy().tolist(), strict=True))
        assert got == set(zip(*ref["edge_index"].tolist(), strict=True)), "edges differ"

    def rate(fn, n: int) -> tuple[float, int]:
        nodes = 0
        t = time.perf_counter()
        for i in range(n):
            nodes += int(fn(i)["end_rows"].shape[0])
        return n / (time.perf_counter() - t), nodes

    n = len(b)
    ours_bps, nodes = rate(b.batch, n)
    n_ref = min(n, 100)
    ref_bps, ref_nodes = rate(plain.batch, n_ref)
    per_day = nodes / n
    print(f"setup: DayBatcher {setup * 1e3:.0f} ms, reference dicts {plain_setup * 1e3:.0f} ms")
    print(f"DayBatcher: {ours_bps:,.0f} day batches/s, {ours_bps * per_day:,.0f} nodes/s ({n} batches, "
          f"{per_day:.0f} nodes/day, edges included)")
    print(f"reference : {ref_bps:,.0f} day batches/s, {ref_bps * ref_nodes / n_ref:,.0f} nodes/s ({n_ref} batches)")
    print(f"speed-up  : {ours_bps / ref_bps:.1f}x")

    tracemalloc.start()
    b.batch(0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    window = per_day * seq_len * n_feat * 4
    full = split.n_samples * seq_len * n_feat * 4
    print(f"peak memory of one batch: {peak / 2**20:.1f} MiB (its n x L x F window {window / 2**20:.1f} MiB; the split "
          f"itself {split.seq.nbytes / 2**20:.0f} MiB; pre-built N x L x F windows would be {full / 2**30:.2f} GiB)")


def bench_graph(n_times: int, n_symbols: int = 505) -> None:
    rng = np.random.default_rng(2)
    ret = rng.normal(size=(n_times, n_symbols)) * 0.01 + rng.normal(size=(n_times, 11))[:, np.arange(n_symbols) % 11] * 0.01
    ret[rng.random(ret.shape) < 0.02] = np.nan
    cfg = GraphConfig(top_k=10, min_abs_corr=0.2, min_overlap=60)
    t = time.perf_counter()
    e = select_edges(ret, cfg)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    corr = pd.DataFrame(ret).corr(min_periods=cfg.min_overlap).to_numpy()
    ref_edges = set()
    for i in range(n_symbols):
        row = np.abs(corr[i])
        row[i] = np.nan
        cand = [j for j in np.argsort(-np.nan_to_num(row, nan=-1.0), kind="stable")[:cfg.top_k] if row[j] >= cfg.min_abs_corr]
        ref_edges |= {(int(j), i) for j in cand}
    ref = time.perf_counter() - t
    assert ref_edges == set(zip(e.source.tolist(), e.target.tolist(), strict=True)), "edges differ from pandas"
    print(f"graph build, {n_symbols} symbols x {n_times} returns: select_edges {ours * 1e3:.0f} ms "
          f"({e.n} edges) vs pandas corr + per-row sort {ref * 1e3:.0f} ms ({ref / ours:.1f}x)")
    pit = GraphConfig(top_k=10, min_abs_corr=0.2, min_overlap=60, point_in_time=True, window=252, step=21)
    t = time.perf_counter()
    versions = build_versions(ret, np.arange(n_times, dtype=np.int64), pit, train_window=(0, 1))
    print(f"point in time (window 252, step 21): {len(versions)} versions in {time.perf_counter() - t:.2f}s")
    _, n = pairwise_corr(ret[:10])
    assert n.shape == (n_symbols, n_symbols)


def bench_panel(path: str) -> None:
    """The static graph of a real daily panel (``symbol, timestamp, close``): train window = first 70% of dates."""
    from sentinel_pipeline.data.symbol_graph import return_panel, strongest_clusters

    df = pd.read_parquet(path, columns=["symbol", "timestamp", "close"])
    t = time.perf_counter()
    sym, symbols = pd.factorize(df["symbol"].astype(str), sort=True)
    ts = pd.DatetimeIndex(df["timestamp"]).as_unit("ns").asi8
    times, trank = np.unique(ts, return_inverse=True)
    ret = return_panel(sym, trank, df["close"].to_numpy(), len(symbols), times.size)
    cfg = GraphConfig()
    train_end = times[int(round(0.7 * times.size)) - 1]
    ((_, e),) = build_versions(ret, times, cfg, train_window=(int(times[0]), int(train_end)))
    build = time.perf_counter() - t
    deg = np.bincount(e.target, minlength=len(symbols))
    print(f"{path}: {len(symbols)} symbols x {times.size} days; static graph (train = first 70% of days, top_k "
          f"{cfg.top_k}, |corr| >= {cfg.min_abs_corr}, overlap >= {cfg.min_overlap}) in {build:.2f}s: {e.n} edges, "
          f"in-degree min {deg.min()} / median {np.median(deg):.0f} / max {deg.max()}, isolated {int((deg == 0).sum())}, "
          f"|corr| of edges median {np.median(e.weight):.2f}")
    t = time.perf_counter()
    clusters = strongest_clusters(e, [str(x) for x in symbols], np.full(len(symbols), -1), [])
    print(f"strongest clusters ({time.perf_counter() - t:.2f}s, {clusters[0]['method'] if clusters else ''}):")
    for c in clusters[:6]:
        print(f"  size {c['size']:3d}  mean |corr| {c['mean_abs_corr']:.2f}  {c['members']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--panel", default=None, help="also build the static graph of a daily panel parquet")
    args = ap.parse_args()
    bench_batches(200 if args.quick else 1000, args.seq_len, args.features)
    bench_graph(300 if args.quick else 1260)
    if args.panel:
        bench_panel(args.panel)


if __name__ == "__main__":
    main()
