"""Bundle verification: a good bundle passes, every kind of tampering is caught by the right check,
quality gates follow their thresholds, and ``require_verified`` guards replay."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
import yaml

from sentinel_pipeline.atomic_io import write_json_atomic
from sentinel_pipeline.bundles import (
    BUNDLE_FILES,
    BUNDLE_FORMAT_VERSION,
    RECORD_FILES,
    BundleError,
    build_manifest,
    load_bundle,
    records_dir,
    write_record,
)
from sentinel_pipeline.data.scalers import ClippedRobustScaler
from sentinel_pipeline.training.checkpoints import load_best, save_best
from sentinel_pipeline.training.engine import train
from sentinel_pipeline.training.models import VARIANTS, build_model, resolve_arch
from sentinel_pipeline.verification import (
    CHECK_NAMES,
    DEFAULT_GATES,
    DEFAULT_MIN_DIRECTIONAL_T,
    DEFAULT_MIN_MSE_T,
    RECORD_NAME,
    BundleNotVerifiedError,
    QualityGates,
    VerificationReport,
    load_gates,
    require_verified,
    verify_bundle,
    write_verification_record,
)
from sentinel_pipeline_tests.bundle_tamper import resign
from sentinel_pipeline_tests.dataset_factory import make_contract
from sentinel_pipeline_tests.training_fixtures import (
    GATE_BARS,
    TrainingData,
    make_training_data,
    train_config,
)

VARIANTS_TESTED = ("mlp_two_head", "seq_ctx_fusion")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.0, n_bars=GATE_BARS)


@pytest.fixture(scope="module")
def trained(data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny real bundle per tested variant, trained once for the module (never modified)."""
    out = tmp_path_factory.mktemp("runs")
    bundles = {}
    for variant in VARIANTS_TESTED:
        config = train_config(
            data, out / variant, model=variant, epochs=3, batch_size=64, models_dir=out / "models"
        )
        bundles[variant] = train(config, progress=False).bundle_dir
    return bundles


@pytest.fixture()
def bundle(trained: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the MLP bundle that a test may tamper with."""
    dst = tmp_path / trained["mlp_two_head"].name
    shutil.copytree(trained["mlp_two_head"], dst)
    return dst


def _verify(bundle: Path, data: TrainingData, **kwargs: Any) -> VerificationReport:
    return verify_bundle(bundle, data.hash, val_h5=data.val_h5, **kwargs)


def _rewrite_manifest(bundle: Path) -> None:
    """Make the manifest match the tampered files and re-sign it with the trusted key: the worst case
    (the key holder, or a bug before signing), so that each later check is proven on its own.
    Without the re-signing every one of these is refused by ``signature`` (test_bundle_trust.py)."""
    write_json_atomic(bundle / "manifest.json", build_manifest(bundle))
    resign(bundle)


def _edit_json(bundle: Path, name: str, edit: Any) -> None:
    obj = json.loads((bundle / name).read_text())
    edit(obj)
    (bundle / name).write_text(json.dumps(obj))  # json.dumps writes NaN for float("nan")
    _rewrite_manifest(bundle)


def _assert_caught_by(report: VerificationReport, check: str, *fragments: str) -> None:
    """``check`` failed (naming every fragment), every check before it passed, the report failed."""
    assert not report.passed
    index = CHECK_NAMES.index(check)
    for earlier in CHECK_NAMES[:index]:
        assert report.check(earlier).passed, report.render()
    outcome = report.check(check)
    assert not outcome.passed, report.render()
    for fragment in fragments:
        assert fragment in outcome.detail, outcome.detail


# -- the good bundle ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS_TESTED)
def test_good_bundle_passes_every_check(variant: str, trained: dict[str, Path], data: TrainingData) -> None:
    bundle = trained[variant]
    report = _verify(bundle, data)
    assert report.passed, report.render()
    assert [c.name for c in report.checks] == list(CHECK_NAMES) and report.failed_checks == []
    assert report.manifest_digest == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert report.expected_hash == data.hash and report.verified_at.endswith("Z")
    text = report.render()
    assert "PASSED" in text and all(f"PASS  {name}" in text for name in CHECK_NAMES)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert VerificationReport.from_dict(as_dict) == report
    assert variant in report.check("quality_gates").detail


def test_forward_pass_uses_the_recorded_val_split_without_val_h5(bundle: Path, data: TrainingData) -> None:
    report = verify_bundle(bundle, data.hash)
    assert report.passed, report.render()
    assert "val.h5" in report.check("model_loads").detail


def test_without_val_h5_and_no_recorded_split_model_loads_fails(bundle: Path, data: TrainingData) -> None:
    _edit_json(bundle, "train_config.json", lambda c: c.update(val_h5=str(bundle / "gone" / "val.h5")))
    report = verify_bundle(bundle, data.hash)
    _assert_caught_by(report, "model_loads", "no validation data", "does not exist")


# -- files and manifest ------------------------------------------------------------------------


def test_missing_file_fails_files_present_and_skips_the_rest(bundle: Path, data: TrainingData) -> None:
    (bundle / "loss_curve.png").unlink()
    report = _verify(bundle, data)
    _assert_caught_by(report, "files_present", "loss_curve.png")
    assert report.check("manifest").detail == "skipped: needs files_present"
    assert all(report.check(n).detail.startswith("skipped: needs") for n in CHECK_NAMES[2:])


def test_unexpected_extra_file_fails_files_present(bundle: Path, data: TrainingData) -> None:
    (bundle / "notes.txt").write_text("hello")
    _assert_caught_by(_verify(bundle, data), "files_present", "unexpected", "notes.txt")


def test_records_are_allowed_only_in_their_own_area(bundle: Path, data: TrainingData) -> None:
    for name in RECORD_FILES:
        write_record(bundle, name, b"{}")
    report = _verify(bundle, data)
    assert report.passed, report.render()
    assert "records/" in report.check("files_present").detail


def test_not_a_directory_is_a_failed_check(tmp_path: Path, data: TrainingData) -> None:
    report = _verify(tmp_path / "nope", data)
    assert not report.passed
    for name in ("signature", "files_present"):
        assert "not a directory" in report.check(name).detail or "No such file" in report.check(name).detail
    assert report.manifest_digest is None


def test_one_changed_byte_in_the_weights_fails_the_manifest_before_any_unpickling(
    bundle: Path, data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = bytearray((bundle / "model_best.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (bundle / "model_best.pt").write_bytes(bytes(raw))
    unpickled: list[str] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append("torch") or {})
    monkeypatch.setattr(joblib, "load", lambda *a, **k: unpickled.append("joblib"))
    report = _verify(bundle, data)
    _assert_caught_by(report, "manifest", "model_best.pt", "sha256")
    assert unpickled == []
    assert all(report.check(n).detail.startswith("skipped: needs") for n in CHECK_NAMES[3:])


# -- contract ----------------------------------------------------------------------------------


def test_contract_from_another_feature_set_fails_contract_hash(bundle: Path, data: TrainingData) -> None:
    other = make_contract(data.contract.seq_len, True, 6, 3)
    assert other.hash != data.hash
    other.write(bundle)  # feature_contract.json + feature_schema.txt of the other feature set
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "contract_hash", other.hash, data.hash)


def test_consistent_foreign_contract_fails_on_the_expected_hash(bundle: Path, data: TrainingData) -> None:
    other = make_contract(data.contract.seq_len, True, 6, 3)
    other.write(bundle)
    (bundle / "feature_contract_hash.txt").write_text(other.hash + "\n")
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "contract_hash", f"expected {data.hash}")


def test_wrong_expected_hash_fails_contract_hash(bundle: Path, data: TrainingData) -> None:
    report = verify_bundle(bundle, "0" * 16, val_h5=data.val_h5)
    _assert_caught_by(report, "contract_hash", "expected 0000000000000000")


def test_schema_out_of_order_fails_contract_hash(bundle: Path, data: TrainingData) -> None:
    lines = (bundle / "feature_schema.txt").read_text().splitlines()
    seq = data.contract.names("seq")
    i, j = lines.index(seq[0]), lines.index(seq[1])
    lines[i], lines[j] = lines[j], lines[i]
    (bundle / "feature_schema.txt").write_text("\n".join(lines) + "\n")
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "contract_hash", "feature_schema.txt seq features")


# -- metadata and model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("supports_context_features", True),
        ("ctx_cat_dim", 3),
        ("ctx_cont_dim", 0),
        ("seq_len", 99),
        ("feature_contract_hash", "ffffffffffffffff"),
        ("model_variant", "lstm_magic"),
    ],
)
def test_metadata_disagreeing_fails_metadata_agrees(
    bundle: Path, data: TrainingData, key: str, value: Any
) -> None:
    _edit_json(bundle, "bundle_metadata.json", lambda m: m.update({key: value}))
    _assert_caught_by(_verify(bundle, data), "metadata_agrees", key)


# -- bundle format versions --------------------------------------------------------------------


def test_a_format_1_bundle_still_loads_and_verifies(bundle: Path, data: TrainingData) -> None:
    """A bundle written before model families (no format version, family or batch kind in its metadata)
    is a window-family bundle: it loads and passes every check."""
    _edit_json(bundle, "bundle_metadata.json",
               lambda m: [m.pop(k) for k in ("bundle_format_version", "model_family", "batch_kind")])
    assert "bundle_format_version" not in json.loads((bundle / "bundle_metadata.json").read_text())
    report = _verify(bundle, data)
    assert report.passed, report.render()
    assert "bundle format 1" in report.check("metadata_agrees").detail
    loaded = load_bundle(bundle, expected_hash=data.hash)
    assert (loaded.format_version, loaded.family, loaded.batch_kind) == (1, "window_models", "windows")


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        ({"bundle_format_version": BUNDLE_FORMAT_VERSION + 1},
         (f"bundle format version {BUNDLE_FORMAT_VERSION + 1} is newer", "retrain")),
        ({"bundle_format_version": "2"}, ("bundle_format_version '2' is not a format version",)),
        ({"model_family": "graph_magic"}, ("model family 'graph_magic' is not registered", "FAMILY_MODULES")),
        ({"batch_kind": "days"}, ("batch_kind 'days' is not family 'window_models'",)),
    ],
)
def test_an_unknown_format_or_family_is_refused_naming_the_bundle(
    bundle: Path, data: TrainingData, edit: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    _edit_json(bundle, "bundle_metadata.json", lambda m: m.update(edit))
    _assert_caught_by(_verify(bundle, data), "metadata_agrees", str(bundle), *fragments)
    with pytest.raises(BundleError, match=str(bundle)) as err:
        load_bundle(bundle, expected_hash=data.hash)
    assert all(f in str(err.value) for f in fragments)


def test_unparseable_metadata_is_a_failed_check(bundle: Path, data: TrainingData) -> None:
    (bundle / "bundle_metadata.json").write_text("{not json")
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "metadata_agrees", "bundle_metadata.json", "cannot read JSON")


def _other_arch(data: TrainingData, variant: str, **overrides: Any) -> dict[str, Any]:
    c = data.contract
    return resolve_arch(variant, c.dims(), c.ctx_cat_cardinalities, c.seq_len, overrides)


def test_weights_of_another_variant_under_the_declared_arch_fail_model_loads(
    bundle: Path, data: TrainingData
) -> None:
    """Weights and manifest swapped, the checkpoint still claims the MLP: strict loading catches it."""
    ckpt = load_best(bundle / "model_best.pt")
    foreign = build_model(_other_arch(data, "seq_ctx_fusion")).state_dict()
    save_best(bundle / "model_best.pt", foreign, ckpt["arch"], ckpt["epoch"], ckpt["val_loss"])
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "model_loads", "do not fit", "mlp_two_head")


def test_checkpoint_of_another_variant_fails_metadata_agrees(bundle: Path, data: TrainingData) -> None:
    arch = _other_arch(data, "transformer_tbm")
    ckpt = load_best(bundle / "model_best.pt")
    save_best(bundle / "model_best.pt", build_model(arch).state_dict(), arch, ckpt["epoch"], ckpt["val_loss"])
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "metadata_agrees", "arch variant", "transformer_tbm")


def test_checkpoint_of_another_run_fails_metadata_agrees(bundle: Path, data: TrainingData) -> None:
    """A consistent checkpoint of the same variant but another architecture than the run recorded."""
    arch = _other_arch(data, "mlp_two_head", hidden_dim=32)
    ckpt = load_best(bundle / "model_best.pt")
    save_best(bundle / "model_best.pt", build_model(arch).state_dict(), arch, ckpt["epoch"], ckpt["val_loss"])
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "metadata_agrees", "train_config.json arch")


def test_checkpoint_from_another_epoch_fails_metrics_sane(bundle: Path, data: TrainingData) -> None:
    ckpt = load_best(bundle / "model_best.pt")
    save_best(
        bundle / "model_best.pt",
        ckpt["model_state_dict"],
        ckpt["arch"],
        ckpt["epoch"] + 7,
        ckpt["val_loss"] * 2,
    )
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "metrics_sane", "best_epoch", "best_val_loss")


def test_checkpoint_with_extra_keys_fails(bundle: Path, data: TrainingData) -> None:
    ckpt = load_best(bundle / "model_best.pt")
    torch.save({**ckpt, "optimizer": {}}, bundle / "model_best.pt")
    _rewrite_manifest(bundle)
    _assert_caught_by(_verify(bundle, data), "metadata_agrees", "keys")


# -- scalers -----------------------------------------------------------------------------------


def test_scaler_with_other_dims_fails_scalers_load(bundle: Path, data: TrainingData) -> None:
    info = json.loads((bundle / "scalers.json").read_text())
    width = len(info["center"]["snap"]) + 2
    info["center"]["snap"] += [0.0, 0.0]
    (bundle / "scalers.json").write_text(json.dumps(info))
    _rewrite_manifest(bundle)
    report = _verify(bundle, data)
    _assert_caught_by(report, "scalers_load", "scalers.json", f"{width}/{width - 2} values")


def test_a_planted_joblib_scaler_is_never_unpickled(bundle: Path, data: TrainingData) -> None:
    """The joblib copies are for users: verification rebuilds the scalers from scalers.json."""
    width = len(data.contract.names("snap")) + 2
    swapped = ClippedRobustScaler().fit(np.random.default_rng(0).normal(size=(50, width)))
    joblib.dump(swapped, bundle / "snap_scaler.joblib")
    _rewrite_manifest(bundle)
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    # the only trace: the bundle's file is not the data half's recorded when the bundle was written
    _assert_caught_by(report, "scalers_load", "snap_scaler.joblib", "recorded when the bundle was written")


def test_scalers_of_another_dataset_with_the_same_contract_fail_scalers_load(
    bundle: Path, data: TrainingData
) -> None:
    """The issue's case: centres differing by up to 0.23, same contract, everything rewritten and
    re-signed (and the recorded digests updated): the data half's scalers still tell them apart."""
    info = json.loads((bundle / "scalers.json").read_text())
    info["center"]["seq"] = [c + 0.23 * (i % 2) for i, c in enumerate(info["center"]["seq"])]
    (bundle / "scalers.json").write_text(json.dumps(info))
    digests = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest()
               for n in ("scalers.json", "seq_scaler.joblib", "snap_scaler.joblib")}
    _edit_json(bundle, "bundle_metadata.json", lambda m: m["data_half_scalers"].update(sha256=digests))
    assert _verify(bundle, data).check("scalers_load").passed  # without the pipeline's paths: undetectable here
    report = _verify(bundle, data, scalers_dir=data.scalers_dir)
    _assert_caught_by(report, "scalers_load", "not the data half's", "seq center differs by up to 0.23")


# -- metrics -----------------------------------------------------------------------------------


def test_nan_in_metrics_fails_metrics_sane(bundle: Path, data: TrainingData) -> None:
    _edit_json(
        bundle, "metrics.json", lambda m: m["final_val"]["heads"]["early_move"].update(mse=float("nan"))
    )
    report = _verify(bundle, data)
    _assert_caught_by(report, "metrics_sane", "final_val.heads.early_move.mse")


def test_inf_deep_in_the_history_fails_metrics_sane(bundle: Path, data: TrainingData) -> None:
    _edit_json(
        bundle,
        "metrics.json",
        lambda m: m["history"][-1]["train_head_losses"].update(early_move=float("inf")),
    )
    _assert_caught_by(_verify(bundle, data), "metrics_sane", "history[2].train_head_losses.early_move")


def test_validation_loss_that_never_improved_fails_metrics_sane(bundle: Path, data: TrainingData) -> None:
    """Every epoch's val loss at or above the untrained model's: the run learnt nothing."""
    def flat(m: dict[str, Any]) -> None:
        assert isinstance(m["initial_val_loss"], float)  # the engine records the untrained model's loss
        for h in m["history"]:
            h["val_loss"] = m["initial_val_loss"]

    _edit_json(bundle, "metrics.json", flat)
    _assert_caught_by(_verify(bundle, data), "metrics_sane", "never improved on the untrained model's")


def test_best_first_epoch_below_the_untrained_model_passes_metrics_sane(bundle: Path, data: TrainingData) -> None:
    """A run that learns what it can in its first epoch and then only gets worse is healthy."""
    def first_best(m: dict[str, Any]) -> None:
        first = m["history"][0]["val_loss"] = m["initial_val_loss"] * 0.5
        for k, h in enumerate(m["history"][1:], start=1):
            h["val_loss"] = first * (1 + 0.01 * k)

    _edit_json(bundle, "metrics.json", first_best)
    outcome = _verify(bundle, data).check("metrics_sane")
    assert outcome.passed, outcome.detail
    assert "< untrained model" in outcome.detail


def test_bundle_without_initial_val_loss_falls_back_to_the_first_epoch(bundle: Path, data: TrainingData) -> None:
    """Bundles written before the untrained model was evaluated are judged by the first-epoch rule."""
    def old_flat(m: dict[str, Any]) -> None:
        del m["initial_val_loss"]
        for h in m["history"]:
            h["val_loss"] = m["history"][0]["val_loss"]

    _edit_json(bundle, "metrics.json", old_flat)
    _assert_caught_by(_verify(bundle, data), "metrics_sane", "never improved on the first epoch's")


@pytest.mark.parametrize(("rate", "samples", "rows"), [(0.05, 10, 1000), (1.2, 1200, 1000), (0.0, 0, 1000)])
def test_implausible_eligibility_fails_metrics_sane(
    bundle: Path, data: TrainingData, rate: float, samples: int, rows: int
) -> None:
    _edit_json(bundle, "metrics.json",
               lambda m: m["dataset"]["val"].update(eligibility_rate=rate, samples=samples, rows=rows))
    _assert_caught_by(_verify(bundle, data), "metrics_sane", "val eligibility rate")


def test_a_long_clean_series_near_full_eligibility_passes_metrics_sane(bundle: Path, data: TrainingData) -> None:
    """0.995 eligible is what years of clean bars give; the old ceiling of 0.99 failed every such bundle."""
    _edit_json(bundle, "metrics.json",
               lambda m: m["dataset"]["val"].update(eligibility_rate=0.995, samples=19_900, rows=20_000))
    outcome = _verify(bundle, data).check("metrics_sane")
    assert outcome.passed, outcome.detail


# -- quality gates (statistical, on the gate split) --------------------------------------------


def _gate(report: VerificationReport, name: str) -> dict[str, Any]:
    return next(g for g in report.gate_results if g["name"].startswith(name))


def test_default_gates_cover_every_variant() -> None:
    assert set(DEFAULT_GATES) == set(VARIANTS)
    for name, spec in VARIANTS.items():
        gates = DEFAULT_GATES[name]
        assert gates.min_directional_t == DEFAULT_MIN_DIRECTIONAL_T
        if spec.batch_kind == "days":  # a ranking family: its 5-day head on fwd_ret_5, no MSE gate
            assert (gates.head, gates.horizon, gates.null_quantile, gates.min_mse_t) == ("ret_5", 5, None, None)
        elif spec.classifier:
            assert (gates.null_quantile, gates.min_mse_t, gates.horizon) == (0.95, None, None)
        else:
            assert (gates.null_quantile, gates.min_mse_t, gates.horizon) == (None, DEFAULT_MIN_MSE_T, None)


@pytest.mark.parametrize("variant", VARIANTS_TESTED)
def test_gates_are_scored_on_the_test_split_with_their_evidence(
    variant: str, trained: dict[str, Path], data: TrainingData
) -> None:
    report = _verify(trained[variant], data)
    assert report.passed, report.render()
    assert "test.h5" in report.check("quality_gates").detail
    names = [g["name"] for g in report.gate_results]
    expected = ["directional_skill", "shift_null"] if VARIANTS[variant].classifier else [
        "directional_skill", "mse_skill[early_move]"]
    assert names == expected
    for g in report.gate_results:
        assert g["passed"] and g["n_samples"] > 0 and g["n_windows"] >= DEFAULT_GATES[variant].min_windows
        assert g["value"] is not None and g["bound"] is not None and g["statistic"]
    # the record keeps the evidence
    assert VerificationReport.from_dict(report.to_dict()).gate_results == report.gate_results


def test_gates_never_fall_back_to_the_validation_split(bundle: Path, data: TrainingData, tmp_path: Path) -> None:
    """Without a test split beside the validation split there is no gate, and the check says why."""
    lonely = tmp_path / "val_only"
    lonely.mkdir()
    shutil.copy(data.val_h5, lonely / "val.h5")
    report = verify_bundle(bundle, data.hash, val_h5=lonely / "val.h5")
    _assert_caught_by(report, "quality_gates", "no gate split")
    assert _verify(bundle, data, gate_h5=tmp_path / "missing.h5").check("quality_gates").detail.endswith(
        "does not exist")


def test_regression_gates_pass_and_fail_by_threshold(bundle: Path, data: TrainingData) -> None:
    report = _verify(bundle, data)
    t_dir, t_mse = _gate(report, "directional_skill")["value"], _gate(report, "mse_skill")["value"]
    assert _verify(bundle, data, gates={"mlp_two_head": {"min_directional_t": t_dir - 0.01}}).passed
    _assert_caught_by(_verify(bundle, data, gates={"mlp_two_head": {"min_directional_t": t_dir + 0.01}}),
                      "quality_gates", "FAIL directional_skill", "rank IC")
    _assert_caught_by(_verify(bundle, data, gates={"mlp_two_head": {"min_mse_t": t_mse + 0.01}}),
                      "quality_gates", "FAIL mse_skill[early_move]", "train-mean")


def test_gates_on_another_head(bundle: Path, data: TrainingData) -> None:
    report = _verify(bundle, data, gates=QualityGates(head="tb_return_atr", min_mse_t=1.0))
    assert [g["name"] for g in report.gate_results] == ["directional_skill", "mse_skill[tb_return_atr]"]
    wrong = QualityGates(head="direction", min_mse_t=0.0)
    _assert_caught_by(_verify(bundle, data, gates=wrong), "quality_gates", "needs a regression head")
    misplaced = QualityGates(null_quantile=0.95)
    _assert_caught_by(_verify(bundle, data, gates=misplaced), "quality_gates", "needs a classification head")


def test_classifier_gates_pass_and_fail_by_threshold(trained: dict[str, Path], data: TrainingData) -> None:
    bundle = trained["seq_ctx_fusion"]
    report = _verify(bundle, data)
    shift = _gate(report, "shift_null")
    assert shift["extra"]["accuracy"] > shift["extra"]["null_accuracy_q"]
    assert shift["extra"]["macro_f1"] > shift["extra"]["null_macro_f1_q"]
    t_dir = _gate(report, "directional_skill")["value"]
    _assert_caught_by(_verify(bundle, data, gates={"seq_ctx_fusion": {"min_directional_t": t_dir + 0.01}}),
                      "quality_gates", "FAIL directional_skill")


def test_a_model_that_learned_nothing_fails_the_gates(bundle: Path, data: TrainingData) -> None:
    """The bundle's weights replaced by an untrained model of the same architecture (metadata consistent)."""
    ckpt = load_best(bundle / "model_best.pt")
    torch.manual_seed(123)
    fresh = build_model(ckpt["arch"])
    save_best(bundle / "model_best.pt", fresh.state_dict(), ckpt["arch"], ckpt["epoch"], ckpt["val_loss"])
    _rewrite_manifest(bundle)
    report = _verify(bundle, data)
    # the weights no longer give metrics.json's numbers (caught before the gates) ...
    assert not report.check("metrics_reproduced").passed and "validation loss" in report.check("metrics_reproduced").detail
    # ... and the gates, scored on their own, fail too
    assert "FAIL directional_skill" in report.check("quality_gates").detail
    assert not _gate(report, "directional_skill")["passed"]


def test_too_little_gate_data_is_its_own_failure(bundle: Path, data: TrainingData) -> None:
    report = _verify(bundle, data, gates={"mlp_two_head": {"min_windows": 10_000}})
    _assert_caught_by(report, "quality_gates", "not enough data to decide")
    assert all(g["value"] is None for g in report.gate_results)


def test_gates_are_reported_even_when_metrics_sane_fails(bundle: Path, data: TrainingData) -> None:
    _edit_json(bundle, "metrics.json", lambda m: m["dataset"]["val"].update(eligibility_rate=7.0))
    report = _verify(bundle, data)
    assert not report.passed and not report.check("metrics_sane").passed
    assert report.check("quality_gates").passed and report.gate_results


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_gates_load_from_json_and_yaml(tmp_path: Path, bundle: Path, data: TrainingData, suffix: str) -> None:
    body = {"mlp_two_head": {"min_directional_t": 99.0}, "transformer_tbm": {"null_quantile": None}}
    path = tmp_path / f"gates{suffix}"
    path.write_text(json.dumps(body) if suffix == ".json" else yaml.safe_dump(body))
    gates = load_gates(path)
    assert gates["mlp_two_head"].min_directional_t == 99.0
    assert gates["mlp_two_head"].min_mse_t == DEFAULT_MIN_MSE_T  # untouched fields keep their defaults
    assert gates["transformer_tbm"].null_quantile is None
    assert gates["seq_ctx_fusion"] == DEFAULT_GATES["seq_ctx_fusion"]
    _assert_caught_by(_verify(bundle, data, gates=path), "quality_gates", "directional_skill")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"no_such_variant": {"min_directional_t": 0.1}}, "unknown variants"),
        ({"mlp_two_head": {"min_rank_ic": 0.1}}, "unknown gate fields"),
        ({"mlp_two_head": {"min_directional_t": "high"}}, "finite number"),
        ({"mlp_two_head": {"min_directional_t": math.inf}}, "finite number"),
        ({"seq_ctx_fusion": {"null_quantile": 1.5}}, "null_quantile"),
        ({"mlp_two_head": {"min_windows": 0}}, "min_windows"),
        (["mlp_two_head"], "mapping"),
    ],
)
def test_bad_gates_files_are_refused(tmp_path: Path, body: Any, message: str) -> None:
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ValueError, match=message) as info:
        load_gates(path)
    assert str(path) in str(info.value)


# -- verification records ----------------------------------------------------------------------


def test_require_verified_refuses_an_unverified_bundle(bundle: Path) -> None:
    with pytest.raises(BundleNotVerifiedError, match="has not been verified") as info:
        require_verified(bundle)
    assert bundle.name in str(info.value)


def test_require_verified_accepts_a_verified_bundle(bundle: Path, data: TrainingData) -> None:
    report = _verify(bundle, data)
    path = write_verification_record(bundle, report)
    assert path == records_dir(bundle) / RECORD_NAME
    assert RECORD_NAME not in json.loads((bundle / "manifest.json").read_text())["files"]
    assert RECORD_NAME in json.loads((records_dir(bundle) / "manifest.json").read_text())["files"]
    record = require_verified(bundle, expected_hash=data.hash)
    assert record["passed"] and record["manifest_digest"] == report.manifest_digest
    # the record is a post-release file: the bundle still verifies with it in place
    again = _verify(bundle, data)
    assert again.passed, again.render()
    write_verification_record(bundle, again)
    record = require_verified(bundle)
    assert record["verified_at"] == again.verified_at and len(record["previous"]) == 1
    with pytest.raises(BundleNotVerifiedError, match="verified for feature contract"):
        require_verified(bundle, expected_hash="0" * 16)


def test_require_verified_refuses_a_failed_bundle(bundle: Path, data: TrainingData) -> None:
    _edit_json(bundle, "metrics.json", lambda m: m["history"][0].update(val_loss=float("nan")))
    write_verification_record(bundle, _verify(bundle, data))
    with pytest.raises(BundleNotVerifiedError, match="metrics_sane") as info:
        require_verified(bundle)
    assert bundle.name in str(info.value) and "failed verification" in str(info.value)


def test_require_verified_refuses_a_hand_edited_record(bundle: Path, data: TrainingData) -> None:
    _edit_json(bundle, "metrics.json", lambda m: m["history"][0].update(val_loss=float("nan")))
    write_verification_record(bundle, _verify(bundle, data))
    record = json.loads((records_dir(bundle) / RECORD_NAME).read_text())
    record["passed"] = True
    (records_dir(bundle) / RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(BundleNotVerifiedError, match="records/verification.json: sha256/size differ"):
        require_verified(bundle)  # the records' own manifest no longer matches
    # a forger who also rewrites the records manifest cannot sign the edited record with a trusted key
    write_record(bundle, RECORD_NAME, json.dumps(record).encode())
    with pytest.raises(BundleNotVerifiedError, match="verification.json: the signature does not match"):
        require_verified(bundle)


def test_require_verified_refuses_a_bundle_tampered_after_verification(
    bundle: Path, data: TrainingData
) -> None:
    write_verification_record(bundle, _verify(bundle, data))
    require_verified(bundle)
    raw = bytearray((bundle / "snap_scaler.joblib").read_bytes())
    raw[-3] ^= 0xFF
    (bundle / "snap_scaler.joblib").write_bytes(bytes(raw))
    with pytest.raises(BundleNotVerifiedError, match="refused: snap_scaler.joblib: sha256"):
        require_verified(bundle)
    write_json_atomic(bundle / "manifest.json", build_manifest(bundle))  # covering the tracks, no key
    with pytest.raises(BundleNotVerifiedError, match="signature in manifest.sig does not match"):
        require_verified(bundle)
    _rewrite_manifest(bundle)  # even re-signed with the trusted key, it is not the verified manifest
    with pytest.raises(BundleNotVerifiedError, match="records/manifest.json belongs to bundle manifest"):
        require_verified(bundle)
    # the digest from the Dagster event log is the anchor when given: the record is not consulted
    shutil.rmtree(records_dir(bundle))
    with pytest.raises(BundleNotVerifiedError, match="not the manifest that passed verification"):
        require_verified(bundle, verified_manifest_sha256="0" * 64)


def test_write_verification_record_refuses_a_report_of_another_bundle(
    bundle: Path, trained: dict[str, Path], data: TrainingData
) -> None:
    report = _verify(trained["seq_ctx_fusion"], data)
    with pytest.raises(ValueError, match="not for"):
        write_verification_record(bundle, report)
    assert not (records_dir(bundle) / RECORD_NAME).exists()


def test_bundle_files_are_what_the_bundle_module_writes(bundle: Path) -> None:
    """The bundle files, plus model.onnx (every family of the registry exports)."""
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*BUNDLE_FILES, "model.onnx", "manifest.json",
                                                               "manifest.sig"])
