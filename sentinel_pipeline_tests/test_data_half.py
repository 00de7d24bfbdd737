"""The whole data half end to end (``data_half.run_data_half``) on a small synthetic market.

20 symbols x 60 days x 7 hourly bars plus a second raw file of deliberately broken rows. Checks
that every artefact exists, that row counts agree from stage to stage, that the feature contract hash
is the same everywhere it is recorded, that raw rows are fully accounted for (bars + quarantine),
that the split summary, the HDF5 files and the Arrow cache agree, that a rerun on the same inputs is
bit-for-bit reproducible, and that the ``python -m sentinel_pipeline.data_half`` CLI runs.
The expected values are recomputed here with plain pandas, independently of the stage code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sentinel_pipeline import data_half
from sentinel_pipeline.data.arrow_cache import cache_matches_source, open_split, samples_path_for
from sentinel_pipeline.data.hdf5_splits import read_split
from sentinel_pipeline.data.raw_bars import QUARANTINE_REASONS, RAW_COLUMNS
from sentinel_pipeline.data.split_arrays import content_checksum
from sentinel_pipeline.data.synthetic_market import (
    DEFAULT_FILE_NAME,
    SyntheticMarketConfig,
    generate_synthetic_market,
)
from sentinel_pipeline.data_half import DataHalfConfig, run_data_half
from sentinel_pipeline.paths import SPLITS, ArtifactPaths

MARKET = SyntheticMarketConfig(seed=3, n_symbols=20, n_days=60)
CONFIG = DataHalfConfig(synthetic=MARKET)
SEQ_LEN = CONFIG.features.seq_len
MARKET_FILE = "market.parquet"
DIRTY_FILE = "z_dirty.parquet"  # sorted after MARKET_FILE: read second


def _dirty_rows(market: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Broken copies of market rows, one per kind of defect, and the reason each must get."""
    rows, reasons = [], []

    def add(i: int, reason: str, **changes: object) -> None:
        row = market.iloc[i].to_dict()
        row.update(changes)
        rows.append(row)
        reasons.append(reason)

    add(5, "duplicate_key", volume=market["volume"].iloc[5] + 1.0)  # same key as a good row read earlier
    add(100, "nan_or_inf_price", close=float("nan"))
    add(200, "non_positive_price", low=0.0)
    add(300, "high_below_low", high=market["low"].iloc[300] * 0.9)
    add(400, "negative_volume", volume=-5.0)
    add(500, "nan_volume", volume=float("nan"))
    add(600, "missing_symbol", symbol=None)
    frame = pd.DataFrame(rows, columns=list(RAW_COLUMNS))
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame, reasons


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    raw = tmp_path_factory.mktemp("raw")
    market = generate_synthetic_market(MARKET)
    market.to_parquet(raw / MARKET_FILE, index=False)
    dirty, reasons = _dirty_rows(market)
    dirty.to_parquet(raw / DIRTY_FILE, index=False)
    return raw, reasons


def _run(data_dir: Path, raw: Path) -> tuple[ArtifactPaths, dict]:
    paths = ArtifactPaths(data_dir=data_dir, raw_dir_override=raw)
    return paths, run_data_half(paths, CONFIG, log=lambda _msg: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, raw_dir: tuple[Path, list[str]]) -> tuple[ArtifactPaths, dict]:
    return _run(tmp_path_factory.mktemp("data"), raw_dir[0])


@pytest.fixture(scope="module")
def frames(built: tuple[ArtifactPaths, dict]) -> dict[str, pd.DataFrame]:
    paths, _ = built
    return {
        "bars": pd.read_parquet(paths.bars),
        "quarantine": pd.read_parquet(paths.quarantine),
        "features": pd.read_parquet(paths.features),
        "dataset": pd.read_parquet(paths.labelled_dataset),
        "assignment": pd.read_parquet(paths.split_assignment),
    }


def _artefacts(paths: ArtifactPaths) -> list[Path]:
    files = [
        paths.bars, paths.quarantine, paths.quality_report, paths.bar_flags, paths.feature_contract, paths.feature_schema,
        paths.features, paths.labelled_dataset, paths.split_assignment, paths.split_summary,
        paths.seq_scaler, paths.snap_scaler, paths.scalers_info,
    ]
    for s in SPLITS:
        files += [paths.h5(s), paths.arrow(s), samples_path_for(paths.arrow(s))]
    return files


def test_every_stage_ran_and_wrote_its_artefacts(built, raw_dir):
    paths, results = built
    assert list(results) == [name for name, _ in data_half.STAGES]
    missing = [str(p) for p in _artefacts(paths) if not p.is_file() or p.stat().st_size == 0]
    assert not missing, f"missing or empty artefacts: {missing}"
    # raw files were present, so the synthetic default was not generated on top of them
    assert not (raw_dir[0] / DEFAULT_FILE_NAME).exists()
    assert results["raw_bars"]["input_files"] == [str(raw_dir[0] / MARKET_FILE), str(raw_dir[0] / DIRTY_FILE)]
    json.dumps(results)  # the summaries feed Dagster metadata: JSON-able
    # no temp files of the atomic writers left behind
    leftovers = [p for p in paths.artifacts.rglob("*") if p.is_file() and p not in set(_artefacts(paths))]
    assert not leftovers, leftovers


def test_raw_rows_are_all_accounted_for(built, raw_dir, frames):
    paths, results = built
    raw, reasons = raw_dir
    bars, q = frames["bars"], frames["quarantine"]
    market = pd.read_parquet(raw / MARKET_FILE)
    dirty = pd.read_parquet(raw / DIRTY_FILE)
    report = json.loads(paths.quality_report.read_text())
    assert report == results["raw_bars"]["report"]
    assert report["n_rows_in"] == len(market) + len(dirty) == len(bars) + len(q)
    # exactly the planted rows are quarantined, each with its reason; the market file loses nothing
    got = {(Path(f).name, int(r)): reason for f, r, reason in zip(q["source_file"], q["source_row"], q["reason"], strict=True)}
    assert got == {(DIRTY_FILE, i): reason for i, reason in enumerate(reasons)}
    assert set(q["reason"]) <= set(QUARANTINE_REASONS)
    assert report["quarantine_by_reason"] == {r: reasons.count(r) for r in QUARANTINE_REASONS}
    # the bars are the market file's rows, values untouched (the duplicate kept the first occurrence)
    pd.testing.assert_frame_equal(bars, market, check_dtype=False)


def test_row_counts_agree_across_stages(built, frames):
    _, results = built
    n = len(frames["bars"])
    assert len(frames["features"]) == len(frames["dataset"]) == len(frames["assignment"]) == n
    for name in ("features", "dataset", "assignment"):
        assert isinstance(frames[name].index, pd.RangeIndex)
    # row i is the same bar in every table
    for name in ("features", "dataset"):
        pd.testing.assert_frame_equal(frames[name][list(RAW_COLUMNS)], frames["bars"], check_dtype=False)
    assert results["features"]["rows"] == results["labels"]["rows"] == n
    assert results["features"]["valid_rows"] == int(frames["dataset"]["feature_valid"].sum())
    stats = results["labels"]["stats"]
    json.dumps(stats)
    eligible = frames["dataset"]["label_eligible"].to_numpy()
    assert 0 < eligible.sum() < n
    # ineligible rows carry no made-up label
    assert (frames["dataset"].loc[~eligible, "tb_label"] == 0).all()
    assert frames["dataset"].loc[~eligible, "tb_return_atr"].isna().all()


def _expected_split_rows(dataset: pd.DataFrame, assignment: pd.DataFrame, split: str) -> np.ndarray:
    """Own bars + per symbol the ``SEQ_LEN - 1`` bars before its first bar of the split (pandas)."""
    pos = dataset.groupby("symbol").cumcount().to_numpy()
    own = (assignment["split"] == split).to_numpy()
    first = pd.Series(np.where(own, pos, np.iinfo(np.int64).max)).groupby(dataset["symbol"].to_numpy()).transform("min")
    warm = (pos < first.to_numpy()) & (pos >= first.to_numpy() - (SEQ_LEN - 1))
    return np.flatnonzero(own | warm)


def _expected_sample_rows(dataset: pd.DataFrame, assignment: pd.DataFrame, split: str) -> np.ndarray:
    """``sample_ok`` rows of the split whose ``SEQ_LEN``-bar window is inside one symbol, all features valid."""
    valid = dataset["feature_valid"].astype(int)
    full = valid.groupby(dataset["symbol"]).transform(lambda v: v.rolling(SEQ_LEN, min_periods=SEQ_LEN).sum())
    ok = (assignment["split"] == split) & assignment["sample_ok"] & (full == SEQ_LEN)
    return np.flatnonzero(ok.to_numpy())


def test_split_summary_hdf5_and_arrow_agree(built, frames):
    paths, results = built
    dataset, assignment = frames["dataset"], frames["assignment"]
    summary = json.loads(paths.split_summary.read_text())
    assert summary == results["splits"]["summary"]
    assert sum(summary["splits"][s]["rows"] for s in SPLITS) == len(dataset)
    key = pd.MultiIndex.from_arrays(
        [dataset["symbol"].to_numpy(dtype=str), dataset["timestamp"].to_numpy(dtype="datetime64[ns]").view("int64")]
    )
    for s in SPLITS:
        own = (assignment["split"] == s).to_numpy()
        assert summary["splits"][s]["rows"] == own.sum()
        assert summary["splits"][s]["samples"] == (own & assignment["sample_ok"].to_numpy()).sum()
        arrays = read_split(paths.h5(s), verify_checksum=True)
        with h5py.File(paths.h5(s), "r") as f:
            n_rows, n_warm, n_samples = (int(f.attrs[k]) for k in ("n_rows", "n_warmup_rows", "n_samples"))
        # HDF5 rows = the split's bars + warm-up bars, exactly the expected dataset rows, in order
        rows = key.get_indexer(pd.MultiIndex.from_arrays([np.asarray(arrays.symbols)[arrays.symbol_idx], arrays.timestamp]))
        np.testing.assert_array_equal(rows, _expected_split_rows(dataset, assignment, s))
        assert n_rows == arrays.n_rows == summary["splits"][s]["rows"] + n_warm
        # samples: the summary's sample_ok rows minus those without a full window of valid features
        expected_samples = _expected_sample_rows(dataset, assignment, s)
        np.testing.assert_array_equal(rows[arrays.sample_end_rows], expected_samples)
        assert n_samples == arrays.n_samples == results["hdf5_splits"]["splits"][s]["n_samples"]
        assert 0 < arrays.n_samples <= summary["splits"][s]["samples"]
        np.testing.assert_array_equal(arrays.tb_label[arrays.sample_end_rows], dataset["tb_label"].to_numpy()[expected_samples])
        # the Arrow cache holds the same content
        ok, details = cache_matches_source(paths.h5(s), paths.arrow(s))
        assert ok, details["problems"]
        assert results["arrow_cache"]["splits"][s]["matches_hdf5"]
        assert content_checksum(open_split(paths.arrow(s)).arrays()) == content_checksum(arrays.arrays())


def _arrow_meta(path: Path) -> dict:
    with pa.memory_map(str(path), "r") as source:
        raw = pa.ipc.open_file(source).schema.metadata
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def test_feature_contract_hash_is_the_same_everywhere(built):
    paths, results = built
    contract = json.loads(paths.feature_contract.read_text())
    h = contract["feature_contract_hash"]
    assert data_half.load_contract(paths).hash == h  # the stated hash is the content's hash
    assert paths.feature_schema.read_text().splitlines()[0].split()[5] == h
    assert json.loads(paths.scalers_info.read_text())["feature_contract_hash"] == h
    for s in SPLITS:
        with h5py.File(paths.h5(s), "r") as f:
            assert f.attrs["feature_contract_hash"] == h
            names = json.loads(f.attrs["feature_names"])
        assert [n for g in ("seq", "snap", "ctx_cat", "ctx_cont") for n in names[g]] == [
            spec["name"] for spec in contract["features"]
        ]
        assert _arrow_meta(paths.arrow(s))["feature_contract_hash"] == h
        assert _arrow_meta(samples_path_for(paths.arrow(s)))["feature_contract_hash"] == h
    for stage in ("feature_contract", "features", "scalers", "hdf5_splits"):
        assert results[stage]["feature_contract_hash"] == h


def _checksums(paths: ArtifactPaths) -> dict[str, str]:
    out = {}
    for s in SPLITS:
        with h5py.File(paths.h5(s), "r") as f:
            out[s] = str(f.attrs["content_checksum"])
        assert content_checksum(read_split(paths.h5(s)).arrays()) == out[s]
    return out


def test_rerun_on_the_same_inputs_is_deterministic(built, raw_dir, tmp_path):
    paths, _ = built
    again, _ = _run(tmp_path / "again", raw_dir[0])
    assert _checksums(again) == _checksums(paths)
    for name in ("bars", "features", "labelled_dataset", "split_assignment"):
        pd.testing.assert_frame_equal(pd.read_parquet(getattr(again, name)), pd.read_parquet(getattr(paths, name)))
    assert again.scalers_info.read_text() == paths.scalers_info.read_text()


def test_cli_runs_the_data_half(raw_dir, tmp_path, capsys):
    raw = raw_dir[0]
    assert data_half.main(["--data-dir", str(tmp_path / "a"), "--raw-dir", str(raw)]) == 0
    out = capsys.readouterr().out
    timings = json.loads(out[out.index("{"):])
    assert list(timings) == [name for name, _ in data_half.STAGES]
    assert all(v >= 0 for k, v in timings.items() if k != "feature_contract")  # that stage is not timed
    cli_paths = ArtifactPaths(data_dir=tmp_path / "a", raw_dir_override=raw)
    assert all(p.is_file() for p in _artefacts(cli_paths))
    # the module entry point, as a user runs it, gives the same splits
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel_pipeline.data_half", "--data-dir", str(tmp_path / "b"), "--raw-dir", str(raw)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    b = ArtifactPaths(data_dir=tmp_path / "b", raw_dir_override=raw)
    assert _checksums(b) == _checksums(cli_paths)


def test_empty_landing_zone_gets_the_synthetic_default(tmp_path):
    paths = ArtifactPaths(data_dir=tmp_path)
    results = run_data_half(paths, CONFIG, log=lambda _msg: None)
    generated = paths.raw_dir / DEFAULT_FILE_NAME
    assert results["raw_bars"]["input_files"] == [str(generated)]
    pd.testing.assert_frame_equal(pd.read_parquet(paths.bars), generate_synthetic_market(MARKET), check_dtype=False)
    assert all(p.is_file() for p in _artefacts(paths))
