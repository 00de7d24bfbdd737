"""Stage 1: read raw OHLCV files (parquet or CSV), validate every row, quarantine bad rows with a reason.

``load_raw_bars(raw_dir)`` reads every ``*.parquet`` and ``*.csv`` file under ``raw_dir`` (recursively,
sorted by path; hidden files are ignored, any other file fails naming it; ``raw_dir`` may also be a
single parquet or CSV file) with the columns
``symbol, timestamp, open, high, low, close, volume`` (``load_bar_files`` reads a given list) and returns

- ``bars``: the good rows, ``RAW_COLUMNS`` only, ``symbol`` a plain string column, ``timestamp``
  ``datetime64[ns, UTC]``, prices and volume float64, sorted by ``(symbol, timestamp)`` with a
  ``RangeIndex`` (unsorted input is sorted, never rejected);
- ``quarantine``: every rejected row with the raw columns (``timestamp`` null when unparseable),
  ``source_file``, ``source_row`` (0-based row number in its file) and ``reason``;
- ``report``: a JSON-able summary (counts per reason, per file, per symbol, time range) with, under
  ``bar_quality``, the quirks of the good bars that no row check catches (jumps, spikes, zero-volume
  and flat runs, long holes; ``sentinel_pipeline.data.bar_quality``);
- ``flags``: one row per bar (same order) saying which of those quirks it carries; the label stage
  keeps label windows off them. The bars themselves stay: they are real, only flagged.

Nothing is dropped silently: ``n_rows_in == n_rows_out + n_quarantined`` always. With
``IngestConfig.quality.split_at_hole_bars`` set, the bars after each long hole of a symbol are renamed
``<symbol>~2``, ``<symbol>~3``, ... (and re-sorted), so that no later stage treats the two sides of the
hole as one series; without it (the default) symbols are as in the files.

CSV files have the same columns (a header row names them, extra columns are ignored) and get the same
checks: ``symbol`` and ``timestamp`` are read as text, prices and volume as numbers (an empty cell is
missing, a cell that is not a number fails naming the file and the column).

Timestamps: tz-aware values (a parquet timestamp with a time zone, an ISO-8601 string with ``Z`` or an
offset) are converted to UTC. Values without a time zone (a parquet timestamp without tz, a date, an
ISO string without offset) are **refused** (:class:`RawDataError` naming the file) unless
``IngestConfig.source_timezone`` names the zone they are in (an IANA name such as ``UTC`` or
``America/New_York``); then they are localised from that zone (daylight saving by pandas'
``tz_localize``) and converted to UTC. A local time that does not exist (the spring-forward gap) or
exists twice (the autumn fall-back hour) is quarantined (``nonexistent_local_time`` /
``ambiguous_local_time``), never guessed. Strings are parsed strictly as ISO 8601; unparseable ones are
quarantined. A row gets the first reason of ``QUARANTINE_REASONS`` that applies. ``duplicate_key`` is
judged among the rows that pass every other check: the first occurrence of a ``(symbol, timestamp)``
in file/row order is kept, later ones are quarantined (a broken earlier row therefore never displaces a
good later one). ``short_history`` is judged last: with ``IngestConfig.min_symbol_bars = m`` the rows of
a symbol with fewer than ``m`` good rows are quarantined (the data half derives ``m`` from its feature,
label and split configuration: fewer bars cannot give one training sample).

A file that is neither parquet nor CSV, cannot be read, holds no rows, lacks a column or has a column
of the wrong type raises :class:`RawDataError` naming the file and the problem. ``load_raw_bars`` never
raises for the share of quarantined rows: the caller writes the quarantine first (so it can be
inspected) and then calls :func:`enforce_quarantine_limit`.

All row work is vectorised (Arrow compute + NumPy); the only Python loops run over files and over
the distinct symbol strings.

The parquet I/O of the whole data half lives here too: :func:`write_parquet` (the on-disk form of
every bar-ordered table), :func:`read_parquet` (``pd.read_parquet`` with one copy of the data instead
of two) and :func:`iter_row_groups` (stream a file one row group at a time, reading ahead in a thread).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from sentinel_pipeline.atomic_io import atomic_path, write_json_atomic
from sentinel_pipeline.data import bar_quality

RAW_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
# in order of precedence: a row gets the first reason that applies
QUARANTINE_REASONS: tuple[str, ...] = (
    "missing_symbol",
    "unparseable_timestamp",
    "nonexistent_local_time",
    "ambiguous_local_time",
    "nan_or_inf_price",
    "non_positive_price",
    "high_below_low",
    "high_below_open_close",
    "low_above_open_close",
    "nan_volume",
    "negative_volume",
    "duplicate_key",
    "short_history",
)
# the file types the raw stage reads
SUPPORTED_SUFFIXES: tuple[str, ...] = (".parquet", ".csv")
SOURCE_TZ_ENV = "SENTINEL_SOURCE_TZ"
SOURCE_TZ_HELP = (
    "set the time zone the file's timestamps are in: IngestConfig(source_timezone=...) in Python, "
    f"source_timezone in the data_settings resource, --source-timezone on the data_half CLI, or the "
    f"environment variable {SOURCE_TZ_ENV} (an IANA name such as UTC or America/New_York)"
)
QUARANTINE_COLUMNS: tuple[str, ...] = (*RAW_COLUMNS, "source_file", "source_row", "reason")

_NAT = np.iinfo(np.int64).min  # NaT as int64 nanoseconds
_NS_PER_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
# an ISO-8601 time followed by 'Z' or a UTC offset: the string carries its own time zone
_TZ_SUFFIX = r"(?i)[t ]\d.*(z|[+-]\d{2}:?\d{2})$"


class RawDataError(ValueError):
    """A raw input file cannot be used; the message names the file and the problem."""


class QuarantineLimitError(RawDataError):
    """More rows were quarantined than ``IngestConfig.max_quarantine_fraction`` allows."""


class InsufficientHistoryError(RawDataError):
    """Too few bars (per symbol, or overall for the three splits) for the configuration."""


def check_timezone(name: str) -> str:
    """``name`` if pandas can localise to it (an IANA zone such as ``UTC`` or ``Europe/Berlin``), else ValueError."""
    try:
        pd.DatetimeIndex([]).tz_localize(name)
    except Exception as exc:  # pandas/zoneinfo raise several types for an unknown zone
        raise ValueError(
            f"source_timezone {name!r} is not a time zone pandas knows (use an IANA name such as "
            f"'UTC' or 'America/New_York'): {exc}"
        ) from exc
    return name


@dataclass(frozen=True)
class IngestConfig:
    """``max_quarantine_fraction``: the largest share of input rows that may be quarantined (0..1);
    ``source_timezone``: the zone of timestamps that carry none (None: such files are refused);
    ``min_symbol_bars``: symbols with fewer good rows are quarantined as ``short_history`` (0: off);
    ``quality``: the thresholds of the bar-quality flags (and the optional split at long holes)."""

    max_quarantine_fraction: float = 0.05
    source_timezone: str | None = None
    min_symbol_bars: int = 0
    quality: bar_quality.BarQualityConfig = field(default_factory=bar_quality.BarQualityConfig)

    def __post_init__(self) -> None:
        q = self.max_quarantine_fraction
        if isinstance(q, bool) or not isinstance(q, int | float) or not (math.isfinite(q) and 0.0 <= q <= 1.0):
            raise ValueError(
                f"IngestConfig.max_quarantine_fraction must be a number between 0 and 1 (a share of the input "
                f"rows, e.g. 0.05 for 5 %), got {q!r}"
            )
        object.__setattr__(self, "max_quarantine_fraction", float(q))
        m = self.min_symbol_bars
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 0:
            raise ValueError(f"IngestConfig.min_symbol_bars must be an integer >= 0, got {m!r}")
        object.__setattr__(self, "min_symbol_bars", int(m))
        if self.source_timezone is not None:
            if not isinstance(self.source_timezone, str) or not self.source_timezone.strip():
                raise ValueError(f"IngestConfig.source_timezone must be None or a zone name, got {self.source_timezone!r}")
            check_timezone(self.source_timezone)


@dataclass
class IngestResult:
    bars: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict[str, Any]
    flags: pd.DataFrame | None = None  # bar_quality.FLAG_COLUMNS, one row per bar


@dataclass
class _FileColumns:
    """One file's columns as flat arrays; ``symbols`` still holds the raw strings (Arrow)."""

    path: Path
    symbols: pa.Array
    timestamp_ns: np.ndarray  # int64, _NAT where missing/unparseable/not a local time
    n_tz_naive: int
    local_time_problem: np.ndarray | None  # int8 per row: 0 fine, 1 nonexistent, 2 ambiguous local time
    timezone: str  # how the file's timestamps were read (for the report)
    prices: dict[str, np.ndarray]  # float64, NaN where null
    volume: np.ndarray


def list_parquet_files(raw_dir: str | Path) -> list[Path]:
    """Every ``*.parquet`` file under ``raw_dir`` (recursively), sorted by path."""
    return sorted(p for p in Path(raw_dir).rglob("*.parquet") if p.is_file())


def _visible_files(raw_dir: Path) -> list[Path]:
    """Every file under ``raw_dir`` except hidden ones (``.gitkeep``, ``.DS_Store``, files in hidden folders)."""
    return sorted(
        p for p in raw_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts)
    )


def list_input_files(raw_dir: str | Path) -> list[Path]:
    """The parquet and CSV files under ``raw_dir`` (recursively, sorted by path; hidden files ignored),
    or ``[raw_dir]`` when it is itself a parquet or CSV file (one file of a folder that holds others).

    Any other file raises :class:`RawDataError` naming it: a file the pipeline cannot read is never
    silently skipped. An absent path gives ``[]``.
    """
    raw_dir = Path(raw_dir)
    if raw_dir.is_file():
        if raw_dir.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise RawDataError(
                f"{raw_dir}: cannot read this raw input file: the raw stage reads parquet (*.parquet) and CSV (*.csv) "
                f"with the columns {list(RAW_COLUMNS)}"
            )
        return [raw_dir]
    if not raw_dir.is_dir():
        return []
    files = _visible_files(raw_dir)
    unsupported = [p for p in files if p.suffix.lower() not in SUPPORTED_SUFFIXES]
    if unsupported:
        shown = ", ".join(str(p) for p in unsupported[:10]) + (f" (+{len(unsupported) - 10} more)" if len(unsupported) > 10 else "")
        raise RawDataError(
            f"{raw_dir}: cannot read {len(unsupported)} file(s) in the raw data folder: {shown}. The raw stage reads "
            f"parquet (*.parquet) and CSV (*.csv) with the columns {list(RAW_COLUMNS)}; convert or move the other files"
        )
    return files


# -- reading one file -------------------------------------------------------------------------
def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)


def _type_problems(schema: pa.Schema) -> list[str]:
    problems = []
    sym = schema.field("symbol").type
    if not (
        _is_string(sym)
        or pa.types.is_integer(sym)
        or pa.types.is_null(sym)
        or (pa.types.is_dictionary(sym) and _is_string(sym.value_type))
    ):
        problems.append(f"'symbol' is {sym} (expected string or integer)")
    ts = schema.field("timestamp").type
    if not (pa.types.is_timestamp(ts) or pa.types.is_date(ts) or _is_string(ts) or pa.types.is_null(ts)):
        problems.append(f"'timestamp' is {ts} (expected timestamp, date or ISO-8601 string)")
    for col in (*PRICE_COLUMNS, "volume"):
        t = schema.field(col).type
        if not _is_numeric(t):
            problems.append(f"'{col}' is {t} (expected a numeric type)")
    return problems


def _timestamps_to_ns(
    arr: pa.Array, path: Path, source_timezone: str | None
) -> tuple[np.ndarray, int, np.ndarray | None, str]:
    """UTC nanoseconds of a timestamp column: ``(int64 ns, n_tz_naive, local_time_problem, description)``.

    ``_NAT`` where null, unparseable, out of range or not a valid local time (``local_time_problem``
    says which: 1 nonexistent, 2 ambiguous; None when nothing was localised). Values without a time
    zone raise :class:`RawDataError` unless ``source_timezone`` is given.
    """
    n = len(arr)
    if pa.types.is_null(arr.type):
        return np.full(n, _NAT, dtype=np.int64), 0, None, "no timestamps"
    if _is_string(arr.type):
        naive = ~pc.fill_null(pc.match_substring_regex(arr, _TZ_SUFFIX), False).to_numpy(zero_copy_only=False)
        # naive strings parse as their wall-clock time in UTC; localised below when a zone is given
        arr = pa.Array.from_pandas(
            pd.to_datetime(arr.to_pandas(), utc=True, errors="coerce", format="ISO8601")
        )
        zone = "UTC (offsets in the strings)"
    else:
        if pa.types.is_date(arr.type):
            arr = arr.cast(pa.timestamp("s"))
        naive = np.full(n, arr.type.tz is None)
        zone = f"{arr.type.tz} (from the file)" if arr.type.tz is not None else ""
    factor = _NS_PER_UNIT[arr.type.unit]
    raw = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    ok = arr.is_valid().to_numpy(zero_copy_only=False) & (np.abs(raw) < np.iinfo(np.int64).max // factor)
    ns = np.where(ok, raw * factor, _NAT)
    naive &= ok
    n_naive = int(np.count_nonzero(naive))
    if not n_naive:
        return ns, 0, None, zone or "UTC"
    if source_timezone is None:
        example = pd.Timestamp(int(ns[np.flatnonzero(naive)[0]]), unit="ns").isoformat()
        raise RawDataError(
            f"{path}: {n_naive} timestamp(s) carry no time zone (e.g. '{example}'); naive timestamps are never "
            f"guessed to be UTC. If they are UTC or local exchange time, {SOURCE_TZ_HELP}"
        )
    where = np.flatnonzero(naive)
    wall = pd.DatetimeIndex(ns[where].view("datetime64[ns]"))
    local = wall.tz_localize(source_timezone, ambiguous="NaT", nonexistent="NaT")
    problem = np.zeros(n, dtype=np.int8)
    bad = np.asarray(local.isna())
    if bad.any():  # tell the gap (nonexistent) from the repeated hour (ambiguous)
        gap = np.asarray(wall.tz_localize(source_timezone, ambiguous=np.ones(len(wall), bool), nonexistent="NaT").isna())
        problem[where[bad & gap]] = 1
        problem[where[bad & ~gap]] = 2
    ns[where] = np.where(bad, _NAT, local.asi8)
    described = f"naive, localised from {source_timezone}"
    return ns, n_naive, problem, described if n_naive == n else f"{zone or 'UTC'}; {described}"


def _missing_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in RAW_COLUMNS if c not in names]
    if missing:
        raise RawDataError(
            f"{path}: missing required column(s) {missing}; file has {names}, expected {list(RAW_COLUMNS)}"
        )


def _read_parquet_table(path: Path) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise RawDataError(f"{path}: not a readable parquet file ({exc})") from exc
    _missing_columns(path, schema.names)
    problems = _type_problems(schema)
    if problems:
        raise RawDataError(f"{path}: wrong column type(s): " + "; ".join(problems))
    try:
        return pq.read_table(path, columns=list(RAW_COLUMNS), memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise RawDataError(f"{path}: cannot read parquet data ({exc})") from exc


_CSV_TYPES: dict[str, pa.DataType] = {
    "symbol": pa.string(), "timestamp": pa.string(), **{c: pa.float64() for c in (*PRICE_COLUMNS, "volume")}
}


def _read_csv_table(path: Path) -> pa.Table:
    """A CSV file's raw columns: symbol and timestamp as text (parsed like parquet strings), prices and
    volume as float64 (empty cells null; a cell that is not a number fails naming the column)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise RawDataError(f"{path}: not a readable CSV file ({exc})") from exc
    if not header:
        raise RawDataError(f"{path}: empty CSV file (no header, 0 rows); expected the columns {list(RAW_COLUMNS)}")
    header = [h.strip() for h in header]
    _missing_columns(path, header)
    try:
        return pv.read_csv(
            path,
            read_options=pv.ReadOptions(column_names=header, skip_rows=1),
            convert_options=pv.ConvertOptions(
                column_types=_CSV_TYPES, include_columns=list(RAW_COLUMNS), strings_can_be_null=True
            ),
        )
    except (pa.ArrowException, OSError) as exc:
        problem = str(exc)
        m = re.search(r"CSV column #(\d+)", problem)
        if m and int(m.group(1)) < len(header):
            column = header[int(m.group(1))]
            problem = f"column '{column}' (expected {'a number' if _CSV_TYPES.get(column) == pa.float64() else 'text'}): {problem}"
        raise RawDataError(f"{path}: wrong column type(s) or unreadable CSV: {problem}") from exc


def _read_file(path: Path, source_timezone: str | None = None) -> _FileColumns:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table = _read_csv_table(path)
    elif suffix == ".parquet":
        table = _read_parquet_table(path)
    else:
        raise RawDataError(f"{path}: not a parquet or CSV file; the raw stage reads {list(SUPPORTED_SUFFIXES)}")
    if table.num_rows == 0:
        raise RawDataError(f"{path}: the file holds no rows (0 bars); remove it or give it data")
    cols = {c: table.column(c) for c in RAW_COLUMNS}

    symbols = cols["symbol"].combine_chunks()
    if symbols.type != pa.string():
        symbols = symbols.cast(pa.string())
    ts_ns, n_naive, problem, zone = _timestamps_to_ns(cols["timestamp"].combine_chunks(), path, source_timezone)

    def as_float(arr: pa.ChunkedArray) -> np.ndarray:  # one copy, straight from the chunks (writable)
        return arr.cast(pa.float64(), safe=False).to_numpy()

    return _FileColumns(
        path=path,
        symbols=symbols,
        timestamp_ns=ts_ns,
        n_tz_naive=n_naive,
        local_time_problem=problem,
        timezone=zone,
        prices={c: as_float(cols[c]) for c in PRICE_COLUMNS},
        volume=as_float(cols["volume"]),
    )


def _encode_symbols(files: list[_FileColumns]) -> tuple[np.ndarray, list[str], int]:
    """Global symbol codes for all rows.

    Returns ``(codes, names, n_valid)``: ``names[:n_valid]`` are the valid symbols in sorted order (so
    sorting by code sorts by symbol), ``names[n_valid:]`` the empty/blank strings seen; ``codes`` is
    -1 for null symbols.
    """
    encoded = [pc.dictionary_encode(f.symbols) for f in files]
    local_names = [e.dictionary.to_pylist() for e in encoded]
    seen = {s for names in local_names for s in names}
    valid = sorted(s for s in seen if s.strip())
    names = valid + sorted(s for s in seen if not s.strip())
    index = {s: i for i, s in enumerate(names)}
    parts = []
    for enc, local in zip(encoded, local_names, strict=True):
        lookup = np.array([index[s] for s in local] + [-1], dtype=np.int32)
        parts.append(lookup[pc.fill_null(enc.indices, len(local)).to_numpy(zero_copy_only=False)])
    return np.concatenate(parts), names, len(valid)


def _sort_order(codes: np.ndarray, ts: np.ndarray) -> np.ndarray | None:
    """Stable argsort by ``(codes, ts)``, or None when the rows are already in that order.

    Sorting one int64 key is about twice as fast as ``np.lexsort`` on two: timestamps are expressed
    in steps of their greatest common divisor (e.g. one bar) so ``code * n_steps + step`` fits.
    """
    dc = np.diff(codes)
    if np.all((dc > 0) | ((dc == 0) & (np.diff(ts) >= 0))):
        return None
    t0, span = int(ts.min()), int(ts.max()) - int(ts.min())
    if span < 2**62:
        step = max(int(np.gcd.reduce(ts - t0)), 1)
        n_steps = span // step + 1
        if (int(codes.max()) + 1) * n_steps < 2**62:
            return np.argsort(codes.astype(np.int64) * n_steps + (ts - t0) // step, kind="stable")
    return np.lexsort((ts, codes))


# -- the stage ---------------------------------------------------------------------------------
def _string_column(codes: np.ndarray, names: list[str]) -> pa.Array:
    """Strings ``names[codes]`` (null where code is -1) without building Python objects per row."""
    dictionary = pa.array(names, type=pa.string())
    indices = pa.array(codes, type=pa.int32(), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, dictionary).cast(pa.string())


def _frame(columns: dict[str, pa.Array | np.ndarray]) -> pd.DataFrame:
    """A DataFrame over the given columns without copying them (int64 ``_NAT`` is NaT for ``timestamp``)."""
    data: dict[str, Any] = {}
    for name, values in columns.items():
        if isinstance(values, pa.Array):
            data[name] = values.to_pandas()
        elif name == "timestamp":
            data[name] = pd.to_datetime(values.view("datetime64[ns]"), utc=True)
        else:
            data[name] = values
    return pd.DataFrame(data, copy=False)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)``, except that a single writable array is used as it is (the per-file
    arrays are fresh copies; only zero-copy views of Arrow memory are read-only)."""
    if len(parts) == 1 and parts[0].flags.writeable:
        return parts[0]
    return np.concatenate(parts)


def _iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").isoformat()


def load_raw_bars(raw_dir: str | Path, config: IngestConfig | None = None) -> IngestResult:
    """Read, validate and quarantine every parquet/CSV file under ``raw_dir`` (see the module docstring).

    ``config`` only feeds the report (``max_quarantine_fraction``, ``within_quarantine_limit``);
    enforcing the limit is :func:`enforce_quarantine_limit`'s job.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.exists():
        raise RawDataError(f"{raw_dir}: raw data directory does not exist")
    paths = list_input_files(raw_dir)
    if not paths:
        raise RawDataError(f"{raw_dir}: no *.parquet or *.csv files found in the raw data directory")
    return load_bar_files(paths, config, origin=raw_dir.parent if raw_dir.is_file() else raw_dir)


def load_bar_files(
    paths: list[Path], config: IngestConfig | None = None, *, origin: str | Path | None = None
) -> IngestResult:
    """:func:`load_raw_bars` on an explicit list of parquet/CSV files (read in the given order).

    ``origin`` (the folder they came from) only names the input in error messages.
    """
    cfg = config if config is not None else IngestConfig()
    paths = [Path(p) for p in paths]
    if not paths:
        raise RawDataError(f"{origin}: no input files")
    files = [_read_file(p, cfg.source_timezone) for p in paths]
    raw_dir = Path(origin) if origin is not None else paths[0].parent

    rows_per_file = np.array([len(f.volume) for f in files], dtype=np.int64)
    n = int(rows_per_file.sum())
    file_idx = np.repeat(np.arange(len(files), dtype=np.int32), rows_per_file)
    source_row = np.arange(n, dtype=np.int64) - np.repeat(
        np.cumsum(rows_per_file) - rows_per_file, rows_per_file
    )
    codes, names, n_valid_names = _encode_symbols(files)
    ts = _concat([f.timestamp_ns for f in files])
    local_problem = np.concatenate(
        [f.local_time_problem if f.local_time_problem is not None else np.zeros(len(f.volume), np.int8) for f in files]
    )
    o, h, lo, c = (_concat([f.prices[col] for f in files]) for col in PRICE_COLUMNS)
    v = _concat([f.volume for f in files])

    # first applicable reason wins: assign from the last to the first, so earlier reasons overwrite
    reason = np.zeros(n, dtype=np.int8)  # 0 = good, k = QUARANTINE_REASONS[k - 1]
    with np.errstate(invalid="ignore"):
        checks = (
            (codes < 0) | (codes >= n_valid_names),
            (ts == _NAT) & (local_problem == 0),
            local_problem == 1,
            local_problem == 2,
            ~(np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c)),
            (o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0),
            h < lo,
            h < np.maximum(o, c),
            lo > np.minimum(o, c),
            ~np.isfinite(v),
            v < 0,
        )
    for k in range(len(checks), 0, -1):
        reason[checks[k - 1]] = k

    # duplicates among the otherwise good rows; a stable sort keeps file/row order within a key
    cand = np.flatnonzero(reason == 0)
    cc, ct = codes[cand], ts[cand]
    order = _sort_order(cc, ct)
    if order is not None:
        cand, cc, ct = cand[order], cc[order], ct[order]
    same = (cc[1:] == cc[:-1]) & (ct[1:] == ct[:-1])
    reason[cand[1:][same]] = QUARANTINE_REASONS.index("duplicate_key") + 1
    keep = cand[np.concatenate([[True], ~same])] if len(cand) else cand
    # symbols too short for the configuration (judged on their good rows): quarantined, never silently dropped
    kept_counts = np.bincount(codes[keep], minlength=n_valid_names) if len(keep) else np.zeros(n_valid_names, np.int64)
    short = (kept_counts > 0) & (kept_counts < cfg.min_symbol_bars)
    if short.any():
        is_short = short[codes[keep]]
        reason[keep[is_short]] = QUARANTINE_REASONS.index("short_history") + 1
        keep = keep[~is_short]
    # every row good and already in order (the usual case): the kept rows are all rows, no gather
    kept: np.ndarray | slice = slice(None) if order is None and len(keep) == n else keep
    kept_ts = ts[kept]

    file_names = [str(f.path) for f in files]
    bars = _frame(
        {
            "symbol": _string_column(codes[kept], names),
            "timestamp": kept_ts,
            "open": o[kept],
            "high": h[kept],
            "low": lo[kept],
            "close": c[kept],
            "volume": v[kept],
        }
    )

    q = np.flatnonzero(reason)
    quarantine = _frame(
        {
            "symbol": _string_column(codes[q], names),
            "timestamp": ts[q],
            "open": o[q],
            "high": h[q],
            "low": lo[q],
            "close": c[q],
            "volume": v[q],
            "source_file": _string_column(file_idx[q], file_names),
            "source_row": source_row[q],
            "reason": _string_column(reason[q].astype(np.int32) - 1, list(QUARANTINE_REASONS)),
        }
    )

    reason_counts = np.bincount(reason, minlength=len(QUARANTINE_REASONS) + 1)
    q_per_file = np.bincount(file_idx[q], minlength=len(files))
    per_symbol = np.bincount(codes[kept], minlength=n_valid_names)
    per_symbol = per_symbol[per_symbol > 0]
    fraction = float(len(q) / n) if n else 0.0
    report: dict[str, Any] = {
        "n_files": len(files),
        "n_rows_in": n,
        "n_rows_out": len(keep),
        "n_quarantined": len(q),
        "quarantine_fraction": fraction,
        "max_quarantine_fraction": cfg.max_quarantine_fraction,
        "within_quarantine_limit": fraction <= cfg.max_quarantine_fraction,
        "quarantine_by_reason": {r: int(reason_counts[k + 1]) for k, r in enumerate(QUARANTINE_REASONS)},
        "n_tz_naive_rows": int(sum(f.n_tz_naive for f in files)),
        "source_timezone": cfg.source_timezone,
        "min_symbol_bars": cfg.min_symbol_bars,
        "n_short_history_symbols": int(short.sum()),
        "short_history_symbols": {
            names[k]: int(kept_counts[k]) for k in np.flatnonzero(short)[np.argsort(kept_counts[short], kind="stable")][:20]
        },
        "n_symbols": len(per_symbol),
        "rows_per_symbol_min": int(per_symbol.min()) if len(per_symbol) else 0,
        "rows_per_symbol_max": int(per_symbol.max()) if len(per_symbol) else 0,
        "time_min": _iso(int(kept_ts.min())) if len(keep) else None,
        "time_max": _iso(int(kept_ts.max())) if len(keep) else None,
        "files": [
            {"path": name, "rows": int(rows), "n_quarantined": int(nq), "timezone": f.timezone}
            for name, rows, nq, f in zip(file_names, rows_per_file, q_per_file, files, strict=True)
        ],
    }
    quality = bar_quality.assess_bars(bars, cfg.quality)
    flags = quality.flags
    if cfg.quality.split_at_hole_bars is not None:
        try:
            bars, flags = bar_quality.apply_segments(bars, flags, quality.segment)
        except ValueError as exc:
            raise RawDataError(f"{raw_dir}: cannot split symbols at long holes: {exc}") from exc
        if quality.segment.any():
            counts = bars["symbol"].value_counts()
            report["n_symbols"] = int(counts.size)
            report["rows_per_symbol_min"] = int(counts.min())
            report["rows_per_symbol_max"] = int(counts.max())
    report["bar_quality"] = quality.report
    return IngestResult(bars=bars, quarantine=quarantine, report=report, flags=flags)


def enforce_quarantine_limit(result: IngestResult, config: IngestConfig | None = None) -> None:
    """Raise :class:`QuarantineLimitError` when the quarantined share exceeds the configured limit.

    The message names the fraction, the limit, the most frequent reasons and the files they came from.
    """
    cfg = config if config is not None else IngestConfig()
    report = result.report
    fraction = report["quarantine_fraction"]
    if fraction <= cfg.max_quarantine_fraction:
        return
    top = []
    reasons = Counter(result.quarantine["reason"].tolist())
    for reason, count in reasons.most_common(3):
        per_file = Counter(
            result.quarantine.loc[result.quarantine["reason"] == reason, "source_file"].tolist()
        )
        files = ", ".join(f"{f}: {k}" for f, k in per_file.most_common(3))
        more = f", +{len(per_file) - 3} more files" if len(per_file) > 3 else ""
        top.append(f"{reason}: {count} ({files}{more})")
    short = ""
    if reasons.get("short_history"):
        short = (f" (short_history: the rows of symbols with fewer than {report.get('min_symbol_bars')} bars, the "
                 f"least the feature, label and split configuration needs)")
    raise QuarantineLimitError(
        f"quarantined {report['n_quarantined']} of {report['n_rows_in']} rows = {fraction:.2%}, above the "
        f"limit max_quarantine_fraction={cfg.max_quarantine_fraction:.2%}; top reasons: " + "; ".join(top) + short
    )


def write_parquet(data: pd.DataFrame | pa.Table, path: str | Path) -> Path:
    """Write a frame (without its index) or an Arrow table as parquet, atomically; returns ``path``.

    The parquet form of every bar-ordered table of the data half. It is what ``DataFrame.to_parquet``
    writes (same Arrow schema and pandas metadata, snappy), except that float columns are not
    dictionary-encoded: their values are nearly all distinct, so pyarrow builds a dictionary, gives up
    and falls back to plain encoding, which made writes about 3x and reads about 2x slower for no gain
    in size. Other columns (symbols, timestamps, small integer codes, flags) keep dictionary encoding.
    """
    if isinstance(data, pa.Table):
        table = data
    else:
        table = pa.Table.from_pandas(data, preserve_index=False)
        if data.attrs:  # as pandas does
            table = table.replace_schema_metadata({**table.schema.metadata, "PANDAS_ATTRS": json.dumps(data.attrs)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **parquet_write_options(table.schema))
    return Path(path)


def parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """The ``pq.write_table``/``pq.ParquetWriter`` options :func:`write_parquet` uses for ``schema``."""
    return {"use_dictionary": [f.name for f in schema if not pa.types.is_floating(f.type)]}


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The frame ``pd.read_parquet(path, columns=columns)`` returns, built with one copy of the data.

    ``pd.read_parquet`` materialises the whole Arrow table and then copies it into pandas, so the
    data is in fresh memory twice. Here numeric, boolean and timestamp columns are read one row group at
    a time (Arrow reuses one row group's buffers for the next) straight into their final NumPy arrays;
    string and other columns are converted by pyarrow as pandas does. The dtypes are checked against
    what ``pd.read_parquet`` gives (from the schema and its pandas metadata); anything unusual (an index
    stored in the file, nulls in an integer, boolean or timestamp column) falls back to ``pd.read_parquet``.
    """
    source = pq.ParquetFile(path, memory_map=True)
    schema = source.schema_arrow
    names = list(schema.names if columns is None else columns)
    pandas_meta = json.loads((schema.metadata or {}).get(b"pandas", b"{}"))
    expected = schema.empty_table().select(names).to_pandas().dtypes  # the dtypes pd.read_parquet gives
    if pandas_meta.get("index_columns") or len(set(names)) != len(names):
        return pd.read_parquet(path, columns=columns)

    def numpy_dtype(t: pa.DataType) -> np.dtype | None:
        """The NumPy dtype a column of type ``t`` is read into directly (None: converted by pyarrow)."""
        if pa.types.is_timestamp(t):
            return np.dtype(f"datetime64[{t.unit}]")
        if pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t):
            return np.dtype(t.to_pandas_dtype())
        return None

    n = source.metadata.num_rows
    dtypes = {c: numpy_dtype(schema.field(c).type) for c in names}
    arrays = {c: np.empty(n, dtype=dtype) for c, dtype in dtypes.items() if dtype is not None}
    offset = 0
    for part in iter_row_groups(source, list(arrays)) if arrays else ():
        for c, out in arrays.items():
            col = part.column(c)
            if col.null_count and not pa.types.is_floating(col.type):  # pandas would change the dtype
                return pd.read_parquet(path, columns=columns)
            out[offset : offset + part.num_rows] = col.to_numpy()  # float nulls -> NaN, as in pandas
        offset += part.num_rows
    others = [c for c in names if c not in arrays]
    converted = source.read(columns=others).to_pandas(split_blocks=True) if others else None
    data: dict[str, Any] = {}
    for c in names:
        if c not in arrays:
            data[c] = converted[c]  # type: ignore[index]
        elif isinstance(expected[c], pd.DatetimeTZDtype):
            data[c] = pd.DatetimeIndex(arrays[c]).tz_localize("UTC").tz_convert(expected[c].tz)
        else:
            data[c] = arrays[c]
    frame = pd.DataFrame(data, columns=names, copy=False)
    if not frame.dtypes.equals(expected):
        return pd.read_parquet(path, columns=columns)
    return frame


def iter_row_groups(source: pq.ParquetFile, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The row groups of a parquet file in order (``columns`` only), each read in a second thread while
    the caller works on the previous one (pyarrow releases the GIL while it reads and decodes)."""
    n = source.num_row_groups
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(source.read_row_group, 0, columns) if n else None
        for g in range(n):
            current = ahead.result()  # type: ignore[union-attr]
            ahead = pool.submit(source.read_row_group, g + 1, columns) if g + 1 < n else None
            yield current


def write_ingest_result(
    result: IngestResult,
    bars_path: str | Path,
    quarantine_path: str | Path,
    report_path: str | Path,
    flags_path: str | Path | None = None,
) -> None:
    """Write bars, quarantine and (when ``flags_path`` is given) the bar flags as parquet
    (:func:`write_parquet`) and the report as JSON, each atomically."""
    write_parquet(result.bars, bars_path)
    write_parquet(result.quarantine, quarantine_path)
    if flags_path is not None:
        if result.flags is None:
            raise ValueError(f"{flags_path}: the ingest result has no bar flags to write")
        write_parquet(result.flags, flags_path)
    write_json_atomic(report_path, result.report)
