"""The ``symbol_graph`` asset: a thin wrapper around ``data.symbol_graph.run_symbol_graph``.

It reads the labelled dataset, the split assignment and the HDF5 splits of the data half (paths from
``PipelineSettings``), reuses the graph when its input fingerprint and files are unchanged, else builds
it all or nothing under the stage lock, and shows nodes, edges, the degree distribution (inline chart and
full plot), the strongest clusters and the ``graph_hash`` that graph models record. Graph parameters are
the asset's run config (:class:`SymbolGraphConfig`, defaults = ``GraphConfig``'s).
"""


import dataclasses
from typing import Any

import dagster as dg

from sentinel_pipeline.data.symbol_graph import (
    PLOT_FILE,
    GraphConfig,
    GraphFileError,
    graph_dir,
    run_symbol_graph,
)
from sentinel_pipeline.data_half import synthetic_panel_sector_file
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings
from sentinel_pipeline.orchestration.metadata import file_size_mb, image, md_kv_table, md_table, sparkline
from sentinel_pipeline.orchestration.settings import WRITE_POOL, PipelineSettings
from sentinel_pipeline.stage_cache import StageInputError


class SymbolGraphConfig(dg.Config):
    """The symbol graph's parameters (see ``data.symbol_graph.GraphConfig``)."""

    top_k: int = GraphConfig.top_k
    min_abs_corr: float = GraphConfig.min_abs_corr
    min_overlap: int = GraphConfig.min_overlap
    absolute: bool = GraphConfig.absolute
    symmetric: bool = GraphConfig.symmetric
    returns: str = GraphConfig.returns
    point_in_time: bool = GraphConfig.point_in_time
    window: int = GraphConfig.window
    step: int = GraphConfig.step
    sector_file: str | None = GraphConfig.sector_file
    sector_level: str = GraphConfig.sector_level
    sector_weight: float = GraphConfig.sector_weight
    max_sector_edges: int = GraphConfig.max_sector_edges
    # without a sector_file: on the synthetic panel, join its own sector map as sector edges
    synthetic_panel_sectors: bool = True

    def to_config(self) -> GraphConfig:
        return GraphConfig(**self.model_dump(exclude={"synthetic_panel_sectors"}))


def graph_metadata(s: dict[str, Any], plot: Any = None) -> dict[str, Any]:
    """UI metadata of a graph summary (``run_symbol_graph``'s)."""
    deg = s["degree"]
    hist = {int(k): int(v) for k, v in deg.get("histogram", {}).items()}
    counts = [hist.get(d, 0) for d in range(max(hist, default=0) + 1)]
    clusters = s.get("clusters", [])
    columns = ["size", "mean_abs_corr", "internal_edges", "members"]
    if any("top_sector" in c for c in clusters):
        columns += ["top_sector", "top_sector_share"]
    md: dict[str, Any] = {
        "graph_hash": s["graph_hash"],
        "feature_contract_hash": s["feature_contract_hash"],
        "nodes": int(s["nodes"]),
        "edges": int(s["edges"]),
        "edges_latest_version": int(s["edges_latest"]),
        "correlation_edges": int(s["correlation_edges_latest"]),
        "sector_edges": int(s["sector_edges_latest"]),
        "versions": int(s["versions"]),
        "point_in_time": bool(s["point_in_time"]),
        "train_window": " .. ".join(s.get("train_window", [])),
        "degree_distribution": sparkline({"nodes per in-degree 0..max": counts}, "in-degree histogram"),
        "degree_stats": md_kv_table({k: v for k, v in deg.items() if k != "histogram"}, "in-degree", "value"),
        "strongest_clusters": md_table(clusters, columns),
        "params": md_kv_table(s.get("params", {}), "param", "value"),
        "seconds": s.get("seconds", 0.0),
    }
    if plot is not None:
        md["degree_histogram"] = plot
    return md


@dg.asset(group_name="graph", deps=["dataset_splits", "hdf5_splits"], kinds={"parquet", "numpy"}, pool=WRITE_POOL)
def symbol_graph(context: dg.AssetExecutionContext, config: SymbolGraphConfig, settings: PipelineSettings,
                 data_settings: DataHalfSettings):
    """Which symbols exchange information per day: top-k return-correlation edges from the train window
    (or point-in-time versions), optional sector edges; node_features.parquet, edges_static.parquet, graph.json.
    Sector map: ``sector_file`` when given; else, on the synthetic panel, the panel's own sector map."""
    paths = settings.paths()
    try:
        graph_config = config.to_config()  # GraphConfig checks its values (ValueError)
        if graph_config.sector_file is None and config.synthetic_panel_sectors:
            sectors = synthetic_panel_sector_file(paths, data_settings.to_config())
            if sectors is not None and sectors.is_file():
                graph_config = dataclasses.replace(graph_config, sector_file=str(sectors))
        summary = run_symbol_graph(paths, graph_config)
    except (StageInputError, GraphFileError, ValueError) as exc:
        raise dg.Failure(description=f"symbol_graph: {exc}") from exc
    folder = graph_dir(paths)
    if summary["reused"]:
        context.log.info(f"inputs unchanged (fingerprint {summary['fingerprint'][:12]}): reusing {folder}")
    plot = folder / PLOT_FILE
    metadata = graph_metadata(summary, image(plot, "in-degree distribution") if plot.is_file() else None)
    metadata.update({
        "reused": bool(summary["reused"]),
        "input_fingerprint": summary["fingerprint"][:16],
        "path": dg.MetadataValue.path(str(folder)),
        "size_mb": file_size_mb(*(p for p in folder.glob("*.parquet"))),
    })
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(summary["graph_hash"][:16]))


GRAPH_ASSETS = [symbol_graph]
