"""Scalers: fitted on train rows with valid features only, robust + clipped, saved/loaded with hash checks."""

from __future__ import annotations

import json
import os
import pickle

import joblib
import numpy as np
import pytest
from sklearn.preprocessing import RobustScaler

from sentinel_pipeline.data.feature_contract import ContractError
from sentinel_pipeline.data.scalers import (
    ClippedRobustScaler,
    fit_scalers,
    load_scalers,
    robust_parameters,
    save_scalers,
    transform_filled,
)
from sentinel_pipeline_tests.dataset_factory import make_labelled_dataset


@pytest.fixture(scope="module")
def data():
    return make_labelled_dataset(n_symbols=3, n_bars=250, seq_len=6, seed=7)


def _params(fitted):
    return [fitted.seq.center_, fitted.seq.scale_, fitted.snap.center_, fitted.snap.scale_]


def test_fit_uses_train_valid_rows_only(data):
    dataset, assignment, contract = data
    base = fit_scalers(dataset, assignment, contract)
    names = contract.names("seq") + contract.names("snap")
    not_train = (assignment["split"] != "train").to_numpy()
    invalid_train = ~not_train & ~dataset["feature_valid"].to_numpy()
    assert not_train.any() and invalid_train.any()
    changed = dataset.copy()
    changed.loc[not_train, names] = changed.loc[not_train, names] * 1000.0 + 50.0
    changed.loc[invalid_train, names] = 1e6
    again = fit_scalers(changed, assignment, contract)
    for a, b in zip(_params(base), _params(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.info == base.info

    # one train value moved across the whole distribution changes the fit
    train_valid = np.flatnonzero(~not_train & dataset["feature_valid"].to_numpy())
    col = contract.names("seq")[0]
    lowest = train_valid[np.argmin(dataset.loc[train_valid, col].to_numpy())]
    moved = dataset.copy()
    moved.loc[lowest, col] = dataset.loc[train_valid, col].max() * 10
    refit = fit_scalers(moved, assignment, contract)
    assert refit.seq.center_[0] != base.seq.center_[0]
    np.testing.assert_array_equal(refit.seq.center_[1:], base.seq.center_[1:])


def test_parameters_are_train_median_and_iqr(data):
    dataset, assignment, contract = data
    fitted = fit_scalers(dataset, assignment, contract)
    mask = (assignment["split"] == "train").to_numpy() & dataset["feature_valid"].to_numpy()
    X = dataset.loc[mask, contract.names("snap")].to_numpy(dtype=np.float64)
    q25, q50, q75 = np.percentile(X, [25, 50, 75], axis=0)
    np.testing.assert_allclose(fitted.snap.center_, q50)
    np.testing.assert_allclose(fitted.snap.scale_, q75 - q25)
    ts = dataset.loc[mask, "timestamp"]
    assert fitted.info["fit_start"] == ts.min().isoformat() and fitted.info["fit_end"] == ts.max().isoformat()
    assert fitted.info["n_rows"] == int(mask.sum())
    assert fitted.info["feature_contract_hash"] == contract.hash
    assert fitted.info["feature_names"]["seq"] == contract.names("seq")


def test_transform_scales_and_clips(data):
    dataset, assignment, contract = data
    fitted = fit_scalers(dataset, assignment, contract, clip=2.0)
    X = dataset.loc[dataset["feature_valid"], contract.names("seq")].to_numpy()
    out = fitted.seq.transform(X)
    assert out.dtype == np.float32 and out.shape == X.shape
    expected = np.clip((X - fitted.seq.center_) / fitted.seq.scale_, -2.0, 2.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(out).max() == pytest.approx(2.0)  # t-distributed data does reach the clip
    dirty = X[:3].copy()
    dirty[0, 0], dirty[1, 1], dirty[2, 2] = np.nan, np.inf, -np.inf
    filled = transform_filled(fitted.seq, dirty)
    assert np.isfinite(filled).all() and filled[0, 0] == 0 and filled[1, 1] == 0
    np.testing.assert_array_equal(filled[0, 1:], out[0, 1:])


def test_save_load_round_trip(data, tmp_path):
    dataset, assignment, contract = data
    fitted = fit_scalers(dataset, assignment, contract)
    paths = save_scalers(tmp_path, fitted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scalers.json", "seq_scaler.joblib", "snap_scaler.joblib"]
    assert json.loads(paths["info"].read_text())["clip"] == 5.0
    loaded = load_scalers(tmp_path, contract.hash, contract)
    X = dataset[contract.names("snap")].to_numpy()[:50]
    np.testing.assert_array_equal(loaded.snap.transform(X), fitted.snap.transform(X))
    assert loaded.info == json.loads(json.dumps(fitted.info))
    # the joblib file is a plain estimator that unpickles on its own
    assert isinstance(joblib.load(paths["seq"]), ClippedRobustScaler)


def test_load_refuses_wrong_hash_and_dimension(data, tmp_path):
    dataset, assignment, contract = data
    save_scalers(tmp_path, fit_scalers(dataset, assignment, contract))
    with pytest.raises(ContractError) as exc:
        load_scalers(tmp_path, "0000000000000000")
    assert "scalers.json" in str(exc.value) and contract.hash in str(exc.value) and "0000000000000000" in str(exc.value)
    # scalers.json is the source: parameters of another width, or not describing a scaler, are refused
    info = json.loads((tmp_path / "scalers.json").read_text())
    bad = {**info, "center": {**info["center"], "seq": info["center"]["seq"][:2]}}
    (tmp_path / "scalers.json").write_text(json.dumps(bad))
    with pytest.raises(ContractError, match="scalers.json: seq centre/scale have 2/"):
        load_scalers(tmp_path, contract.hash, contract)
    bad = {**info, "scale": {**info["scale"], "snap": [0.0] * len(info["scale"]["snap"])}}
    (tmp_path / "scalers.json").write_text(json.dumps(bad))
    with pytest.raises(ContractError, match="scale > 0"):
        load_scalers(tmp_path, contract.hash, contract)
    renamed = {**info, "feature_names": {**info["feature_names"], "snap": info["feature_names"]["snap"][::-1]}}
    (tmp_path / "scalers.json").write_text(json.dumps(renamed))
    with pytest.raises(ContractError, match="snap features .* differ from contract"):
        load_scalers(tmp_path, contract.hash, contract)


def test_load_never_unpickles_the_joblib_files(data, tmp_path):
    """The joblib files are for users only: a malicious pickle in their place runs nothing on load, and
    the rebuilt scalers equal the fitted ones bit for bit."""
    dataset, assignment, contract = data
    fitted = fit_scalers(dataset, assignment, contract)
    save_scalers(tmp_path, fitted)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("seq_scaler.joblib", "snap_scaler.joblib"):
        (tmp_path / name).write_bytes(pickle.dumps(Payload()))
    loaded = load_scalers(tmp_path, contract.hash, contract)
    assert not marker.exists()
    for group in ("seq", "snap"):
        np.testing.assert_array_equal(loaded.scaler(group).center_, fitted.scaler(group).center_)
        np.testing.assert_array_equal(loaded.scaler(group).scale_, fitted.scaler(group).scale_)
    X = dataset[contract.names("seq")].to_numpy()[:50]
    np.testing.assert_array_equal(loaded.seq.transform(X), fitted.seq.transform(X))


def test_zero_feature_group_is_identity(tmp_path):
    dataset, assignment, contract = make_labelled_dataset(n_symbols=2, n_bars=120, seq_len=4, context=False, n_snap=0)
    fitted = fit_scalers(dataset, assignment, contract)
    out = fitted.snap.transform(np.zeros((7, 0)))
    assert out.shape == (7, 0) and out.dtype == np.float32
    save_scalers(tmp_path, fitted)
    loaded = load_scalers(tmp_path, contract.hash, contract)
    assert loaded.snap.n_features_in_ == 0 and loaded.seq.n_features_in_ == 5


def test_no_train_rows_rejected(data):
    dataset, assignment, contract = data
    no_train = assignment.assign(split="val")
    with pytest.raises(ValueError, match="no train rows"):
        fit_scalers(dataset, no_train, contract)


@pytest.mark.parametrize("n", [1, 2, 599, 600, 601, 602, 1001, 4096, 20001])
@pytest.mark.parametrize("quantile_range", [(25.0, 75.0), (10.0, 90.0), (0.0, 100.0), (33.3, 66.7)])
def test_one_pass_parameters_are_robust_scalers_bit_for_bit(n: int, quantile_range: tuple[float, float]) -> None:
    """``robust_parameters`` (one selection pass per column) equals ``RobustScaler.fit`` exactly: centre and
    scale, on fat tails, ties, constant and near-constant columns, and zeros of both signs."""
    rng = np.random.default_rng(n)
    X = np.column_stack([
        rng.standard_t(3, n), rng.integers(-3, 3, n).astype(float), np.full(n, 2.5), rng.normal(size=n) * 1e-12,
        np.round(rng.normal(size=n), 1), rng.lognormal(size=n), -np.zeros(n), rng.choice([0.0, -0.0, 1e-300], n),
        rng.choice([0.0, -0.0, 1.0, -1.0], n),
    ])
    ref = RobustScaler(quantile_range=quantile_range).fit(X)
    center, scale = robust_parameters(X, quantile_range)
    assert np.array_equal(center, ref.center_) and np.array_equal(np.signbit(center), np.signbit(ref.center_))
    assert np.array_equal(scale, ref.scale_)
    fitted = ClippedRobustScaler(quantile_range=quantile_range).fit(np.asfortranarray(X))
    assert np.array_equal(fitted.center_, ref.center_) and np.array_equal(fitted.scale_, ref.scale_)
