"""Model bundles: contents, manifest, atomic write, tamper refusal before unpickling, listing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sentinel_pipeline import bundles
from sentinel_pipeline.bundles import (
    BUNDLE_FILES,
    BundleError,
    check_manifest,
    list_bundles,
    load_bundle,
    write_bundle,
)
from sentinel_pipeline.data import scalers as scalers_module
from sentinel_pipeline.data.scalers import ClippedRobustScaler
from sentinel_pipeline.training.checkpoints import load_best
from sentinel_pipeline.training.engine import TrainResult, train
from sentinel_pipeline.training.models import build_model, get_variant
from sentinel_pipeline_tests.dataset_factory import LABEL_PARAMS
from sentinel_pipeline_tests.training_fixtures import TrainingData, make_training_data, train_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    return make_training_data(tmp_path_factory.mktemp("data"), signal=1.0)


@pytest.fixture(scope="module")
def run(data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("run")
    return train(train_config(data, out, model="seq_ctx_fusion", limit_samples=128, epochs=1,
                              models_dir=out / "models"), progress=False)


def _write(run: TrainResult, data: TrainingData, models_dir: Path) -> Path:
    return write_bundle(run, models_dir=models_dir, scalers_dir=data.scalers_dir, contract_path=data.contract_path,
                        schema_path=data.schema, label_params=LABEL_PARAMS,
                        data_windows=run.metrics["data_windows"], extra_metadata={"note": "test"})


@pytest.fixture()
def bundle(run: TrainResult, data: TrainingData, tmp_path: Path) -> Path:
    return _write(run, data, tmp_path / "models")


def test_engine_writes_a_bundle_that_loads(run: TrainResult, data: TrainingData) -> None:
    assert run.bundle_dir is not None and run.bundle_dir.parent == run.out_dir / "models"
    loaded = load_bundle(run.bundle_dir, expected_hash=data.hash)
    assert loaded.variant == "seq_ctx_fusion" and not loaded.model.training
    assert loaded.metadata["run_id"] == run.metrics["run_id"]


def test_bundle_contents_and_metadata(bundle: Path, run: TrainResult, data: TrainingData) -> None:
    variant, stamp, contract_hash = bundle.name.split("__")
    assert (variant, contract_hash) == ("seq_ctx_fusion", data.hash)
    assert len(stamp) == 16 and stamp.endswith("Z") and stamp[8] == "T"
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*BUNDLE_FILES, "model.onnx", "manifest.json",
                                                               "manifest.sig"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted([*BUNDLE_FILES, "model.onnx"])
    assert check_manifest(bundle) == []
    assert (bundle / "feature_contract_hash.txt").read_text().strip() == data.hash
    meta = json.loads((bundle / "bundle_metadata.json").read_text())
    assert meta["model_variant"] == "seq_ctx_fusion" and meta["supports_context_features"] is True
    assert (meta["ctx_cat_dim"], meta["ctx_cont_dim"]) == (2, 2)
    assert meta["seq_len"] == data.contract.seq_len and meta["label_params"] == LABEL_PARAMS
    assert set(meta["data_windows"]) == {"train", "val"} and meta["data_windows"]["train"]["start"]
    assert torch.__version__.startswith(meta["library_versions"]["torch"].split("+")[0])
    assert {"numpy", "pandas", "scikit-learn", "dagster"} <= set(meta["library_versions"])
    assert meta["code_version"]["package_version"] and "git_commit" in meta["code_version"]
    assert meta["created_at"].endswith("Z") and meta["note"] == "test"
    # the ONNX export: pinned opset, the variant's input groups with only the batch axis dynamic, every
    # head then the signal as outputs
    onnx = meta["onnx"]
    assert (meta["bundle_format_version"], onnx["status"], onnx["opset"]) == (3, "exported", 18)
    assert [(i["name"], i["dtype"], i["shape"]) for i in onnx["inputs"]] == [
        ("seq", "float32", ["batch", data.contract.seq_len, 5]), ("snap", "float32", ["batch", 3]),
        ("ctx_cat", "int64", ["batch", 2]), ("ctx_cont", "float32", ["batch", 2])]
    assert [o["name"] for o in onnx["outputs"]] == [*(h.name for h in get_variant("seq_ctx_fusion").heads), "signal"]
    assert onnx["exporter"]["onnxscript"] and onnx["exporter"]["exporter"] == "torch.onnx.export(dynamo=True)"
    # the data half's scaler files the bundle was built from, by digest
    recorded = meta["data_half_scalers"]["sha256"]
    assert recorded == {n: bundles.sha256_file(data.scalers_dir / n) for n in bundles.SCALER_FILES}
    assert bundles.check_signature(bundle)  # signed by the (test) training key, which is trusted


def test_loaded_bundle_reproduces_the_checkpoint(bundle: Path, run: TrainResult, data: TrainingData) -> None:
    loaded = load_bundle(bundle, expected_hash=data.hash)
    assert isinstance(loaded.scalers.seq, ClippedRobustScaler) and loaded.feature_contract_hash == data.hash
    ckpt = load_best(run.best_checkpoint)
    reference = build_model(ckpt["arch"])
    reference.load_state_dict(ckpt["model_state_dict"])
    reference.eval()
    g = torch.Generator().manual_seed(0)
    batch = {"seq": torch.randn(5, data.contract.seq_len, 5, generator=g), "snap": torch.randn(5, 3, generator=g),
             "ctx_cat": torch.zeros(5, 2, dtype=torch.int64), "ctx_cont": torch.randn(5, 2, generator=g)}
    with torch.no_grad():
        for name, out in reference(batch).items():
            assert torch.equal(loaded.model(batch)[name], out)
    assert loaded.checkpoint_epoch == ckpt["epoch"] and loaded.schema["seq"] == data.contract.names("seq")


def test_wrong_expected_hash_is_refused(bundle: Path) -> None:
    with pytest.raises(BundleError, match="ffffffffffffffff"):
        load_bundle(bundle, expected_hash="ffffffffffffffff")


def test_one_changed_byte_is_refused_before_anything_is_loaded(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = bundle / "seq_scaler.joblib"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    problems = check_manifest(bundle)
    assert len(problems) == 1 and "seq_scaler.joblib" in problems[0] and "sha256" in problems[0]
    calls: list[object] = []
    monkeypatch.setattr(scalers_module.joblib, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(bundles.torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(BundleError, match="seq_scaler.joblib"):
        load_bundle(bundle)
    assert calls == []


def test_missing_and_unlisted_files_are_reported(bundle: Path) -> None:
    (bundle / "loss_curve.png").unlink()
    (bundle / "extra.bin").write_bytes(b"x")
    problems = check_manifest(bundle)
    assert any("loss_curve.png" in p and "missing" in p for p in problems)
    assert any("extra.bin" in p and "not listed" in p for p in problems)
    (bundle / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in check_manifest(bundle)[0]


def test_crash_mid_write_leaves_nothing_that_looks_like_a_bundle(
    run: TrainResult, data: TrainingData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    real_copy = bundles._copy
    n = {"calls": 0}

    def failing_copy(src: Path, dst: Path) -> None:
        n["calls"] += 1
        if n["calls"] == 4:
            raise OSError("simulated crash")
        real_copy(src, dst)

    monkeypatch.setattr(bundles, "_copy", failing_copy)
    with pytest.raises(OSError, match="simulated crash"):
        _write(run, data, models)
    assert n["calls"] == 4
    assert list(models.iterdir()) == [] and list_bundles(models) == []


def test_refuses_scalers_of_another_contract(run: TrainResult, data: TrainingData, tmp_path: Path) -> None:
    other = make_training_data(tmp_path / "other", n_symbols=4, n_bars=120, context=False)
    assert other.hash != data.hash
    with pytest.raises(BundleError, match="contract"):
        write_bundle(run, models_dir=tmp_path / "m", scalers_dir=other.scalers_dir, contract_path=data.contract_path,
                     schema_path=data.schema, label_params={}, data_windows={})
    with pytest.raises(BundleError, match="contract"):
        write_bundle(run, models_dir=tmp_path / "m", scalers_dir=other.scalers_dir,
                     contract_path=other.contract_path, schema_path=other.schema, label_params={}, data_windows={})
    assert not (tmp_path / "m").exists() or list_bundles(tmp_path / "m") == []


def test_list_bundles_newest_first_ignoring_temp_dirs(bundle: Path, tmp_path: Path) -> None:
    models = bundle.parent
    older = models / "mlp_two_head__20200101T000000Z__abcdef0123456789"
    newer = models / "seq_ctx_fusion__29990101T000000Z__abcdef0123456789"
    for d in (older, newer):
        shutil.copytree(bundle, d)
    (models / ".seq_ctx_fusion__29990101T000000Z__x.tmp-1234").mkdir()
    (models / "seq_ctx_fusion__29990102T000000Z__abcdef0123456789").mkdir()  # no manifest: not a bundle
    assert list_bundles(models) == [newer, bundle, older]
    assert list_bundles(models, variant="mlp_two_head") == [older]
    assert list_bundles(tmp_path / "nowhere") == []


def test_runtime_onnx_loads_the_signed_model_onnx_and_agrees_with_torch(bundle: Path, data: TrainingData) -> None:
    from sentinel_pipeline.deployment.onnx_model import OnnxModel

    torch_side = load_bundle(bundle, expected_hash=data.hash)
    onnx_side = load_bundle(bundle, expected_hash=data.hash, runtime="onnx")
    assert isinstance(onnx_side.model, OnnxModel) and onnx_side.runtime == "onnx" and torch_side.runtime == "torch"
    g = torch.Generator().manual_seed(3)
    batch = {"seq": torch.randn(9, data.contract.seq_len, 5, generator=g), "snap": torch.randn(9, 3, generator=g),
             "ctx_cat": torch.zeros(9, 2, dtype=torch.int64), "ctx_cont": torch.randn(9, 2, generator=g)}
    with torch.no_grad():
        expected = torch_side.model(batch)
    got = onnx_side.model(batch)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_bundle(bundle, expected_hash=data.hash, runtime="tensorrt")


def test_runtime_onnx_refuses_a_model_onnx_swapped_after_signing(bundle: Path, data: TrainingData, tmp_path: Path) -> None:
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    raw = bytearray((copy / "model.onnx").read_bytes())
    raw[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="model.onnx"):
        load_bundle(copy, expected_hash=data.hash, runtime="onnx")
