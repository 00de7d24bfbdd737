"""The whole data half end to end (``data_half.run_data_half``) on a small synthetic market.

20 symbols x 60 days x 7 hourly bars plus a second raw file of deliberately broken rows. Checks
that every artefact exists, that row counts agree from stage to stage, that the feature contract hash
is the same everywhere it is recorded, that raw rows are fully accounted for (bars + quarantine),
that the split summary, the HDF5 files and the Arrow cache agree, that a rerun on the same inputs is
bit-for-bit reproducible, and that the ``python -m sentinel_pipeline.data_half`` CLI runs.
The expected values are recomputed here with plain pandas, independently of the stage code.

Then the inputs a user brings (issue 9): a CSV alone in the landing zone, files the stage cannot read,
an empty landing zone (the synthetic default, from its own folder, named as such), empty files and
histories too short for the configuration, and a failed raw stage that must leave the previous
outputs as they were.
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
from sentinel_pipeline.data.dataset import read_dataset
from sentinel_pipeline.data.hdf5_splits import read_split
from sentinel_pipeline.data.raw_bars import (
    QUARANTINE_REASONS,
    RAW_COLUMNS,
    IngestConfig,
    InsufficientHistoryError,
    QuarantineLimitError,
    RawDataError,
)
from sentinel_pipeline.data.split_arrays import content_checksum
from sentinel_pipeline.data.synthetic_market import (
    DEFAULT_FILE_NAME,
    SyntheticMarketConfig,
    generate_synthetic_market,
)
from sentinel_pipeline.data.tables import read_frame
from sentinel_pipeline.data_half import DataHalfConfig, minimum_history, run_data_half
from sentinel_pipeline.paths import SPLITS, ArtifactPaths
from sentinel_pipeline.stage_cache import StageInputError, read_record

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
        "bars": read_frame(paths.bars),
        "quarantine": pd.read_parquet(paths.quarantine),
        "features": read_frame(paths.features),
        "dataset": read_dataset(paths.features, paths.labels),
        "assignment": read_frame(paths.split_assignment),
    }


def _artefacts(paths: ArtifactPaths) -> list[Path]:
    files = [
        paths.bars, paths.quarantine, paths.quality_report, paths.bar_flags, paths.feature_contract, paths.feature_schema,
        paths.features, paths.labels, paths.split_assignment, paths.split_summary,
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
    leftovers = [p for p in paths.artifacts.rglob("*")
                 if p.is_file() and p not in set(_artefacts(paths)) and p.name != ".stage.json"]
    assert not leftovers, leftovers
    # every stage committed its record with its outputs; no synthetic market anywhere
    for name in data_half.STAGES:
        if name[0] != "feature_contract":
            assert read_record(paths.stage_dir(name[0])) is not None, name
    assert not paths.synthetic_dir.exists()
    assert results["raw_bars"]["synthetic"] is False
    assert results["arrow_cache"]["data_source"] == f"raw files: 2 file(s) in {raw_dir[0]}"


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
    for name in ("bars", "features", "labels", "split_assignment"):
        pd.testing.assert_frame_equal(read_frame(getattr(again, name)), read_frame(getattr(paths, name)))
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


@pytest.mark.parametrize("landing_zone", ["absent", "empty"])
def test_empty_landing_zone_uses_the_synthetic_default_from_its_own_folder_and_says_so(tmp_path, landing_zone):
    paths = ArtifactPaths(data_dir=tmp_path)
    if landing_zone == "empty":
        paths.raw_dir.mkdir(parents=True)
        (paths.raw_dir / ".gitkeep").write_text("")
    logs: list[str] = []
    results = run_data_half(paths, CONFIG, log=logs.append)
    (generated,) = [Path(p) for p in results["raw_bars"]["input_files"]]
    assert generated.parent == paths.synthetic_dir and generated.name.startswith("synthetic_market-")
    # the user's landing zone is never written to
    assert (sorted(p.name for p in paths.raw_dir.iterdir()) == [".gitkeep"]) if landing_zone == "empty" \
        else not paths.raw_dir.exists()
    pd.testing.assert_frame_equal(read_frame(paths.bars), generate_synthetic_market(MARKET), check_dtype=False)
    assert all(p.is_file() for p in _artefacts(paths))
    # "synthetic" everywhere: logs, the quality report, every stage's summary and record
    assert logs[0].startswith("[data] SYNTHETIC DATA") and all("synthetic" in line.lower() for line in logs)
    source = "synthetic default market (seed 3, 20 symbols x 60 days x 7 bars/day, signal strength 0.2)"
    report = json.loads(paths.quality_report.read_text())
    assert report["synthetic"] is True and report["data_source"].startswith(source)
    for name, _ in data_half.STAGES:
        if name != "feature_contract":
            assert results[name]["data_source"].startswith(source), name
            assert read_record(paths.stage_dir(name))["metadata"]["data_source"].startswith(source), name
    from sentinel_pipeline.summary import summarise

    text = "\n".join(summarise(paths))
    assert f"data source  {report['data_source']}" in text and "SYNTHETIC" in text


# -- what a user brings -------------------------------------------------------------------------------
def test_a_csv_alone_in_the_landing_zone_is_ingested_and_nothing_is_written_beside_it(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    market = generate_synthetic_market(MARKET)
    market.assign(timestamp=market["timestamp"].map(pd.Timestamp.isoformat)).to_csv(raw / "bars.csv", index=False)
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    results = run_data_half(paths, CONFIG, log=lambda _msg: None)
    assert results["raw_bars"]["input_files"] == [str(raw / "bars.csv")] and results["raw_bars"]["synthetic"] is False
    pd.testing.assert_frame_equal(read_frame(paths.bars), market, check_dtype=False)
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before  # the landing zone only read
    assert not paths.synthetic_dir.exists() and not any("synthetic" in p.name for p in tmp_path.rglob("*"))


def test_a_file_the_stage_cannot_read_fails_naming_it(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_feather(raw / "bars.feather")
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    with pytest.raises(RawDataError, match=rf"{raw / 'bars.feather'}.*parquet \(\*\.parquet\) and CSV"):
        run_data_half(paths, CONFIG, log=lambda _msg: None)
    assert sorted(p.name for p in raw.iterdir()) == ["bars.feather"]
    assert not paths.synthetic_dir.exists()


def test_an_empty_parquet_fails_at_the_raw_stage_naming_the_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).iloc[:0].to_parquet(raw / "empty.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    with pytest.raises(RawDataError, match=r"empty\.parquet: the file holds no rows"):
        run_data_half(paths, CONFIG, log=lambda _msg: None)
    assert not paths.bars.exists() and read_record(paths.raw_bars_dir) is None  # nothing downstream ran


def _walk(symbol: str, n: int, freq: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    opn = close * np.exp(rng.normal(0, 0.005, n))
    return pd.DataFrame({
        "symbol": symbol, "timestamp": pd.date_range("2000-01-31", periods=n, freq=freq, tz="UTC"),
        "open": opn, "high": np.maximum(opn, close) * 1.01, "low": np.minimum(opn, close) * 0.99, "close": close,
        "volume": rng.integers(1_000, 5_000, n).astype(float),
    })


def test_the_minimum_history_is_derived_from_the_configuration():
    h = minimum_history(CONFIG)
    assert (h["feature_warmup_bars"], h["seq_len"], h["label_window_bars"], h["embargo_bars"]) == (60, 30, 20, 5)
    assert h["min_symbol_bars"] == 60 + 30 + 20 and h["min_rows_per_split"] == {"train": 110, "val": 26, "test": 26}
    assert h["min_timestamps"] == 174  # val needs 26 rows = 15 % of 174 timestamps
    shorter = DataHalfConfig(features=data_half.feats.FeatureConfig(seq_len=10),
                             labels=data_half.labels.LabelConfig(horizon=5, fwd_horizons=(1, 5), excursion_bars=3))
    assert minimum_history(shorter)["min_symbol_bars"] == 60 + 10 + 5


@pytest.mark.parametrize("n_symbols", [1, 3])
def test_156_monthly_bars_fail_early_naming_the_file_and_the_minimum(tmp_path, n_symbols):
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.concat([_walk(f"S{k}", 156, "ME", k) for k in range(n_symbols)]).to_parquet(raw / "monthly.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    with pytest.raises(InsufficientHistoryError) as err:
        run_data_half(paths, CONFIG, log=lambda _msg: None)
    msg = str(err.value)
    assert str(raw / "monthly.parquet") in msg and "too little history for train/val/test" in msg
    assert "at least 174 distinct timestamps" in msg and "156 distinct timestamps" in msg and "110 bars per symbol" in msg
    assert not paths.bars.exists() and not paths.features.exists()  # failed at the raw stage


def test_a_single_50_bar_symbol_fails_naming_it_and_the_minimum(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _walk("TINY", 50, "D", 0).to_parquet(raw / "tiny.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    with pytest.raises(InsufficientHistoryError) as err:
        run_data_half(paths, CONFIG, log=lambda _msg: None)
    msg = str(err.value)
    for part in (str(raw / "tiny.parquet"), "no usable bars left", "TINY: 50 bars", "at least 110 bars per symbol"):
        assert part in msg
    assert not paths.bars.exists()
    # the quarantine of the failed run is kept for inspection, beside (here: instead of) the outputs
    q = pd.read_parquet(paths.raw_bars_dir / "last_failed" / "quarantine.parquet")
    assert len(q) == 50 and set(q["reason"]) == {"short_history"}
    assert "last_failed" in "\n".join(getattr(err.value, "__notes__", []))


def test_a_50_bar_symbol_among_healthy_ones_is_quarantined_and_accounted_for(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    market = generate_synthetic_market(MARKET)
    market.to_parquet(raw / "market.parquet", index=False)
    short = market[market["symbol"] == market["symbol"].iloc[0]].head(50).assign(symbol="NEWCO")
    short.to_parquet(raw / "newco.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    results = run_data_half(paths, CONFIG, log=lambda _msg: None)
    report = results["raw_bars"]["report"]
    assert report["n_rows_in"] == len(market) + 50 == report["n_rows_out"] + report["n_quarantined"]
    assert report["quarantine_by_reason"]["short_history"] == 50 and report["short_history_symbols"] == {"NEWCO": 50}
    q = pd.read_parquet(paths.quarantine)
    assert set(q.loc[q["source_file"] == str(raw / "newco.parquet"), "reason"]) == {"short_history"}
    assert "NEWCO" not in set(read_frame(paths.bars, ["symbol"])["symbol"])
    assert all(results["raw_bars"]["report"]["max_samples_per_split"][s] > 0 for s in SPLITS)


def test_naive_timestamps_are_refused_then_localised_with_the_cli_flag(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    market = generate_synthetic_market(MARKET)
    market.assign(timestamp=market["timestamp"].dt.tz_convert("America/New_York").dt.tz_localize(None)).to_parquet(
        raw / "local.parquet", index=False)
    monkeypatch.delenv("SENTINEL_SOURCE_TZ", raising=False)
    with pytest.raises(RawDataError, match=r"local\.parquet: \d+ timestamp\(s\) carry no time zone"):
        run_data_half(ArtifactPaths(data_dir=tmp_path / "a", raw_dir_override=raw), CONFIG, log=lambda _msg: None)
    assert data_half.main(["--data-dir", str(tmp_path / "b"), "--raw-dir", str(raw)]) == 1
    monkeypatch.setenv("SENTINEL_SOURCE_TZ", "America/New_York")
    assert data_half.main(["--data-dir", str(tmp_path / "b"), "--raw-dir", str(raw)]) == 0
    b = ArtifactPaths(data_dir=tmp_path / "b", raw_dir_override=raw)
    pd.testing.assert_frame_equal(read_frame(b.bars), market, check_dtype=False)  # back to the UTC instants
    report = json.loads(b.quality_report.read_text())
    assert report["source_timezone"] == "America/New_York" and report["n_tz_naive_rows"] == len(market)
    assert report["files"][0]["timezone"] == "naive, localised from America/New_York"


# -- a failed stage leaves the previous outputs untouched ------------------------------------------------
def test_a_failed_raw_stage_leaves_the_previous_outputs_and_blocks_stale_reuse(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    market = generate_synthetic_market(MARKET)
    market.to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    run_data_half(paths, CONFIG, log=lambda _msg: None)
    raw_dir = paths.raw_bars_dir
    before = {p.name: p.read_bytes() for p in raw_dir.iterdir() if p.is_file()}
    features_fp = data_half.stage_fingerprint("features", paths, CONFIG)

    # new raw data with 10 % broken rows: above the 5 % quarantine limit
    bad = market.copy()
    bad.loc[bad.index % 10 == 0, "volume"] = -1.0
    bad.to_parquet(raw / "market.parquet", index=False)
    with pytest.raises(QuarantineLimitError) as err:
        data_half.build_stage("raw_bars", paths, CONFIG)
    # the previous bars, flags, report and record are byte-identical; the failed run's quarantine is beside them
    assert {p.name: p.read_bytes() for p in raw_dir.iterdir() if p.is_file()} == before
    kept = raw_dir / "last_failed"
    assert len(pd.read_parquet(kept / "quarantine.parquet")) == int((bad["volume"] < 0).sum())
    failure = json.loads((kept / "failure.json").read_text())
    assert failure["error"] == str(err.value) and failure["kept"] == ["quarantine.parquet", "quality_report.json"]
    assert not [p for p in raw_dir.iterdir() if ".tmp-" in p.name]
    # downstream: no "inputs unchanged" on outputs the current raw data did not produce
    with pytest.raises(StageInputError, match=r"stage 'raw_bars' upstream of 'features' failed its last run.*rebuild"):
        data_half.stage_fingerprint("features", paths, CONFIG)

    # the raw data fixed again: the raw stage rebuilds, the failure is cleared and features may be reused
    market.to_parquet(raw / "market.parquet", index=False)
    data_half.build_stage("raw_bars", paths, CONFIG)
    assert not kept.exists() and data_half.stage_fingerprint("features", paths, CONFIG) == features_fp


def test_an_unreadable_file_arriving_later_blocks_every_later_stage_until_fixed(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    generate_synthetic_market(MARKET).to_parquet(raw / "market.parquet", index=False)
    paths = ArtifactPaths(data_dir=tmp_path / "data", raw_dir_override=raw)
    run_data_half(paths, CONFIG, log=lambda _msg: None)
    fps = {name: data_half.stage_fingerprint(name, paths, CONFIG) for name in data_half.UPSTREAMS}
    (raw / "more.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(RawDataError, match=r"more\.xlsx"):
        data_half.stage_fingerprint("raw_bars", paths, CONFIG)
    assert "more.xlsx" in json.loads((paths.raw_bars_dir / "last_failed" / "failure.json").read_text())["error"]
    # not only the next stage: every stage below refuses outputs built from the previous raw data
    for name in ("features", "labels", "splits", "scalers", "hdf5_splits", "arrow_cache"):
        with pytest.raises(StageInputError, match=r"stage 'raw_bars' upstream of .* failed its last run"):
            data_half.stage_fingerprint(name, paths, CONFIG)
    (raw / "more.xlsx").unlink()
    data_half.build_stage("raw_bars", paths, CONFIG)  # same inputs as the last good build again
    assert {name: data_half.stage_fingerprint(name, paths, CONFIG) for name in data_half.UPSTREAMS} == fps


def test_fingerprints_do_not_depend_on_the_instance_folder(built, tmp_path):
    paths, _ = built
    import shutil

    shutil.copytree(paths.raw_dir, tmp_path / "raw")
    elsewhere = ArtifactPaths(data_dir=tmp_path / "elsewhere", raw_dir_override=tmp_path / "raw")
    run_data_half(elsewhere, CONFIG, log=lambda _msg: None)
    # the raw stage's report names its folder, so its bytes differ; the chained fingerprints do not
    assert elsewhere.quality_report.read_bytes() != paths.quality_report.read_bytes()
    for name in data_half.UPSTREAMS:
        assert data_half.stage_fingerprint(name, elsewhere, CONFIG) == data_half.stage_fingerprint(name, paths, CONFIG)


def test_an_upstream_output_changed_after_its_record_is_refused(tmp_path, built):
    paths, _ = built
    copy = ArtifactPaths(data_dir=tmp_path / "copy", raw_dir_override=paths.raw_dir)
    import shutil

    shutil.copytree(paths.artifacts, copy.artifacts)
    fp = data_half.stage_fingerprint("labels", copy, CONFIG)
    assert data_half.stage_fingerprint("labels", copy, CONFIG) == fp
    # bars.arrow replaced behind the raw stage's back (a half-finished or manual write): refused
    good = copy.bars.read_bytes()
    read_frame(copy.bars).iloc[:-1].to_parquet(copy.bars, index=False)
    with pytest.raises(StageInputError, match=r"bars\.arrow: output of upstream stage 'raw_bars' differs"):
        data_half.stage_fingerprint("features", copy, CONFIG)
    copy.bars.write_bytes(good)
    assert data_half.stage_fingerprint("labels", copy, CONFIG) == fp
    # features.arrow edited: the labels stage refuses it too (its record no longer matches)
    (copy.features).write_bytes(copy.features.read_bytes() + b"x")
    with pytest.raises(StageInputError, match=r"features\.arrow: output of upstream stage 'features' differs"):
        data_half.stage_fingerprint("labels", copy, CONFIG)


def test_ingest_settings_are_validated():
    with pytest.raises(ValueError, match="max_quarantine_fraction must be a number between 0 and 1"):
        DataHalfConfig(ingest=IngestConfig(max_quarantine_fraction=5))
