"""Dagster-level tests of the backtest assets on the small market of ``pipeline_fixtures``.

One variant (``mlp_two_head``, the fastest to train) is built once per module with the data half, its
bundle, the blocking check and its backtest, and snapshotted; every test restores that state first.
Proven: the backtest runs after a verified bundle and writes only outside the bundle; it is not executed
in the run whose ``bundle_verified`` fails, refuses in a later run (failed check, or a bundle changed
after its verification, a bundle that has seen the rebuilt test window), is requested by automation only
once the check passed; an unchanged rerun is
reused; a retrained bundle is compared with the previous verified one; ``variant_comparison`` tabulates
what exists.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from sentinel_pipeline.bundles import MANIFEST_NAME
from sentinel_pipeline.definitions import ASSETS, CHECKS
from sentinel_pipeline.deployment.onnx_parity import same_trades
from sentinel_pipeline.orchestration.backtest_assets import COMPARISON_KEY, backtest_asset_key, backtest_dir
from sentinel_pipeline.orchestration.bundle_checks import CHECK_NAME
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings
from sentinel_pipeline.orchestration.jobs import full_pipeline
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.training.families import VARIANTS as ALL_VARIANTS
from sentinel_pipeline.training.families import variants_of_kind
from sentinel_pipeline.verification import require_verified
from sentinel_pipeline_tests.pipeline_fixtures import (
    DATA_STAGES,
    SMALL_MARKET,
    PipelineHome,
    check_evaluations,
    flip_byte,
    leftover_temp_files,
    materializations,
    restore,
    run_config,
    started_steps,
    step_failures,
)

# the variants of the intraday graph (window families); the panel job trains the others
VARIANTS = variants_of_kind("windows")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::dagster.PreviewWarning"),
    pytest.mark.filterwarnings("ignore::dagster.BetaWarning"),
    pytest.mark.filterwarnings("ignore:AssetExecutionContext.run_id is deprecated:DeprecationWarning"),
]

VARIANT = "mlp_two_head"
BACKTEST = backtest_asset_key(VARIANT)
BUNDLE = bundle_asset_key(VARIANT)
OUTPUTS = {"backtest_report.json", "backtest.png", "daily.parquet", "bars.parquet", "trades.parquet",
           "positions.parquet", "predictions.parquet", "random_strategies.parquet", ".stage.json"}


@dataclass
class Built:
    home: PipelineHome
    snapshot: Path
    result: dg.ExecuteInProcessResult
    bundle: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("backtest_pipeline")
    home = PipelineHome(root / "instance")
    instance = home.open_instance()
    try:
        selection = [dg.AssetKey(a) for a in DATA_STAGES] + [dg.AssetKey("feature_contract"), BUNDLE, BACKTEST]
        result = home.run(instance, selection=selection)
    finally:
        instance.dispose()
    assert result.success, step_failures(result)
    snapshot = root / "snapshot"
    shutil.copytree(home.root, snapshot)
    bundle = Path(materializations(result)[BUNDLE.to_user_string()]["bundle_path"])
    return Built(home, snapshot, result, bundle)


@dataclass
class Good:
    home: PipelineHome
    instance: dg.DagsterInstance
    bundle: Path
    built: Built


@pytest.fixture
def good(built: Built) -> Iterator[Good]:
    restore(built.snapshot, built.home)
    instance = built.home.open_instance()
    try:
        yield Good(built.home, instance, built.bundle, built)
    finally:
        instance.dispose()


def report_bytes(good: Good) -> bytes:
    return (backtest_dir(good.home.paths, VARIANT) / "backtest_report.json").read_bytes()


def test_backtest_runs_after_the_verified_bundle_and_writes_only_outside_it(good: Good) -> None:
    result, home, bundle = good.built.result, good.home, good.bundle
    assert check_evaluations(result)[f"bundle_{VARIANT}:{CHECK_NAME}"].passed
    md = materializations(result)[BACKTEST.to_user_string()]
    assert md["bundle"] == bundle.name and md["reused"] is False
    assert md["n_trades"] > 0 and md["n_days"] >= 5
    assert md["entry_rule"].startswith("cross_section, hold 10 bars, lag 1")  # 20 symbols; horizon 10
    assert "data:image/png;base64," in md["equity_drawdown"]
    for base in ("random", "shifted"):
        assert 0 < md[f"p_vs_{base}_sharpe"] <= 1 and 0 <= md[f"percentile_vs_{base}_total_return"] <= 100
    assert md["random_baselines"].count("\n| ") == 4  # 2 baselines x 2 statistics
    # the small market's test split spans days, not months: no annualised Sharpe, and a note saying why
    assert md["sharpe"] == "not reported (see notes)" and "min_days 30" in md["notes"]
    assert md["previous_bundle"].startswith("none")

    out = backtest_dir(home.paths, VARIANT)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    report = json.loads((out / "backtest_report.json").read_text())
    assert report["bundle"] == bundle.name and report["variant"] == VARIANT
    for base in ("random_baseline", "shifted_baseline"):
        assert report[base]["n"] == 1000 and report[base]["n_trades_each"] == report["metrics"]["n_trades"]
    strategies = pd.read_parquet(out / "random_strategies.parquet")
    assert strategies.groupby("baseline").size().to_dict() == {"random": 1000, "shifted": 1000}
    assert (strategies["n_trades"] == report["metrics"]["n_trades"]).all()
    assert report["test_split"]["path"].endswith("test.h5")
    # the bundle holds its manifest's files, the manifest, its signature and its records, nothing else
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert {p.name for p in bundle.iterdir()} == {*manifest["files"], MANIFEST_NAME, "manifest.sig", "records"}
    require_verified(bundle)
    assert leftover_temp_files(home.data_dir) == leftover_temp_files(home.models_dir) == []


def test_unchanged_rerun_is_reused_and_the_comparison_tabulates_every_variant(good: Good) -> None:
    before = report_bytes(good)
    result = good.home.run(good.instance, selection=[BACKTEST, COMPARISON_KEY])
    assert result.success, step_failures(result)
    mats = materializations(result)
    assert mats[BACKTEST.to_user_string()]["reused"] is True
    assert report_bytes(good) == before
    table = mats[COMPARISON_KEY.to_user_string()]["comparison"]
    lines = table.splitlines()
    assert lines[0].startswith("| variant | status | bundle |") and len(lines) == 2 + len(VARIANTS)
    mine = next(line for line in lines if line.startswith(f"| {VARIANT} |"))
    assert f"| current | {good.bundle.name} | cross_section |" in mine
    others = [line for line in lines[2:] if not line.startswith(f"| {VARIANT} |")]
    assert all("| no backtest |" in line for line in others)
    assert mats[COMPARISON_KEY.to_user_string()]["n_current"] == 1
    saved = json.loads((good.home.paths.artifacts / "backtest" / "variant_comparison.json").read_text())
    assert [r["variant"] for r in saved["variants"]] == list(VARIANTS)


def test_failing_check_keeps_the_backtest_out_of_the_same_run(good: Good) -> None:
    before = report_bytes(good)
    flip_byte(good.bundle)  # the training run is reused as it is; its bundle no longer matches its manifest
    result = good.home.run(good.instance, selection=[BUNDLE, BACKTEST])
    assert not result.success
    evaluation = check_evaluations(result)[f"bundle_{VARIANT}:{CHECK_NAME}"]
    assert not evaluation.passed and "manifest" in (evaluation.description or "")
    steps = started_steps(result)
    assert f"bundle_{VARIANT}" in steps and f"bundle_{VARIANT}_{CHECK_NAME}" in steps
    assert f"backtest_{VARIANT}" not in steps
    assert BACKTEST.to_user_string() not in materializations(result)
    assert report_bytes(good) == before


def test_backtest_refuses_in_a_later_run_after_a_failed_check_or_a_changed_bundle(good: Good) -> None:
    home, instance = good.home, good.instance
    before = report_bytes(good)
    flip_byte(good.bundle)
    failed = home.run(instance, "checks_only")
    assert not check_evaluations(failed)[f"bundle_{VARIANT}:{CHECK_NAME}"].passed
    result = home.run(instance, selection=[BACKTEST])
    message = step_failures(result)[f"backtest_{VARIANT}"]
    assert "refused" in message and f"'{CHECK_NAME}'" in message and "manifest" in message, message
    assert materializations(result) == {} and report_bytes(good) == before

    # the byte flipped back, the check passes again; then the bundle changes without re-verification:
    # the Dagster record says "passed", the bundle no longer matches the manifest it verified
    flip_byte(good.bundle)
    assert check_evaluations(home.run(instance, "checks_only"))[f"bundle_{VARIANT}:{CHECK_NAME}"].passed
    flip_byte(good.bundle)
    result = home.run(instance, selection=[BACKTEST])
    message = step_failures(result)[f"backtest_{VARIANT}"]
    assert "refused" in message and "model_best.pt: sha256" in message, message
    assert report_bytes(good) == before


def test_automation_requests_the_backtest_only_once_the_new_bundle_passed_its_check(good: Good) -> None:
    home, instance = good.home, good.instance
    defs = home.defs()

    def tick(cursor: object) -> dg.EvaluateAutomationConditionsResult:
        return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)

    result = tick(None)
    assert result.get_num_requested(BACKTEST) == 0
    instance.report_runless_asset_event(
        dg.AssetMaterialization(BUNDLE, metadata={"bundle_path": dg.MetadataValue.path(str(good.bundle))})
    )
    result = tick(result.cursor)
    assert result.get_num_requested(BACKTEST) == 0  # not verified yet
    flip_byte(good.bundle)
    assert not check_evaluations(home.run(instance, "checks_only"))[f"bundle_{VARIANT}:{CHECK_NAME}"].passed
    result = tick(result.cursor)
    assert result.get_num_requested(BACKTEST) == 0  # verification failed
    evaluation = next(r for r in result.results if r.key == BACKTEST)
    parts = {c.condition.get_label(): c.true_subset.size for c in evaluation.child_results}
    assert parts == {"eager": 1, "all_deps_blocking_checks_passed": 0}
    flip_byte(good.bundle)  # flipped back: the bundle is intact again
    home.run(instance, "checks_only")
    result = tick(result.cursor)
    assert result.get_num_requested(BACKTEST) == 1
    result = tick(result.cursor)
    assert result.get_num_requested(BACKTEST) == 0


def test_the_code_location_runs_the_backtests_in_every_job_and_by_a_sensor() -> None:
    from sentinel_pipeline.definitions import defs

    keys = {backtest_asset_key(v) for v in VARIANTS} | {COMPARISON_KEY}
    for job in ("full_pipeline", "ci_gate"):
        assert keys <= set(defs.resolve_job_def(job).asset_layer.selected_asset_keys)
    sensor = defs.resolve_sensor_def("backtest_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    # the sensor also covers the ranking evaluation of the panel's day-batch variants
    every = {backtest_asset_key(v) for v in ALL_VARIANTS} | {COMPARISON_KEY}
    assert sensor.asset_selection.resolve(defs.resolve_asset_graph()) == every


def test_a_retrained_bundle_is_compared_with_the_previous_verified_one_on_the_same_window(good: Good) -> None:
    home, instance = good.home, good.instance
    config = run_config()
    config["ops"][BUNDLE.to_user_string()]["config"]["seed"] = 7  # another training run -> a new bundle
    result = home.defs().resolve_job_def("full_pipeline").execute_in_process(
        run_config=config, instance=instance, asset_selection=[BUNDLE, BACKTEST], raise_on_error=False)
    assert result.success, step_failures(result)
    mats = materializations(result)
    new = Path(mats[BUNDLE.to_user_string()]["bundle_path"])
    assert new != good.bundle
    md = mats[BACKTEST.to_user_string()]
    assert md["bundle"] == new.name and md["previous_bundle"] == good.bundle.name
    assert "| mean_daily_return |" in md["vs_previous"] and "delta_mean_daily_return_vs_previous" in md
    report = json.loads(report_bytes(good))
    vs = report["vs_previous"]
    daily = pd.read_parquet(backtest_dir(home.paths, VARIANT) / "daily.parquet")
    diff = daily["net_return"] - daily["previous_net_return"]
    assert vs["n_days_paired"] == len(daily) and vs["mean_daily_return"]["delta"] == pytest.approx(diff.mean())
    lo, hi = vs["mean_daily_return"]["lower"], vs["mean_daily_return"]["upper"]
    assert lo <= vs["mean_daily_return"]["delta"] <= hi
    assert vs["sharpe"] is None  # too few days for annualised Sharpe ratios, so no delta of them either


def test_a_bundle_that_has_seen_the_rebuilt_test_window_is_refused(good: Good) -> None:
    """The splits are rebuilt with an earlier cut (train 50 %), the bundle is not retrained: its
    training and validation bars now lie inside the test window, so the backtest refuses it."""
    home, instance = good.home, good.instance
    before = report_bytes(good)
    resources = {**home.resources(), "data_settings": DataHalfSettings(**SMALL_MARKET, train_frac=0.5)}
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[full_pipeline], resources=resources)
    data = [dg.AssetKey(a) for a in ("dataset_splits", "seq_scaler", "snap_scaler", "hdf5_splits", "arrow_cache")]
    rebuilt = defs.resolve_job_def("full_pipeline").execute_in_process(
        instance=instance, asset_selection=data, raise_on_error=False)
    assert rebuilt.success, step_failures(rebuilt)
    result = home.run(instance, selection=[BACKTEST])
    message = step_failures(result)[f"backtest_{VARIANT}"]
    assert "refused" in message and "inside this test window" in message, message
    assert report_bytes(good) == before


def test_the_backtest_on_the_onnx_runtime_trades_identically(good: Good) -> None:
    """``runtime: onnx`` scores the test split with the bundle's model.onnx on ONNX Runtime: a new
    result (the runtime is part of the stage's fingerprint) with the identical trade list."""
    home, instance = good.home, good.instance
    out = backtest_dir(home.paths, VARIANT)
    on_torch = pd.read_parquet(out / "trades.parquet")
    config = run_config()
    config["ops"][BACKTEST.to_user_string()] = {"config": {"runtime": "onnx"}}
    result = home.defs().resolve_job_def("full_pipeline").execute_in_process(
        run_config=config, instance=instance, asset_selection=[BACKTEST], raise_on_error=False)
    assert result.success, step_failures(result)
    md = materializations(result)[BACKTEST.to_user_string()]
    assert md["reused"] is False
    report = json.loads(report_bytes(good))
    assert report["runtime"] == "onnx" and report["bundle"] == good.bundle.name
    on_onnx = pd.read_parquet(out / "trades.parquet")
    assert len(on_torch) > 0 and same_trades(on_torch, on_onnx)
