"""Dagster-level integration tests of the whole pipeline (issue 4).

One small "good" pipeline instance is built once per module (``built``: the full graph on a small
synthetic market, see ``pipeline_fixtures``) and snapshotted; every test that changes anything first
restores the instance in place from that snapshot (``good``), so tests are independent of each other.

What is proven, in the issue's words:

- the full graph materialises, every check passes, the UI metadata is there, replay reports sit next to
  the bundles and train/serve parity holds;
- "when the raw data has not changed since the last rebuild, the nightly run costs seconds, not a
  retrain", and "when it has, everything downstream rebuilds in that run";
- "replay must never run on a bundle whose latest verification did not pass, whichever way it is
  launched": in the same run, in a later run (after re-verification of a tampered bundle, and without
  it), and by the automation condition;
- the CI gate (``dagster job execute -j ci_gate``) exits 0 on the good pipeline and non-zero on a
  tampered bundle, without replaying it;
- "two runs at once must not corrupt each other's outputs";
- training runs out of the run process (Dagster Pipes subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import h5py
import pyarrow as pa
import pytest
import yaml

from sentinel_pipeline.bundle_archive import inspect_archive
from sentinel_pipeline.bundles import manifest_sha256, records_dir, write_record
from sentinel_pipeline.data.feature_contract import read_contract
from sentinel_pipeline.data.synthetic_market import SyntheticMarketConfig, generate_synthetic_market
from sentinel_pipeline.orchestration.bundle_checks import CHECK_NAME
from sentinel_pipeline.orchestration.data_assets import DataHalfSettings
from sentinel_pipeline.orchestration.jobs import PANEL_ONLY
from sentinel_pipeline.orchestration.package_assets import package_asset_key
from sentinel_pipeline.orchestration.replay_assets import replay_asset_key
from sentinel_pipeline.orchestration.training_assets import bundle_asset_key
from sentinel_pipeline.package import default_archive_path
from sentinel_pipeline.paths import SPLITS
from sentinel_pipeline.safe_read import sha256_regular
from sentinel_pipeline.stage_cache import read_record
from sentinel_pipeline.verification import CHECK_NAMES
from sentinel_pipeline_tests.bundle_tamper import (
    plant_pickles_in_scalers_and_records,
    resign,
)
from sentinel_pipeline_tests.pipeline_fixtures import (
    DATA_STAGES,
    SMALL_MARKET,
    VARIANTS,
    PipelineHome,
    check_evaluations,
    cli_run_config,
    flip_byte,
    leftover_temp_files,
    materializations,
    raw_metadata,
    restore,
    started_steps,
    step_failures,
    swap_contract,
    swap_scaler,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGSTER_CLI = str(Path(sys.executable).parent / "dagster")
# one data-half materialisation in its own process and its own ephemeral Dagster instance (imports only
# the data half: no torch); starts when the file GO appears, writes {asset: reused} to OUT
DATA_HALF_WORKER = """
import json, sys, time
from pathlib import Path
from typing import Any
import dagster as dg
from sentinel_pipeline.orchestration.data_assets import DATA_ASSETS, DataHalfSettings
from sentinel_pipeline.orchestration.settings import PipelineSettings
data_dir, out, ready, go, market = sys.argv[1:]
Path(ready).touch()
deadline = time.monotonic() + 600
while not Path(go).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
models_dir = str(Path(data_dir).parent / "models")
resources = {"settings": PipelineSettings(data_dir=data_dir, models_dir=models_dir),
             "data_settings": DataHalfSettings(**json.loads(market))}
result = dg.materialize(DATA_ASSETS, resources=resources, instance=dg.DagsterInstance.ephemeral())
mats = [e.materialization for e in result.get_asset_materialization_events()]
Path(out).write_text(json.dumps({m.asset_key.to_user_string(): m.metadata["reused"].value
                                 for m in mats if "reused" in m.metadata}))
"""

pytestmark = [
    pytest.mark.filterwarnings("ignore::dagster.PreviewWarning"),
    pytest.mark.filterwarnings("ignore::dagster.BetaWarning"),
    # raised inside dagster's own Pipes session code (dagster/_core/pipes/context.py), not by this project
    pytest.mark.filterwarnings("ignore:AssetExecutionContext.run_id is deprecated:DeprecationWarning"),
]


@dataclass
class Built:
    home: PipelineHome  # where every test works; restored from ``snapshot`` before each test
    snapshot: Path
    result: dg.ExecuteInProcessResult  # the first full_pipeline run
    seconds: float


@dataclass
class Good:
    home: PipelineHome
    instance: dg.DagsterInstance
    built: Built


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("pipeline")
    home = PipelineHome(root / "instance")
    instance = home.open_instance()
    try:
        t0 = time.perf_counter()
        result = home.run(instance)
        seconds = time.perf_counter() - t0
    finally:
        instance.dispose()
    assert result.success, f"the good pipeline failed: {step_failures(result)}"
    snapshot = root / "snapshot"
    shutil.copytree(home.root, snapshot)
    print(f"\n[timing] first full_pipeline run (3 variants trained): {seconds:.1f}s")
    return Built(home, snapshot, result, seconds)


@pytest.fixture
def good(built: Built) -> Iterator[Good]:
    """The good pipeline instance, restored from its snapshot, with its Dagster instance open."""
    restore(built.snapshot, built.home)
    instance = built.home.open_instance()
    try:
        yield Good(built.home, instance, built)
    finally:
        instance.dispose()


def bundle_of(result: dg.ExecuteInProcessResult, variant: str) -> Path:
    return Path(materializations(result)[f"bundle_{variant}"]["bundle_path"])


def impossible_gates(path: Path) -> Path:
    """Quality gates no model can meet (a directional-skill t of a million)."""
    gates = {v: {"min_directional_t": 1e6} for v in VARIANTS}
    path.write_text(json.dumps(gates))
    return path


# -- 1. the full graph ------------------------------------------------------------------------------


def test_full_graph_materialises_every_asset_passes_every_check_with_metadata(good: Good) -> None:
    """The first full_pipeline run: every asset, every check, the UI metadata, the replay reports."""
    result, home = good.built.result, good.home
    defs = home.defs()
    graph = defs.resolve_asset_graph()
    panel_only = {k.to_user_string() for k in PANEL_ONLY.resolve(graph)}  # the panel job's (daily universe)
    all_assets = {k.to_user_string() for k in graph.get_all_asset_keys()} - panel_only
    all_checks = {
        f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys
        if k.asset_key.to_user_string() not in panel_only
    }
    mats = materializations(result)
    assert set(mats) == all_assets
    evaluations = check_evaluations(result)
    assert set(evaluations) == all_checks
    assert {k for k, e in evaluations.items() if not e.passed} == set()
    assert result.get_step_failure_events() == [] and result.get_step_skipped_events() == []
    assert leftover_temp_files(home.data_dir) == leftover_temp_files(home.models_dir) == []

    # data half: row counts agree from stage to stage, each stage was built (nothing to reuse yet)
    n_bars = mats["raw_bars"]["dagster/row_count"]
    assert n_bars > 0 and mats["raw_bars"]["symbols"] == SMALL_MARKET["synthetic_n_symbols"]
    assert mats["features"]["dagster/row_count"] == n_bars == mats["labelled_dataset"]["dagster/row_count"]
    # + seq_len - 1 warm-up rows per symbol in validation and test
    warmup = (len(SPLITS) - 1) * SMALL_MARKET["synthetic_n_symbols"] * (DataHalfSettings().seq_len - 1)
    assert mats["hdf5_splits"]["dagster/row_count"] == n_bars + warmup
    assert all(mats[a]["reused"] is False for a in DATA_STAGES)

    # one contract hash everywhere it is recorded
    contract_hash = read_contract(home.paths.feature_contract).hash
    for asset in ("feature_contract", "features", "seq_scaler", "hdf5_splits"):
        assert mats[asset]["feature_contract_hash"] == contract_hash, asset
    with h5py.File(home.paths.h5("train"), "r") as f:
        assert f.attrs["feature_contract_hash"] == contract_hash

    # bar quirks: none on the synthetic market, shown as zero counts; labels neither blocked nor clipped
    raw_md, label_md = mats["raw_bars"], mats["labelled_dataset"]
    assert raw_md["quirk_bars_flagged"] == raw_md["quirk_jumps"] == raw_md["quirk_holes"] == 0
    assert raw_md["quirk_examples"] == "_(empty)_"  # the table of examples has no rows
    assert label_md["ineligible_quirk_total"] == 0 and label_md["rows_clipped"] == 0
    assert label_md["target_clip_atr"] == 20.0

    # label balance: table in the UI and the check's numbers
    assert "| tb_label | fraction |" in mats["labelled_dataset"]["class_balance"]
    balance = raw_metadata(evaluations["labelled_dataset:label_balance_sanity"].metadata)
    assert 0.1 < balance["eligibility_rate"] < 0.99

    for variant in VARIANTS:
        md = mats[f"bundle_{variant}"]
        bundle = Path(md["bundle_path"])
        assert bundle.parent == home.models_dir and bundle.name.startswith(f"{variant}__")
        assert (bundle / "feature_contract_hash.txt").read_text().strip() == contract_hash
        assert "data:image/png;base64," in md["loss_curve"]
        assert md["already_complete"] is False and md["epochs_completed"] >= 1
        verification = json.loads((records_dir(bundle) / "verification.json").read_text())
        assert verification["passed"] and [c["name"] for c in verification["checks"]] == list(CHECK_NAMES)
        check_md = raw_metadata(evaluations[f"bundle_{variant}:{CHECK_NAME}"].metadata)
        assert check_md["failed_checks"] == "none"
        # the manifest digest is in the event log twice: the materialisation and the passing check
        assert check_md["manifest_sha256"] == md["manifest_sha256"] == manifest_sha256(bundle)

        replay = mats[f"replay_{variant}"]
        assert replay["bundle"] == bundle.name and replay["previous_bundle"] == "none"
        header = replay["comparison"].splitlines()[0]
        assert all(
            col in header for col in ("metric", "current", "previous", "baseline", "delta_vs_baseline")
        )
        assert "data:image/png;base64," in replay["equity_curves"]
        assert replay["n_trades_created"] > 0
        report = json.loads((records_dir(bundle) / "replay_report.json").read_text())  # in the bundle's records
        assert Path(report["current"]["info"]["bundle"]) == bundle
        assert len(report["comparison"]) == len(replay["comparison"].splitlines()) - 2

        parity = evaluations[f"replay_{variant}:train_serve_parity"]
        parity_md = raw_metadata(parity.metadata)
        assert parity.passed and parity_md["cells_compared"] > 0 and parity_md["max_abs_diff"] <= 1e-6


def test_nightly_schedule_runs_the_full_pipeline_at_2_utc(good: Good) -> None:
    """The nightly schedule is off by default (SENTINEL_NIGHTLY=on where deployed) and requests one
    full_pipeline run per tick."""
    schedule = good.home.defs().resolve_schedule_def("nightly_rebuild")
    assert (schedule.job_name, schedule.cron_schedule, schedule.execution_timezone) == (
        "full_pipeline",
        "0 2 * * *",
        "UTC",
    )
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    tick = schedule.evaluate_tick(dg.build_schedule_context(instance=good.instance))
    assert len(tick.run_requests or []) == 1


def test_each_bundle_is_verified_replayed_and_backtested_before_the_next_variant_trains(good: Good) -> None:
    """Step start order of the first run: train A, check A, replay/backtest A (and replay A's check), then
    train B, ... (step priorities), not every variant trained before the first verification."""
    order = [e.step_key for e in good.built.result.all_events if e.event_type_value == "STEP_START"]
    trained = [k.removeprefix("bundle_") for k in order if k.startswith("bundle_") and k.count("bundle_verified") == 0]
    assert sorted(trained) == sorted(VARIANTS)
    for this, following in zip(trained, trained[1:], strict=False):
        own = [f"bundle_{this}_{CHECK_NAME}", f"replay_{this}", f"backtest_{this}", f"replay_{this}_train_serve_parity"]
        assert max(order.index(k) for k in own) < order.index(f"bundle_{following}"), order
    assert order.index(f"bundle_{trained[0]}_{CHECK_NAME}") == order.index(f"bundle_{trained[0]}") + 1


def test_metadata_of_the_full_run_is_rounded_for_reading(good: Good) -> None:
    from sentinel_pipeline_tests.test_presentation import long_floats_of_run

    result = good.built.result
    assert long_floats_of_run(result) == []


# -- 2. nightly rerun: reuse when nothing changed, rebuild when the raw data did --------------------


def test_nightly_rerun_reuses_everything_then_rebuilds_after_raw_data_change(good: Good) -> None:
    """Unchanged raw data: every stage reused, nothing retrained; a new symbol: everything rebuilt."""
    home, instance = good.home, good.instance
    first = {v: bundle_of(good.built.result, v) for v in VARIANTS}
    dirs_before = sorted(p.name for p in home.models_dir.iterdir())
    metrics_before = {v: (first[v] / "metrics.json").read_bytes() for v in VARIANTS}

    t0 = time.perf_counter()
    rerun = home.run(instance)
    rerun_seconds = time.perf_counter() - t0
    print(
        f"\n[timing] second full_pipeline run, raw data unchanged: {rerun_seconds:.1f}s "
        f"(first run {good.built.seconds:.1f}s)"
    )
    assert rerun.success, step_failures(rerun)
    mats = materializations(rerun)
    assert {a: mats[a]["reused"] for a in DATA_STAGES} == dict.fromkeys(DATA_STAGES, True)
    for variant in VARIANTS:
        md = mats[f"bundle_{variant}"]
        assert md["already_complete"] is True, f"{variant} was retrained"
        # a complete run with its bundle on disk is reported without starting the training process
        assert md["training_process"] == "not started (run reused)" and "training_pid" not in md
        assert Path(md["bundle_path"]) == first[variant]
        assert (first[variant] / "metrics.json").read_bytes() == metrics_before[variant]
        assert mats[f"replay_{variant}"]["bundle"] == first[variant].name
    assert sorted(p.name for p in home.models_dir.iterdir()) == dirs_before
    assert all(e.passed for e in check_evaluations(rerun).values())

    # new raw data: the user takes the default market as their own raw data (the landing zone was
    # empty: the synthetic default lives in its own folder) and one more symbol lands beside it
    (default,) = home.paths.synthetic_dir.glob("synthetic_market-*.parquet")
    home.paths.raw_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(default, home.paths.raw_dir / "market.parquet")
    other = generate_synthetic_market(
        SyntheticMarketConfig(seed=11, n_symbols=20, n_days=60, signal_strength=0.3)
    )
    new = other[other["symbol"] == other["symbol"].iloc[0]].assign(symbol="ZNEW").reset_index(drop=True)
    new.to_parquet(home.paths.raw_dir / "zz_new_symbol.parquet", index=False)

    rebuild = home.run(instance)
    assert rebuild.success, step_failures(rebuild)
    mats = materializations(rebuild)
    assert {a: mats[a]["reused"] for a in DATA_STAGES} == dict.fromkeys(DATA_STAGES, False)
    assert mats["raw_bars"]["symbols"] == SMALL_MARKET["synthetic_n_symbols"] + 1
    for variant in VARIANTS:
        md = mats[f"bundle_{variant}"]
        bundle = Path(md["bundle_path"])
        assert md["already_complete"] is False and bundle != first[variant] and bundle.is_dir()
        assert "training_process" not in md and md["training_pid"] != os.getpid()  # retrained, out of process
        assert home.bundles(variant) == [bundle, first[variant]]
        replay = mats[f"replay_{variant}"]
        assert (replay["bundle"], replay["previous_bundle"]) == (bundle.name, first[variant].name)
        report = json.loads((records_dir(bundle) / "replay_report.json").read_text())
        assert Path(report["current"]["info"]["bundle"]) == bundle
        assert Path(report["previous"]["info"]["bundle"]) == first[variant]
    assert all(e.passed for e in check_evaluations(rebuild).values())


# -- 3. replay never runs on a bundle whose latest verification did not pass ------------------------


def test_failing_blocking_check_keeps_replay_out_of_the_same_run(good: Good, tmp_path: Path) -> None:
    """Bundle, its check and its replay in one run: the check fails (impossible gates), no replay step."""
    variant = "mlp_two_head"
    bundle = bundle_of(good.built.result, variant)
    report_before = (records_dir(bundle) / "replay_report.json").read_bytes()
    result = good.home.run(
        good.instance,
        gates_file=impossible_gates(tmp_path / "gates.json"),
        selection=[bundle_asset_key(variant), replay_asset_key(variant)],
    )
    assert not result.success
    steps = started_steps(result)
    assert f"bundle_{variant}" in steps and f"bundle_{variant}_{CHECK_NAME}" in steps
    assert f"replay_{variant}" not in steps
    assert f"replay_{variant}" not in materializations(result)
    evaluation = check_evaluations(result)[f"bundle_{variant}:{CHECK_NAME}"]
    assert not evaluation.passed and "quality_gates" in (evaluation.description or "")
    assert raw_metadata(evaluation.metadata)["failed_checks"] == "quality_gates"
    assert (records_dir(bundle) / "replay_report.json").read_bytes() == report_before
    assert json.loads((records_dir(bundle) / "verification.json").read_text())["passed"] is False


def test_replay_refuses_bundles_that_fail_reverification_after_tampering(good: Good, tmp_path: Path) -> None:
    """Three tamperings, one per variant: checks_only names the failing check, replay alone refuses."""
    home, instance = good.home, good.instance
    bundles = {v: bundle_of(good.built.result, v) for v in VARIANTS}
    expected = {
        "mlp_two_head": flip_byte(bundles["mlp_two_head"]),
        "seq_ctx_fusion": swap_scaler(bundles["seq_ctx_fusion"]),
        "transformer_tbm": swap_contract(bundles["transformer_tbm"], tmp_path / "other_contract"),
    }
    reports_before = {v: (records_dir(b) / "replay_report.json").read_bytes() for v, b in bundles.items()}

    checks = home.run(instance, "checks_only")
    evaluations = check_evaluations(checks)
    for variant, inner in expected.items():
        evaluation = evaluations[f"bundle_{variant}:{CHECK_NAME}"]
        failed = raw_metadata(evaluation.metadata)["failed_checks"].split(", ")
        assert not evaluation.passed and failed[0] == inner, (variant, failed)
        assert inner in (evaluation.description or "")
    others = [e for k, e in evaluations.items() if not k.endswith(CHECK_NAME)]
    assert others and all(e.passed for e in others)  # only the bundle checks fail

    replay = home.run(instance, selection=[replay_asset_key(v) for v in VARIANTS])
    assert not replay.success
    failures = step_failures(replay)
    assert set(failures) == {f"replay_{v}" for v in VARIANTS}
    for variant, inner in expected.items():
        message = failures[f"replay_{variant}"]
        assert "refused" in message and f"'{CHECK_NAME}'" in message and inner in message, message
        assert (records_dir(bundles[variant]) / "replay_report.json").read_bytes() == reports_before[variant]
    assert materializations(replay) == {}


def test_replay_refuses_a_bundle_changed_after_its_verification_passed(good: Good) -> None:
    """No re-verification: the Dagster record still says "passed". The manifest digest that passing
    evaluation recorded is the anchor, not a file in the bundle: a tampered bundle re-signed with the
    trusted key and given a forged verification record that "passed" is still refused."""
    home, instance = good.home, good.instance
    bundles = {v: bundle_of(good.built.result, v) for v in VARIANTS}
    swap_scaler(bundles["mlp_two_head"])  # manifest rewritten ...
    resign(bundles["mlp_two_head"])  # ... and validly signed: only the event log's digest tells
    forged = json.loads((records_dir(bundles["mlp_two_head"]) / "verification.json").read_text())
    forged["manifest_digest"] = manifest_sha256(bundles["mlp_two_head"])
    write_record(bundles["mlp_two_head"], "verification.json", json.dumps(forged).encode())
    flip_byte(bundles["seq_ctx_fusion"])  # manifest kept: a file no longer matches it
    result = home.run(instance, selection=[replay_asset_key(v) for v in VARIANTS])
    failures = step_failures(result)
    assert set(failures) == {"replay_mlp_two_head", "replay_seq_ctx_fusion"}
    assert "is not the manifest that passed verification" in failures["replay_mlp_two_head"]
    assert "Dagster event log" in failures["replay_mlp_two_head"]
    assert "refused" in failures["replay_seq_ctx_fusion"] and "model_best.pt: sha256" in failures["replay_seq_ctx_fusion"]
    # the untouched bundle still replays in the same run
    assert set(materializations(result)) == {"replay_transformer_tbm"}


def test_each_verified_bundle_is_packaged_and_a_changed_or_failing_one_is_not(good: Good, tmp_path: Path) -> None:
    """model_final_<variant>: the archive beside each verified bundle, with its metadata; packaging alone
    refuses a bundle changed after its verification passed (the event log's manifest digest is the
    anchor, as for replay); a failing blocking check keeps packaging out of the same run."""
    home, instance = good.home, good.instance
    mats = materializations(good.built.result)
    bundles = {v: bundle_of(good.built.result, v) for v in VARIANTS}
    for variant, bundle in bundles.items():
        md = mats[f"model_final_{variant}"]
        archive = Path(md["path"])
        assert archive == default_archive_path(bundle) and archive.name == "model_final.zip"
        assert sha256_regular(archive) == (md["sha256"], md["size_bytes"])
        members = inspect_archive(archive)
        assert md["members"] == len(members) and members[:2] == ["manifest.json", "manifest.sig"]
        assert md["manifest_sha256"] == manifest_sha256(bundle) and md["bundle"] == bundle.name
    before = {v: default_archive_path(b).read_bytes() for v, b in bundles.items()}

    flip_byte(bundles["mlp_two_head"])  # a file no longer matches the manifest
    swap_scaler(bundles["seq_ctx_fusion"])  # manifest rewritten ...
    resign(bundles["seq_ctx_fusion"])  # ... and validly signed: only the event log's digest tells
    result = home.run(instance, selection=[package_asset_key(v) for v in VARIANTS])
    failures = step_failures(result)
    assert set(failures) == {"model_final_mlp_two_head", "model_final_seq_ctx_fusion"}
    assert "refused" in failures["model_final_mlp_two_head"]
    assert "model_best.pt: sha256" in failures["model_final_mlp_two_head"]
    assert "is not the verified manifest" in failures["model_final_seq_ctx_fusion"]
    assert set(materializations(result)) == {"model_final_transformer_tbm"}
    assert {v: default_archive_path(b).read_bytes() for v, b in bundles.items()} == before  # same bytes again

    variant = "transformer_tbm"
    failing = home.run(instance, gates_file=impossible_gates(tmp_path / "gates.json"),
                       selection=[bundle_asset_key(variant), package_asset_key(variant)])
    assert not failing.success
    assert f"bundle_{variant}_{CHECK_NAME}" in started_steps(failing)
    assert f"model_final_{variant}" not in started_steps(failing)


def test_planted_pickles_run_nothing_through_the_bundle_check_and_replay(good: Good, tmp_path: Path) -> None:
    """The issue's attack through Dagster: malicious pickles in place of the joblib scalers and of every
    record, the manifest recomputed (and the scaler digests in the metadata updated). Unsigned: the
    check refuses at the signature and replay does not run. Re-signed with the trusted key (the worst
    case): the check and replay read the whole bundle, pass, and still run nothing."""
    home, instance = good.home, good.instance
    variant = "mlp_two_head"
    bundle = bundle_of(good.built.result, variant)
    marker = tmp_path / "pwned"
    plant_pickles_in_scalers_and_records(bundle, marker)
    selection = [bundle_asset_key(variant), replay_asset_key(variant)]

    forged = home.run(instance, selection=selection)
    evaluation = check_evaluations(forged)[f"bundle_{variant}:{CHECK_NAME}"]
    assert not evaluation.passed and raw_metadata(evaluation.metadata)["failed_checks"].startswith("signature")
    assert f"replay_{variant}" not in started_steps(forged)
    assert not marker.exists()
    replay_alone = home.run(instance, selection=[replay_asset_key(variant)])
    assert f"replay_{variant}" in step_failures(replay_alone) and not marker.exists()

    resign(bundle)
    signed = home.run(instance, selection=selection)
    evaluation = check_evaluations(signed)[f"bundle_{variant}:{CHECK_NAME}"]
    assert evaluation.passed, raw_metadata(evaluation.metadata)
    assert f"replay_{variant}" in materializations(signed)  # replay loaded the bundle and ran
    assert not marker.exists()


def test_automation_requests_replay_only_once_the_new_bundle_passed_its_blocking_check(
    good: Good, tmp_path: Path
) -> None:
    """eager() & all_deps_blocking_checks_passed(): no request while the new bundle is unverified or
    failed its check, one request once the check passed."""
    home, instance = good.home, good.instance
    defs = home.defs()
    replays = [replay_asset_key(v) for v in VARIANTS]
    variant = "mlp_two_head"

    def tick(cursor: object) -> dg.EvaluateAutomationConditionsResult:
        return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)

    def requested(result: dg.EvaluateAutomationConditionsResult) -> dict[str, int]:
        return {k.to_user_string(): result.get_num_requested(k) for k in replays}

    nothing = dict.fromkeys((k.to_user_string() for k in replays), 0)
    result = tick(None)
    assert requested(result) == nothing  # everything is up to date

    # a new materialisation of the bundle: not verified yet -> no replay
    bundle = bundle_of(good.built.result, variant)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            bundle_asset_key(variant), metadata={"bundle_path": dg.MetadataValue.path(str(bundle))}
        )
    )
    result = tick(result.cursor)
    assert requested(result) == nothing

    # its blocking check fails -> still no replay, although the eager part alone would request it
    failed = home.run(instance, "checks_only", gates_file=impossible_gates(tmp_path / "gates.json"))
    assert not check_evaluations(failed)[f"bundle_{variant}:{CHECK_NAME}"].passed
    result = tick(result.cursor)
    assert requested(result) == nothing
    evaluation = next(r for r in result.results if r.key == replay_asset_key(variant))
    parts = {c.condition.get_label(): c.true_subset.size for c in evaluation.child_results}
    assert parts == {"eager": 1, "all_deps_blocking_checks_passed": 0}

    # the check passes -> replay requested (only the variant with a new bundle), then not again
    passed = home.run(instance, "checks_only")
    assert check_evaluations(passed)[f"bundle_{variant}:{CHECK_NAME}"].passed
    result = tick(result.cursor)
    assert requested(result) == {**nothing, f"replay_{variant}": 1}
    result = tick(result.cursor)
    assert requested(result) == nothing


# -- 4. the CI gate through the dagster CLI ---------------------------------------------------------


def _ci_gate(home: PipelineHome, dagster_home: Path, config: Path) -> tuple[int, int, str, str]:
    """(exit code, CLI pid, output, run id) of ``dagster job execute -j ci_gate`` on ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in ("SENTINEL_RAW_DIR", "SENTINEL_QUALITY_GATES")}
    env.update(
        DAGSTER_HOME=str(dagster_home),
        SENTINEL_DATA_DIR=str(home.data_dir),
        SENTINEL_MODELS_DIR=str(home.models_dir),
        OMP_NUM_THREADS="1",
    )
    command = [DAGSTER_CLI, "job", "execute", "-m", "sentinel_pipeline.definitions", "-j", "ci_gate"]
    proc = subprocess.Popen(
        [*command, "-c", str(config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = proc.communicate(timeout=900)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        run_id = instance.get_runs(limit=1)[0].run_id
    return proc.returncode, proc.pid, output, run_id


def _run_events(dagster_home: Path, run_id: str) -> tuple[dg.DagsterRunStatus, list[dg.EventLogEntry], Any]:
    """Status, event log and stats of a run of the CLI's instance."""
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        return run.status, instance.all_logs(run_id), instance.get_run_stats(run_id)


def test_ci_gate_cli_passes_the_good_pipeline_and_fails_a_tampered_bundle_without_replaying_it(
    good: Good, tmp_path: Path
) -> None:
    """`dagster job execute -j ci_gate`: exit 0 on the good pipeline; a flipped byte in one bundle:
    non-zero exit, its check failed, its replay step never started (the other replays ran)."""
    home = good.home
    # the CLI gets a fresh Dagster instance of its own (like a CI machine), on the good pipeline's data
    dagster_home = tmp_path / "ci_dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(REPO_ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
    config = tmp_path / "ci_gate.yaml"
    config.write_text(yaml.safe_dump(cli_run_config()))

    code, cli_pid, output, run_id = _ci_gate(home, dagster_home, config)
    assert code == 0, output[-5000:]
    status, events, _ = _run_events(dagster_home, run_id)
    assert status == dg.DagsterRunStatus.SUCCESS
    checks = [
        e.dagster_event.event_specific_data
        for e in events
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    graph = home.defs().resolve_asset_graph()
    panel_only = PANEL_ONLY.resolve(graph)
    assert len(checks) == len([k for k in graph.asset_check_keys if k.asset_key not in panel_only])
    assert all(c.passed for c in checks), [(c.asset_key.to_user_string(), c.check_name, c.metadata)
                                           for c in checks if not c.passed]
    for e in events:  # the data and the training runs are reused as they are: no training process
        mat = e.asset_materialization
        if mat is not None and mat.asset_key.to_user_string().startswith("bundle_"):
            md = raw_metadata(mat.metadata)
            assert md["already_complete"] is True
            assert md["training_process"] == "not started (run reused)"

    variant = "seq_ctx_fusion"
    flip_byte(home.bundles(variant)[0])
    code, _, output, run_id = _ci_gate(home, dagster_home, config)
    assert code != 0, output[-5000:]
    status, events, stats = _run_events(dagster_home, run_id)
    assert status == dg.DagsterRunStatus.FAILURE and stats.steps_failed >= 1
    dagster_events = [e.dagster_event for e in events if e.dagster_event is not None]
    evaluations = {
        (ev.event_specific_data.asset_key.to_user_string(), ev.event_specific_data.passed)
        for ev in dagster_events
        if ev.event_type_value == "ASSET_CHECK_EVALUATION" and ev.event_specific_data.check_name == CHECK_NAME
    }
    assert evaluations == {(f"bundle_{v}", v != variant) for v in VARIANTS}
    started = {ev.step_key for ev in dagster_events if ev.event_type_value == "STEP_START"}
    assert f"replay_{variant}" not in started
    assert {f"replay_{v}" for v in VARIANTS if v != variant} <= started  # the rest of the graph ran


# -- 5. two runs at once ----------------------------------------------------------------------------


def test_two_concurrent_data_half_runs_do_not_corrupt_each_other(built: Built, tmp_path: Path) -> None:
    """Two processes materialise the data half into one directory at the same moment."""
    data_dir = tmp_path / "shared" / "data"
    go = tmp_path / "go"
    procs, outs, readies = [], [], []
    for i in range(2):
        outs.append(tmp_path / f"run{i}.json")
        readies.append(tmp_path / f"ready{i}")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    DATA_HALF_WORKER,
                    str(data_dir),
                    str(outs[i]),
                    str(readies[i]),
                    str(go),
                    json.dumps(SMALL_MARKET),
                ],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + 300
        while not all(r.exists() for r in readies):  # both imported: start them at the same moment
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
                "a worker did not start"
            )
            time.sleep(0.05)
        go.touch()
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    reused = [json.loads(o.read_text()) for o in outs]
    assert set(reused[0]) == set(reused[1]) == set(DATA_STAGES)
    # the stage lock: every stage was built by exactly one of the two runs, the other reused it
    built_by = {stage: [not r[stage] for r in reused] for stage in DATA_STAGES}
    assert all(sum(flags) == 1 for flags in built_by.values()), built_by

    # the outputs equal a single run's (the module's good pipeline, same settings): same fingerprints,
    # same bytes (JSON reports up to the instance's directory, which they name), same HDF5 content
    # checksums; and no temp file is left behind
    shared, single = PipelineHome(data_dir.parent), PipelineHome(built.snapshot)
    for name in ("raw_bars_dir", "features_dir", "hdf5_dir", "scalers_dir", "arrow_dir"):
        _assert_same_stage(
            getattr(shared.paths, name), getattr(single.paths, name), shared.root, built.home.root
        )
    for name in ("labels", "split_assignment"):
        _assert_same_stage(
            getattr(shared.paths, name).parent,
            getattr(single.paths, name).parent,
            shared.root,
            built.home.root,
        )
    for split in SPLITS:
        with h5py.File(shared.paths.h5(split), "r") as f, h5py.File(single.paths.h5(split), "r") as g:
            assert f.attrs["content_checksum"] == g.attrs["content_checksum"]
    assert leftover_temp_files(shared.root) == []


def _assert_same_stage(mine: Path, reference: Path, my_root: Path, reference_root: Path) -> None:
    """Same fingerprint, same outputs; a file whose bytes differ may differ only in the instance
    directory it names (JSON reports, the Arrow cache's ``source_path``)."""
    a, b = read_record(mine), read_record(reference)
    assert a is not None and b is not None, mine
    assert a["fingerprint"] == b["fingerprint"] and set(a["outputs"]) == set(b["outputs"]), mine
    for name, digest in a["outputs"].items():
        if digest == b["outputs"][name]:
            continue
        if name.endswith(".json"):
            text = (mine / name).read_text().replace(str(my_root), "<root>")
            assert text == (reference / name).read_text().replace(str(reference_root), "<root>"), mine / name
        elif name.endswith(".arrow"):
            assert _arrow(mine / name, my_root) == _arrow(reference / name, reference_root), mine / name
        else:
            raise AssertionError(f"{mine / name} differs from the single run's {reference / name}")
    assert (mine / ".pipeline.lock").exists()  # built under the stage lock


def _arrow(path: Path, root: Path) -> tuple[bytes, dict[bytes, bytes]]:
    """An Arrow IPC file's data (re-serialised without schema metadata; bytes, so NaN equals NaN) and
    its schema metadata with ``root`` masked."""
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    metadata = {k: v.replace(str(root).encode(), b"<root>") for k, v in (table.schema.metadata or {}).items()}
    table = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes(), metadata


# -- 6. training out of process -----------------------------------------------------------------------


def test_training_runs_in_a_pipes_subprocess_not_in_the_step_process(good: Good) -> None:
    """Each training step launched its own process (its pid differs from the step's) and talked back
    through Dagster Pipes."""
    result = good.built.result
    step_pids = {e.step_key: e.pid for e in result.all_events if e.event_type_value == "STEP_START"}
    mats = materializations(result)
    pids = set()
    for variant in VARIANTS:
        step = f"bundle_{variant}"
        assert step_pids[step] == os.getpid()  # in-process execution: the step runs in this process
        training_pid = mats[step]["training_pid"]
        assert isinstance(training_pid, int) and training_pid != step_pids[step]
        pids.add(training_pid)
        # the subprocess talked back through Pipes: its log lines are in the step's event log
        logs = [r.user_message for r in good.instance.all_logs(result.run_id) if r.step_key == step]
        assert any(f"training {variant} in " in m for m in logs), logs
    assert len(pids) == len(VARIANTS)  # one process per training
