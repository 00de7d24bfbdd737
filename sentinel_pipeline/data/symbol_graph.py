"""The symbol graph: which symbols a cross-sectional model lets exchange information, per day.

Edges come from the correlation of the symbols' bar-to-bar log returns of ``close`` (daily log returns
on a daily panel), plus, optionally, a user-supplied sector/industry map joined as extra edges.

**Static graph** (``point_in_time=False``, the default): one edge set from the returns of the **train
window only** (the time range of the train split of the splits stage), used for every day of every split.
No val/test return enters it; inside the train window it is, as any static graph, built from the whole
window (a training day sees neighbours chosen on returns up to the window's end, never beyond it).

**Point-in-time graph** (``point_in_time=True``): versions rebuilt every ``step`` timestamps of the panel,
each from the trailing ``window`` timestamps ending at its ``as_of`` date (inclusive; shorter at the start
of the data), and a day uses the newest version whose ``as_of`` is **strictly before** it (days before the
first version have no edges). No edge uses a return after its ``as_of`` (tested by replacing every later
close with garbage).

Edge selection (vectorised): one pairwise-complete correlation matrix of the window's returns
(:func:`pairwise_corr`: five matrix products; each pair uses the timestamps where both symbols have a
return, as ``pandas.DataFrame.corr`` does, which the tests use as the reference), pairs with fewer than
``min_overlap`` common returns dropped; then for every node its ``top_k`` neighbours by ``|corr|`` (or by
``corr`` with ``absolute=False``) at or above ``min_abs_corr`` (``numpy.argpartition`` per row). Edges are
**directed** ``source -> target`` with the node as target: every node receives messages from at most
``top_k`` peers, so the attention fan-in and memory stay bounded (``E <= top_k * n``) however central a
symbol is. ``symmetric=True`` adds the reverse of every edge (the union; hubs then receive from many).
Edge weight = ``|corr|`` (> 0); the signed correlation is kept in the ``corr`` column.

Sector edges: a CSV or parquet file with ``symbol`` and ``sector`` (optionally ``industry``; the column
used is ``sector_level``). Every node receives edges from at most ``max_sector_edges`` peers of its own
group (those with the highest ``|corr|`` in the version's window, ties by symbol order), weight
``sector_weight``, ``kind="sector"``: a sector of 60 members adds at most 60 x cap edges, not a clique
of 3,540. A pair that is both a correlation and a sector edge appears twice in the file (one row per
kind); :meth:`SymbolGraph.edges_for_day` merges them into one edge with the larger weight.

Files of the stage folder (``<artifacts>/symbol_graph``):

- ``edges_static.parquet``: ``source``, ``target`` (symbol strings), ``weight`` float32, ``kind``
  ("correlation" | "sector"), ``as_of`` timestamp[ns, UTC] (the last date whose returns the edge used;
  the static graph: the train window's last timestamp), ``corr`` float32 (signed; NaN for sector edges).
- ``node_features.parquet``: one row per bar (date and symbol) of the labelled dataset; the node inputs
  are *referenced*, not copied: ``row`` (row of ``features.arrow``/``labels.arrow``), ``split`` and
  ``split_row`` (row of that split's HDF5/Arrow arrays, which hold the scaled contract features; -1 for
  none), ``eligible`` (the split row is a sample end: a node of the day batches), ``symbol_idx`` (index into the splits' ``symbols``), ``degree`` (in-degree in the
  version in force that day), ``version`` (-1: none), ``sector`` (code into ``graph.json``'s sector list,
  -1: none).
- ``graph.json``: params, counts, degree stats, ``edges_sha256`` (of the edges file) and ``graph_hash``
  = sha256 over the feature contract hash, the params (the sector file's sha256 in place of its path)
  and ``edges_sha256``: the graph's parameters and edges enter the contract hash a graph model records.
- ``degree_hist.png``: the in-degree distribution (for the UI).

:func:`run_symbol_graph` is the stage runner (reuse when fresh, else an all-or-nothing build with the
upstream digests recorded); :class:`SymbolGraph` loads and checks the files and gives each day's edges.
No Dagster import here.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sentinel_pipeline.atomic_io import atomic_path, write_json_atomic
from sentinel_pipeline.data import raw_bars, tables
from sentinel_pipeline.data.dataset import LabelledDataset
from sentinel_pipeline.data.feature_contract import ContractError, read_contract
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import (
    StageInputError,
    build_stage,
    clear_failure,
    file_digest,
    fingerprint,
    fresh_record,
    last_failure,
    read_record,
    upstream_state,
)

STAGE_DIR = "symbol_graph"
EDGES_FILE = "edges_static.parquet"
NODES_FILE = "node_features.parquet"
GRAPH_FILE = "graph.json"
PLOT_FILE = "degree_hist.png"
FORMAT = "sentinel-symbol-graph/1"
EDGE_KINDS: tuple[str, ...] = ("correlation", "sector")
EDGE_COLUMNS: tuple[str, ...] = ("source", "target", "weight", "kind", "as_of", "corr")


class GraphFileError(ValueError):
    """A graph file is missing, malformed, or differs from the digest recorded for it."""


def graph_dir(paths: ArtifactPaths) -> Path:
    """The stage folder of the symbol graph: ``<artifacts>/symbol_graph``."""
    return paths.artifacts / STAGE_DIR


@dataclass(frozen=True)
class GraphConfig:
    """Every knob of the symbol graph (all of them enter ``graph_hash``)."""

    top_k: int = 10  # neighbours each node receives edges from
    min_abs_corr: float = 0.2  # |corr| threshold of a correlation edge
    min_overlap: int = 60  # least common returns of a pair (timestamps where both have one)
    absolute: bool = True  # rank by |corr| (negative correlations qualify); False: positive corr only
    symmetric: bool = False  # add the reverse of every edge (union)
    returns: str = "log_close"  # "log_close": log(close_t / close_t-1) per symbol; or a column, e.g. "ret_1"
    point_in_time: bool = False
    window: int = 252  # trailing timestamps per point-in-time version (its as_of included)
    step: int = 21  # timestamps between point-in-time versions
    sector_file: str | None = None  # CSV/parquet with symbol, sector[, industry]
    sector_level: str = "sector"  # the column of the sector file that groups symbols
    sector_weight: float = 0.5
    max_sector_edges: int = 10  # cap of sector edges each node receives

    def __post_init__(self) -> None:
        problems = []
        if int(self.top_k) != self.top_k or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (math.isfinite(self.min_abs_corr) and 0.0 <= self.min_abs_corr <= 1.0):
            problems.append(f"min_abs_corr must be in [0, 1], got {self.min_abs_corr!r}")
        if int(self.min_overlap) != self.min_overlap or self.min_overlap < 3:
            problems.append(f"min_overlap must be an integer >= 3, got {self.min_overlap!r}")
        if int(self.window) != self.window or self.window < self.min_overlap + 1:
            problems.append(f"window must be an integer > min_overlap ({self.min_overlap}), got {self.window!r}")
        if int(self.step) != self.step or self.step < 1:
            problems.append(f"step must be an integer >= 1, got {self.step!r}")
        if not (math.isfinite(self.sector_weight) and self.sector_weight > 0):
            problems.append(f"sector_weight must be > 0, got {self.sector_weight!r}")
        if int(self.max_sector_edges) != self.max_sector_edges or self.max_sector_edges < 0:
            problems.append(f"max_sector_edges must be an integer >= 0, got {self.max_sector_edges!r}")
        if not self.returns:
            problems.append("returns must be 'log_close' or a column name")
        if problems:
            raise ValueError("GraphConfig: " + "; ".join(problems))

    def params(self, sector_sha256: str | None = None) -> dict[str, Any]:
        """The parameters that define the graph: the config with the sector file's sha256 in place of its
        path (the same map in another folder gives the same graph hash)."""
        out = asdict(self)
        out.pop("sector_file")
        out["sector_sha256"] = sector_sha256
        return out


# ------------------------------------------------------------------------------------------------
# pure computation (arrays in, arrays out)
# ------------------------------------------------------------------------------------------------


def return_panel(
    symbol_codes: np.ndarray, time_index: np.ndarray, values: np.ndarray, n_symbols: int, n_times: int,
    *, log_close: bool = True,
) -> np.ndarray:
    """The (T, S) float64 return matrix on the panel's timestamp grid (NaN where a symbol has none).

    ``log_close``: ``values`` are closes and the return at t is ``log(close_t / close_t-1)`` on the grid,
    so a symbol with no bar at t-1 has no return at t (nothing is bridged across a missing bar);
    otherwise ``values`` already are returns (e.g. the contract's ``ret_1``). Non-finite or non-positive
    closes give NaN.
    """
    grid = np.full((n_times, n_symbols), np.nan)
    vals = np.asarray(values, dtype=np.float64)
    if log_close:
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = np.where(vals > 0, np.log(vals), np.nan)
    grid[time_index, symbol_codes] = vals
    if not log_close:
        return grid
    out = np.full_like(grid, np.nan)
    out[1:] = grid[1:] - grid[:-1]
    return out


def pairwise_corr(returns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of every pair of columns over the rows where **both** are finite
    (pairwise-complete, as ``pandas.DataFrame.corr``), and the number of those rows.

    Hand-written rather than ``DataFrame.corr`` because that loops over pairs (O(S^2 T) scalar work per
    call, seconds at 500 symbols and again for every point-in-time version); here it is five (S, T) x
    (T, S) matrix products in float64, after centring each column on its own mean (less cancellation).
    Pairs with fewer than 2 common rows or no variance get NaN. Tested against pandas.
    """
    x = np.asarray(returns, dtype=np.float64)
    mask = np.isfinite(x)
    m = mask.astype(np.float64)
    counts = m.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, np.where(mask, x, 0.0).sum(axis=0) / np.maximum(counts, 1), 0.0)
    xc = np.where(mask, x - mean, 0.0)
    n = m.T @ m  # n[i, j]: rows where both are finite
    sx = xc.T @ m  # sx[i, j]: sum of x_i over those rows
    sxx = (xc * xc).T @ m
    sxy = xc.T @ xc
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sx.T / n
        var_i = sxx - sx * sx / n
        var_j = var_i.T
        corr = cov / np.sqrt(var_i * var_j)
    ok = (n >= 2) & (var_i > 1e-300) & (var_j > 1e-300)
    corr = np.where(ok, np.clip(corr, -1.0, 1.0), np.nan)
    return corr, n.astype(np.int64)


def _top_per_row(priority: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each row's ``k`` largest finite ``priority`` values (``-inf`` = not a candidate);
    ties broken by the lower column (deterministic)."""
    n_rows, n_cols = priority.shape
    k = min(int(k), n_cols)
    if k <= 0 or n_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = np.argpartition(-priority, k - 1, axis=1)[:, :k] if k < n_cols else np.tile(np.arange(n_cols), (n_rows, 1))
    rows = np.repeat(np.arange(n_rows), k)
    cols = cols.reshape(-1)
    keep = np.isfinite(priority[rows, cols])
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


@dataclass
class EdgeSet:
    """Edges of one graph version in symbol-index space (index into the graph's ``symbols``)."""

    source: np.ndarray  # int64
    target: np.ndarray  # int64
    weight: np.ndarray  # float32 > 0
    kind: np.ndarray  # int8 index into EDGE_KINDS
    corr: np.ndarray  # float32 signed correlation (NaN: none)

    @property
    def n(self) -> int:
        return int(self.source.size)


def select_edges(
    returns: np.ndarray, cfg: GraphConfig, sector_codes: np.ndarray | None = None
) -> EdgeSet:
    """The edges of one window of returns ((T, S) matrix): top-k correlation edges per target node, plus
    sector edges (see the module docstring). Self loops never appear."""
    s = returns.shape[1]
    corr, n_obs = pairwise_corr(returns)
    score = np.abs(corr) if cfg.absolute else corr
    valid = np.isfinite(score) & (n_obs >= cfg.min_overlap) & ~np.eye(s, dtype=bool)
    ties = np.arange(s, dtype=np.float64)[None, :] * 1e-12
    priority = np.where(valid & (score >= cfg.min_abs_corr), score - ties, -np.inf)
    tgt, src = _top_per_row(priority, cfg.top_k)  # row = target node, col = source
    c = corr[tgt, src]
    parts = [(src, tgt, np.abs(c), np.zeros(src.size, np.int8), c)]
    if cfg.symmetric and src.size:
        parts.append((tgt, src, np.abs(c), np.zeros(src.size, np.int8), c))
    if sector_codes is not None and cfg.max_sector_edges > 0:
        codes = np.asarray(sector_codes, dtype=np.int64)
        same = (codes[:, None] == codes[None, :]) & (codes[:, None] >= 0) & ~np.eye(s, dtype=bool)
        # among the own group: highest |corr| first (pairs without a valid corr after all of those)
        rank = np.where(valid, np.abs(corr), -1.0) - ties
        sec_t, sec_s = _top_per_row(np.where(same, rank, -np.inf), cfg.max_sector_edges)
        sc = np.where(valid[sec_t, sec_s], corr[sec_t, sec_s], np.nan)
        parts.append((sec_s, sec_t, np.full(sec_s.size, cfg.sector_weight), np.ones(sec_s.size, np.int8), sc))
    src_all, tgt_all, w, kind, cc = (np.concatenate(p) for p in zip(*parts, strict=True))
    # one row per (source, target, kind): symmetric union may repeat a pair
    key = (tgt_all * s + src_all) * len(EDGE_KINDS) + kind
    _, first = np.unique(key, return_index=True)
    return EdgeSet(src_all[first].astype(np.int64), tgt_all[first].astype(np.int64),
                   w[first].astype(np.float32), kind[first].astype(np.int8), cc[first].astype(np.float32))


def version_ends(n_times: int, cfg: GraphConfig, first_time: int = 0) -> np.ndarray:
    """Indices (into the timestamp grid) of the point-in-time versions' ``as_of`` dates: the first once
    ``min_overlap`` returns can exist after ``first_time`` (the first grid row has no return), then every
    ``step`` timestamps."""
    start = first_time + cfg.min_overlap
    return np.arange(start, n_times, cfg.step, dtype=np.int64)


def build_versions(
    returns: np.ndarray, times: np.ndarray, cfg: GraphConfig, *, train_window: tuple[int, int],
    sector_codes: np.ndarray | None = None,
) -> list[tuple[int, EdgeSet]]:
    """``[(as_of_ns, edges), ...]`` of the graph, oldest first.

    ``returns`` is the (T, S) matrix on the sorted timestamp grid ``times`` (int64 ns) and
    ``train_window`` the first and last timestamp (ns) of the train split. Static: one version from the
    train rows only, ``as_of`` = the train window's last timestamp. Point in time: see
    :func:`version_ends`; version ``a`` reads the rows ``(a - window, a]`` only.
    """
    if not cfg.point_in_time:
        lo = int(np.searchsorted(times, train_window[0], side="left"))
        hi = int(np.searchsorted(times, train_window[1], side="right"))
        if hi <= lo:
            raise ValueError(f"symbol graph: the train window {train_window} holds no timestamp of the panel")
        return [(int(times[hi - 1]), select_edges(returns[lo:hi], cfg, sector_codes))]
    out = []
    for a in version_ends(times.size, cfg):
        out.append((int(times[a]), select_edges(returns[max(0, a - cfg.window + 1): a + 1], cfg, sector_codes)))
    return out


# ------------------------------------------------------------------------------------------------
# sector map
# ------------------------------------------------------------------------------------------------


def read_sector_map(path: str | Path, level: str = "sector") -> pd.DataFrame:
    """``symbol`` -> group (column ``level``) from a CSV or parquet file; bad files fail naming them."""
    path = Path(path)
    if not path.is_file():
        raise GraphFileError(f"{path}: sector map file does not exist")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any reader error: name the file
        raise GraphFileError(f"{path}: cannot read the sector map ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("symbol", level) if c not in frame.columns]
    if missing:
        raise GraphFileError(f"{path}: sector map lacks column(s) {missing} (has {list(frame.columns)})")
    frame = frame[["symbol", level]].dropna()
    frame = frame.assign(symbol=frame["symbol"].astype(str), group=frame[level].astype(str))
    dupes = frame.loc[frame["symbol"].duplicated(), "symbol"]
    conflicting = sorted(s for s in set(dupes) if frame.loc[frame["symbol"] == s, "group"].nunique() > 1)
    if conflicting:
        raise GraphFileError(f"{path}: symbol(s) {conflicting[:10]} have more than one {level}")
    return frame.drop_duplicates("symbol")[["symbol", "group"]].reset_index(drop=True)


def sector_codes_for(symbols: list[str], sector_map: pd.DataFrame | None) -> tuple[np.ndarray, list[str]]:
    """Per symbol the index of its group in the sorted group names (-1: not in the map)."""
    if sector_map is None:
        return np.full(len(symbols), -1, np.int64), []
    groups = sorted(sector_map["group"].unique())
    code = dict(zip(sector_map["symbol"], np.searchsorted(groups, sector_map["group"]), strict=True))
    return np.array([code.get(s, -1) for s in symbols], dtype=np.int64), groups


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def edges_frame(versions: list[tuple[int, EdgeSet]], symbols: list[str]) -> pd.DataFrame:
    """The ``edges_static.parquet`` table of all versions, sorted by (as_of, target, source, kind)."""
    names = np.asarray(symbols, dtype=object)
    kinds = np.asarray(EDGE_KINDS, dtype=object)
    parts = []
    for as_of, e in versions:
        order = np.lexsort((e.kind, e.source, e.target))
        parts.append(pd.DataFrame({
            "source": names[e.source[order]], "target": names[e.target[order]],
            "weight": e.weight[order], "kind": kinds[e.kind[order]],
            "as_of": pd.to_datetime(np.full(order.size, as_of, dtype=np.int64), utc=True).as_unit("ns"),
            "corr": e.corr[order],
        }))
    if not parts:
        return pd.DataFrame({"source": pd.Series([], dtype=object), "target": pd.Series([], dtype=object),
                             "weight": pd.Series([], dtype=np.float32), "kind": pd.Series([], dtype=object),
                             "as_of": pd.Series([], dtype="datetime64[ns, UTC]"),
                             "corr": pd.Series([], dtype=np.float32)})
    return pd.concat(parts, ignore_index=True)


_EDGE_SCHEMA = pa.schema([("source", pa.string()), ("target", pa.string()), ("weight", pa.float32()),
                          ("kind", pa.string()), ("as_of", pa.timestamp("ns", tz="UTC")), ("corr", pa.float32())])


def write_edges(frame: pd.DataFrame, path: str | Path) -> str:
    """Write the edges table atomically with a fixed schema; returns the file's sha256."""
    table = pa.Table.from_pandas(frame[list(EDGE_COLUMNS)], schema=_EDGE_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata(None)  # the digest depends on the edges only
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return sha256_file(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def graph_hash(feature_contract_hash: str, params: dict[str, Any], edges_sha256: str) -> str:
    """sha256 over the feature contract hash, the graph params and the edge file's digest."""
    body = json.dumps({"feature_contract_hash": feature_contract_hash, "params": params,
                       "edges_sha256": edges_sha256}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def degree_stats(degrees: np.ndarray) -> dict[str, Any]:
    """min/mean/median/max of in-degrees and the histogram ``{degree: nodes}``."""
    d = np.asarray(degrees, dtype=np.int64)
    if d.size == 0:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0, "isolated": 0, "histogram": {}}
    values, counts = np.unique(d, return_counts=True)
    return {"min": int(d.min()), "mean": float(d.mean()), "median": float(np.median(d)), "max": int(d.max()),
            "isolated": int((d == 0).sum()),
            "histogram": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}}


def plot_degree_hist(degrees: np.ndarray, path: str | Path, title: str) -> Path:
    """The in-degree histogram as a PNG (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(degrees, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    top = int(d.max()) if d.size else 0
    ax.hist(d, bins=np.arange(-0.5, top + 1.5, 1.0), color="#1f77b4", edgecolor="white")
    ax.set_xlabel("in-degree (edges a node receives)")
    ax.set_ylabel("nodes")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def strongest_clusters(edges: EdgeSet, symbols: list[str], sector_codes: np.ndarray, sector_names: list[str],
                       limit: int = 10) -> list[dict[str, Any]]:
    """Communities of the correlation edges (networkx greedy modularity on the undirected, |corr|-weighted
    graph; connected components from scipy when networkx is absent), strongest first: by mean internal
    |corr| among groups of >= 3 symbols. Each: size, mean |corr|, members (the best connected first) and
    the dominant sector when a sector map is given."""
    corr_edges = edges.kind == 0
    src, tgt, w = edges.source[corr_edges], edges.target[corr_edges], edges.weight[corr_edges].astype(np.float64)
    if src.size == 0:
        return []
    nodes = np.unique(np.concatenate([src, tgt]))
    try:
        import networkx as nx

        g = nx.Graph()
        for a, b, x in zip(src.tolist(), tgt.tolist(), w.tolist(), strict=True):
            if g.has_edge(a, b):
                g[a][b]["weight"] = max(g[a][b]["weight"], x)
            else:
                g.add_edge(a, b, weight=x)
        groups = [np.array(sorted(c)) for c in nx.algorithms.community.greedy_modularity_communities(g, weight="weight")]
        method = "greedy modularity (networkx)"
    except ImportError:  # networkx comes with torch; the fallback keeps the stage working without it
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(symbols)
        _, labels = connected_components(coo_matrix((w, (src, tgt)), shape=(n, n)), directed=False)
        groups = [nodes[labels[nodes] == c] for c in np.unique(labels[nodes])]
        method = "connected components (scipy)"
    out = []
    member_of = np.full(len(symbols), -1, np.int64)
    for gi, members in enumerate(groups):
        member_of[members] = gi
    inside = member_of[src] == member_of[tgt]
    for gi, members in enumerate(groups):
        if members.size < 3:
            continue
        sel = inside & (member_of[tgt] == gi)
        deg = np.bincount(np.concatenate([src[sel], tgt[sel]]), minlength=len(symbols))[members]
        best = members[np.argsort(-deg, kind="stable")]
        row: dict[str, Any] = {"size": int(members.size), "mean_abs_corr": float(w[sel].mean()) if sel.any() else 0.0,
                               "internal_edges": int(sel.sum()),
                               "members": ", ".join(symbols[i] for i in best[:8]) + (" ..." if best.size > 8 else ""),
                               "method": method}
        codes = sector_codes[members]
        if (codes >= 0).any():
            vals, counts = np.unique(codes[codes >= 0], return_counts=True)
            top = int(np.argmax(counts))
            row["top_sector"] = sector_names[int(vals[top])]
            row["top_sector_share"] = float(counts[top] / members.size)
        out.append(row)
    out.sort(key=lambda r: (-r["mean_abs_corr"], -r["size"]))
    return out[:limit]


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


def _read_inputs(paths: ArtifactPaths, cfg: GraphConfig) -> pd.DataFrame:
    """symbol, timestamp, the return source column and split of every dataset row."""
    source = "close" if cfg.returns == "log_close" else cfg.returns
    dataset = paths.labels
    for needed in (paths.features, paths.labels):
        if not needed.is_file():
            raise StageInputError(f"{needed}: the labelled dataset is missing; materialise 'labelled_dataset' first")
    table = LabelledDataset(paths.features, paths.labels)
    if source not in table.names:
        raise ValueError(f"{paths.features}: has no column {source!r} for the graph's returns (GraphConfig.returns)")
    frame = table.frame(["symbol", "timestamp", source])
    assignment = tables.read_frame(paths.split_assignment, ["split"])
    if len(assignment) != len(frame):
        raise ValueError(f"{paths.split_assignment}: {len(assignment)} rows, the dataset {dataset} has {len(frame)}")
    frame["split"] = assignment["split"].to_numpy()
    return frame.rename(columns={source: "value"})


def _split_rows(paths: ArtifactPaths, sym: np.ndarray, trank: np.ndarray, split: np.ndarray, symbols: list[str],
                times: np.ndarray, contract_hash: str) -> tuple[np.ndarray, np.ndarray]:
    """Per dataset row, its row in its split's HDF5/Arrow arrays (-1 when the split does not hold it) and
    whether that row is one of the split's sample ends (an eligible node)."""
    from sentinel_pipeline.data.hdf5_splits import map_split

    out = np.full(sym.size, -1, np.int64)
    eligible = np.zeros(sym.size, bool)
    n_t = np.int64(times.size)
    for s in SPLITS:
        arrays = map_split(paths.h5(s), contract_hash)
        if list(arrays.symbols) != symbols:
            raise ValueError(f"{paths.h5(s)}: its symbols differ from the labelled dataset's; rebuild hdf5_splits")
        t = np.searchsorted(times, arrays.timestamp)
        key = arrays.symbol_idx.astype(np.int64) * n_t + t  # rows are sorted by (symbol, time): increasing
        mine = np.flatnonzero(split == s)
        want = sym[mine] * n_t + trank[mine]
        pos = np.searchsorted(key, want)
        hit = (pos < key.size) & (key[np.minimum(pos, key.size - 1)] == want)
        out[mine[hit]] = pos[hit]
        eligible[mine[hit]] = np.isin(pos[hit], arrays.sample_end_rows)
    return out, eligible


def write_graph_files(
    out_dir: str | Path, versions: list[tuple[int, EdgeSet]], symbols: list[str], params: dict[str, Any],
    feature_contract_hash: str, *, sector_names: list[str] | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``edges_static.parquet`` and ``graph.json`` (atomically) for ``versions``; returns graph.json."""
    out_dir = Path(out_dir)
    edges = edges_frame(versions, symbols)
    edges_sha = write_edges(edges, out_dir / EDGES_FILE)
    last = versions[-1][1] if versions else None
    last_deg = (np.bincount(_merged_pairs(last, len(symbols))[1], minlength=len(symbols)) if last is not None
                else np.zeros(len(symbols), np.int64))
    info = {
        "format": FORMAT,
        "feature_contract_hash": feature_contract_hash,
        "params": params,
        **(extra or {}),
        "sector_names": list(sector_names or []),
        "symbols": list(symbols),
        "n_nodes": len(symbols),
        "n_edges": int(len(edges)),
        "n_versions": len(versions),
        "versions": [{"as_of": _iso(a), "edges": e.n, "correlation_edges": int((e.kind == 0).sum()),
                      "sector_edges": int((e.kind == 1).sum())} for a, e in versions],
        "degree": degree_stats(last_deg),
        "edges_sha256": edges_sha,
        "graph_hash": graph_hash(feature_contract_hash, params, edges_sha),
    }
    write_json_atomic(out_dir / GRAPH_FILE, info)
    return info


def build_symbol_graph(paths: ArtifactPaths, cfg: GraphConfig, out_dir: str | Path) -> dict[str, Any]:
    """Build the graph's files into ``out_dir`` from the data half's artefacts; returns the summary."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    contract = read_contract(paths.feature_contract)
    frame = _read_inputs(paths, cfg)
    sym, symbols = pd.factorize(frame["symbol"].astype(str), sort=True)
    symbols = [str(s) for s in symbols]
    ts = pd.DatetimeIndex(frame["timestamp"]).tz_convert("UTC").as_unit("ns").asi8
    times, trank = np.unique(ts, return_inverse=True)
    split = frame["split"].astype(str).to_numpy()
    train = split == "train"
    if not train.any():
        raise ValueError(f"{paths.split_assignment}: no train rows; the static graph is built from the train window")
    train_window = (int(ts[train].min()), int(ts[train].max()))
    returns = return_panel(sym, trank, frame["value"].to_numpy(), len(symbols), times.size,
                           log_close=cfg.returns == "log_close")
    sector_sha = None
    sector_map = None
    if cfg.sector_file:
        sector_map = read_sector_map(cfg.sector_file, cfg.sector_level)
        sector_sha = file_digest(cfg.sector_file)
    codes, groups = sector_codes_for(symbols, sector_map)
    versions = build_versions(returns, times, cfg, train_window=train_window,
                              sector_codes=codes if sector_map is not None else None)

    params = cfg.params(sector_sha)
    info = write_graph_files(out_dir, versions, symbols, params, contract.hash, sector_names=groups,
                             extra={"sector_file": cfg.sector_file,
                                    "train_window": [_iso(train_window[0]), _iso(train_window[1])]})
    ghash, edges_sha = info["graph_hash"], info["edges_sha256"]

    # per row: the version in force and the node's in-degree in it
    as_of = np.array([a for a, _ in versions], dtype=np.int64)
    if cfg.point_in_time:
        version = np.searchsorted(as_of, ts, side="left") - 1
    else:
        version = np.zeros(ts.size, np.int64)
    deg = np.zeros((max(len(versions), 1), len(symbols)), np.int32)
    for v, (_, e) in enumerate(versions):
        deg[v] = np.bincount(_merged_pairs(e, len(symbols))[1], minlength=len(symbols))
    degree = np.where(version >= 0, deg[np.maximum(version, 0), sym], 0).astype(np.int32)
    split_row, eligible = _split_rows(paths, sym, trank, split, symbols, times, contract.hash)
    nodes = pd.DataFrame({
        "timestamp": pd.DatetimeIndex(frame["timestamp"]).tz_convert("UTC").as_unit("ns"),
        "symbol": frame["symbol"].astype(str).to_numpy(),
        "symbol_idx": sym.astype(np.int32),
        "row": np.arange(len(frame), dtype=np.int64),
        "split": split,
        "split_row": split_row,
        "eligible": eligible,
        "version": version.astype(np.int32),
        "degree": degree,
        "sector": codes[sym].astype(np.int32),
    })
    raw_bars.write_parquet(nodes, out_dir / NODES_FILE)

    last = versions[-1][1] if versions else EdgeSet(*(np.zeros(0, t) for t in (np.int64, np.int64, np.float32, np.int8, np.float32)))
    last_deg = deg[len(versions) - 1] if versions else np.zeros(len(symbols), np.int32)
    title = (f"static graph (train window), {len(symbols)} nodes" if not cfg.point_in_time
             else f"latest point-in-time version ({len(versions)} versions), {len(symbols)} nodes")
    plot_degree_hist(last_deg, out_dir / PLOT_FILE, title)
    clusters = strongest_clusters(last, symbols, codes, groups)
    return {
        "graph_hash": ghash,
        "edges_sha256": edges_sha,
        "feature_contract_hash": contract.hash,
        "nodes": len(symbols),
        "edges": info["n_edges"],
        "edges_latest": last.n,
        "correlation_edges_latest": int((last.kind == 0).sum()),
        "sector_edges_latest": int((last.kind == 1).sum()),
        "versions": len(versions),
        "point_in_time": cfg.point_in_time,
        "train_window": info["train_window"],
        "degree": info["degree"],
        "clusters": clusters,
        "params": params,
        "node_rows": int(len(nodes)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _iso(ns: int) -> str:
    return pd.Timestamp(int(ns), unit="ns", tz="UTC").isoformat()


def graph_fingerprint(paths: ArtifactPaths, cfg: GraphConfig) -> str:
    """The graph stage's input fingerprint: its config (with the sector file's sha256), the contract's
    digest and the content digests of the upstream files it reads (``stage_cache.upstream_state``, which
    refuses an upstream changed after its build or whose last run failed, as does a failed stage further up)."""
    from sentinel_pipeline.data_half import check_ancestors

    check_ancestors("hdf5_splits", paths)
    if not paths.feature_contract.is_file():
        raise StageInputError(f"{paths.feature_contract}: the feature contract is missing; build feature_contract first")
    sector = None
    if cfg.sector_file:
        if not Path(cfg.sector_file).is_file():
            raise GraphFileError(f"{cfg.sector_file}: sector map file does not exist")
        sector = file_digest(cfg.sector_file)
    return fingerprint(
        stage="symbol_graph",
        params=cfg.params(sector),
        contract=file_digest(paths.feature_contract),
        features=upstream_state(paths.features_dir, "features", [paths.features.name]),
        labels=upstream_state(paths.labels_dir, "labelled_dataset", [paths.labels.name]),
        splits=upstream_state(paths.splits_dir, "dataset_splits", [paths.split_assignment.name]),
        hdf5=upstream_state(paths.hdf5_dir, "hdf5_splits", [paths.h5(s).name for s in SPLITS]),
    )


def run_symbol_graph(paths: ArtifactPaths, cfg: GraphConfig | None = None) -> dict[str, Any]:
    """Build (or reuse) the symbol graph stage; returns its JSON-able summary with ``reused`` and
    ``fingerprint``.

    Reused when the stage record's fingerprint equals :func:`graph_fingerprint` and its files are
    intact; otherwise built under the stage lock into a temporary folder and committed all or nothing
    (``stage_cache.build_stage``: a failed build leaves the previous graph as it was).
    """
    from sentinel_pipeline.locking import exclusive_lock

    cfg = cfg or GraphConfig()
    stage_dir = graph_dir(paths)
    fp = graph_fingerprint(paths, cfg)
    record = fresh_record(stage_dir, fp)
    reused = record is not None and last_failure(stage_dir) is None
    if not reused:
        stage_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(stage_dir):
            record = fresh_record(stage_dir, fp)
            if record is None:
                record = build_stage(stage_dir, fp, lambda out: build_symbol_graph(paths, cfg, out))
            else:
                clear_failure(stage_dir)
    assert record is not None
    return {**record["metadata"], "reused": reused, "fingerprint": fp, "path": str(stage_dir)}


def read_graph_record(paths: ArtifactPaths) -> dict[str, Any] | None:
    """The graph stage's record (None when it was never built)."""
    return read_record(graph_dir(paths))


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def _merged_pairs(e: EdgeSet, n_symbols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One edge per (source, target) (a pair that is both a correlation and a sector edge keeps the
    larger weight), sorted by (target, source)."""
    if e.n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    key = e.target * np.int64(n_symbols) + e.source
    order = np.lexsort((-e.weight, key))
    key, w = key[order], e.weight[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, w = key[first], w[first]
    return key % n_symbols, key // n_symbols, w


class SymbolGraph:
    """A loaded, checked symbol graph (see :meth:`load`) that gives each day's edges."""

    def __init__(self, info: dict[str, Any], edges: pd.DataFrame, path: Path) -> None:
        self.info = info
        self.path = path
        self.symbols: list[str] = list(info["symbols"])
        self.graph_hash: str = info["graph_hash"]
        self.feature_contract_hash: str = info["feature_contract_hash"]
        self.params: dict[str, Any] = info["params"]
        self.point_in_time = bool(self.params.get("point_in_time"))
        index = {s: i for i, s in enumerate(self.symbols)}
        src = _symbol_index(edges["source"], index, path)
        tgt = _symbol_index(edges["target"], index, path)
        as_of = pd.DatetimeIndex(edges["as_of"]).as_unit("ns").asi8
        self.as_of, inverse = np.unique(as_of, return_inverse=True)
        kind = pd.Categorical(edges["kind"], categories=list(EDGE_KINDS)).codes.astype(np.int8)
        weight = edges["weight"].to_numpy(dtype=np.float32)
        bad = []
        if (kind < 0).any():
            bad.append(f"unknown kind(s) {sorted(set(edges['kind'][kind < 0]))}")
        if not (np.isfinite(weight) & (weight > 0)).all():
            bad.append("non-positive or non-finite weights")
        if (src == tgt).any():
            bad.append(f"{int((src == tgt).sum())} self loops")
        if bad:
            raise GraphFileError(f"{path / EDGES_FILE}: " + "; ".join(bad))
        if not self.point_in_time and self.as_of.size > 1:
            raise GraphFileError(f"{path / EDGES_FILE}: a static graph with {self.as_of.size} as_of dates")
        # per version, merged edges in the graph's symbol index space
        self._versions: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(self.as_of.size + 1))
        corr = edges["corr"].to_numpy(dtype=np.float32)
        for v in range(self.as_of.size):
            sel = order[bounds[v]: bounds[v + 1]]
            e = EdgeSet(src[sel], tgt[sel], weight[sel], kind[sel], corr[sel])
            self._versions.append(_merged_pairs(e, len(self.symbols)))
        self._mapped: dict[tuple[str, ...], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._last: tuple[Any, Any] = (None, None)

    @classmethod
    def load(cls, directory: str | Path, expected_contract_hash: str | None = None) -> SymbolGraph:
        """Read ``graph.json`` and ``edges_static.parquet`` from ``directory``; the edges file must have the
        sha256 that ``graph.json`` records, and ``graph_hash`` must be the one its contents give
        (:class:`GraphFileError` naming the file otherwise); ``expected_contract_hash``, when given, must
        be the graph's feature contract hash (``ContractError``)."""
        directory = Path(directory)
        info_path, edges_path = directory / GRAPH_FILE, directory / EDGES_FILE
        for p in (info_path, edges_path):
            if not p.is_file():
                raise GraphFileError(f"{p}: missing; materialise the symbol_graph asset")
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GraphFileError(f"{info_path}: not readable JSON: {exc}") from exc
        missing = [k for k in ("format", "symbols", "params", "edges_sha256", "graph_hash", "feature_contract_hash")
                   if k not in info]
        if missing or info.get("format") != FORMAT:
            raise GraphFileError(f"{info_path}: not a symbol graph of format {FORMAT} (missing {missing})")
        actual = sha256_file(edges_path)
        if actual != info["edges_sha256"]:
            raise GraphFileError(
                f"{edges_path}: sha256 {actual[:16]}... differs from the {info['edges_sha256'][:16]}... recorded in "
                f"{info_path}: the edges file was changed after the graph was built; rebuild symbol_graph"
            )
        expected = graph_hash(info["feature_contract_hash"], info["params"], info["edges_sha256"])
        if expected != info["graph_hash"]:
            raise GraphFileError(f"{info_path}: graph_hash does not match its params and edge digest (edited?)")
        if expected_contract_hash is not None and expected_contract_hash != info["feature_contract_hash"]:
            raise ContractError(f"{info_path}: graph built for feature contract {info['feature_contract_hash']}, "
                                f"expected {expected_contract_hash}")
        try:
            edges = pq.read_table(edges_path).to_pandas()
        except Exception as exc:  # noqa: BLE001 - the digest matched, so this is a writer bug; name the file
            raise GraphFileError(f"{edges_path}: unreadable parquet: {exc}") from exc
        missing_cols = [c for c in EDGE_COLUMNS if c not in edges.columns]
        if missing_cols:
            raise GraphFileError(f"{edges_path}: lacks column(s) {missing_cols}")
        return cls(info, edges, directory)

    @property
    def n_versions(self) -> int:
        return int(self.as_of.size)

    def version_for(self, timestamp_ns: int) -> int:
        """Index of the version in force on a day: static -> 0; point in time -> the newest with
        ``as_of`` strictly before the day (-1: none yet)."""
        if not self.point_in_time:
            return 0 if self.as_of.size else -1
        return int(np.searchsorted(self.as_of, np.int64(timestamp_ns), side="left")) - 1

    def _in_split_space(self, symbols: list[str] | tuple[str, ...]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if symbols is self._last[0]:  # the same list object as the last call (a batcher's split): no hashing
            return self._last[1]
        key = tuple(symbols)
        hit = self._mapped.get(key)
        if hit is None:
            index = {s: i for i, s in enumerate(key)}
            to_split = np.array([index.get(s, -1) for s in self.symbols] + [-1], dtype=np.int64)
            hit = []
            for src, tgt, w in self._versions:
                s_idx, t_idx = to_split[src], to_split[tgt]
                keep = (s_idx >= 0) & (t_idx >= 0)
                hit.append((s_idx[keep], t_idx[keep], w[keep]))
            self._mapped[key] = hit
        self._last = (symbols, hit)
        return hit

    def edges_for_day(
        self, timestamp_ns: int, symbol_idx_of_nodes: np.ndarray, symbols: list[str] | tuple[str, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The edges among one day's nodes: ``(edge_index (2, E) int64 local node ids [source; target],
        edge_weight (E,) float32)``. Node ``i`` of the day is symbol ``symbols[symbol_idx_of_nodes[i]]``
        (``symbols``: the split's list; graph symbols it lacks are dropped). Vectorised: one lookup array
        from symbol index to local id."""
        nodes = np.asarray(symbol_idx_of_nodes, dtype=np.int64)
        v = self.version_for(timestamp_ns)
        if v < 0 or nodes.size == 0:
            return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
        src, tgt, w = self._in_split_space(symbols)[v]
        lookup = np.full(len(symbols), -1, np.int64)
        lookup[nodes] = np.arange(nodes.size)
        s_loc, t_loc = lookup[src], lookup[tgt]
        keep = (s_loc >= 0) & (t_loc >= 0)
        return np.stack([s_loc[keep], t_loc[keep]]), w[keep]


def _symbol_index(values: pd.Series, index: dict[str, int], path: Path) -> np.ndarray:
    codes, uniques = pd.factorize(values.astype(str))
    lookup = np.array([index.get(u, -1) for u in uniques] + [-1], dtype=np.int64)
    out = lookup[codes]
    if (out < 0).any():
        unknown = sorted({u for u in uniques if u not in index})[:5]
        raise GraphFileError(f"{path / EDGES_FILE}: edge symbols {unknown} are not in {path / GRAPH_FILE}'s symbols")
    return out
