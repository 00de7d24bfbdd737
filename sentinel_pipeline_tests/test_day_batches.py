"""Day batches: whole days only, every eligible (symbol, t) once per epoch, seeded day order, windows
inside one symbol, per-day local edges, and the instrument-major layout that breaks Qlib's
``DailyBatchSampler`` (qlib issue 2319)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.split_arrays import TARGET_NAMES, SplitArrays
from sentinel_pipeline.data.symbol_graph import EdgeSet, GraphConfig, SymbolGraph, edges_frame
from sentinel_pipeline.training.batchers.day_batches import DayBatcher

DAY_NS = 86_400 * 10**9


def panel_split(n_symbols: int = 12, n_days: int = 60, seq_len: int = 5, seed: int = 0,
                p_eligible: float = 0.8, n_feat: int = 3) -> SplitArrays:
    """An instrument-major split (rows sorted by (symbol, timestamp)): symbols start on different days,
    miss some days, and a random ~``p_eligible`` of their rows (after the warm-up) are sample ends.
    ``seq[:, 0]`` holds the row number, ``seq[:, 1]`` the symbol index, ``seq[:, 2]`` the day number."""
    rng = np.random.default_rng(seed)
    sym, day = [], []
    for s in range(n_symbols):
        days = np.arange(rng.integers(0, 8), n_days)
        days = days[rng.random(days.size) > 0.05]  # a few missing days
        sym.append(np.full(days.size, s))
        day.append(days)
    sym, day = np.concatenate(sym), np.concatenate(day)
    n = sym.size
    pos = np.concatenate([np.arange((sym == s).sum()) for s in range(n_symbols)])
    ends = np.flatnonzero((pos >= seq_len - 1) & (rng.random(n) < p_eligible)).astype(np.int64)
    seq = np.stack([np.arange(n), sym, day], axis=1).astype(np.float32)
    if n_feat > 3:
        seq = np.concatenate([seq, rng.normal(size=(n, n_feat - 3)).astype(np.float32)], axis=1)
    return SplitArrays(
        split="train", seq=seq, snap=rng.normal(size=(n, 2)).astype(np.float32),
        ctx_cat=rng.integers(0, 3, size=(n, 2)).astype(np.int32), ctx_cont=rng.normal(size=(n, 1)).astype(np.float32),
        targets=rng.normal(size=(n, len(TARGET_NAMES))).astype(np.float32),
        tb_label=rng.integers(-1, 2, size=n).astype(np.int8), symbol_idx=sym.astype(np.int32),
        timestamp=(day.astype(np.int64) + 19_000) * DAY_NS, sample_end_rows=ends, feature_contract_hash="0" * 16,
        feature_names={"seq": [f"s{i}" for i in range(seq.shape[1])], "snap": ["a", "b"], "ctx_cat": ["c", "d"],
                       "ctx_cont": ["e"]},
        symbols=[f"S{i:02d}" for i in range(n_symbols)], seq_len=seq_len,
    )


def eligible_by_day(split: SplitArrays, min_symbols: int) -> dict[int, set[int]]:
    """The plainest reference: {timestamp: {end rows}} of days with at least ``min_symbols`` ends."""
    frame = pd.DataFrame({"t": split.timestamp[split.sample_end_rows], "row": split.sample_end_rows})
    return {int(t): set(g["row"]) for t, g in frame.groupby("t") if len(g) >= min_symbols}


@pytest.mark.parametrize("days_per_batch", [1, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_are_whole_days_and_cover_every_eligible_sample_once(days_per_batch, shuffle):
    split = panel_split()
    ref = eligible_by_day(split, min_symbols=5)
    b = DayBatcher(split, seq_len=4, days_per_batch=days_per_batch, shuffle=shuffle, seed=3, min_symbols=5)
    assert b.n_days == len(ref) and b.n_samples == sum(map(len, ref.values()))
    assert b.skipped_days == len(np.unique(split.timestamp[split.sample_end_rows])) - len(ref)
    assert len(b) == -(-len(ref) // days_per_batch)
    seen = []
    for batch in b:
        ts, rows, ptr = batch["timestamp"].numpy(), batch["end_rows"].numpy(), batch["day_ptr"].numpy()
        day = batch["day"].numpy()
        assert ptr[0] == 0 and ptr[-1] == rows.size and (np.diff(ptr) > 0).all()
        assert 1 <= ptr.size - 1 <= days_per_batch
        for d in range(ptr.size - 1):
            lo, hi = ptr[d], ptr[d + 1]
            assert (day[lo:hi] == d).all()
            (t,) = set(ts[lo:hi].tolist())  # one timestamp per day ...
            assert set(rows[lo:hi].tolist()) == ref[t]  # ... and all of its eligible symbols, nothing else
            sym = batch["symbol_idx"].numpy()[lo:hi]
            assert (np.diff(sym) > 0).all()  # nodes sorted by symbol inside a day
        assert (np.diff(ts[ptr[:-1]]) > 0).all()  # days of a batch in chronological order
        seen.append(rows)
    seen = np.concatenate(seen)
    assert seen.size == np.unique(seen).size == b.n_samples  # each eligible (symbol, t) exactly once


def test_gathered_values_match_the_split_rows():
    split = panel_split(n_feat=6)
    b = DayBatcher(split, seq_len=5, days_per_batch=2, keys=("seq", "snap", "ctx_cat", "ctx_cont"))
    batch = b.batch(3)
    rows = batch["end_rows"].numpy()
    seq = batch["seq"].numpy()
    assert seq.shape == (rows.size, 5, 6) and seq.dtype == np.float32
    # seq[:, :, 0] holds the row number: the window is rows end-4 .. end, of one symbol
    np.testing.assert_array_equal(seq[:, :, 0], rows[:, None] + np.arange(-4, 1)[None, :])
    assert (seq[:, :, 1] == batch["symbol_idx"].numpy()[:, None]).all()  # windows never cross symbols
    np.testing.assert_array_equal(batch["snap"].numpy(), split.snap[rows])
    np.testing.assert_array_equal(batch["ctx_cat"].numpy(), split.ctx_cat[rows].astype(np.int64))
    np.testing.assert_array_equal(batch["ctx_cont"].numpy(), split.ctx_cont[rows])
    np.testing.assert_array_equal(batch["targets"].numpy(), split.targets[rows])
    np.testing.assert_array_equal(batch["tb_class"].numpy(), split.tb_label[rows].astype(np.int64) + 1)
    assert batch["edge_index"].shape == (2, 0) and batch["edge_weight"].shape == (0,)  # graph=None


def test_keys_select_the_feature_groups():
    b = DayBatcher(panel_split(), seq_len=3, keys=("seq",))
    batch = b.batch(0)
    assert "seq" in batch and not {"snap", "ctx_cat", "ctx_cont"} & set(batch)
    assert {"targets", "tb_class", "timestamp", "symbol_idx", "end_rows", "day", "day_ptr", "edge_index",
            "edge_weight"} <= set(batch)
    with pytest.raises(ValueError, match="unknown batch keys"):
        DayBatcher(panel_split(), seq_len=3, keys=("seq", "labels"))
    assert set(DayBatcher(panel_split(), seq_len=3, keys=("seq", "targets")).batch(0)) == set(batch)


def test_memory_per_batch_is_the_batch_not_the_split():
    split = panel_split(n_symbols=40, n_days=400, seq_len=30, n_feat=8)
    b = DayBatcher(split, seq_len=30, keys=("seq",))
    b.batch(0)  # warm up
    tracemalloc.start()
    batch = b.batch(len(b) // 2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    window = batch["seq"].numel() * 4
    all_windows = split.n_samples * 30 * 8 * 4
    assert window <= 40 * 30 * 8 * 4 and all_windows > 300 * window
    assert peak < 3 * window + 256 * 1024  # the window, its index matrix and small arrays; never N x L x F


def test_day_order_is_seeded_in_train_and_chronological_otherwise():
    split = panel_split()
    first_days = lambda b: [int(b.batch(i)["timestamp"][0]) for i in range(len(b))]  # noqa: E731
    plain = DayBatcher(split, seq_len=3)
    chrono = first_days(plain)
    assert chrono == sorted(chrono)
    plain.set_epoch(5)
    assert first_days(plain) == chrono  # no shuffle: every epoch chronological

    a, b = DayBatcher(split, seq_len=3, shuffle=True, seed=7), DayBatcher(split, seq_len=3, shuffle=True, seed=7)
    assert first_days(a) == first_days(b) != chrono  # same (seed, epoch): same order
    e0 = first_days(a)
    a.set_epoch(1)
    e1 = first_days(a)
    assert e1 != e0 and sorted(e1) == sorted(e0) == chrono  # another epoch: another permutation of the days
    expected = np.random.default_rng([7, 1]).permutation(a.n_days)
    np.testing.assert_array_equal(a.day_order(), expected)
    assert first_days(DayBatcher(split, seq_len=3, shuffle=True, seed=8)) != e0


def test_limit_days_and_min_symbols():
    split = panel_split()
    b = DayBatcher(split, seq_len=3, limit_days=4)
    assert b.n_days == 4 and len(b) == 4
    everything = DayBatcher(split, seq_len=3, min_symbols=1)
    strict = DayBatcher(split, seq_len=3, min_symbols=10)
    assert everything.skipped_days == 0 and strict.skipped_days > 0
    assert strict.n_samples + strict.skipped_samples == everything.n_samples
    assert all(int(strict.batch(i)["day_ptr"][-1]) >= 10 for i in range(len(strict)))


def test_refuses_windows_longer_than_the_split_and_windows_crossing_symbols():
    split = panel_split(seq_len=5)
    with pytest.raises(ValueError, match="longer than the split's seq_len"):
        DayBatcher(split, seq_len=6)
    # a sample end at a symbol's second row: its 5-row window would start in the previous symbol
    second = int(np.flatnonzero(np.diff(split.symbol_idx) != 0)[0]) + 2
    split.sample_end_rows = np.sort(np.r_[split.sample_end_rows, second])
    with pytest.raises(ValueError, match="cross a symbol boundary"):
        DayBatcher(split, seq_len=5, min_symbols=1)


# -- qlib issue 2319: instrument-major storage ------------------------------------------------------------
def naive_daily_batches(timestamps: np.ndarray) -> list[np.ndarray]:
    """Qlib's ``DailyBatchSampler`` logic: per-day counts (``groupby(datetime).size()``, sorted by date),
    start offsets by ``cumsum``, and each day's batch the *contiguous* row range ``arange(start, start+count)``
    (correct only when rows are stored datetime-major)."""
    counts = pd.Series(timestamps).groupby(timestamps).size().to_numpy()
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return [np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)]


def test_instrument_major_layout_whole_days_where_consecutive_row_grouping_fails():
    split = panel_split(n_symbols=8, n_days=30, p_eligible=1.0)
    ends = split.sample_end_rows
    ts, sym = split.timestamp[ends], split.symbol_idx[ends]
    assert (np.diff(split.symbol_idx) >= 0).all()  # stored instrument-major, as the project stores splits

    # the naive grouping: its "days" hold one symbol over consecutive dates, not one date's cross-section
    naive = [ends[i] for i in naive_daily_batches(ts)]
    assert any(np.unique(split.timestamp[rows]).size > 1 for rows in naive)
    assert sum(np.unique(split.symbol_idx[rows]).size == 1 for rows in naive) > len(naive) // 2

    b = DayBatcher(split, seq_len=3, min_symbols=1)
    for batch in b:
        rows = batch["end_rows"].numpy()
        (t,) = np.unique(split.timestamp[rows])
        np.testing.assert_array_equal(np.sort(rows), np.sort(ends[ts == t]))  # exactly that day's cross-section
        assert np.unique(split.symbol_idx[rows]).size == int((ts == t).sum()) == (sym[ts == t]).size


# -- edges -----------------------------------------------------------------------------------------------
def make_graph(symbols: list[str], versions: list[tuple[int, EdgeSet]], point_in_time: bool) -> SymbolGraph:
    info = {"symbols": symbols, "graph_hash": "g", "feature_contract_hash": "0" * 16,
            "params": {**GraphConfig(point_in_time=point_in_time).params()}}
    return SymbolGraph(info, edges_frame(versions, symbols), path=None)  # type: ignore[arg-type]


def random_edges(n_symbols: int, n_edges: int, seed: int) -> EdgeSet:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, n_symbols, n_edges)
    tgt = (src + rng.integers(1, n_symbols, n_edges)) % n_symbols  # never a self loop
    key = np.unique(tgt * n_symbols + src)
    src, tgt = key % n_symbols, key // n_symbols
    w = rng.uniform(0.2, 1.0, key.size).astype(np.float32)
    return EdgeSet(src, tgt, w, np.zeros(key.size, np.int8), w.copy())


def test_edges_are_local_to_their_day_without_self_loops_and_match_the_graph():
    split = panel_split()
    # the graph lists its symbols in another order than the split (and one symbol the split lacks)
    graph_symbols = [*reversed(split.symbols), "ZZZ"]
    edges = random_edges(len(graph_symbols), 60, seed=1)
    graph = make_graph(graph_symbols, [(0, edges)], point_in_time=False)
    b = DayBatcher(split, seq_len=3, days_per_batch=3, graph=graph, shuffle=True, seed=1)
    pairs = {(graph_symbols[s], graph_symbols[t]) for s, t in zip(edges.source, edges.target, strict=True)}
    weight = {(graph_symbols[s], graph_symbols[t]): w for s, t, w in
              zip(edges.source, edges.target, edges.weight, strict=True)}
    total = 0
    for batch in b:
        ei, ew, day, sym = (batch[k].numpy() for k in ("edge_index", "edge_weight", "day", "symbol_idx"))
        assert ei.dtype == np.int64 and ew.dtype == np.float32 and (ew > 0).all()
        assert (ei >= 0).all() and (ei < day.size).all()
        assert (day[ei[0]] == day[ei[1]]).all()  # both ends on the same day
        assert (ei[0] != ei[1]).all()  # no self loops
        names = np.asarray(split.symbols)[sym]
        got = set(zip(names[ei[0]].tolist(), names[ei[1]].tolist(), day[ei[0]].tolist(), strict=True))
        # reference: every graph edge whose two symbols are nodes of the same day
        expect = set()
        for d in np.unique(day):
            present = set(names[day == d].tolist())
            expect |= {(s, t, int(d)) for s, t in pairs if s in present and t in present}
        assert got == expect
        for k in range(ei.shape[1]):
            assert ew[k] == weight[(names[ei[0, k]], names[ei[1, k]])]
        total += ei.shape[1]
    assert total > 0


def test_point_in_time_edges_come_from_the_newest_version_strictly_before_the_day():
    split = panel_split()
    days = np.unique(split.timestamp)
    v0, v1 = random_edges(len(split.symbols), 30, 2), random_edges(len(split.symbols), 30, 3)
    graph = make_graph(list(split.symbols), [(int(days[10]), v0), (int(days[30]), v1)], point_in_time=True)
    assert graph.version_for(days[10]) == -1  # a version is used only after its as_of date
    assert graph.version_for(days[11]) == 0 and graph.version_for(days[30]) == 0
    assert graph.version_for(days[31]) == 1
    b = DayBatcher(split, seq_len=3, graph=graph, min_symbols=1)
    for batch in b:
        t = int(batch["timestamp"][0])
        sym = batch["symbol_idx"].numpy()
        ei = batch["edge_index"].numpy()
        if t <= days[10]:
            assert ei.shape[1] == 0
            continue
        e = v0 if t <= days[30] else v1
        present = set(sym.tolist())
        expect = {(s, d) for s, d in zip(e.source.tolist(), e.target.tolist(), strict=True)
                  if s in present and d in present}
        assert set(zip(sym[ei[0]].tolist(), sym[ei[1]].tolist(), strict=True)) == expect
