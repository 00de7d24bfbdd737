"""HDF5 splits: row selection (own bars + warm-up), sample ends, round trip, checksum, hash refusal."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.feature_contract import ContractError
from sentinel_pipeline.data.hdf5_splits import (
    SplitFileError,
    build_split_arrays,
    read_split,
    split_summary,
    write_splits,
)
from sentinel_pipeline.data.scalers import fit_scalers
from sentinel_pipeline.data.split_arrays import ARRAY_DTYPES, TARGET_NAMES, SplitArrays, content_checksum
from sentinel_pipeline.paths import SPLITS
from sentinel_pipeline_tests.dataset_factory import LABEL_PARAMS, make_labelled_dataset

SEQ_LEN = 8


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    dataset, assignment, contract = make_labelled_dataset(n_symbols=4, n_bars=300, seq_len=SEQ_LEN, seed=3)
    scalers = fit_scalers(dataset, assignment, contract)
    out = tmp_path_factory.mktemp("h5")
    paths = write_splits(dataset, assignment, contract, scalers, LABEL_PARAMS, out)
    read = {s: read_split(p, contract.hash) for s, p in paths.items()}
    return dataset, assignment, contract, scalers, paths, read


def _source_rows(arrays: SplitArrays, dataset: pd.DataFrame) -> np.ndarray:
    """Dataset row index of every file row, found by (symbol, timestamp)."""
    key = pd.MultiIndex.from_arrays(
        [dataset["symbol"].astype(str).to_numpy(), dataset["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64")]
    )
    file_key = pd.MultiIndex.from_arrays([np.asarray(arrays.symbols)[arrays.symbol_idx], arrays.timestamp])
    rows = key.get_indexer(file_key)
    assert (rows >= 0).all(), "file row not found in the dataset"
    return rows


def _expected_rows(dataset: pd.DataFrame, assignment: pd.DataFrame, split: str) -> np.ndarray:
    """Split bars + per symbol the SEQ_LEN-1 previous bars, computed with pandas (independent of the writer)."""
    pos = dataset.groupby("symbol").cumcount().to_numpy()
    in_split = (assignment["split"] == split).to_numpy()
    first = pd.Series(np.where(in_split, pos, np.iinfo(np.int64).max)).groupby(dataset["symbol"].to_numpy()).transform("min")
    warm = (pos < first.to_numpy()) & (pos >= first.to_numpy() - (SEQ_LEN - 1))
    return np.flatnonzero(in_split | warm)


def test_rows_are_split_bars_plus_warmup(written):
    dataset, assignment, _, _, _, read = written
    for split in SPLITS:
        rows = _source_rows(read[split], dataset)
        np.testing.assert_array_equal(rows, _expected_rows(dataset, assignment, split))


def test_warmup_rows_precede_the_split_and_no_future_rows(written):
    dataset, assignment, _, _, _, read = written
    split_order = {s: i for i, s in enumerate(SPLITS)}
    for split in ("val", "test"):
        arrays = read[split]
        rows = _source_rows(arrays, dataset)
        row_split = assignment["split"].to_numpy()[rows]
        warm = row_split != split
        assert warm.sum() == arrays.attrs["n_warmup_rows"] > 0
        # warm-up rows come from an earlier split, never a later one
        assert all(split_order[s] < split_order[split] for s in set(row_split[warm]))
        for code in np.unique(arrays.symbol_idx):
            sym = arrays.symbol_idx == code
            n_warm = int((warm & sym).sum())
            assert 0 < n_warm <= SEQ_LEN - 1
            # warm-up rows are the first rows of the symbol and strictly earlier in time
            assert warm[sym][:n_warm].all() and not warm[sym][n_warm:].any()
            assert arrays.timestamp[sym][:n_warm].max() < arrays.timestamp[sym][n_warm:].min()
        own_ts = dataset["timestamp"][(assignment["split"] == split).to_numpy()]
        assert arrays.timestamp.max() == own_ts.max().value
        assert arrays.attrs["time_max"] == own_ts.max().isoformat()


def test_sample_windows_stay_in_one_symbol_with_valid_features(written):
    dataset, assignment, _, _, _, read = written
    valid = dataset["feature_valid"].to_numpy()
    sample_ok = assignment["sample_ok"].to_numpy()
    n_ends = 0
    for split in SPLITS:
        arrays = read[split]
        rows = _source_rows(arrays, dataset)
        ends = arrays.sample_end_rows
        assert ends.size > 0
        n_ends += ends.size
        windows = ends[:, None] + np.arange(-SEQ_LEN + 1, 1)[None, :]
        assert windows.min() >= 0
        assert (arrays.symbol_idx[windows] == arrays.symbol_idx[ends][:, None]).all()
        assert valid[rows[windows]].all()
        # windows are consecutive bars of the dataset
        assert (np.diff(rows[windows], axis=1) == 1).all()
        assert sample_ok[rows[ends]].all()
        assert (assignment["split"].to_numpy()[rows[ends]] == split).all()
        assert np.isfinite(arrays.targets[ends]).all()
    # the rule is not vacuous: some sample_ok rows are dropped because an invalid bar is in their window
    assert n_ends < int(sample_ok.sum())


def test_sample_ends_are_exactly_the_eligible_rows(written):
    dataset, assignment, _, _, _, read = written
    codes = pd.factorize(dataset["symbol"])[0]
    valid = dataset["feature_valid"].to_numpy()
    ok = assignment["sample_ok"].to_numpy()
    # brute force over a rolling window: all valid and one symbol
    valid_run = pd.Series(valid.astype(int)).groupby(codes).rolling(SEQ_LEN).sum().to_numpy()
    eligible = ok & (valid_run == SEQ_LEN)
    for split in SPLITS:
        rows = _source_rows(read[split], dataset)
        expect = np.flatnonzero(eligible & (assignment["split"] == split).to_numpy())
        np.testing.assert_array_equal(rows[read[split].sample_end_rows], expect)


def test_values_scaled_types_and_metadata(written):
    dataset, _, contract, scalers, paths, read = written
    symbols = sorted(dataset["symbol"].unique())
    for split in SPLITS:
        arrays = read[split]
        for name, dtype in ARRAY_DTYPES.items():
            assert getattr(arrays, name).dtype == np.dtype(dtype)
        assert arrays.symbols == symbols
        assert arrays.target_names == list(TARGET_NAMES)
        assert arrays.feature_names["seq"] == contract.names("seq")
        assert arrays.seq_len == SEQ_LEN and arrays.label_params == LABEL_PARAMS
        assert arrays.feature_contract_hash == contract.hash
        for name in ("seq", "snap", "ctx_cat", "ctx_cont"):
            assert np.isfinite(getattr(arrays, name)).all()
        assert np.abs(arrays.seq).max() <= scalers.info["clip"]
        rows = _source_rows(arrays, dataset)
        valid = dataset["feature_valid"].to_numpy()[rows]
        raw = dataset.loc[rows[valid], contract.names("seq")].to_numpy()
        np.testing.assert_allclose(arrays.seq[valid], scalers.seq.transform(raw), rtol=1e-6)
        np.testing.assert_array_equal(arrays.ctx_cont[valid], dataset.loc[rows[valid], contract.names("ctx_cont")].to_numpy())
        np.testing.assert_array_equal(arrays.tb_label, dataset["tb_label"].to_numpy()[rows])
        np.testing.assert_array_equal(
            arrays.targets, dataset.loc[rows, list(TARGET_NAMES)].to_numpy(dtype=np.float32)
        )
        with h5py.File(paths[split], "r") as f:
            assert f.attrs["split"] == split and int(f.attrs["n_samples"]) == arrays.n_samples


def test_round_trip_and_checksum_stable(written, tmp_path):
    dataset, assignment, contract, scalers, paths, read = written
    built = build_split_arrays(dataset, assignment, contract, scalers, LABEL_PARAMS)
    again = write_splits(dataset, assignment, contract, scalers, LABEL_PARAMS, tmp_path)
    for split in SPLITS:
        for name in ARRAY_DTYPES:
            np.testing.assert_array_equal(getattr(read[split], name), getattr(built[split], name))
        stored = read[split].attrs["content_checksum"]
        assert stored == content_checksum(read[split].arrays()) == content_checksum(built[split].arrays())
        assert read_split(again[split], verify_checksum=True).attrs["content_checksum"] == stored
    # different data -> different checksum
    assert len({read[s].attrs["content_checksum"] for s in SPLITS}) == 3


def test_wrong_hash_refused(written):
    _, _, contract, _, paths, _ = written
    with pytest.raises(ContractError) as exc:
        read_split(paths["val"], expected_hash="0123456789abcdef")
    msg = str(exc.value)
    assert str(paths["val"]) in msg and "0123456789abcdef" in msg and contract.hash in msg


def test_foreign_and_corrupt_files_refused(written, tmp_path):
    _, _, _, _, paths, _ = written
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["seq"] = np.zeros((3, 2), np.float32)
    with pytest.raises(SplitFileError, match="missing attributes"):
        read_split(foreign)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(SplitFileError, match="not a readable HDF5"):
        read_split(text)
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(paths["test"].read_bytes())
    with h5py.File(tampered, "r+") as f:
        f["seq"][0, 0] += 1.0
    with pytest.raises(SplitFileError, match="content checksum"):
        read_split(tampered, verify_checksum=True)


def test_split_summary(written):
    _, _, contract, _, paths, read = written
    summary = split_summary(paths["train"])
    arrays = read["train"]
    labels = arrays.tb_label[arrays.sample_end_rows]
    assert summary["n_rows"] == arrays.n_rows and summary["n_samples"] == arrays.n_samples
    assert summary["label_balance"] == {str(k): int((labels == k).sum()) for k in (-1, 0, 1)}
    assert sum(summary["label_balance"].values()) == arrays.n_samples
    assert summary["file_size_bytes"] == Path(paths["train"]).stat().st_size
    assert summary["feature_contract_hash"] == contract.hash
    assert summary["time_min"] < summary["time_max"]


def test_zero_width_groups_context_off(tmp_path):
    dataset, assignment, contract = make_labelled_dataset(n_symbols=3, n_bars=120, seq_len=4, context=False, n_snap=0)
    scalers = fit_scalers(dataset, assignment, contract)
    paths = write_splits(dataset, assignment, contract, scalers, LABEL_PARAMS, tmp_path)
    arrays = read_split(paths["train"], contract.hash, verify_checksum=True)
    assert arrays.snap.shape == (arrays.n_rows, 0) and arrays.ctx_cat.shape == (arrays.n_rows, 0)
    assert arrays.ctx_cont.dtype == np.float32 and arrays.seq.shape[1] == 5
    assert arrays.n_samples > 0


def test_bad_inputs_rejected(written):
    dataset, assignment, contract, scalers, _, _ = written
    shuffled = dataset.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="not sorted"):
        build_split_arrays(shuffled, assignment, contract, scalers)
    _, _, other = make_labelled_dataset(n_symbols=2, n_bars=60, seq_len=SEQ_LEN + 1)
    with pytest.raises(ContractError, match="scalers were fitted"):
        build_split_arrays(dataset, assignment, other, scalers)
    with pytest.raises(ValueError, match="rows"):
        build_split_arrays(dataset, assignment.iloc[:-1], contract, scalers)
