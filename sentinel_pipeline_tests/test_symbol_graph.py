"""The symbol graph: no edge uses returns after its as-of date, overlap/top-k/threshold honoured, sector
edges joined and capped, digests that change with the params, a tampered edges file refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sentinel_pipeline.data.symbol_graph import (
    EDGES_FILE,
    GRAPH_FILE,
    GraphConfig,
    GraphFileError,
    SymbolGraph,
    build_versions,
    pairwise_corr,
    read_sector_map,
    return_panel,
    sector_codes_for,
    select_edges,
    version_ends,
    write_graph_files,
)

DAY_NS = 86_400 * 10**9


def clustered_closes(n_symbols: int = 24, n_times: int = 300, n_clusters: int = 4, seed: int = 0,
                     missing: float = 0.03) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Long-format (symbol code, time index, close) of a panel whose returns load on one of
    ``n_clusters`` factors (so there are strong within-cluster correlations), with a few missing bars;
    also returns each symbol's cluster."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(n_symbols) % n_clusters
    factors = rng.normal(0, 0.01, (n_times, n_clusters))
    loading = rng.uniform(0.3, 1.2, n_symbols)
    rets = factors[:, cluster] * loading + rng.normal(0, 0.01, (n_times, n_symbols))
    close = 50 * np.exp(np.cumsum(rets, axis=0))
    keep = rng.random((n_times, n_symbols)) > missing
    t, s = np.nonzero(keep)
    return s, t, close[t, s], cluster


def panel(n_symbols=24, n_times=300, **kw):
    s, t, c, cluster = clustered_closes(n_symbols, n_times, **kw)
    return s, t, c, cluster, n_symbols, n_times


def edges_as_set(e) -> set[tuple[int, int, int, float]]:
    return set(zip(e.source.tolist(), e.target.tolist(), e.kind.tolist(), np.round(e.weight, 6).tolist(), strict=True))


def test_pairwise_corr_equals_pandas_pairwise_complete():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 9))
    x[:, 1] += 0.8 * x[:, 0]
    x[rng.random(x.shape) < 0.2] = np.nan
    x[:100, 8] = np.nan  # little overlap with the rest
    corr, n = pairwise_corr(x)
    ref = pd.DataFrame(x).corr(min_periods=2).to_numpy()
    np.testing.assert_allclose(corr, ref, atol=1e-10, equal_nan=True)
    mask = np.isfinite(x).astype(int)
    np.testing.assert_array_equal(n, mask.T @ mask)


def test_static_graph_uses_no_return_after_the_train_window():
    s, t, c, _, n_s, n_t = panel()
    times = (np.arange(n_t, dtype=np.int64) + 19_000) * DAY_NS
    train_window = (int(times[0]), int(times[199]))
    cfg = GraphConfig(top_k=3, min_abs_corr=0.1, min_overlap=30)
    ret = return_panel(s, t, c, n_s, n_t)
    (as_of, edges), = build_versions(ret, times, cfg, train_window=train_window)
    assert as_of == train_window[1] and edges.n > 0
    garbage = c.copy()
    after = t > 199
    garbage[after] = np.random.default_rng(9).uniform(1, 1e6, after.sum())  # every later close replaced
    (as_of2, edges2), = build_versions(return_panel(s, t, garbage, n_s, n_t), times, cfg, train_window=train_window)
    assert as_of2 == as_of and edges_as_set(edges2) == edges_as_set(edges)
    # and the train window does matter: a garbage close inside it changes the edges
    inside = c.copy()
    inside[t == 150] *= 50.0
    (_, edges3), = build_versions(return_panel(s, t, inside, n_s, n_t), times, cfg, train_window=train_window)
    assert edges_as_set(edges3) != edges_as_set(edges)


def test_point_in_time_versions_read_only_their_trailing_window():
    s, t, c, _, n_s, n_t = panel(n_times=260)
    times = (np.arange(n_t, dtype=np.int64) + 19_000) * DAY_NS
    cfg = GraphConfig(top_k=3, min_abs_corr=0.1, min_overlap=30, point_in_time=True, window=80, step=25)
    ret = return_panel(s, t, c, n_s, n_t)
    versions = build_versions(ret, times, cfg, train_window=(int(times[0]), int(times[-1])))
    ends = version_ends(n_t, cfg)
    assert [a for a, _ in versions] == [int(times[i]) for i in ends] and len(versions) >= 5
    rng = np.random.default_rng(4)
    for v, a in enumerate(ends):
        # garbage after the as_of date and before the window (the window's first return needs close[a-80])
        outside = (t > a) | (t < a - cfg.window)
        junk = c.copy()
        junk[outside] = rng.uniform(1, 1e6, outside.sum())
        again = build_versions(return_panel(s, t, junk, n_s, n_t), times, cfg, train_window=(0, 1))
        assert edges_as_set(again[v][1]) == edges_as_set(versions[v][1]), f"version {v} read outside its window"
    # every version with as_of <= a cut-off date is unchanged when every close after it is garbage
    cut = ends[2]
    junk = c.copy()
    junk[t > cut] = rng.uniform(1, 1e6, (t > cut).sum())
    again = build_versions(return_panel(s, t, junk, n_s, n_t), times, cfg, train_window=(0, 1))
    for v in range(3):
        assert edges_as_set(again[v][1]) == edges_as_set(versions[v][1])
    assert any(edges_as_set(again[v][1]) != edges_as_set(versions[v][1]) for v in range(3, len(versions)))


def test_top_k_threshold_and_overlap_are_honoured():
    s, t, c, cluster, n_s, n_t = panel(n_symbols=30, n_times=200)
    ret = return_panel(s, t, c, n_s, n_t)
    ret[:, 29] = np.nan
    ret[:40, 29] = ret[:40, 0]  # symbol 29 is symbol 0 on 39 returns only (corr 1, too little overlap)
    cfg = GraphConfig(top_k=4, min_abs_corr=0.25, min_overlap=50)
    e = select_edges(ret, cfg)
    corr, n = pairwise_corr(ret)
    assert (e.source != e.target).all()
    assert (np.abs(e.corr) >= 0.25).all() and (n[e.source, e.target] >= 50).all()
    np.testing.assert_allclose(e.weight, np.abs(corr[e.source, e.target]), rtol=1e-6)
    assert not ((e.source == 29) | (e.target == 29)).any()
    in_deg = np.bincount(e.target, minlength=n_s)
    assert in_deg.max() <= 4
    for i in range(n_s):  # each target's sources are exactly its 4 best qualifying peers
        ok = (np.arange(n_s) != i) & (n[i] >= 50) & (np.abs(corr[i]) >= 0.25) & np.isfinite(corr[i])
        best = np.flatnonzero(ok)[np.argsort(-np.abs(corr[i, ok]), kind="stable")][:4]
        assert set(e.source[e.target == i].tolist()) == set(best.tolist())
    # the planted clusters show: most edges join symbols of one cluster
    assert (cluster[e.source] == cluster[e.target]).mean() > 0.8
    sym = select_edges(ret, GraphConfig(top_k=4, min_abs_corr=0.25, min_overlap=50, symmetric=True))
    pairs = set(zip(sym.source.tolist(), sym.target.tolist(), strict=True))
    assert all((b, a) in pairs for a, b in pairs) and pairs >= set(zip(e.source.tolist(), e.target.tolist(), strict=True))
    strict = select_edges(ret, GraphConfig(top_k=4, min_abs_corr=0.9, min_overlap=50))
    assert strict.n < e.n


def test_sector_edges_are_joined_within_groups_and_capped(tmp_path):
    s, t, c, _, n_s, n_t = panel(n_symbols=30, n_times=200)
    symbols = [f"S{i:02d}" for i in range(n_s)]
    groups = ["tech" if i < 20 else "energy" for i in range(n_s - 2)]  # the last two have no sector
    path = tmp_path / "sectors.csv"
    pd.DataFrame({"symbol": symbols[:-2], "sector": groups, "industry": ["x"] * (n_s - 2)}).to_csv(path, index=False)
    codes, names = sector_codes_for(symbols, read_sector_map(path))
    assert names == ["energy", "tech"] and (codes[-2:] == -1).all()
    cfg = GraphConfig(top_k=3, min_abs_corr=0.2, min_overlap=50, max_sector_edges=5, sector_weight=0.4)
    e = select_edges(return_panel(s, t, c, n_s, n_t), cfg, codes)
    sec = e.kind == 1
    assert sec.any() and (e.kind == 0).any()
    assert (codes[e.source[sec]] == codes[e.target[sec]]).all() and (codes[e.source[sec]] >= 0).all()
    assert (e.weight[sec] == np.float32(0.4)).all()
    per_node = np.bincount(e.target[sec], minlength=n_s)
    assert per_node.max() == 5 and (per_node[:20] == 5).all()  # 20-member group: capped at 5, not 19
    assert (per_node[-2:] == 0).all()
    assert sec.sum() == 20 * 5 + 8 * 5
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"symbol": ["A", "A"], "sector": ["x", "y"]}).to_csv(bad, index=False)
    with pytest.raises(GraphFileError, match="bad.csv.*more than one sector"):
        read_sector_map(bad)
    with pytest.raises(GraphFileError, match="lacks column"):
        read_sector_map(path, level="subindustry")


def _write(tmp_path, name, cfg, ret, symbols, times, contract="c" * 16):
    versions = build_versions(ret, times, cfg, train_window=(int(times[0]), int(times[150])))
    return write_graph_files(tmp_path / name, versions, symbols, cfg.params(), contract)


def test_graph_hash_follows_params_contract_and_edges(tmp_path):
    s, t, c, _, n_s, n_t = panel(n_symbols=20, n_times=200)
    times = (np.arange(n_t, dtype=np.int64) + 19_000) * DAY_NS
    symbols = [f"S{i:02d}" for i in range(n_s)]
    ret = return_panel(s, t, c, n_s, n_t)
    base = _write(tmp_path, "a", GraphConfig(min_overlap=30), ret, symbols, times)
    same = _write(tmp_path, "b", GraphConfig(min_overlap=30), ret, symbols, times)
    assert same["graph_hash"] == base["graph_hash"] and same["edges_sha256"] == base["edges_sha256"]
    k = _write(tmp_path, "c", GraphConfig(min_overlap=30, top_k=2), ret, symbols, times)
    assert k["edges_sha256"] != base["edges_sha256"] and k["graph_hash"] != base["graph_hash"]
    # a parameter that leaves these edges as they are still changes the graph hash
    w = _write(tmp_path, "d", GraphConfig(min_overlap=30, sector_weight=0.9), ret, symbols, times)
    assert w["edges_sha256"] == base["edges_sha256"] and w["graph_hash"] != base["graph_hash"]
    other = _write(tmp_path, "e", GraphConfig(min_overlap=30), ret, symbols, times, contract="d" * 16)
    assert other["graph_hash"] != base["graph_hash"]
    g = SymbolGraph.load(tmp_path / "a", expected_contract_hash="c" * 16)
    assert g.graph_hash == base["graph_hash"] and g.symbols == symbols and g.n_versions == 1


def test_a_tampered_edges_file_or_graph_json_is_refused(tmp_path):
    s, t, c, _, n_s, n_t = panel(n_symbols=20, n_times=200)
    times = (np.arange(n_t, dtype=np.int64) + 19_000) * DAY_NS
    symbols = [f"S{i:02d}" for i in range(n_s)]
    _write(tmp_path, "g", GraphConfig(min_overlap=30), return_panel(s, t, c, n_s, n_t), symbols, times)
    folder = tmp_path / "g"
    SymbolGraph.load(folder)
    edges = pq.read_table(folder / EDGES_FILE)
    frame = edges.to_pandas()
    frame.loc[0, "weight"] = np.float32(0.99)
    pq.write_table(edges.from_pandas(frame, schema=edges.schema, preserve_index=False), folder / EDGES_FILE)
    with pytest.raises(GraphFileError, match=f"{folder / EDGES_FILE}.*differs from the .* recorded in"):
        SymbolGraph.load(folder)
    # graph.json rewritten to the new digest but with the old graph_hash: refused too
    info = json.loads((folder / GRAPH_FILE).read_text())
    from sentinel_pipeline.data.symbol_graph import sha256_file

    info["edges_sha256"] = sha256_file(folder / EDGES_FILE)
    (folder / GRAPH_FILE).write_text(json.dumps(info))
    with pytest.raises(GraphFileError, match="graph_hash does not match"):
        SymbolGraph.load(folder)
    with pytest.raises(GraphFileError, match="missing"):
        SymbolGraph.load(tmp_path / "nowhere")


def test_edges_for_day_maps_split_symbols_and_merges_kinds(tmp_path):
    s, t, c, _, n_s, n_t = panel(n_symbols=20, n_times=200)
    times = (np.arange(n_t, dtype=np.int64) + 19_000) * DAY_NS
    symbols = [f"S{i:02d}" for i in range(n_s)]
    path = tmp_path / "sec.parquet"
    pd.DataFrame({"symbol": symbols, "sector": ["a"] * 10 + ["b"] * 10}).to_parquet(path)
    cfg = GraphConfig(min_overlap=30, top_k=3, sector_file=str(path), max_sector_edges=3, sector_weight=0.05)
    codes, _ = sector_codes_for(symbols, read_sector_map(path))
    versions = build_versions(return_panel(s, t, c, n_s, n_t), times, cfg,
                              train_window=(int(times[0]), int(times[150])), sector_codes=codes)
    write_graph_files(tmp_path / "g", versions, symbols, cfg.params("x"), "c" * 16)
    g = SymbolGraph.load(tmp_path / "g")
    e = versions[0][1]
    # a split that lists the symbols in another order, and a day on which only some symbols trade
    split_symbols = list(reversed(symbols))
    present = np.array([1, 4, 5, 7, 9, 12, 13, 18])  # split symbol indices of the day's nodes
    ei, ew = g.edges_for_day(int(times[170]), present, split_symbols)
    assert ei.shape[0] == 2 and ei.shape[1] == ew.size and (ei[0] != ei[1]).all()
    names = np.asarray(split_symbols)[present]
    got = {(names[a], names[b]): w for a, b, w in zip(ei[0], ei[1], ew, strict=True)}
    assert len(got) == ei.shape[1]  # one edge per pair even where a pair is both kinds
    ref: dict[tuple[str, str], float] = {}
    on_day = set(names.tolist())
    for a, b, w in zip(e.source, e.target, e.weight, strict=True):
        if symbols[a] in on_day and symbols[b] in on_day:
            ref[(symbols[a], symbols[b])] = max(ref.get((symbols[a], symbols[b]), 0.0), float(w))
    assert got.keys() == ref.keys() and all(np.isclose(got[k], ref[k]) for k in ref)
