"""The symbol graph stage on a real (small) data half: its files, their references into the splits, reuse,
point-in-time versions, day batches over the HDF5 train split with the graph's edges, and the Dagster asset."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline import data_half
from sentinel_pipeline.data import hdf5_splits
from sentinel_pipeline.data.symbol_graph import (
    EDGES_FILE,
    NODES_FILE,
    PLOT_FILE,
    GraphConfig,
    SymbolGraph,
    graph_dir,
    run_symbol_graph,
)
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings
from sentinel_pipeline.orchestration.graph_assets import GRAPH_ASSETS, symbol_graph
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.training.batchers.day_batches import DayBatcher

GRAPH = GraphConfig(top_k=4, min_abs_corr=0.1, min_overlap=30)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> ArtifactPaths:
    """The data half on a small synthetic market (20 symbols x 30 days x 7 hourly bars)."""
    root = tmp_path_factory.mktemp("graph")
    paths = ArtifactPaths(data_dir=root / "data", models_dir=root / "models")
    cfg = data_half.DataHalfConfig(synthetic=SyntheticMarketConfig(seed=5, n_symbols=20, n_days=30))
    data_half.run_data_half(paths, cfg, log=lambda _: None)
    return paths


def test_stage_files_reference_the_splits_and_are_reused(built):
    paths = built
    first = run_symbol_graph(paths, GRAPH)
    folder = graph_dir(paths)
    assert not first["reused"] and {EDGES_FILE, NODES_FILE, "graph.json", PLOT_FILE} <= {p.name for p in folder.iterdir()}
    assert first["nodes"] == 20 and 0 < first["edges"] <= 20 * 4
    again = run_symbol_graph(paths, GRAPH)
    assert again["reused"] and again["graph_hash"] == first["graph_hash"]

    edges = pd.read_parquet(folder / EDGES_FILE)
    assert list(edges.columns) == ["source", "target", "weight", "kind", "as_of", "corr"]
    assert str(edges["as_of"].dtype) == "datetime64[ns, UTC]" and edges["weight"].dtype == np.float32
    nodes = pd.read_parquet(folder / NODES_FILE)
    train_end = nodes.loc[nodes["split"] == "train", "timestamp"].max()
    assert (edges["as_of"] == train_end).all()  # the static graph: returns up to the train window's end only
    assert train_end < nodes.loc[nodes["split"] == "val", "timestamp"].min()
    # every node row points at its own row of its split's arrays
    for s in SPLITS:
        arrays = hdf5_splits.read_split(paths.h5(s))
        mine = nodes[nodes["split"] == s]
        assert (mine["split_row"] >= 0).all()
        np.testing.assert_array_equal(arrays.symbol_idx[mine["split_row"]], mine["symbol_idx"])
        np.testing.assert_array_equal(arrays.timestamp[mine["split_row"]],
                                      pd.DatetimeIndex(mine["timestamp"]).as_unit("ns").asi8)
        np.testing.assert_array_equal(np.sort(mine.loc[mine["eligible"], "split_row"]), arrays.sample_end_rows)
    in_deg = edges.groupby("target").size()
    deg = nodes.groupby("symbol")["degree"].first()
    assert (deg.reindex(in_deg.index) == in_deg).all()

    changed = run_symbol_graph(paths, GraphConfig(top_k=2, min_abs_corr=0.1, min_overlap=30))
    assert not changed["reused"] and changed["graph_hash"] != first["graph_hash"]
    assert changed["edges"] <= 20 * 2


def test_point_in_time_versions_on_the_stage(built):
    paths = built
    s = run_symbol_graph(paths, GraphConfig(top_k=3, min_abs_corr=0.0, min_overlap=30, point_in_time=True,
                                            window=70, step=40))
    assert s["point_in_time"] and s["versions"] > 2
    nodes = pd.read_parquet(graph_dir(paths) / NODES_FILE)
    g = SymbolGraph.load(graph_dir(paths))
    v = nodes["version"].to_numpy()
    ts = pd.DatetimeIndex(nodes["timestamp"]).as_unit("ns").asi8
    used = v >= 0
    assert used.any() and (~used).any()
    assert (g.as_of[v[used]] < ts[used]).all()  # a day uses a version built strictly before it
    nxt = np.minimum(v[used] + 1, g.n_versions - 1)
    assert ((g.as_of[nxt] >= ts[used]) | (v[used] == g.n_versions - 1)).all()  # ... the newest such one


def test_day_batches_over_the_train_split_with_the_graph(built):
    paths = built
    run_symbol_graph(paths, GRAPH)
    split = hdf5_splits.read_split(paths.h5("train"))
    graph = SymbolGraph.load(graph_dir(paths), expected_contract_hash=split.feature_contract_hash)
    b = DayBatcher(split, seq_len=split.seq_len, days_per_batch=2, shuffle=True, seed=1, graph=graph)
    seen, n_edges = 0, 0
    for batch in b:
        ei, day = batch["edge_index"].numpy(), batch["day"].numpy()
        assert (day[ei[0]] == day[ei[1]]).all() and (ei[0] != ei[1]).all()
        n_edges += ei.shape[1]
        seen += batch["end_rows"].numel()
    assert seen == b.n_samples and n_edges > 0


def test_symbol_graph_asset_materialises_with_ui_metadata(built):
    paths = built
    resources = {"settings": PipelineSettings(data_dir=str(paths.data_dir), models_dir=str(paths.models_dir),
                                              raw_dir=None),
                 "data_settings": DataHalfSettings()}
    config = {"ops": {"symbol_graph": {"config": {"top_k": 3, "min_abs_corr": 0.1, "min_overlap": 30}}}}
    assert GRAPH_ASSETS == [symbol_graph]
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(GRAPH_ASSETS, resources=resources, run_config=config, instance=instance)
        assert result.success
        (event,) = result.get_asset_materialization_events()
        md = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
        expected = run_symbol_graph(paths, GraphConfig(top_k=3, min_abs_corr=0.1, min_overlap=30))
        assert expected["reused"]  # the asset built exactly this graph
        assert md["graph_hash"] == expected["graph_hash"] and md["nodes"] == 20 and md["edges"] == expected["edges"]
        assert "data:image/png;base64," in md["degree_distribution"] and "data:image/png;base64," in md["degree_histogram"]
        assert "| size | mean_abs_corr |" in md["strongest_clusters"]
        again = dg.materialize(GRAPH_ASSETS, resources=resources, run_config=config, instance=instance)
        (event,) = again.get_asset_materialization_events()
        assert event.materialization.metadata["reused"].value is True
        bad = {"ops": {"symbol_graph": {"config": {"sector_file": str(paths.data_dir / "no_such.csv")}}}}
        failed = dg.materialize(GRAPH_ASSETS, resources=resources, run_config=bad, instance=instance,
                                raise_on_error=False)
        assert not failed.success
        (fail,) = failed.get_step_failure_events()
        assert "no_such.csv: sector map file does not exist" in fail.step_failure_data.error.to_string()
