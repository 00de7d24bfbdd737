"""Data quirks that corrupt targets: jumps, spikes, zero-volume and flat runs, long holes (pure, vectorised).

Real feeds carry bars that pass every row check of stage 1 and still wreck ATR-unit targets: a bad
tick (a daily low of 0.01 inside its own bar's range), an unadjusted 7:1 split, minutes forward-filled
with zero volume, a ticker reused by another company after a years-long hole. :func:`assess_bars`
finds them per symbol on the sorted, validated bars and returns

- ``flags``: one row per bar, same order (``FLAG_COLUMNS``): boolean columns per kind, the bars
  missing before each bar, the segment number, and ``quirks`` (uint8, the OR of ``QUIRK_BITS``) that
  the label stage reads to keep label windows off them;
- ``report``: counts and the worst few examples of each kind (JSON-able, for ``quality_report.json``
  and the UI);
- ``segment``: per bar, how many ``split_at_hole_bars`` holes of its symbol precede it.

Nothing is dropped or changed: the bars are real, the flags say what is odd about them.

Definitions (per symbol, bar ``j`` against its own symbol's neighbours; ``BarQualityConfig``):

- **jump** at ``j``: ``|log(close[j] / close[j-1])| > jump_log_return`` (default 0.35: a 3:2 split is
  0.41, 2:1 0.69, 7:1 1.95, a 1:4 reverse split 1.39; a corporate action does not shrink with the
  bar size while ordinary moves do, so one threshold serves daily and intraday bars). Examples carry
  the price ratio and ``split_like`` (e.g. ``"7:1"``, ``"1:4"``) when it is within 3% of a simple ratio.
- **spike** at ``j``: the low sits ``spike_log_excess`` (log units, default 0.25) or more below the
  lows of both neighbours (``log(min(low[j-1], low[j+1]) / low[j])``), or the high that far above both
  neighbours' highs; the next bar being back in range is what makes it a spike rather than a level
  change (a split moves both the bar and its successor, so it is not a spike). The first/last bar of a
  symbol is judged against its one neighbour.
- **zero-volume run**: ``zero_volume_run_bars`` or more consecutive bars with ``volume == 0``.
- **flat run**: ``flat_run_bars`` or more consecutive bars with ``open == high == low == close ==``
  the previous close (no range, no move: typically forward-filled bars).
- **hole** before ``j``: the gap from bar ``j-1`` skips ``hole_bars`` or more bars of the symbol's own
  calendar. Calendar aware: the gap is counted in weekdays, ``B = busday_count(date[j-1], date[j])``
  (UTC dates), so weekends and the overnight break are not holes; with ``d`` = the symbol's typical
  ``B`` between bars on different dates (1 for daily and intraday bars, 5 for weekly) and ``r`` = its
  median number of bars per date (1 daily, 7 for a US equity session of hourly bars, 24 for FX),
  ``missed_bars = max(B - d, 0) / d * r``. A holiday is 1 daily bar (7 hourly), a 2-year hole about
  500 daily bars. Missing bars inside a day are not counted (they are not long holes). ``d`` and ``r``
  come from the symbol itself when it has at least ``MIN_DATE_GAPS`` date changes, else from the
  whole panel. Default ``hole_bars = 20``: a gap longer than the default label window.
- **segments** (optional, ``split_at_hole_bars = N``): a symbol's history is cut at every gap of N or
  more missed bars; ``segment`` counts the cuts before each bar. The raw stage then renames the bars
  of segment ``k >= 1`` to ``f"{symbol}~{k + 1}"`` (:func:`apply_segments`), so that no feature
  window, label window, purge or training window of any later stage spans the hole.

``jump`` and ``hole`` describe the step from bar ``j-1`` into bar ``j`` (``TRANSITION_QUIRKS``); a
label window of bars ``t+1 .. t+W`` crosses them when ``j`` is in that range. ``spike`` and the runs
describe bar ``j`` itself; a label window meets them when ``j`` is in ``t .. t+W``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

QUIRK_KINDS: tuple[str, ...] = ("jump", "spike", "zero_volume_run", "flat_run", "hole")
QUIRK_BITS: dict[str, int] = {kind: 1 << k for k, kind in enumerate(QUIRK_KINDS)}
TRANSITION_QUIRKS: tuple[str, ...] = ("jump", "hole")
# the flags table: per kind a boolean column (the hole one is on the first bar after the hole)
KIND_COLUMN: dict[str, str] = {
    "jump": "jump",
    "spike": "spike",
    "zero_volume_run": "zero_volume_run",
    "flat_run": "flat_run",
    "hole": "after_hole",
}
FLAG_COLUMNS: tuple[str, ...] = (
    "symbol", "timestamp", *KIND_COLUMN.values(), "missed_bars", "segment", "quirks",
)
SEGMENT_SEPARATOR = "~"
MIN_DATE_GAPS = 20  # date changes a symbol needs before its own typical spacing is trusted
_NS_DAY = 86_400_000_000_000
_SPLIT_TOLERANCE = 0.03
_FRACTIONAL_SPLITS = (Fraction(3, 2), Fraction(4, 3), Fraction(5, 4), Fraction(5, 2))


@dataclass(frozen=True)
class BarQualityConfig:
    """Thresholds of :func:`assess_bars` (see the module docstring); they enter the raw stage's fingerprint."""

    jump_log_return: float = 0.35
    spike_log_excess: float = 0.25
    zero_volume_run_bars: int = 3
    flat_run_bars: int = 3
    hole_bars: int = 20
    split_at_hole_bars: int | None = None
    n_examples: int = 5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("jump_log_return", "spike_log_excess"):
                if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0
                ):
                    raise ValueError(f"BarQualityConfig.{f.name} must be a finite number > 0, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.name == "split_at_hole_bars" and value is None:
                continue
            else:
                lowest = 0 if f.name == "n_examples" else 1
                if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lowest:
                    raise ValueError(f"BarQualityConfig.{f.name} must be an integer >= {lowest}, got {value!r}")
                object.__setattr__(self, f.name, int(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BarQuality:
    flags: pd.DataFrame
    report: dict[str, Any]
    segment: np.ndarray  # int32 per bar


# -- helpers -----------------------------------------------------------------------------------
def _iso(ns: int) -> str:
    return pd.Timestamp(int(ns), unit="ns", tz="UTC").isoformat()


def _round(x: float, digits: int = 6) -> float | None:
    """``x`` with ``digits`` significant digits (None when not finite), for reports and the UI."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _shift(a: np.ndarray, k: int, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """``a`` moved by one bar within each symbol (k=+1: previous bar's value, k=-1: next bar's), NaN
    where that bar is in another symbol."""
    out = np.empty(a.shape, dtype=np.float64)
    if k == 1:
        out[1:], out[:1] = a[:-1], np.nan
        out[first] = np.nan
    else:
        out[:-1], out[-1:] = a[1:], np.nan
        out[last] = np.nan
    return out


def _runs(mask: np.ndarray, first: np.ndarray, min_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of True inside each symbol: ``(in_long_run mask, start rows, lengths)`` of the
    runs of at least ``min_len`` bars."""
    n = mask.shape[0]
    if not mask.any():
        return np.zeros(n, dtype=bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    prev = np.zeros(n, dtype=bool)
    prev[1:] = mask[:-1]
    prev[first] = False
    start = mask & ~prev
    run_id = np.cumsum(start) - 1
    lengths = np.bincount(run_id[mask])
    starts = np.flatnonzero(start)
    long_run = lengths >= min_len
    in_long = np.zeros(n, dtype=bool)
    in_long[mask] = long_run[run_id[mask]]
    return in_long, starts[long_run], lengths[long_run]


def _per_symbol_median(values: np.ndarray, codes: np.ndarray, n_codes: int,
                       min_count: int, fallback: float) -> np.ndarray:
    """Median of ``values`` per code (codes 0..n_codes-1); ``fallback`` for codes with fewer than
    ``min_count`` values."""
    out = np.full(n_codes, fallback, dtype=np.float64)
    if values.size:
        s = pd.Series(values, dtype=np.float64).groupby(codes)
        med, cnt = s.median(), s.size()
        ok = cnt.index[cnt.to_numpy() >= min_count]
        out[ok.to_numpy()] = med.loc[ok].to_numpy()
    return out


def split_like(price_ratio: float) -> str | None:
    """``"p:q"`` when ``price_ratio`` (previous close / close) is within 3% of a simple split ratio: a
    whole number up to 100 or 3:2, 4:3, 5:4, 5:2 (``"7:1"``: one share became seven; ``"1:4"``: a
    1-for-4 reverse split). A hint, not a corporate-action record."""
    if not (math.isfinite(price_ratio) and price_ratio > 0):
        return None
    r = price_ratio if price_ratio >= 1 else 1.0 / price_ratio
    candidates = [Fraction(max(round(r), 1)), *_FRACTIONAL_SPLITS]
    best = min(candidates, key=lambda f: abs(r / float(f) - 1))
    if best <= 1 or best.numerator > 100 or abs(r / float(best) - 1) > _SPLIT_TOLERANCE:
        return None
    p, q = best.numerator, best.denominator
    return f"{p}:{q}" if price_ratio >= 1 else f"{q}:{p}"


def _top(score: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows with the largest score (ties: earlier row first), in that order."""
    if k <= 0 or rows.size == 0:
        return rows[:0]
    order = np.lexsort((rows, -score))
    return rows[order[:k]]


def _by_symbol(rows: np.ndarray, codes: np.ndarray, names: np.ndarray, k: int = 10) -> dict[str, int]:
    """Counts per symbol of the flagged ``rows``, the ``k`` symbols with the most."""
    if rows.size == 0:
        return {}
    counts = np.bincount(codes[rows], minlength=len(names))
    top = np.lexsort((np.arange(len(names)), -counts))[:k]
    return {str(names[c]): int(counts[c]) for c in top if counts[c] > 0}


# -- the assessment ----------------------------------------------------------------------------
def assess_bars(bars: pd.DataFrame, config: BarQualityConfig | None = None) -> BarQuality:
    """Flag the quirks of ``bars`` (``symbol, timestamp, open, high, low, close, volume``, sorted by
    ``(symbol, timestamp)``, prices > 0 as stage 1 guarantees); see the module docstring."""
    cfg = config if config is not None else BarQualityConfig()
    n = len(bars)
    codes, names = pd.factorize(bars["symbol"], sort=False)
    codes = codes.astype(np.int64)
    names = np.asarray(names, dtype=object)
    n_codes = len(names)
    ts = np.asarray(bars["timestamp"].array.as_unit("ns").asi8, dtype=np.int64) if n else np.zeros(0, np.int64)
    o, h, lo, c, v = (np.asarray(bars[col].to_numpy(np.float64)) for col in ("open", "high", "low", "close", "volume"))

    first = np.ones(n, dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    last = np.ones(n, dtype=bool)
    last[:-1] = first[1:]

    # jumps: the close-to-close log return into each bar
    prev_c = _shift(c, 1, first, last)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ret = np.log(c / prev_c)
    jump = np.abs(log_ret) > cfg.jump_log_return  # NaN (first bar) compares False

    # spikes: low far below both neighbours' lows, high far above both neighbours' highs
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_low = np.fmin(_shift(lo, 1, first, last), _shift(lo, -1, first, last))
        ref_high = np.fmax(_shift(h, 1, first, last), _shift(h, -1, first, last))
        low_excess = np.log(ref_low / lo)
        high_excess = np.log(h / ref_high)
    spike_low = low_excess >= cfg.spike_log_excess
    spike_high = high_excess >= cfg.spike_log_excess
    spike = spike_low | spike_high

    # zero-volume and flat runs
    zero_run, zero_starts, zero_lengths = _runs(v == 0, first, cfg.zero_volume_run_bars)
    flat_bar = (o == h) & (h == lo) & (lo == c) & (c == prev_c)
    flat_run, flat_starts, flat_lengths = _runs(flat_bar, first, cfg.flat_run_bars)

    # holes: weekdays between the bars' UTC dates, against the symbol's typical step and bars per date
    dates = (ts // _NS_DAY).astype("datetime64[D]")
    busdays = np.zeros(n, dtype=np.int64)
    if n > 1:
        busdays[1:] = np.busday_count(dates[:-1], dates[1:])
    busdays[first] = 0
    new_date = first.copy()
    new_date[1:] |= dates[1:] != dates[:-1]
    date_change = new_date & ~first
    step_rows = np.flatnonzero(date_change & (busdays >= 1))
    pooled_step = float(np.median(busdays[step_rows])) if step_rows.size else 1.0
    step = _per_symbol_median(busdays[step_rows].astype(np.float64), codes[step_rows], n_codes,
                              MIN_DATE_GAPS, pooled_step)
    day_starts = np.flatnonzero(new_date)
    per_date = np.diff(np.append(day_starts, n)).astype(np.float64)
    pooled_per_date = float(np.median(per_date)) if per_date.size else 1.0
    n_dates = np.bincount(codes[day_starts], minlength=n_codes) if n else np.zeros(n_codes, np.int64)
    per_date_sym = _per_symbol_median(per_date, codes[day_starts], n_codes, 1, pooled_per_date)
    per_date_sym[n_dates <= MIN_DATE_GAPS] = pooled_per_date
    d, r = step[codes], per_date_sym[codes]
    missed = np.where(date_change, np.maximum(busdays - d, 0.0) / d * r, 0.0)
    hole = missed >= cfg.hole_bars

    if cfg.split_at_hole_bars is not None:
        cut = (missed >= cfg.split_at_hole_bars).astype(np.int32)
        cum = np.cumsum(cut, dtype=np.int64)
        segment = (cum - cum[np.flatnonzero(first)][np.cumsum(first) - 1]).astype(np.int32) if n else cut
    else:
        segment = np.zeros(n, dtype=np.int32)

    quirks = (
        jump * np.uint8(QUIRK_BITS["jump"])
        | spike * np.uint8(QUIRK_BITS["spike"])
        | zero_run * np.uint8(QUIRK_BITS["zero_volume_run"])
        | flat_run * np.uint8(QUIRK_BITS["flat_run"])
        | hole * np.uint8(QUIRK_BITS["hole"])
    ).astype(np.uint8)
    flags = pd.DataFrame(
        {
            "symbol": bars["symbol"].array,
            "timestamp": bars["timestamp"].array,
            "jump": jump,
            "spike": spike,
            "zero_volume_run": zero_run,
            "flat_run": flat_run,
            "after_hole": hole,
            "missed_bars": missed.astype(np.float32),
            "segment": segment,
            "quirks": quirks,
        },
        index=pd.RangeIndex(n),
    )

    k = cfg.n_examples

    def sym(row: int) -> str:
        return str(names[codes[row]])

    # report: counts, the worst examples, the symbols most affected
    jump_rows = np.flatnonzero(jump)
    jump_examples = []
    for row in _top(np.abs(log_ret[jump_rows]), jump_rows, k):
        ratio = prev_c[row] / c[row]
        jump_examples.append({
            "symbol": sym(row), "timestamp": _iso(ts[row]), "previous_close": _round(prev_c[row]),
            "close": _round(c[row]), "log_return": _round(log_ret[row], 4), "price_ratio": _round(ratio, 4),
            "split_like": split_like(ratio),
        })
    spike_rows = np.flatnonzero(spike)
    excess = np.fmax(np.where(spike_low, low_excess, -np.inf), np.where(spike_high, high_excess, -np.inf))
    spike_examples = []
    for row in _top(excess[spike_rows], spike_rows, k):
        is_low = bool(spike_low[row]) and (not spike_high[row] or low_excess[row] >= high_excess[row])
        spike_examples.append({
            "symbol": sym(row), "timestamp": _iso(ts[row]), "side": "low" if is_low else "high",
            "value": _round(lo[row] if is_low else h[row]),
            "neighbours": _round(ref_low[row] if is_low else ref_high[row]),
            "log_excess": _round(low_excess[row] if is_low else high_excess[row], 4),
        })

    def run_report(starts: np.ndarray, lengths: np.ndarray, in_run: np.ndarray, min_len: int) -> dict[str, Any]:
        examples = []
        for j in np.argsort(-lengths, kind="stable")[:k]:
            s0, m = int(starts[j]), int(lengths[j])
            examples.append({"symbol": sym(s0), "start": _iso(ts[s0]), "end": _iso(ts[s0 + m - 1]), "bars": m})
        rows_per_sym = np.bincount(codes, minlength=n_codes) if n else np.zeros(n_codes, np.int64)
        in_run_per_sym = np.bincount(codes[in_run], minlength=n_codes) if n else rows_per_sym
        entirely = [str(names[x]) for x in np.flatnonzero((rows_per_sym > 0) & (in_run_per_sym == rows_per_sym))]
        return {
            "min_run_bars": min_len,
            "n_runs": int(starts.size),
            "n_bars": int(in_run.sum()),
            "longest": int(lengths.max()) if lengths.size else 0,
            "n_symbols": int(np.unique(codes[starts]).size),
            "symbols_entirely": entirely[:20],
            "n_symbols_entirely": len(entirely),
            "by_symbol": _by_symbol(starts, codes, names),
            "examples": examples,
        }

    hole_rows = np.flatnonzero(hole)
    hole_examples = []
    for row in _top(missed[hole_rows], hole_rows, k):
        hole_examples.append({
            "symbol": sym(row), "timestamp": _iso(ts[row]), "previous": _iso(ts[row - 1]),
            "missed_bars": _round(missed[row], 4), "calendar_days": _round((ts[row] - ts[row - 1]) / _NS_DAY, 4),
        })
    report: dict[str, Any] = {
        "config": cfg.to_dict(),
        "n_bars": n,
        "n_bars_flagged": int(np.count_nonzero(quirks)),
        "n_symbols_flagged": int(np.unique(codes[quirks != 0]).size),
        "jumps": {
            "threshold_log_return": cfg.jump_log_return,
            "n": int(jump_rows.size),
            "n_split_like": sum(1 for row in jump_rows if split_like(prev_c[row] / c[row]) is not None),
            "max_abs_log_return": _round(np.abs(log_ret[jump_rows]).max(), 4) if jump_rows.size else None,
            "by_symbol": _by_symbol(jump_rows, codes, names),
            "examples": jump_examples,
        },
        "spikes": {
            "threshold_log_excess": cfg.spike_log_excess,
            "n": int(spike_rows.size),
            "n_low": int(spike_low.sum()),
            "n_high": int(spike_high.sum()),
            "by_symbol": _by_symbol(spike_rows, codes, names),
            "examples": spike_examples,
        },
        "zero_volume_runs": run_report(zero_starts, zero_lengths, zero_run, cfg.zero_volume_run_bars),
        "flat_runs": run_report(flat_starts, flat_lengths, flat_run, cfg.flat_run_bars),
        "holes": {
            "hole_bars": cfg.hole_bars,
            "n": int(hole_rows.size),
            "n_symbols": int(np.unique(codes[hole_rows]).size),
            "longest_missed_bars": _round(missed[hole_rows].max(), 4) if hole_rows.size else 0.0,
            "by_symbol": _by_symbol(hole_rows, codes, names),
            "examples": hole_examples,
        },
        "segments": _segment_report(segment, codes, names, ts, first, cfg, k),
    }
    return BarQuality(flags=flags, report=report, segment=segment)


def _segment_report(segment: np.ndarray, codes: np.ndarray, names: np.ndarray, ts: np.ndarray,
                    first: np.ndarray, cfg: BarQualityConfig, k: int) -> dict[str, Any]:
    """How the symbols were cut into segments (empty counts when ``split_at_hole_bars`` is None)."""
    starts = np.flatnonzero(first | np.r_[False, segment[1:] != segment[:-1]]) if segment.size else segment
    later = starts[segment[starts] > 0] if starts.size else starts
    ends = np.append(starts[1:], segment.size) if starts.size else starts
    end_of = dict(zip(starts.tolist(), ends.tolist(), strict=True))
    examples = []
    for s0 in later[:k]:
        e = end_of[int(s0)]
        examples.append({
            "symbol": segment_name(str(names[codes[s0]]), int(segment[s0])), "first": _iso(ts[s0]),
            "last": _iso(ts[e - 1]), "rows": int(e - s0),
        })
    return {
        "split_at_hole_bars": cfg.split_at_hole_bars,
        "naming": f"<symbol>{SEGMENT_SEPARATOR}<k> for segment k >= 2",
        "n_segments_added": int(later.size),
        "n_symbols_split": int(np.unique(codes[later]).size),
        "examples": examples,
    }


def segment_name(symbol: str, segment: int) -> str:
    """The symbol name of a segment: ``symbol`` for segment 0, ``f"{symbol}~{segment + 1}"`` after that."""
    return symbol if segment == 0 else f"{symbol}{SEGMENT_SEPARATOR}{segment + 1}"


def apply_segments(bars: pd.DataFrame, flags: pd.DataFrame, segment: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rename the bars of each later segment (:func:`segment_name`) and re-sort bars and flags by
    ``(symbol, timestamp)``; rows are only renamed and reordered, none is added or dropped.

    Raises ``ValueError`` when a segment name is already a symbol of the data.
    """
    if not segment.any():
        return bars, flags
    codes, names = pd.factorize(bars["symbol"], sort=False)
    pair = codes.astype(np.int64) * (int(segment.max()) + 1) + segment
    pair_codes, pairs = pd.factorize(pair, sort=False)
    width = int(segment.max()) + 1
    new_names = [segment_name(str(names[p // width]), int(p % width)) for p in pairs]
    existing = set(map(str, names))
    clash = sorted({nm for nm, p in zip(new_names, pairs, strict=True) if p % width and nm in existing})
    if clash:
        raise ValueError(f"segment name(s) {clash[:5]} already used by symbols of the data; rename them or "
                         f"set split_at_hole_bars=None")
    order_names = np.argsort(np.asarray(new_names, dtype=object), kind="stable")
    rank = np.empty(len(new_names), dtype=np.int64)
    rank[order_names] = np.arange(len(new_names))
    new_codes = rank[pair_codes]
    order = np.argsort(new_codes, kind="stable")  # rows of one segment keep their time order
    sorted_names = pa.array([new_names[i] for i in order_names], type=pa.string())
    symbol = pa.DictionaryArray.from_arrays(pa.array(new_codes[order], type=pa.int32()), sorted_names)
    symbol_col = symbol.cast(pa.string()).to_pandas()

    def reorder(frame: pd.DataFrame) -> pd.DataFrame:
        out = frame.take(order).reset_index(drop=True)
        out["symbol"] = symbol_col.astype(frame["symbol"].dtype)
        return out

    return reorder(bars), reorder(flags)


def base_symbol(name: str) -> str:
    """The original symbol of a segment name (``"AAPL~2"`` -> ``"AAPL"``); other names unchanged."""
    head, sep, tail = name.rpartition(SEGMENT_SEPARATOR)
    return head if sep and tail.isdigit() and head else name
