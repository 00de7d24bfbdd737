"""The panel configuration through Dagster (``bash scripts/run_pipeline.sh --panel`` runs this job): on a
small synthetic panel with a strong planted cross-sectional signal, the data half (panel preset), the symbol
graph, ``gat_multi_horizon`` trained on day batches, its blocking ``bundle_verified`` check (5-day head
against the 5-day forward return) and the ranking evaluation all run, in the panel's own directories, and
show their figures and plots in the UI metadata. The intraday jobs leave the panel's assets out."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from sentinel_pipeline.bundles import list_bundles, load_bundle, records_dir
from sentinel_pipeline.definitions import defs
from sentinel_pipeline.orchestration import jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dg.ExecuteInProcessResult]:
    root = tmp_path_factory.mktemp("panel")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    config = jobs.panel_run_config()
    config["resources"]["settings"]["config"]["raw_dir"] = None
    config["resources"]["data_settings"]["config"].update(
        {"panel_seed": 3, "panel_n_symbols": 60, "panel_n_days": 520, "signal_strength": 0.4})
    config["ops"] = {
        "bundle_gat_multi_horizon": {"config": {"epochs": 3, "patience": 2, "log_every": 100_000}},
        "backtest_gat_multi_horizon": {"config": {"n_random": 100}},
    }
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = defs.resolve_job_def("panel_pipeline").execute_in_process(
            run_config=config, instance=instance, raise_on_error=False)
    finally:
        instance.dispose()
        mp.undo()
    return root, result


def test_panel_job_trains_verifies_and_ranks_the_graph_family(panel) -> None:
    root, result = panel
    assert result.success, [e.step_failure_data.error.to_string()[:600] for e in result.get_step_failure_events()]
    checks = {f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in result.get_asset_check_evaluations()}
    assert checks["bundle_gat_multi_horizon:bundle_verified"].passed
    mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in result.get_asset_materialization_events()}
    assert {"symbol_graph", "bundle_gat_multi_horizon", "backtest_gat_multi_horizon"} <= set(mats)
    assert not any(k.startswith(("bundle_mlp", "replay_")) for k in mats)  # the panel job only
    graph = mats["symbol_graph"]
    assert graph["nodes"].value == 60 and graph["sector_edges"].value > 0  # the synthetic panel's sector map
    bundles = list_bundles(root / jobs.PANEL_MODELS_DIR)
    assert len(bundles) == 1 and bundles[0].name.startswith("gat_multi_horizon")
    loaded = load_bundle(bundles[0])
    assert loaded.batch_kind == "days" and {"graph.json", "edges_static.parquet"} <= {p.name for p in bundles[0].iterdir()}
    verification = json.loads((records_dir(bundles[0]) / "verification.json").read_text())
    gate = {g["name"]: g for g in verification["gate_results"]}["directional_skill"]
    assert gate["extra"]["target"] == "fwd_ret_5" and gate["value"] >= 3.0 and gate["n_windows"] >= 10
    ranking = mats["backtest_gat_multi_horizon"]
    assert ranking["test_rank_ic_5d"].value > 0
    for plot in ("ic_decay", "long_short_equity"):
        assert "data:image/png;base64," in ranking[plot].value
    report = json.loads((root / jobs.PANEL_DATA_DIR / "artifacts" / "backtest" / "gat_multi_horizon"
                         / "ranking_report.json").read_text())
    assert set(report["splits"]["test"]["horizons"]) == {"1", "5", "10", "20"}
    assert report["backtest"]["permuted_rankings"]["n"] == 100


def test_intraday_jobs_leave_the_panel_assets_out() -> None:
    for name in ("full_pipeline", "ci_gate", "quick_pipeline"):
        keys = {k.to_user_string() for k in defs.resolve_job_def(name).asset_layer.executable_asset_keys}
        assert not keys & {"symbol_graph", "bundle_gat_multi_horizon", "backtest_gat_multi_horizon"}, name
    panel_keys = {k.to_user_string() for k in defs.resolve_job_def("panel_pipeline").asset_layer.executable_asset_keys}
    assert {"raw_bars", "symbol_graph", "bundle_gat_multi_horizon", "backtest_gat_multi_horizon"} <= panel_keys
    assert not any(k.startswith(("replay_", "bundle_mlp")) for k in panel_keys)
