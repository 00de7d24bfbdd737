"""Stage 1 ingestion on hand-made files: every quarantine reason, bad files, time zones, sorting, limits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel_pipeline.data.raw_bars import (
    QUARANTINE_COLUMNS,
    QUARANTINE_REASONS,
    RAW_COLUMNS,
    IngestConfig,
    QuarantineLimitError,
    RawDataError,
    enforce_quarantine_limit,
    list_input_files,
    load_raw_bars,
    write_ingest_result,
)

# the reasons reference_reasons states row by row (local-time problems need naive input and a zone;
# duplicates and short histories are judged among the otherwise good rows)
ROW_REASONS = [r for r in QUARANTINE_REASONS
               if r not in ("nonexistent_local_time", "ambiguous_local_time", "duplicate_key", "short_history")]

REPORT_KEYS = {
    "n_files",
    "n_rows_in",
    "n_rows_out",
    "n_quarantined",
    "quarantine_fraction",
    "quarantine_by_reason",
    "n_symbols",
    "time_min",
    "time_max",
    "files",
    "n_tz_naive_rows",
    "rows_per_symbol_min",
    "rows_per_symbol_max",
}


def good_frame(
    symbols: tuple[str, ...] = ("AAA", "BBB"), n: int = 5, start: str = "2024-03-01 14:30"
) -> pd.DataFrame:
    """Valid hourly bars, sorted by (symbol, timestamp)."""
    ts = pd.date_range(start, periods=n, freq="h", tz="UTC")
    frames = []
    for k, sym in enumerate(symbols):
        close = 100.0 * (k + 1) + np.arange(n, dtype=float)
        frames.append(
            pd.DataFrame(
                {
                    "symbol": sym,
                    "timestamp": ts,
                    "open": close - 0.5,
                    "high": close + 1.0,
                    "low": close - 1.0,
                    "close": close,
                    "volume": 1000.0 + np.arange(n),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def write(df: pd.DataFrame | pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, path)
    return path


def reference_reasons(df: pd.DataFrame) -> np.ndarray:
    """An independent pandas statement of the quarantine rules; '' for a good row.

    ``df`` is the concatenation of all files in file/row order with a parsed UTC ``timestamp``.
    """
    sym = df["symbol"]
    o, h, lo, c, v = (df[k].astype(float) for k in ("open", "high", "low", "close", "volume"))
    prices = pd.concat([o, h, lo, c], axis=1)
    conditions = [
        sym.isna() | (sym.fillna("").astype(str).str.strip() == ""),
        df["timestamp"].isna(),
        ~np.isfinite(prices).all(axis=1),
        (prices <= 0).any(axis=1),
        h < lo,
        h < pd.concat([o, c], axis=1).max(axis=1),
        lo > pd.concat([o, c], axis=1).min(axis=1),
        ~np.isfinite(v),
        v < 0,
    ]
    reasons = np.select(
        [np.asarray(x, dtype=bool) for x in conditions], ROW_REASONS, default=""
    )
    ok = np.flatnonzero(reasons == "")
    dup = df.iloc[ok].duplicated(["symbol", "timestamp"], keep="first").to_numpy()
    reasons[ok[dup]] = "duplicate_key"
    return reasons


def check_accounting(result) -> None:
    """Nothing dropped silently; bars are clean, sorted and unique; reasons add up."""
    rep, bars, q = result.report, result.bars, result.quarantine
    assert REPORT_KEYS <= set(rep)
    json.dumps(rep)
    assert rep["n_rows_in"] == rep["n_rows_out"] + rep["n_quarantined"]
    assert rep["n_rows_out"] == len(bars) and rep["n_quarantined"] == len(q)
    assert rep["n_rows_in"] == sum(f["rows"] for f in rep["files"])
    assert sum(rep["quarantine_by_reason"].values()) == len(q)
    assert q["reason"].value_counts().to_dict() == {k: v for k, v in rep["quarantine_by_reason"].items() if v}
    assert tuple(bars.columns) == RAW_COLUMNS and tuple(q.columns) == QUARANTINE_COLUMNS
    assert isinstance(bars.index, pd.RangeIndex) and bars.index.start == 0
    assert str(bars["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert pd.api.types.is_string_dtype(bars["symbol"]) and bars["symbol"].dtype != object
    assert all(bars[c].dtype == np.float64 for c in RAW_COLUMNS[2:])
    if len(bars):
        assert not bars.duplicated(["symbol", "timestamp"]).any()
        assert bars.equals(bars.sort_values(["symbol", "timestamp"], ignore_index=True))
        assert (reference_reasons(bars) == "").all()
        assert rep["n_symbols"] == bars["symbol"].nunique()
        counts = bars["symbol"].value_counts()
        assert (rep["rows_per_symbol_min"], rep["rows_per_symbol_max"]) == (counts.min(), counts.max())
        assert rep["time_min"] == bars["timestamp"].min().isoformat()
        assert rep["time_max"] == bars["timestamp"].max().isoformat()


def quarantined(result) -> dict[tuple[str, int], str]:
    q = result.quarantine
    return {
        (Path(f).name, int(r)): reason
        for f, r, reason in zip(q["source_file"], q["source_row"], q["reason"], strict=True)
    }


# -- clean input -------------------------------------------------------------------------------
def test_clean_file_passes_unchanged(tmp_path):
    df = good_frame()
    write(df, tmp_path / "bars.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    pd.testing.assert_frame_equal(result.bars, df, check_dtype=False)
    rep = result.report
    assert rep["n_quarantined"] == 0 and rep["quarantine_fraction"] == 0.0 and rep["n_tz_naive_rows"] == 0
    assert rep["files"] == [{"path": str(tmp_path / "bars.parquet"), "rows": 10, "n_quarantined": 0,
                             "timezone": "UTC (from the file)"}]
    assert (rep["n_symbols"], rep["rows_per_symbol_min"], rep["rows_per_symbol_max"]) == (2, 5, 5)
    enforce_quarantine_limit(result)  # nothing to complain about


# -- every quarantine reason -------------------------------------------------------------------
def _set(col, value):
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        if col == "symbol":
            df["symbol"] = df["symbol"].astype(object)
        df.loc[2, col] = value
        return df

    return mutate


def _set_many(**values):
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        for col, value in values.items():
            df.loc[2, col] = value
        return df

    return mutate


def _duplicate_row_1(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[2, "timestamp"] = df.loc[1, "timestamp"]
    return df


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set("symbol", None), "missing_symbol"),
        (_set("symbol", ""), "missing_symbol"),
        (_set("symbol", "   "), "missing_symbol"),
        (_set("timestamp", pd.NaT), "unparseable_timestamp"),
        (_set("close", np.nan), "nan_or_inf_price"),
        (_set("high", np.inf), "nan_or_inf_price"),
        (_set_many(open=0.0, low=0.0), "non_positive_price"),
        (_set_many(low=-1.0), "non_positive_price"),
        (_set_many(high=90.0, low=95.0, open=91.0, close=92.0), "high_below_low"),
        (_set_many(high=101.0, open=101.5), "high_below_open_close"),
        (_set_many(low=102.5), "low_above_open_close"),
        (_set("volume", np.nan), "nan_volume"),
        (_set("volume", np.inf), "nan_volume"),
        (_set("volume", -5.0), "negative_volume"),
        (_duplicate_row_1, "duplicate_key"),
    ],
)
def test_each_reason_quarantines_exactly_the_bad_row(tmp_path, mutate, reason):
    df = mutate(good_frame())
    write(df, tmp_path / "f.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert quarantined(result) == {("f.parquet", 2): reason}
    assert result.report["quarantine_by_reason"][reason] == 1
    assert len(result.bars) == len(df) - 1


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"symbol": "", "close": np.nan, "volume": -1.0}, "missing_symbol"),
        ({"timestamp": pd.NaT, "close": np.nan}, "unparseable_timestamp"),
        ({"close": np.nan, "volume": -1.0, "open": -3.0}, "nan_or_inf_price"),
        ({"open": -3.0, "high": -4.0}, "non_positive_price"),
        ({"high": 50.0, "low": 60.0, "volume": np.nan}, "high_below_low"),
        (
            {"open": 100.0, "close": 104.0, "high": 103.0, "low": 101.0, "volume": -1.0},
            "high_below_open_close",
        ),
        ({"volume": np.nan}, "nan_volume"),
    ],
)
def test_first_applicable_reason_wins(tmp_path, values, reason):
    df = good_frame()
    df["symbol"] = df["symbol"].astype(object)
    for col, value in values.items():
        df.loc[2, col] = value
    write(df, tmp_path / "f.parquet")
    result = load_raw_bars(tmp_path)
    assert quarantined(result) == {("f.parquet", 2): reason}
    assert reference_reasons(df)[2] == reason


def test_quarantine_keeps_raw_values_and_source(tmp_path):
    df = good_frame()
    df.loc[3, "volume"] = -7.0
    write(df, tmp_path / "sub" / "x.parquet")
    q = load_raw_bars(tmp_path).quarantine
    assert len(q) == 1
    row = q.iloc[0]
    assert row["source_file"] == str(tmp_path / "sub" / "x.parquet") and row["source_row"] == 3
    assert row["symbol"] == "AAA" and row["timestamp"] == df.loc[3, "timestamp"] and row["volume"] == -7.0
    assert q["source_row"].dtype == np.int64


# -- duplicates --------------------------------------------------------------------------------
def test_duplicates_across_files_keep_the_first_file_in_path_order(tmp_path):
    df = good_frame()
    later = df.iloc[[1, 6]].copy()
    later["close"] = later["close"] + 0.25  # different values, same keys
    write(later, tmp_path / "b" / "later.parquet")
    write(df, tmp_path / "a.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert quarantined(result) == {
        ("later.parquet", 0): "duplicate_key",
        ("later.parquet", 1): "duplicate_key",
    }
    pd.testing.assert_frame_equal(result.bars, df, check_dtype=False)
    assert [f["path"] for f in result.report["files"]] == [
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b" / "later.parquet"),
    ]


def test_broken_first_occurrence_does_not_displace_a_good_duplicate(tmp_path):
    df = good_frame()
    bad = df.iloc[[4]].copy()
    bad["close"] = np.nan
    write(bad, tmp_path / "a.parquet")
    write(df, tmp_path / "b.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert quarantined(result) == {("a.parquet", 0): "nan_or_inf_price"}
    assert len(result.bars) == len(df)


# -- order and time zones ----------------------------------------------------------------------
def test_unsorted_input_is_sorted(tmp_path):
    df = good_frame(symbols=("ZZZ", "AAA", "MMM"), n=6)
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    write(shuffled.iloc[:9], tmp_path / "1.parquet")
    write(shuffled.iloc[9:], tmp_path / "2.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    expected = df.sort_values(["symbol", "timestamp"], ignore_index=True)
    pd.testing.assert_frame_equal(result.bars, expected, check_dtype=False)


def test_unsorted_nanosecond_timestamps_over_centuries_are_sorted(tmp_path):
    # 1 ns resolution over ~500 years: too wide for the single-key sort, exercises the lexsort path
    stamps = pd.to_datetime(
        ["2200-01-01", "1700-01-01 00:00:00.000000001", "2024-01-01", "1700-01-01 00:00:00.000000001"],
        utc=True,
        format="ISO8601",
    ).as_unit("ns")
    df = pd.concat([good_frame(symbols=("BBB",), n=4), good_frame(symbols=("AAA",), n=4)], ignore_index=True)
    df["timestamp"] = list(stamps) * 2
    write(df, tmp_path / "wide.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert quarantined(result) == {("wide.parquet", 3): "duplicate_key", ("wide.parquet", 7): "duplicate_key"}
    assert list(result.bars["timestamp"][:3]) == sorted(stamps[:3])
    assert list(result.bars["close"][:3]) == [101.0, 102.0, 100.0]  # AAA rows, the first duplicate kept


def test_tz_aware_timestamps_are_converted_to_utc(tmp_path):
    df = good_frame(n=4)
    df["timestamp"] = df["timestamp"].dt.tz_convert("America/New_York")
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(
        1, "timestamp", table.column("timestamp").cast(pa.timestamp("ms", tz="America/New_York"))
    )
    write(table, tmp_path / "ny.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert str(result.bars["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert (result.bars["timestamp"] == good_frame(n=4)["timestamp"]).all()
    assert result.report["n_tz_naive_rows"] == 0


def _naive(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["timestamp"] = df["timestamp"].dt.tz_localize(None).astype("datetime64[us]")
    return df


def test_naive_timestamps_are_refused_naming_the_file_and_how_to_set_the_zone(tmp_path):
    write(_naive(good_frame(n=4)), tmp_path / "naive.parquet")
    write(good_frame(symbols=("CCC",), n=3), tmp_path / "aware.parquet")
    with pytest.raises(RawDataError) as err:
        load_raw_bars(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "naive.parquet") in msg and "8 timestamp(s) carry no time zone" in msg
    for hint in ("source_timezone", "--source-timezone", "SENTINEL_SOURCE_TZ", "America/New_York"):
        assert hint in msg


def test_naive_timestamps_with_a_source_timezone_utc_are_kept_and_counted(tmp_path):
    write(_naive(good_frame(n=4)), tmp_path / "naive.parquet")
    write(good_frame(symbols=("CCC",), n=3), tmp_path / "aware.parquet")
    result = load_raw_bars(tmp_path, IngestConfig(source_timezone="UTC"))
    check_accounting(result)
    assert result.report["n_tz_naive_rows"] == 8 and result.report["source_timezone"] == "UTC"
    zones = {Path(f["path"]).name: f["timezone"] for f in result.report["files"]}
    assert zones == {"naive.parquet": "naive, localised from UTC", "aware.parquet": "UTC (from the file)"}
    got = result.bars[result.bars["symbol"] != "CCC"].reset_index(drop=True)
    assert (got["timestamp"] == good_frame(n=4)["timestamp"]).all()


def test_naive_timestamps_are_localised_from_the_source_zone_with_daylight_saving(tmp_path):
    # New York wall-clock times around both 2024 switches: 10 Mar 02:30 does not exist, 3 Nov 01:30 twice
    wall = ["2024-03-09 09:30", "2024-03-10 02:30", "2024-03-11 09:30", "2024-11-03 01:30", "2024-11-04 09:30"]
    df = good_frame(symbols=("AAA",), n=len(wall))
    df["timestamp"] = pd.to_datetime(wall).astype("datetime64[us]")
    write(df, tmp_path / "ny_local.parquet")
    result = load_raw_bars(tmp_path, IngestConfig(source_timezone="America/New_York"))
    check_accounting(result)
    assert quarantined(result) == {("ny_local.parquet", 1): "nonexistent_local_time",
                                   ("ny_local.parquet", 3): "ambiguous_local_time"}
    # EST (UTC-5) before 10 Mar and after 3 Nov; nothing guessed for the two impossible rows
    assert list(result.bars["timestamp"]) == list(pd.to_datetime(
        ["2024-03-09 14:30", "2024-03-11 13:30", "2024-11-04 14:30"], utc=True))
    assert result.quarantine["timestamp"].isna().all()


def test_ingest_config_validates_its_numbers_and_zone():
    for bad in (-0.1, 1.5, float("nan"), "0.05", True):
        with pytest.raises(ValueError, match="max_quarantine_fraction must be a number between 0 and 1"):
            IngestConfig(max_quarantine_fraction=bad)
    assert IngestConfig(max_quarantine_fraction=0).max_quarantine_fraction == 0.0
    assert IngestConfig(max_quarantine_fraction=1).max_quarantine_fraction == 1.0
    with pytest.raises(ValueError, match="min_symbol_bars"):
        IngestConfig(min_symbol_bars=-1)
    with pytest.raises(ValueError, match="Mars/Olympus"):
        IngestConfig(source_timezone="Mars/Olympus")


def test_string_timestamps_are_parsed_and_garbage_quarantined(tmp_path):
    df = good_frame(symbols=("AAA",), n=6)
    df["timestamp"] = [
        "2024-03-01T14:30:00Z",
        "2024-03-01 10:30:00-05:00",  # = 15:30 UTC
        "2024-03-01T16:30:00",  # naive -> localised from the source zone (UTC)
        "not a time",
        "3000-01-01T00:00:00",  # beyond datetime64[ns]
        None,
    ]
    write(df, tmp_path / "s.parquet")
    with pytest.raises(RawDataError, match=r"s\.parquet: 1 timestamp\(s\) carry no time zone"):
        load_raw_bars(tmp_path)
    result = load_raw_bars(tmp_path, IngestConfig(source_timezone="UTC"))
    check_accounting(result)
    assert list(result.bars["timestamp"]) == list(
        pd.date_range("2024-03-01 14:30", periods=3, freq="h", tz="UTC")
    )
    assert quarantined(result) == {("s.parquet", k): "unparseable_timestamp" for k in (3, 4, 5)}
    assert result.quarantine["timestamp"].isna().all()
    assert result.report["n_tz_naive_rows"] == 1


def test_date_timestamps_and_integer_symbols_are_accepted(tmp_path):
    df = good_frame(n=3)
    table = pa.table(
        {
            "symbol": pa.array([101, 101, 101, 7, 7, 7], type=pa.int64()),
            "timestamp": pa.array(
                pd.to_datetime(["2024-03-01", "2024-03-04", "2024-03-05"] * 2).date, type=pa.date32()
            ),
            **{c: pa.array(df[c].to_numpy()) for c in RAW_COLUMNS[2:6]},
            "volume": pa.array(np.arange(6, dtype=np.int64)),
        }
    )
    write(table, tmp_path / "d.parquet")
    with pytest.raises(RawDataError, match="no time zone"):  # a date has no zone either
        load_raw_bars(tmp_path)
    result = load_raw_bars(tmp_path, IngestConfig(source_timezone="UTC"))
    check_accounting(result)
    assert list(result.bars["symbol"].unique()) == ["101", "7"]
    assert result.bars["timestamp"].iloc[0] == pd.Timestamp("2024-03-01", tz="UTC")
    assert result.report["n_tz_naive_rows"] == 6


# -- bad files ---------------------------------------------------------------------------------
def test_csv_renamed_to_parquet_fails_naming_the_file(tmp_path):
    write(good_frame(), tmp_path / "a.parquet")
    bad = tmp_path / "b.parquet"
    good_frame().to_csv(bad, index=False)
    with pytest.raises(RawDataError, match=r"b\.parquet.*not a readable parquet"):
        load_raw_bars(tmp_path)


def test_missing_column_fails_naming_file_and_column(tmp_path):
    write(good_frame().drop(columns=["volume", "low"]), tmp_path / "m.parquet")
    with pytest.raises(RawDataError, match=r"m\.parquet.*missing required column\(s\) \['low', 'volume'\]"):
        load_raw_bars(tmp_path)


def test_string_prices_fail_naming_file_and_column(tmp_path):
    df = good_frame()
    df["open"] = df["open"].astype(str)
    df["volume"] = df["volume"].astype(str)
    write(df, tmp_path / "s.parquet")
    with pytest.raises(RawDataError, match=r"s\.parquet.*'open' is (large_)?string.*'volume' is"):
        load_raw_bars(tmp_path)


def test_integer_timestamps_fail(tmp_path):
    df = good_frame()
    df["timestamp"] = np.arange(len(df))
    write(df, tmp_path / "i.parquet")
    with pytest.raises(RawDataError, match=r"i\.parquet.*'timestamp' is int64"):
        load_raw_bars(tmp_path)


def test_empty_or_missing_raw_dir_fails(tmp_path):
    (tmp_path / ".gitkeep").write_text("")  # hidden files are not input
    with pytest.raises(RawDataError, match=r"no \*\.parquet or \*\.csv files"):
        load_raw_bars(tmp_path)
    with pytest.raises(RawDataError, match="does not exist"):
        load_raw_bars(tmp_path / "nope")


@pytest.mark.parametrize("name", ["bars.feather", "bars.xlsx", "bars.json", "README"])
def test_a_file_the_stage_cannot_read_fails_naming_it(tmp_path, name):
    write(good_frame(), tmp_path / "good.parquet")
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / name).write_bytes(b"\x00data")
    with pytest.raises(RawDataError) as err:
        load_raw_bars(tmp_path)
    assert str(tmp_path / "vendor" / name) in str(err.value) and "cannot read 1 file(s)" in str(err.value)
    assert "good.parquet" not in str(err.value)


def test_hidden_files_are_ignored(tmp_path):
    write(good_frame(), tmp_path / "good.parquet")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.json").write_text("{}")
    assert list_input_files(tmp_path) == [tmp_path / "good.parquet"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_an_empty_file_fails_naming_it(tmp_path, suffix):
    write(good_frame(), tmp_path / "b.parquet")
    empty = tmp_path / f"a_empty{suffix}"
    if suffix == ".parquet":
        write(good_frame().iloc[:0], empty)
    else:
        good_frame().iloc[:0].to_csv(empty, index=False)  # a header and no rows
    with pytest.raises(RawDataError, match=rf"a_empty\{suffix}: the file holds no rows"):
        load_raw_bars(tmp_path)
    empty.write_text("")  # not even a header
    with pytest.raises(RawDataError, match=rf"a_empty\{suffix}"):
        load_raw_bars(tmp_path)


# -- CSV: the same schema and checks as parquet -------------------------------------------------
def _csv(df: pd.DataFrame, path: Path) -> Path:
    out = df.copy()
    out["timestamp"] = out["timestamp"].map(lambda t: t.isoformat() if isinstance(t, pd.Timestamp) else t)
    out.to_csv(path, index=False)
    return path


def test_csv_alone_is_ingested_like_the_same_parquet(tmp_path):
    df = good_frame(symbols=("AAA", "007"), n=6)
    df.loc[2, "close"] = np.nan  # an empty cell: quarantined like a parquet null
    df.loc[4, "volume"] = -1.0
    (tmp_path / "csv").mkdir()
    _csv(df, tmp_path / "csv" / "bars.csv")
    write(df, tmp_path / "pq" / "bars.parquet")
    from_csv, from_pq = load_raw_bars(tmp_path / "csv"), load_raw_bars(tmp_path / "pq")
    check_accounting(from_csv)
    pd.testing.assert_frame_equal(from_csv.bars, from_pq.bars)
    assert quarantined(from_csv) == {("bars.csv", 2): "nan_or_inf_price", ("bars.csv", 4): "negative_volume"}
    assert "007" in set(from_csv.bars["symbol"])  # symbols stay text: leading zeros kept
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["bars.csv"]  # nothing written beside it


def test_csv_with_extra_columns_and_garbage_timestamps(tmp_path):
    df = good_frame(symbols=("AAA",), n=4)
    df["note"] = "x"
    df["timestamp"] = ["2024-03-01T14:30:00Z", "yesterday", "2024-03-01T16:30:00+00:00", "2024-13-45T00:00:00Z"]
    df.to_csv(tmp_path / "f.csv", index=False)
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert quarantined(result) == {("f.csv", 1): "unparseable_timestamp", ("f.csv", 3): "unparseable_timestamp"}


def test_csv_bad_columns_fail_naming_file_and_column(tmp_path):
    df = good_frame()
    df.drop(columns=["low"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(RawDataError, match=r"m\.csv.*missing required column\(s\) \['low'\]"):
        load_raw_bars(tmp_path)
    (tmp_path / "m.csv").unlink()
    df["open"] = df["open"].astype(object)
    df.loc[3, "open"] = "n/a price"
    _csv(df, tmp_path / "t.csv")
    with pytest.raises(RawDataError, match=r"t\.csv: wrong column type.*column 'open' \(expected a number\)"):
        load_raw_bars(tmp_path)


def test_csv_naive_timestamps_are_refused_then_localised(tmp_path):
    df = good_frame(symbols=("AAA",), n=3)
    df["timestamp"] = ["2024-07-01 09:30", "2024-07-01 10:30", "2024-07-01 11:30"]
    df.to_csv(tmp_path / "local.csv", index=False)
    with pytest.raises(RawDataError, match=r"local\.csv: 3 timestamp\(s\) carry no time zone"):
        load_raw_bars(tmp_path)
    result = load_raw_bars(tmp_path, IngestConfig(source_timezone="America/New_York"))
    assert list(result.bars["timestamp"]) == list(pd.date_range("2024-07-01 13:30", periods=3, freq="h", tz="UTC"))


# -- too-short symbols ----------------------------------------------------------------------------
def test_symbols_shorter_than_the_minimum_are_quarantined_with_a_reason(tmp_path):
    df = pd.concat([good_frame(symbols=("AAA", "BBB"), n=12), good_frame(symbols=("SHORT",), n=5)], ignore_index=True)
    write(df, tmp_path / "f.parquet")
    result = load_raw_bars(tmp_path, IngestConfig(min_symbol_bars=10))
    check_accounting(result)  # rows in = rows out + quarantined
    assert set(result.bars["symbol"]) == {"AAA", "BBB"}
    assert quarantined(result) == {("f.parquet", k): "short_history" for k in range(24, 29)}
    rep = result.report
    assert rep["min_symbol_bars"] == 10 and rep["short_history_symbols"] == {"SHORT": 5}
    assert rep["n_short_history_symbols"] == 1
    assert len(load_raw_bars(tmp_path).bars) == len(df)  # off by default


def test_all_rows_quarantined_gives_typed_empty_bars(tmp_path):
    df = good_frame()
    df["volume"] = -1.0
    write(df, tmp_path / "bad.parquet")
    result = load_raw_bars(tmp_path)
    check_accounting(result)
    assert len(result.bars) == 0 and result.report["quarantine_by_reason"]["negative_volume"] == len(df)
    assert (result.report["n_symbols"], result.report["time_min"], result.report["time_max"]) == (
        0,
        None,
        None,
    )


# -- the quarantine limit ----------------------------------------------------------------------
def test_quarantine_limit_is_reported_then_enforced(tmp_path):
    df = good_frame(n=10)
    df.loc[[0, 1, 2], "close"] = np.nan
    df.loc[15, "volume"] = -1.0
    write(df, tmp_path / "noisy.parquet")
    result = load_raw_bars(tmp_path)  # does not raise: the caller writes the quarantine first
    check_accounting(result)
    assert result.report["quarantine_fraction"] == pytest.approx(0.2)
    assert result.report["within_quarantine_limit"] is False
    with pytest.raises(QuarantineLimitError) as err:
        enforce_quarantine_limit(result, IngestConfig())
    msg = str(err.value)
    assert isinstance(err.value, RawDataError)
    for part in ("20.00%", "5.00%", "nan_or_inf_price: 3", "negative_volume: 1", "noisy.parquet: 3"):
        assert part in msg
    enforce_quarantine_limit(result, IngestConfig(max_quarantine_fraction=0.2))  # at the limit: fine


def test_write_ingest_result_round_trips(tmp_path):
    df = good_frame()
    df.loc[4, "close"] = np.nan
    write(df, tmp_path / "raw" / "x.parquet")
    result = load_raw_bars(tmp_path / "raw")
    out = tmp_path / "artifacts" / "raw_bars"
    write_ingest_result(result, out / "bars.parquet", out / "quarantine.parquet", out / "quality_report.json")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "bars.parquet"), result.bars)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "quarantine.parquet"), result.quarantine)
    assert json.loads((out / "quality_report.json").read_text()) == result.report
    assert sorted(p.name for p in out.iterdir()) == [
        "bars.parquet",
        "quality_report.json",
        "quarantine.parquet",
    ]


# -- property: random messy input is fully accounted for ---------------------------------------
_price = st.one_of(
    st.floats(min_value=1.0, max_value=3.0),
    st.sampled_from([np.nan, np.inf, 0.0, -1.0]),
)
_row = st.tuples(
    st.sampled_from(["AAA", "BBB", "", None]),
    st.integers(min_value=0, max_value=5),  # hour offset: collisions make duplicates
    _price,
    _price,
    _price,
    _price,
    st.sampled_from([10.0, 0.0, -1.0, np.nan]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.lists(_row, min_size=1, max_size=25), min_size=1, max_size=3))
def test_messy_input_is_fully_accounted_for(tmp_path_factory, files):
    raw = tmp_path_factory.mktemp("raw")
    frames = []
    for k, rows in enumerate(files):
        df = pd.DataFrame(rows, columns=list(RAW_COLUMNS), dtype=object)
        df["timestamp"] = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(
            df["timestamp"].astype(int), unit="h"
        )
        for col in RAW_COLUMNS[2:]:
            df[col] = df[col].astype(float)
        df["symbol"] = df["symbol"].astype("string")
        write(df, raw / f"f{k}.parquet")
        frames.append(df.assign(source_file=str(raw / f"f{k}.parquet"), source_row=np.arange(len(df))))
    result = load_raw_bars(raw)
    check_accounting(result)
    everything = pd.concat(frames, ignore_index=True)
    expected = reference_reasons(everything)
    bad = expected != ""
    want = dict(
        zip(
            zip(everything["source_file"][bad], everything["source_row"][bad], strict=True),
            expected[bad],
            strict=True,
        )
    )
    q = result.quarantine
    got = dict(zip(zip(q["source_file"], q["source_row"], strict=True), q["reason"], strict=True))
    assert got == want
