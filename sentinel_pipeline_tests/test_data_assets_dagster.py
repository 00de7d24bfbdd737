"""The data-half assets under Dagster (no training): stale reuse after a failed stage, the synthetic
default named in the UI metadata and logs, and settings validated.

Issue 9, item 8: ``raw_bars`` failed its quarantine limit after it had already replaced
``bars.parquet``, and the next ``--select features`` run said "inputs unchanged" and reused features
built from the old bars. Now a failed stage leaves its previous outputs byte for byte, keeps the failed
run's quarantine beside them, and a downstream stage refuses an upstream whose last run failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from sentinel_pipeline.data.raw_bars import RawDataError
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline.data.tables import read_frame, write_table
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings, feature_contract, features, raw_bars
from sentinel_pipeline.orchestration.settings import PipelineSettings
from sentinel_pipeline.paths import ArtifactPaths

MARKET = SyntheticMarketConfig(seed=3, n_symbols=20, n_days=60)
SMALL = {"synthetic_seed": 3, "synthetic_n_symbols": 20, "synthetic_n_days": 60}
ASSETS = [raw_bars, feature_contract, features]


def _materialize(root: Path, raw: Path | None, select: list[str], instance: dg.DagsterInstance,
                 **data_settings: object) -> dg.ExecuteInProcessResult:
    resources = {
        "settings": PipelineSettings(data_dir=str(root / "data"), models_dir=str(root / "models"),
                                     raw_dir=str(raw) if raw is not None else None),
        "data_settings": DataHalfSettings(**{**SMALL, **data_settings}),
    }
    return dg.materialize(ASSETS, selection=select, resources=resources, instance=instance, raise_on_error=False)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (event,) = result.get_step_failure_events()
    return event.step_failure_data.error.to_string()


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, object]]:
    return {ev.materialization.asset_key.to_user_string(): {k: getattr(v, "value", v) for k, v in
                                                           ev.materialization.metadata.items()}
            for ev in result.get_asset_materialization_events()}


def test_failed_raw_stage_keeps_the_previous_bars_and_features_are_not_reused_on_them(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    market = generate_synthetic_market(MARKET)
    market.to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    with dg.DagsterInstance.ephemeral() as instance:
        first = _materialize(tmp_path, raw, ["raw_bars", "feature_contract", "features"], instance)
        assert first.success
        assert _metadata(first)["features"]["reused"] is False
        bars_before = paths.bars.read_bytes()
        features_before = paths.features.read_bytes()

        # the raw data changes: 10 % of the rows broken, above the 5 % limit
        bad = market.copy()
        bad.loc[bad.index % 10 == 0, "close"] = float("nan")
        bad.to_parquet(raw / "market.parquet", index=False)
        failed = _materialize(tmp_path, raw, ["raw_bars"], instance)
        assert not failed.success
        message = _failure(failed)
        assert "above the limit max_quarantine_fraction=5.00%" in message
        assert f"the previous outputs in {paths.raw_bars_dir} are unchanged" in message
        assert str(paths.raw_bars_dir / "last_failed") in message
        assert paths.bars.read_bytes() == bars_before  # byte-identical
        kept = pd.read_parquet(paths.raw_bars_dir / "last_failed" / "quarantine.parquet")
        assert set(kept["reason"]) == {"nan_or_inf_price"} and len(kept) == int(bad["close"].isna().sum())

        # features alone: no "inputs unchanged" on bars that the current raw data did not produce
        stale = _materialize(tmp_path, raw, ["features"], instance)
        assert not stale.success
        assert "stage 'raw_bars' upstream of 'features' failed its last run" in _failure(stale)
        assert paths.features.read_bytes() == features_before

        # raw data fixed: raw_bars rebuilds from it, features may then be reused honestly (same bars)
        market.to_parquet(raw / "market.parquet", index=False)
        again = _materialize(tmp_path, raw, ["raw_bars", "features"], instance)
        assert again.success, _failure(again)
        assert not (paths.raw_bars_dir / "last_failed").exists()
        assert paths.bars.read_bytes() == bars_before and _metadata(again)["features"]["reused"] is True


def test_features_rebuild_when_the_bars_file_differs_from_its_record(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    with dg.DagsterInstance.ephemeral() as instance:
        assert _materialize(tmp_path, raw, ["raw_bars", "feature_contract", "features"], instance).success
        bars = read_frame(paths.bars)
        write_table(bars.iloc[: len(bars) // 2], paths.bars)  # replaced behind the record's back
        stale = _materialize(tmp_path, raw, ["features"], instance)
        assert not stale.success
        assert "bars.arrow: output of upstream stage 'raw_bars' differs from its record" in _failure(stale)
        rebuilt = _materialize(tmp_path, raw, ["raw_bars", "features"], instance)  # the raw stage repairs it
        assert rebuilt.success and _metadata(rebuilt)["raw_bars"]["reused"] is False


def test_synthetic_default_is_named_in_the_metadata_and_logs(tmp_path):
    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path, None, ["raw_bars", "feature_contract", "features"], instance)
        assert result.success
        md = _metadata(result)
        expected = "synthetic default market (seed 3, 20 symbols x 60 days x 7 bars/day, signal strength 0.2)"
        assert md["raw_bars"]["synthetic"] is True
        assert str(md["raw_bars"]["data_source"]).startswith(expected)
        assert str(md["features"]["data_source"]).startswith(expected)
        assert "synthetic" in str(md["raw_bars"]["input_files"])
        warnings = [e.message for e in instance.all_logs(result.run_id) if e.level >= 30]
        assert any("SYNTHETIC DATA" in w and "raw_bars" in w for w in warnings)
        assert not (tmp_path / "data" / "raw").exists()  # the landing zone untouched
        assert any((tmp_path / "data" / "synthetic").glob("synthetic_market-*.parquet"))


@pytest.mark.parametrize("fraction", [-0.01, 1.5])
def test_quarantine_limit_outside_0_1_is_refused_with_a_clear_message(tmp_path, fraction):
    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path, None, ["raw_bars"], instance, max_quarantine_fraction=fraction)
        assert not result.success
        assert "max_quarantine_fraction must be a number between 0 and 1" in _failure(result)


def test_training_and_backtest_inputs_are_refused_below_a_failed_raw_stage(tmp_path):
    """``upstream_fingerprint`` (the training and backtest assets' view of arrow_cache / hdf5_splits)
    refuses outputs built from the previous raw data once the raw stage failed."""
    from sentinel_pipeline import data_half
    from sentinel_pipeline.orchestration.data_assets import upstream_fingerprint

    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    data_half.run_data_half(paths, data_half.DataHalfConfig(synthetic=MARKET), log=lambda _msg: None)
    fp = upstream_fingerprint(paths.arrow_dir, "arrow_cache")
    assert upstream_fingerprint(paths.arrow_dir, "arrow_cache") == fp
    (raw / "notes.json").write_text("{}")
    with pytest.raises(RawDataError, match="notes.json"):
        data_half.stage_fingerprint("raw_bars", paths, data_half.DataHalfConfig(synthetic=MARKET))
    for stage_dir, name in ((paths.arrow_dir, "arrow_cache"), (paths.hdf5_dir, "hdf5_splits")):
        with pytest.raises(dg.Failure, match=rf"stage 'raw_bars' upstream of '{name}' failed its last run"):
            upstream_fingerprint(stage_dir, name)


def test_ffd_group_shows_its_order_adf_p_tau_and_window_in_the_ui(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_parquet(raw / "market.parquet", index=False)
    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize(tmp_path, raw, ["raw_bars", "feature_contract", "features"], instance,
                              ffd=True, ffd_tau=1e-3, ffd_max_window=200)
        assert result.success
        meta = _metadata(result)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    sel = json.loads((paths.feature_contract.parent / "ffd_selection.json").read_text())
    for asset in ("feature_contract", "features"):
        md = meta[asset]
        assert md["ffd_d"] == sel["d"] and md["ffd_adf_p"] == sel["adf_p"] and md["ffd_adf_p"] < 0.05
        assert md["ffd_tau"] == 1e-3 and md["ffd_window"] == sel["window"] and md["ffd_max_window"] == 200
    assert "ffd_d" not in _metadata_default(tmp_path / "off", raw)["features"]


def _metadata_default(root: Path, raw: Path) -> dict[str, dict[str, object]]:
    with dg.DagsterInstance.ephemeral() as instance:
        result = _materialize(root, raw, ["raw_bars", "feature_contract", "features"], instance)
        assert result.success
        return _metadata(result)
