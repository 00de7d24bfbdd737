"""The data half's intermediate tables (Arrow IPC, ``data.tables``) and the labelled dataset read as the
features and the labels side by side (``data.dataset``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sentinel_pipeline.data.dataset import LabelledDataset, read_dataset
from sentinel_pipeline.data.synthetic_market import generate_synthetic_market
from sentinel_pipeline.data.tables import read_frame, to_arrow, write_ipc, write_table
from sentinel_pipeline.data_half import DataHalfConfig, run_data_half
from sentinel_pipeline.paths import ArtifactPaths
from sentinel_pipeline.stage_cache import file_digest, read_record
from sentinel_pipeline_tests.test_data_half_identical import MARKET


def _frame(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "symbol": pd.array(np.repeat(["AAA", "BBB"], n // 2), dtype="str"),
        "timestamp": pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC"),
        "x": rng.normal(size=n), "f32": rng.normal(size=n).astype(np.float32), "flag": rng.random(n) > 0.5,
        "code": rng.integers(0, 5, n).astype(np.int8), "gap": np.where(rng.random(n) > 0.8, np.nan, 1.0),
    })


def test_a_table_reads_back_as_parquet_did_and_its_digest_is_its_bytes(tmp_path: Path) -> None:
    frame = _frame()
    frame.attrs = {"source": "test"}
    path = write_table(frame, tmp_path / "t.arrow")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    back, before = read_frame(path), pd.read_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back, before)
    assert back.attrs == {"source": "test"}
    pd.testing.assert_frame_equal(read_frame(path, ["x", "symbol"]), before[["x", "symbol"]])
    # the digest hashed while writing is the file's sha256 (the stage commit trusts it)
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_zero_copy_conversion_writes_the_bytes_from_pandas_wrote(tmp_path: Path) -> None:
    """``to_arrow`` hands float columns to Arrow without copying them; the file must be byte for byte
    the one ``pa.Table.from_pandas`` gave: NaN null with their values kept, a column without NaN, an
    all-NaN one, float32, a strided (non-contiguous) column, strings, datetimes, attrs."""
    import pyarrow as pa

    frame = _frame(1002)
    frame["all_nan"] = np.nan
    frame["f32_gap"] = np.where(frame["gap"].isna(), np.nan, frame["f32"]).astype(np.float32)
    pair = np.arange(2 * len(frame), dtype=np.float64).reshape(-1, 2)
    pair[7, 0] = np.nan
    frame = pd.concat([frame, pd.DataFrame(pair, columns=["strided", "other"], copy=False)], axis=1)
    assert not frame["strided"].to_numpy(copy=False).flags.c_contiguous  # the path that converts a copy
    frame.attrs = {"source": "test"}
    expected = pa.Table.from_pandas(frame, preserve_index=False)
    ours = to_arrow(frame)
    assert ours.schema.equals(expected.schema, check_metadata=False)
    assert ours.column("gap").null_count == frame["gap"].isna().sum() > 0
    assert np.shares_memory(np.frombuffer(ours.column("x").chunk(0).buffers()[1], np.float64), frame["x"].to_numpy())
    write_ipc(expected.replace_schema_metadata(ours.schema.metadata), tmp_path / "a.arrow")
    write_ipc(ours, tmp_path / "b.arrow")
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()


def test_a_bad_table_file_fails_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "features.arrow"
    bad.write_bytes(b"not an arrow file")
    with pytest.raises(ValueError, match="features.arrow: not a readable Arrow IPC file"):
        read_frame(bad)
    good = write_table(_frame(), tmp_path / "good.arrow")
    with pytest.raises(ValueError, match=r"good.arrow: table lacks columns \['nope'\]"):
        read_frame(good, ["x", "nope"])


def test_labels_must_be_the_features_rows(tmp_path: Path) -> None:
    feats = _frame()
    labels = feats[["symbol", "timestamp"]].assign(tb_label=np.int8(1))
    fp, lp = write_table(feats, tmp_path / "features.arrow"), write_table(labels, tmp_path / "labels.arrow")
    both = read_dataset(fp, lp)
    assert list(both.columns) == [*feats.columns, "tb_label"] and len(both) == len(feats)
    pd.testing.assert_frame_equal(LabelledDataset(fp, lp).frame(["tb_label", "x"]),
                                  pd.concat([labels[["tb_label"]], feats[["x"]]], axis=1))
    write_table(labels.iloc[:-1], lp)  # a row short
    with pytest.raises(ValueError, match=r"labels.arrow \(labels of .*features.arrow\): 49 rows, the features have 50"):
        LabelledDataset(fp, lp)
    shifted = labels.copy()
    shifted["timestamp"] = shifted["timestamp"].shift(-1, fill_value=shifted["timestamp"].iloc[0])
    write_table(shifted, lp)  # same count, other rows
    with pytest.raises(ValueError, match="labels.arrow .*: the timestamp column differs from the features'"):
        LabelledDataset(fp, lp)
    swapped = labels.copy()
    swapped["symbol"] = swapped["symbol"].iloc[::-1].to_numpy()
    write_table(swapped, lp)
    with pytest.raises(ValueError, match="the symbol column differs"):
        LabelledDataset(fp, lp)


def test_every_recorded_output_digest_is_the_files_sha256(tmp_path: Path) -> None:
    """Digests computed while writing (tables, Arrow cache) and kept across the commit's renames are
    each file's real sha256."""
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    run_data_half(paths, DataHalfConfig(synthetic=MARKET), log=lambda _m: None)
    checked = 0
    for stage in ("raw_bars", "features", "labels", "splits", "scalers", "hdf5_splits", "arrow_cache"):
        record = read_record(paths.stage_dir(stage))
        for rel, digest in record["outputs"].items():
            assert digest == hashlib.sha256((paths.stage_dir(stage) / rel).read_bytes()).hexdigest(), (stage, rel)
            checked += 1
    assert checked >= 15
    assert {"labels.arrow"} == set(read_record(paths.labels_dir)["outputs"])  # no copy of the features


def test_a_frame_read_does_not_point_into_the_file(tmp_path: Path) -> None:
    """The frame owns its memory: overwriting the file in place afterwards (a user's edit, a test's
    tampering) leaves it intact instead of crashing the process with SIGBUS on its mapped pages."""
    frame = _frame(20_000)
    path = write_table(frame, tmp_path / "t.arrow")
    back = read_frame(path, ["symbol", "x"])
    path.write_bytes(b"")  # truncated in place: pages of a mapping would be gone
    assert back["symbol"].tolist() == frame["symbol"].tolist()
    assert np.array_equal(back["x"].to_numpy(), frame["x"].to_numpy())
