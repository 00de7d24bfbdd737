"""Arrow cache: exact round trip of the HDF5 split, zero-copy memory mapping, staleness detection."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sentinel_pipeline.data.arrow_cache import build_cache, cache_matches_source, open_split, samples_path_for
from sentinel_pipeline.data.feature_contract import ContractError
from sentinel_pipeline.data.hdf5_splits import SplitFileError, read_split, write_splits
from sentinel_pipeline.data.scalers import fit_scalers
from sentinel_pipeline.data.split_arrays import ARRAY_DTYPES
from sentinel_pipeline.paths import SPLITS, ArtifactPaths, arrow_cache_for
from sentinel_pipeline_tests.dataset_factory import LABEL_PARAMS, make_labelled_dataset


def _write(paths: ArtifactPaths, seed: int = 0, context: bool = True, n_snap: int = 3):
    dataset, assignment, contract = make_labelled_dataset(n_symbols=3, n_bars=200, seq_len=6, context=context,
                                                          seed=seed, n_snap=n_snap)
    scalers = fit_scalers(dataset, assignment, contract)
    return write_splits(dataset, assignment, contract, scalers, LABEL_PARAMS, paths.hdf5_dir), contract


@pytest.fixture()
def built(tmp_path):
    paths = ArtifactPaths(data_dir=tmp_path)
    h5, contract = _write(paths)
    arrow = {s: build_cache(h5[s]) for s in SPLITS}
    return paths, h5, arrow, contract


def _assert_same(a, b):
    for name in ARRAY_DTYPES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for field in ("split", "feature_contract_hash", "feature_names", "target_names", "symbols", "seq_len", "label_params"):
        assert getattr(a, field) == getattr(b, field), field


def test_round_trip_equals_hdf5(built):
    paths, h5, arrow, contract = built
    for split in SPLITS:
        assert arrow[split] == paths.arrow(split) == arrow_cache_for(h5[split])
        assert samples_path_for(arrow[split]).is_file()
        cached = open_split(arrow[split], contract.hash)
        source = read_split(h5[split], contract.hash)
        _assert_same(cached, source)
        assert cached.attrs["source_content_checksum"] == source.attrs["content_checksum"]
        assert cached.attrs["time_min"] == source.attrs["time_min"]
        ok, details = cache_matches_source(h5[split], arrow[split])
        assert ok, details
        assert details["arrow_checksum_recomputed"] == details["h5_checksum"]


def test_file_format_uncompressed_single_batch_fixed_size_lists(built):
    paths, _, arrow, _ = built
    with pa.memory_map(str(arrow["train"])) as source:
        reader = pa.ipc.open_file(source)
        assert reader.num_record_batches == 1
        schema = reader.schema
        assert schema.field("seq").type == pa.list_(pa.float32(), 5)
        assert schema.field("ctx_cat").type == pa.list_(pa.int32(), 2)
        assert schema.field("timestamp").type == pa.int64()
    # uncompressed: the raw bytes of the matrices appear verbatim in the file
    arrays = read_split(paths.h5("train"))
    raw = arrow["train"].read_bytes()
    assert arrays.seq.tobytes() in raw and arrays.targets.tobytes() in raw


def test_zero_copy_views_of_the_mapped_file(built):
    _, _, arrow, _ = built
    path = arrow["val"]
    arrays = open_split(path)
    for name in ("seq", "snap", "targets", "timestamp", "tb_label"):
        a = getattr(arrays, name)
        assert not a.flags.owndata and not a.flags.writeable, name
    # the arrays are views of the page cache: bytes changed in the file show up in the open arrays
    target_bytes = arrays.seq[:4].tobytes()
    raw = path.read_bytes()
    offset = raw.find(target_bytes)
    assert offset >= 0 and raw.find(target_bytes, offset + 1) == -1
    before = arrays.seq[0, 0]
    patched = np.float32(before + 123.0).tobytes()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(patched)
    assert arrays.seq[0, 0] == np.float32(before + 123.0)
    # the sidecar is memory-mapped too
    assert not arrays.sample_end_rows.flags.owndata


def test_stale_cache_detected(built):
    paths, h5, arrow, contract = built
    # rebuild the HDF5 files from different data with the same contract: the cache is now stale
    new_h5, new_contract = _write(paths, seed=1)
    assert new_contract.hash == contract.hash
    ok, details = cache_matches_source(new_h5["train"], arrow["train"])
    assert not ok
    assert any("stale" in p for p in details["problems"])
    # the cheap check (no recompute) detects it too
    assert not cache_matches_source(new_h5["train"], arrow["train"], recompute=False)[0]
    build_cache(new_h5["train"])
    assert cache_matches_source(new_h5["train"])[0]


def test_hash_mismatch_detected(built, tmp_path):
    paths, _, arrow, contract = built
    with pytest.raises(ContractError) as exc:
        open_split(arrow["test"], expected_hash="ffffffffffffffff")
    assert str(arrow["test"]) in str(exc.value) and contract.hash in str(exc.value)
    # HDF5 rebuilt with another contract (different seq_len): cache_matches_source reports the hash
    other = ArtifactPaths(data_dir=tmp_path / "other")
    dataset, assignment, c2 = make_labelled_dataset(n_symbols=3, n_bars=200, seq_len=7)
    other_h5 = write_splits(dataset, assignment, c2, fit_scalers(dataset, assignment, c2), LABEL_PARAMS, other.hdf5_dir)
    ok, details = cache_matches_source(other_h5["test"], arrow["test"])
    assert not ok and any("hash" in p for p in details["problems"])


def test_missing_or_foreign_cache(built, tmp_path):
    _, h5, arrow, _ = built
    ok, details = cache_matches_source(h5["val"], tmp_path / "nope.arrow")
    assert not ok and "unreadable" in details["problems"][0]
    foreign = tmp_path / "foreign.arrow"
    with pa.OSFile(str(foreign), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("x", pa.int8())])) as w:
        w.write_table(pa.table({"x": pa.array([1], pa.int8())}))
    with pytest.raises(SplitFileError, match="not a split cache"):
        open_split(foreign)
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"x" * 100)
    with pytest.raises(SplitFileError, match="not a readable Arrow IPC file"):
        open_split(garbage)
    # a sidecar from another build is refused
    samples_path_for(arrow["val"]).write_bytes(samples_path_for(arrow["test"]).read_bytes())
    with pytest.raises(SplitFileError, match="does not match"):
        open_split(arrow["val"])


def test_zero_width_groups_context_off(tmp_path):
    paths = ArtifactPaths(data_dir=tmp_path)
    h5, contract = _write(paths, context=False, n_snap=0)
    path = build_cache(h5["train"])
    cached = open_split(path, contract.hash)
    assert cached.ctx_cat.shape == (cached.n_rows, 0) and cached.snap.shape == (cached.n_rows, 0)
    _assert_same(cached, read_split(h5["train"]))
    assert cache_matches_source(h5["train"], path)[0]
