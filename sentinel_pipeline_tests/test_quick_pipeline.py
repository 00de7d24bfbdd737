"""The quick demo (``bash scripts/run_pipeline.sh --quick`` runs this job through the Dagster CLI): on a
fresh instance it gives a verified, replayed and backtested bundle, with the default statistical gates,
in its own directories, and its metadata is readable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import pytest

from sentinel_pipeline.bundle_archive import inspect_archive
from sentinel_pipeline.bundles import list_bundles, records_dir
from sentinel_pipeline.definitions import defs
from sentinel_pipeline.orchestration import jobs
from sentinel_pipeline.package import default_archive_path
from sentinel_pipeline_tests.test_presentation import long_floats_of_run


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dg.ExecuteInProcessResult, float]:
    root = tmp_path_factory.mktemp("quick")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)  # the job's directories are relative (data/quick, models/quick), like the defaults
    instance = dg.DagsterInstance.ephemeral()
    try:
        t0 = time.perf_counter()
        result = defs.resolve_job_def("quick_pipeline").execute_in_process(instance=instance, raise_on_error=False)
        seconds = time.perf_counter() - t0
    finally:
        instance.dispose()
        mp.undo()
    print(f"\n[timing] quick_pipeline in process: {seconds:.1f}s")
    return root, result, seconds


def test_quick_pipeline_verifies_replays_and_backtests_one_bundle(quick) -> None:
    root, result, _ = quick
    assert result.success, [e.step_failure_data.error.to_string()[:400] for e in result.get_step_failure_events()]
    checks = {f"{e.asset_key.to_user_string()}:{e.check_name}": e for e in result.get_asset_check_evaluations()}
    assert checks[f"bundle_{jobs.QUICK_VARIANT}:bundle_verified"].passed  # the default gates, unchanged
    assert all(e.passed for e in checks.values())
    mats = {e.materialization.asset_key.to_user_string(): e.materialization.metadata
            for e in result.get_asset_materialization_events()}
    assert {f"bundle_{jobs.QUICK_VARIANT}", f"replay_{jobs.QUICK_VARIANT}", f"backtest_{jobs.QUICK_VARIANT}",
            "variant_comparison"} <= set(mats)
    assert not any(k.startswith(("bundle_seq", "bundle_transformer")) for k in mats)  # one variant only
    bundles = list_bundles(root / jobs.QUICK_MODELS_DIR)
    assert len(bundles) == 1 and bundles[0].name.startswith(jobs.QUICK_VARIANT)
    verification = json.loads((records_dir(bundles[0]) / "verification.json").read_text())
    gates = {g["name"]: g for g in verification["gate_results"]}
    assert verification["passed"] and gates["directional_skill"]["value"] >= 3.0
    assert gates["directional_skill"]["n_windows"] >= 10
    assert (root / jobs.QUICK_DATA_DIR / "artifacts").is_dir() and not (root / "data" / "artifacts").exists()
    table = mats["variant_comparison"]["verification"].value
    assert f"| {jobs.QUICK_VARIANT} | {bundles[0].name} | PASS | none |" in table
    assert "| seq_ctx_fusion | none | no bundle |" in table
    assert "synthetic" in (result.dagster_run.tags.get("sentinel/data") or "")
    archive = mats[f"model_final_{jobs.QUICK_VARIANT}"]  # the shippable archive, beside the bundle
    path = root / archive["path"].value  # relative to the job's working directory, like models/quick
    assert path.resolve() == default_archive_path(bundles[0]).resolve()
    assert archive["members"].value == len(inspect_archive(path))
    for asset, key in (("bundle", "loss_curve_inline"), ("replay", "equity_inline"), ("backtest", "equity_inline")):
        inline = mats[f"{asset}_{jobs.QUICK_VARIANT}"][key].value  # rendered inline by the UI (< 1000 chars)
        assert inline.startswith("![") and "data:image/png;base64," in inline and len(inline) < 1000


def test_no_metadata_float_has_more_than_4_significant_digits(quick) -> None:
    _, result, _ = quick
    assert long_floats_of_run(result) == []

