"""Stage 1: read raw OHLCV parquet, validate every row, quarantine bad rows with a reason.

``load_raw_bars(raw_dir)`` reads every ``*.parquet`` under ``raw_dir`` (recursively, sorted by path)
with the columns ``symbol, timestamp, open, high, low, close, volume`` and returns

- ``bars``: the good rows, ``RAW_COLUMNS`` only, ``symbol`` a plain string column, ``timestamp``
  ``datetime64[ns, UTC]``, prices and volume float64, sorted by ``(symbol, timestamp)`` with a
  ``RangeIndex`` (unsorted input is sorted, never rejected);
- ``quarantine``: every rejected row with the raw columns (``timestamp`` null when unparseable),
  ``source_file``, ``source_row`` (0-based row number in its file) and ``reason``;
- ``report``: a JSON-able summary (counts per reason, per file, per symbol, time range).

Nothing is dropped silently: ``n_rows_in == n_rows_out + n_quarantined`` always.

Timestamps: tz-aware values are converted to UTC; tz-naive values (and dates) are taken as UTC and
counted in ``n_tz_naive_rows``; strings are parsed as ISO 8601 (an offset or ``Z`` makes them
tz-aware) and unparseable ones are quarantined. A row gets the first reason of ``QUARANTINE_REASONS``
that applies. ``duplicate_key`` is judged among the rows that pass every other check: the first
occurrence of a ``(symbol, timestamp)`` in file/row order is kept, later ones are quarantined (a
broken earlier row therefore never displaces a good later one).

A file that is not parquet, lacks a column or has a column of the wrong type raises
:class:`RawDataError` naming the file and the problem. ``load_raw_bars`` never raises for the share of
quarantined rows: the caller writes the quarantine first (so it can be inspected) and then calls
:func:`enforce_quarantine_limit`.

All row work is vectorised (Arrow compute + NumPy); the only Python loops run over files and over
the distinct symbol strings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sentinel_pipeline.atomic_io import atomic_path, write_json_atomic

RAW_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
# in order of precedence: a row gets the first reason that applies
QUARANTINE_REASONS: tuple[str, ...] = (
    "missing_symbol",
    "unparseable_timestamp",
    "nan_or_inf_price",
    "non_positive_price",
    "high_below_low",
    "high_below_open_close",
    "low_above_open_close",
    "nan_volume",
    "negative_volume",
    "duplicate_key",
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


@dataclass(frozen=True)
class IngestConfig:
    """``max_quarantine_fraction``: the largest share of input rows that may be quarantined."""

    max_quarantine_fraction: float = 0.05


@dataclass
class IngestResult:
    bars: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict[str, Any]


@dataclass
class _FileColumns:
    """One file's columns as flat arrays; ``symbols`` still holds the raw strings (Arrow)."""

    path: Path
    symbols: pa.Array
    timestamp_ns: np.ndarray  # int64, _NAT where missing/unparseable
    n_tz_naive: int
    prices: dict[str, np.ndarray]  # float64, NaN where null
    volume: np.ndarray


def list_parquet_files(raw_dir: str | Path) -> list[Path]:
    """Every ``*.parquet`` file under ``raw_dir`` (recursively), sorted by path."""
    return sorted(p for p in Path(raw_dir).rglob("*.parquet") if p.is_file())


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


def _timestamps_to_ns(arr: pa.Array) -> tuple[np.ndarray, int]:
    """int64 UTC nanoseconds (``_NAT`` where null or out of range) and the number of tz-naive values."""
    if pa.types.is_null(arr.type):
        return np.full(len(arr), _NAT, dtype=np.int64), 0
    if _is_string(arr.type):
        naive = ~pc.fill_null(pc.match_substring_regex(arr, _TZ_SUFFIX), False).to_numpy(zero_copy_only=False)
        arr = pa.Array.from_pandas(
            pd.to_datetime(arr.to_pandas(), utc=True, errors="coerce", format="ISO8601")
        )
    else:
        if pa.types.is_date(arr.type):
            arr = arr.cast(pa.timestamp("s"))
        naive = np.full(len(arr), arr.type.tz is None)
    factor = _NS_PER_UNIT[arr.type.unit]
    raw = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    ok = arr.is_valid().to_numpy(zero_copy_only=False) & (np.abs(raw) < np.iinfo(np.int64).max // factor)
    return np.where(ok, raw * factor, _NAT), int(np.count_nonzero(naive & ok))


def _read_file(path: Path) -> _FileColumns:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise RawDataError(f"{path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in RAW_COLUMNS if c not in schema.names]
    if missing:
        raise RawDataError(
            f"{path}: missing required column(s) {missing}; file has {schema.names}, expected {list(RAW_COLUMNS)}"
        )
    problems = _type_problems(schema)
    if problems:
        raise RawDataError(f"{path}: wrong column type(s): " + "; ".join(problems))
    try:
        table = pq.read_table(path, columns=list(RAW_COLUMNS))
    except (pa.ArrowException, OSError) as exc:
        raise RawDataError(f"{path}: cannot read parquet data ({exc})") from exc
    cols = {c: table.column(c).combine_chunks() for c in RAW_COLUMNS}

    symbols = cols["symbol"]
    if symbols.type != pa.string():
        symbols = symbols.cast(pa.string())
    ts_ns, n_naive = _timestamps_to_ns(cols["timestamp"])

    def as_float(arr: pa.Array) -> np.ndarray:
        return arr.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)

    return _FileColumns(
        path=path,
        symbols=symbols,
        timestamp_ns=ts_ns,
        n_tz_naive=n_naive,
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


def _iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").isoformat()


def load_raw_bars(raw_dir: str | Path, config: IngestConfig | None = None) -> IngestResult:
    """Read, validate and quarantine every ``*.parquet`` under ``raw_dir`` (see the module docstring).

    ``config`` only feeds the report (``max_quarantine_fraction``, ``within_quarantine_limit``);
    enforcing the limit is :func:`enforce_quarantine_limit`'s job.
    """
    cfg = config if config is not None else IngestConfig()
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise RawDataError(f"{raw_dir}: raw data directory does not exist")
    paths = list_parquet_files(raw_dir)
    if not paths:
        raise RawDataError(f"{raw_dir}: no *.parquet files found in the raw data directory")
    files = [_read_file(p) for p in paths]

    rows_per_file = np.array([len(f.volume) for f in files], dtype=np.int64)
    n = int(rows_per_file.sum())
    file_idx = np.repeat(np.arange(len(files), dtype=np.int32), rows_per_file)
    source_row = np.arange(n, dtype=np.int64) - np.repeat(
        np.cumsum(rows_per_file) - rows_per_file, rows_per_file
    )
    codes, names, n_valid_names = _encode_symbols(files)
    ts = np.concatenate([f.timestamp_ns for f in files])
    o, h, lo, c = (np.concatenate([f.prices[col] for f in files]) for col in PRICE_COLUMNS)
    v = np.concatenate([f.volume for f in files])

    # first applicable reason wins: assign from the last to the first, so earlier reasons overwrite
    reason = np.zeros(n, dtype=np.int8)  # 0 = good, k = QUARANTINE_REASONS[k - 1]
    with np.errstate(invalid="ignore"):
        checks = (
            (codes < 0) | (codes >= n_valid_names),
            ts == _NAT,
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

    file_names = [str(f.path) for f in files]
    bars = _frame(
        {
            "symbol": _string_column(codes[keep], names),
            "timestamp": ts[keep],
            "open": o[keep],
            "high": h[keep],
            "low": lo[keep],
            "close": c[keep],
            "volume": v[keep],
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
    per_symbol = np.bincount(codes[keep], minlength=n_valid_names)
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
        "n_symbols": len(per_symbol),
        "rows_per_symbol_min": int(per_symbol.min()) if len(per_symbol) else 0,
        "rows_per_symbol_max": int(per_symbol.max()) if len(per_symbol) else 0,
        "time_min": _iso(int(ts[keep].min())) if len(keep) else None,
        "time_max": _iso(int(ts[keep].max())) if len(keep) else None,
        "files": [
            {"path": name, "rows": int(rows), "n_quarantined": int(nq)}
            for name, rows, nq in zip(file_names, rows_per_file, q_per_file, strict=True)
        ],
    }
    return IngestResult(bars=bars, quarantine=quarantine, report=report)


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
    raise QuarantineLimitError(
        f"quarantined {report['n_quarantined']} of {report['n_rows_in']} rows = {fraction:.2%}, above the "
        f"limit max_quarantine_fraction={cfg.max_quarantine_fraction:.2%}; top reasons: " + "; ".join(top)
    )


def write_ingest_result(
    result: IngestResult, bars_path: str | Path, quarantine_path: str | Path, report_path: str | Path
) -> None:
    """Write bars and quarantine as parquet and the report as JSON, each atomically."""
    for frame, path in ((result.bars, bars_path), (result.quarantine, quarantine_path)):
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    write_json_atomic(report_path, result.report)
