"""The daily panel preset of the data half: raw input from one file or the synthetic panel, the daily
contract end to end, the CLI and the Dagster settings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.dataset import read_dataset
from sentinel_pipeline.data.features import build_contract, daily_feature_config
from sentinel_pipeline.data.labels import daily_label_config, label_window_bars
from sentinel_pipeline.data.raw_bars import RawDataError
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline.data.synthetic_panel import (
    SyntheticPanelConfig,
    describe_panel,
    generate_synthetic_panel,
)
from sentinel_pipeline.data_half import (
    PRESETS,
    DataHalfConfig,
    main,
    minimum_history,
    panel_config,
    run_data_half,
    synthetic_panel_dir,
    synthetic_panel_sector_file,
)
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import read_record

SMALL_PANEL = SyntheticPanelConfig(seed=2, n_symbols=40, n_days=260)
CFG = panel_config(synthetic_panel=SMALL_PANEL)
STAGES = ("raw_bars", "features", "labels", "splits", "scalers", "hdf5_splits", "arrow_cache")


def _stage_sources(paths: ArtifactPaths) -> set[str]:
    return {read_record(paths.stage_dir(s))["metadata"]["data_source"] for s in STAGES}


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory) -> Path:
    """A folder like ../shared/data: the panel file beside other bar files that must not be ingested."""
    folder = tmp_path_factory.mktemp("shared")
    generate_synthetic_panel(replace(SMALL_PANEL, seed=9)).to_parquet(folder / "daily_panel.parquet", index=False)
    generate_synthetic_market(SyntheticMarketConfig(n_symbols=20, n_days=30)).to_parquet(folder / "hourly.parquet")
    (folder / "notes.txt").write_text("not bars")
    return folder


@pytest.fixture(scope="module")
def file_run(shared_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("panel_file")
    paths = ArtifactPaths(data_dir=root, raw_dir_override=shared_folder / "daily_panel.parquet")
    return paths, run_data_half(paths, CFG, log=lambda _m: None)


def test_panel_preset_is_the_daily_configuration() -> None:
    assert PRESETS["panel"] is panel_config and PRESETS["default"] is DataHalfConfig
    cfg = panel_config()
    assert cfg.features == daily_feature_config() and cfg.labels == daily_label_config()
    assert cfg.synthetic_panel == SyntheticPanelConfig() and cfg.preset == "panel"
    assert DataHalfConfig().synthetic_panel is None
    assert (cfg.labels.horizon, cfg.labels.fwd_horizons, label_window_bars(cfg.labels)) == (10, (1, 5, 10, 20), 20)
    h = minimum_history(cfg)
    # purge = the 20-day label window, so no train label reaches into val; 5-day embargo after each cut
    assert h["purge_bars"] == 20 and h["embargo_bars"] == 5
    assert h["min_symbol_bars"] == h["feature_warmup_bars"] + 30 + 20
    assert cfg.ingest.quality.hole_bars == 20  # a hole is longer than the label window; holidays are not


def test_a_single_file_is_read_and_nothing_else_in_its_folder(file_run, shared_folder) -> None:
    paths, results = file_run
    report = json.loads(paths.quality_report.read_text())
    src = shared_folder / "daily_panel.parquet"
    assert [f["path"] for f in report["files"]] == [str(src)]
    assert report["n_rows_in"] == len(pd.read_parquet(src)) == report["n_rows_out"]
    assert report["synthetic"] is False and report["data_source"] == f"raw file: {src}"
    assert _stage_sources(paths) == {f"raw file: {src}"}
    assert sorted(p.name for p in shared_folder.iterdir()) == ["daily_panel.parquet", "hourly.parquet", "notes.txt"]


def test_the_daily_contract_runs_end_to_end(file_run) -> None:
    paths, results = file_run
    contract = build_contract(CFG.features)
    assert results["feature_contract"]["feature_contract_hash"] == contract.hash
    ds = read_dataset(paths.features, paths.labels)
    assert "hour_bucket" not in ds.columns and "session_bar" not in ds.columns
    assert {"month", "weekday", "xs_rank_ret_20", "xs_rank_ret_60", "xs_rank_rv_20", "xs_rank_vol_z_20"} <= set(ds)
    valid = ds["feature_valid"].to_numpy()
    for name in ("xs_rank_ret_20", "xs_rank_ret_60", "xs_rank_rv_20", "xs_rank_vol_z_20"):
        x = ds.loc[valid, name].to_numpy()
        assert np.isfinite(x).all() and x.min() == -1.0 and x.max() == 1.0
    assert set(ds["month"].unique()) == set(range(12))
    split = results["splits"]["summary"]["splits"]
    assert all(split[s]["samples"] > 0 for s in SPLITS)
    for s in SPLITS:
        assert results["hdf5_splits"]["splits"][s]["feature_contract_hash"] == contract.hash


def test_without_a_raw_path_the_panel_preset_reads_the_synthetic_panel_and_says_so(tmp_path) -> None:
    paths = ArtifactPaths(data_dir=tmp_path / "data")
    landing = paths.raw_dir
    landing.mkdir(parents=True)
    generate_synthetic_market(SyntheticMarketConfig(n_symbols=20, n_days=30)).to_parquet(landing / "intraday.parquet")
    logs: list[str] = []
    run_data_half(paths, CFG, log=logs.append)
    report = json.loads(paths.quality_report.read_text())
    folder = synthetic_panel_dir(paths)
    assert [Path(f["path"]).parent for f in report["files"]] == [folder]  # the landing zone is not read
    assert report["synthetic"] is True and report["n_rows_in"] == 40 * 260
    assert _stage_sources(paths) == {describe_panel(SMALL_PANEL)}
    assert describe_panel(SMALL_PANEL).startswith("synthetic panel")
    assert any("SYNTHETIC DATA" in m and "synthetic panel" in m for m in logs)
    assert sorted(p.name for p in landing.iterdir()) == ["intraday.parquet"]
    sectors = pd.read_csv(synthetic_panel_sector_file(paths, CFG))
    assert len(sectors) == 40 and sectors["sector"].nunique() == SMALL_PANEL.n_sectors
    assert synthetic_panel_sector_file(replace(paths, raw_dir_override=landing), CFG) is None
    from sentinel_pipeline.summary import summarise

    text = "\n".join(summarise(paths))
    assert f"data source  {describe_panel(SMALL_PANEL)}" in text and "built from the synthetic panel, not real" in text


def test_cli_preset_panel_with_a_raw_file(shared_folder, tmp_path, capsys) -> None:
    rc = main(["--preset", "panel", "--data-dir", str(tmp_path / "d"), "--raw", str(shared_folder / "daily_panel.parquet")])
    assert rc == 0, capsys.readouterr().err
    contract = json.loads((tmp_path / "d/artifacts/features/feature_contract.json").read_text())
    assert contract["feature_contract_hash"] == build_contract(daily_feature_config()).hash
    # a file the raw stage cannot read, named as the raw input, fails naming it
    rc = main(["--preset", "panel", "--data-dir", str(tmp_path / "e"), "--raw", str(shared_folder / "notes.txt")])
    err = capsys.readouterr().err
    assert rc == 1 and "notes.txt" in err and "parquet" in err
    # an empty folder given as the raw path: refused (never the intraday synthetic market instead)
    (tmp_path / "empty").mkdir()
    rc = main(["--preset", "panel", "--data-dir", str(tmp_path / "g"), "--raw", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 1 and "no *.parquet or *.csv files at the raw path" in err and not (tmp_path / "g/synthetic").exists()
    # no raw path and no synthetic panel: refused, saying what to give
    rc = main(["--preset", "panel", "--data-dir", str(tmp_path / "f"), "--no-synthetic-default"])
    err = capsys.readouterr().err
    assert rc == 1 and "no raw path" in err


def test_dagster_settings_build_the_panel_preset(tmp_path) -> None:
    assert DataHalfSettings().to_config() == DataHalfConfig()
    assert DataHalfSettings(preset="panel").to_config() == panel_config()
    custom = DataHalfSettings(preset="panel", pt=1.5, horizon=5, panel_n_symbols=50, signal_strength=0.0).to_config()
    assert (custom.labels.pt, custom.labels.sl, custom.labels.horizon) == (1.5, 2.0, 5)
    assert custom.synthetic_panel == replace(SyntheticPanelConfig(), n_symbols=50, signal_strength=0.0)
    assert custom.features == daily_feature_config()
    with pytest.raises(ValueError, match="preset"):
        DataHalfSettings(preset="weekly").to_config()
    with pytest.raises(RawDataError):
        run_data_half(ArtifactPaths(data_dir=tmp_path), replace(CFG, generate_default_when_empty=False))


def test_dagster_assets_run_the_panel_preset_on_a_raw_file(shared_folder, tmp_path) -> None:
    import dagster as dg

    from sentinel_pipeline.orchestration.data_assets import feature_contract, features, raw_bars
    from sentinel_pipeline.orchestration.settings import PipelineSettings

    src = shared_folder / "daily_panel.parquet"
    resources = {"settings": PipelineSettings(data_dir=str(tmp_path / "data"), models_dir=str(tmp_path / "models"),
                                              raw_dir=str(src)),
                 "data_settings": DataHalfSettings(preset="panel")}
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([raw_bars, feature_contract, features], resources=resources, instance=instance)
    assert result.success
    md = {ev.materialization.asset_key.to_user_string(): ev.materialization.metadata
          for ev in result.get_asset_materialization_events()}
    assert md["raw_bars"]["data_source"].value == f"raw file: {src}"
    assert md["raw_bars"]["rows_in"].value == 40 * 260
    assert md["feature_contract"]["feature_contract_hash"].value == build_contract(daily_feature_config()).hash
