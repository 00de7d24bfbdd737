"""Stage 3: triple-barrier labels, forward returns and excursions, computed by one numba kernel.

For every bar ``t`` of a symbol (entry at ``close[t]``, volatility unit ``atr[t]``):

- **Triple barrier** on high/low. ``upper = close[t] + pt * atr[t]``, ``lower = close[t] - sl * atr[t]``.
  Bars ``t+1 .. t+horizon`` of the same symbol are scanned in order; the first bar with
  ``high >= upper`` gives ``+1``, the first with ``low <= lower`` gives ``-1``. A bar that touches both
  gives ``-1`` (conservative: the order inside a bar is unknown) and ``tb_both_touched = True``. No touch
  gives ``0`` at the vertical barrier (bar ``t+horizon``).
- ``tb_touch_time``: timestamp of the touching bar (vertical: of bar ``t+horizon``);
  ``tb_bars_to_touch``: how many bars after ``t`` that is (``horizon`` when vertical);
  ``tb_return``: simple return from ``close[t]`` to the barrier price (``pt*atr/close``, ``-sl*atr/close``)
  or to ``close[t+horizon]`` at the vertical barrier; ``tb_return_atr``: the same move in ATR units.
- ``fwd_ret_{h} = close[t+h] / close[t] - 1`` for each ``h`` in ``fwd_horizons``.
- ``mfe_{E} = max(max(high[t+1..t+E]) - close[t], 0) / atr[t]`` and
  ``mae_{E} = max(close[t] - min(low[t+1..t+E]), 0) / atr[t]`` with ``E = excursion_bars`` (default 6,
  hence ``mfe_6``/``mae_6``); ``early_move = mfe_E - mae_E``.
- ``label_eligible``: all ``label_window_bars(config)`` future bars exist in the same symbol,
  ``atr[t]`` is finite and > 0, and the label window meets none of the bar quirks in
  ``config.protect_from`` (see below). Ineligible rows get NaN float targets, ``tb_label = 0``,
  ``tb_both_touched = False``, ``tb_touch_time = NaT`` and ``tb_bars_to_touch = -1``: never a made-up
  label.

**Bar quirks** (``sentinel_pipeline.data.bar_quality``; per bar a uint8 of ``QUIRK_BITS`` that the raw
stage writes to its flags table). With ``W = label_window_bars(config)``, the window of row ``t`` meets
a transition quirk (``jump``, ``hole``: the step into bar ``j``) when ``t < j <= t + W``, and a bar quirk
(``spike``, ``zero_volume_run``, ``flat_run``) when ``t <= j <= t + W``, always within the row's
symbol (the window is cut at the symbol's last bar). ``label_quirks`` (uint8) holds the bits of every
quirk the window meets, plus ``LABEL_CLIPPED`` when a target was clipped; a row whose window meets a
kind in ``protect_from`` (default: hole, jump, spike) is ineligible, counted per kind in the stats.
So no label spans a long hole, an unadjusted split or a bad tick.

**Winsorised ATR-unit targets**: with ``target_clip_atr = B`` (default 20), ``mfe_E`` and ``mae_E``
are capped at ``B``, ``early_move = mfe_E - mae_E`` of the capped values (so it lies in ``[-B, B]``)
and ``tb_return_atr`` is clipped to ``[-B, B]`` (it never exceeds ``max(pt, sl)`` anyway, and ``B``
must be at least that). Clipped rows keep their label and eligibility and get ``LABEL_CLIPPED``;
the stats count them per target with the largest value before clipping. ``tb_return`` and ``fwd_ret_h``
are simple returns and are not clipped. ``triple_barrier`` (the barrier outcome alone) knows neither
quirks nor clipping.

The kernel runs over flat arrays with per-row symbol codes and never reads across a symbol boundary.
``sentinel_pipeline_tests/reference_labeller.py`` is a slow per-event implementation of the same
semantics that the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numba
import numpy as np
import pandas as pd

from sentinel_pipeline.data.bar_quality import QUIRK_BITS, QUIRK_KINDS, TRANSITION_QUIRKS

REQUIRED_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "high", "low", "close", "atr")
LABEL_METHOD = "triple_barrier_high_low"
LABEL_CLIPPED = 128  # bit of ``label_quirks``: an ATR-unit target of the row was clipped
DEFAULT_PROTECT_FROM: tuple[str, ...] = ("jump", "spike", "hole")


@dataclass(frozen=True)
class LabelConfig:
    """Barrier widths in ATR units, horizons in bars; which bar quirks make a label window unusable
    (``protect_from``, kinds of ``bar_quality.QUIRK_KINDS``) and the bound of the ATR-unit targets
    (``target_clip_atr``, None: no clipping)."""

    pt: float = 1.5
    sl: float = 1.5
    horizon: int = 20
    fwd_horizons: tuple[int, ...] = (1, 5, 10, 20)
    excursion_bars: int = 6
    protect_from: tuple[str, ...] = DEFAULT_PROTECT_FROM
    target_clip_atr: float | None = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fwd_horizons", tuple(int(h) for h in self.fwd_horizons))
        kinds = (self.protect_from,) if isinstance(self.protect_from, str) else tuple(self.protect_from)
        unknown = [k for k in kinds if k not in QUIRK_KINDS]
        if unknown or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"LabelConfig.protect_from must hold distinct kinds of {list(QUIRK_KINDS)}, got {self.protect_from!r}"
            )
        object.__setattr__(self, "protect_from", tuple(k for k in QUIRK_KINDS if k in kinds))  # canonical order
        clip = self.target_clip_atr
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, int | float) or not (math.isfinite(clip) and clip > 0):
                raise ValueError(f"LabelConfig.target_clip_atr must be None or a finite number > 0, got {clip!r}")
            object.__setattr__(self, "target_clip_atr", float(clip))
        for name in ("pt", "sl"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"LabelConfig.{name} must be a finite number > 0, got {value!r}")
        if int(self.horizon) != self.horizon or self.horizon < 1:
            raise ValueError(f"LabelConfig.horizon must be an integer >= 1, got {self.horizon!r}")
        if int(self.excursion_bars) != self.excursion_bars or self.excursion_bars < 1:
            raise ValueError(
                f"LabelConfig.excursion_bars must be an integer >= 1, got {self.excursion_bars!r}"
            )
        if not self.fwd_horizons or min(self.fwd_horizons) < 1:
            raise ValueError(
                f"LabelConfig.fwd_horizons must be non-empty integers >= 1, got {self.fwd_horizons!r}"
            )
        if len(set(self.fwd_horizons)) != len(self.fwd_horizons):
            raise ValueError(f"LabelConfig.fwd_horizons has duplicates: {self.fwd_horizons!r}")
        if self.target_clip_atr is not None and self.target_clip_atr < max(self.pt, self.sl):
            raise ValueError(
                f"LabelConfig.target_clip_atr ({self.target_clip_atr}) must be at least max(pt, sl) "
                f"({max(self.pt, self.sl)}): a barrier touch must keep its return"
            )


DAILY_LABEL_PRESET: dict[str, Any] = {"pt": 2.0, "sl": 2.0, "horizon": 10, "fwd_horizons": (1, 5, 10, 20),
                                      "excursion_bars": 6}


def daily_label_config(**overrides: Any) -> LabelConfig:
    """Labels of the daily panel preset, horizons in trading days: a triple barrier at 2 ATR over 10 days
    (a daily ATR is about one day's range, so 1.5 ATR over 20 days touched a barrier on most rows), and
    forward returns over 1, 5, 10 and 20 days (the ranking targets; ``split_arrays.TARGET_NAMES`` keeps
    these names). The label window is 20 days."""
    return LabelConfig(**{**DAILY_LABEL_PRESET, **overrides})


def label_window_bars(config: LabelConfig) -> int:
    """How many future bars a row needs for a complete label: max(horizon, fwd horizons, excursion bars)."""
    return int(max(config.horizon, max(config.fwd_horizons), config.excursion_bars))


def label_params(config: LabelConfig) -> dict[str, Any]:
    """The labelling parameters as a JSON-able dict (stored in HDF5 attrs and model bundles)."""
    params = asdict(config)
    params["fwd_horizons"] = list(config.fwd_horizons)
    params["protect_from"] = list(config.protect_from)
    params["label_window_bars"] = label_window_bars(config)
    params["method"] = LABEL_METHOD
    params["both_touched_label"] = -1
    params["entry_price"] = "close"
    return params


def target_columns(config: LabelConfig) -> list[str]:
    """The float target columns ``label_dataset`` adds, in the order of ``split_arrays.TARGET_NAMES``
    for the default config: forward returns, excursions, early move, barrier returns."""
    e = config.excursion_bars
    return [
        *(f"fwd_ret_{h}" for h in config.fwd_horizons),
        f"mfe_{e}",
        f"mae_{e}",
        "early_move",
        "tb_return",
        "tb_return_atr",
    ]


def label_columns(config: LabelConfig) -> list[str]:
    """Every column ``label_dataset`` appends, in the order it appends them."""
    e = config.excursion_bars
    return [
        "tb_label",
        "tb_both_touched",
        "tb_touch_time",
        "tb_bars_to_touch",
        "tb_return",
        "tb_return_atr",
        *(f"fwd_ret_{h}" for h in config.fwd_horizons),
        f"mfe_{e}",
        f"mae_{e}",
        "early_move",
        "label_eligible",
        "label_quirks",
    ]


@numba.njit(cache=True, nogil=True)
def _label_kernel(high, low, close, atr, codes, usable, pt, sl, horizon, window, fwd_horizons, excursion_bars):
    """One pass over all rows. ``window`` future bars of the same symbol and ``usable[i]`` are required
    for eligibility; ``excursion_bars == 0`` skips MFE/MAE. Returns the per-row outputs (see
    ``label_arrays``)."""
    n = high.shape[0]
    n_fwd = fwd_horizons.shape[0]
    label = np.zeros(n, np.int8)
    both = np.zeros(n, np.bool_)
    touch_row = np.full(n, -1, np.int64)
    bars = np.full(n, -1, np.int32)
    ret = np.full(n, np.nan)
    ret_atr = np.full(n, np.nan)
    fwd = np.full((n_fwd, n), np.nan)
    mfe = np.full(n, np.nan)
    mae = np.full(n, np.nan)
    eligible = np.zeros(n, np.bool_)

    end = n  # exclusive end of the current symbol's rows; rows are visited backwards
    for i in range(n - 1, -1, -1):
        if i < n - 1 and codes[i] != codes[i + 1]:
            end = i + 1
        if i + window >= end or not usable[i]:
            continue
        a = atr[i]
        if not (np.isfinite(a) and a > 0.0):
            continue
        c = close[i]
        eligible[i] = True

        upper = c + pt * a
        lower = c - sl * a
        hit = 0
        for k in range(1, horizon + 1):
            j = i + k
            up = high[j] >= upper
            down = low[j] <= lower
            if up or down:
                touch_row[i] = j
                bars[i] = k
                if down:
                    hit = -1
                    both[i] = up
                else:
                    hit = 1
                break
        if hit == 1:
            label[i] = 1
            ret[i] = pt * a / c
            ret_atr[i] = pt
        elif hit == -1:
            label[i] = -1
            ret[i] = -sl * a / c
            ret_atr[i] = -sl
        else:
            j = i + horizon
            touch_row[i] = j
            bars[i] = horizon
            ret[i] = close[j] / c - 1.0
            ret_atr[i] = (close[j] - c) / a

        for f in range(n_fwd):
            fwd[f, i] = close[i + fwd_horizons[f]] / c - 1.0

        if excursion_bars > 0:
            hi = high[i + 1]
            lo = low[i + 1]
            for k in range(2, excursion_bars + 1):
                hi = max(hi, high[i + k])
                lo = min(lo, low[i + k])
            mfe[i] = max(hi - c, 0.0) / a
            mae[i] = max(c - lo, 0.0) / a
    return label, both, touch_row, bars, ret, ret_atr, fwd, mfe, mae, eligible


def _as_float_arrays(*arrays: Any) -> list[np.ndarray]:
    out = [np.ascontiguousarray(a, dtype=np.float64) for a in arrays]
    n = out[0].shape[0]
    if any(a.ndim != 1 or a.shape[0] != n for a in out):
        raise ValueError("high, low, close and atr must be 1-d arrays of the same length")
    return out


def _as_codes(symbol_codes: Any, n: int) -> np.ndarray:
    codes = np.ascontiguousarray(symbol_codes, dtype=np.int64)
    if codes.ndim != 1 or codes.shape[0] != n:
        raise ValueError(f"symbol_codes must hold one code per row ({n}), got shape {codes.shape}")
    return codes


def triple_barrier(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    symbol_codes: np.ndarray,
    pt: float,
    sl: float,
    horizon: int,
) -> dict[str, np.ndarray]:
    """Triple-barrier outcome per row over flat arrays.

    ``symbol_codes`` is one integer per row; rows of a symbol must be contiguous and in time order (a
    change of code is a symbol boundary). A row is labelled when ``horizon`` future bars of its symbol
    exist and its ATR is finite and > 0 (``eligible``). Returns ``tb_label`` (int8),
    ``tb_both_touched`` (bool), ``tb_touch_row`` (int64 row index of the touching/vertical bar, -1 when
    unlabelled), ``tb_bars_to_touch`` (int32, -1 when unlabelled), ``tb_return``, ``tb_return_atr``
    (float64, NaN when unlabelled) and ``eligible`` (bool).
    """
    high, low, close, atr = _as_float_arrays(high, low, close, atr)
    codes = _as_codes(symbol_codes, high.shape[0])
    no_fwd = np.empty(0, np.int64)
    usable = np.ones(high.shape[0], dtype=np.bool_)
    label, both, touch_row, bars, ret, ret_atr, _, _, _, eligible = _label_kernel(
        high, low, close, atr, codes, usable, float(pt), float(sl), int(horizon), int(horizon), no_fwd, 0
    )
    return {
        "tb_label": label,
        "tb_both_touched": both,
        "tb_touch_row": touch_row,
        "tb_bars_to_touch": bars,
        "tb_return": ret,
        "tb_return_atr": ret_atr,
        "eligible": eligible,
    }


def symbol_ends(codes: np.ndarray) -> np.ndarray:
    """Per row, the exclusive end row of its symbol's contiguous block of rows."""
    n = codes.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    last = np.flatnonzero(np.append(codes[1:] != codes[:-1], True))  # last row of each block
    return (np.repeat(last, np.diff(np.append(-1, last))) + 1).astype(np.int64)


def _as_quirks(quirks: Any, n: int) -> np.ndarray:
    if quirks is None:
        return np.zeros(n, dtype=np.uint8)
    q = np.ascontiguousarray(quirks)
    if q.ndim != 1 or q.shape[0] != n:
        raise ValueError(f"quirks must hold one bit mask per row ({n}), got shape {q.shape}")
    if q.dtype != np.uint8:
        if q.size and (q.min() < 0 or q.max() > 255):
            raise ValueError("quirks must be bit masks of bar_quality.QUIRK_BITS (0..255)")
        q = q.astype(np.uint8)
    return q


def window_quirks(quirks: np.ndarray, symbol_codes: np.ndarray, window: int) -> np.ndarray:
    """uint8 per row: the OR of the quirk bits that row ``t``'s label window meets, within its symbol:
    transition quirks (``jump``, ``hole``) of bars ``t+1 .. t+window``, bar quirks of bars ``t .. t+window``.

    Vectorised: a prefix count of each kind, differenced over each row's window.
    """
    n = quirks.shape[0]
    out = np.zeros(n, dtype=np.uint8)
    if n == 0 or not quirks.any():
        return out
    rows = np.arange(n, dtype=np.int64)
    last = np.minimum(rows + window, symbol_ends(symbol_codes) - 1)  # last bar of the window, same symbol
    for kind, bit in QUIRK_BITS.items():
        hit = (quirks & bit) != 0
        if not hit.any():
            continue
        before = np.concatenate([[0], np.cumsum(hit, dtype=np.int64)])  # before[k] = hits in rows < k
        first = rows + 1 if kind in TRANSITION_QUIRKS else rows
        met = before[last + 1] - before[np.minimum(first, last + 1)] > 0
        out[met] |= np.uint8(bit)
    return out


def _label_arrays_and_info(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    symbol_codes: np.ndarray,
    config: LabelConfig,
    quirks: np.ndarray | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``label_arrays`` plus what the stats need: rows made ineligible per quirk kind, clip counts."""
    high, low, close, atr = _as_float_arrays(high, low, close, atr)
    n = high.shape[0]
    codes = _as_codes(symbol_codes, n)
    bar_quirks = _as_quirks(quirks, n)
    fwd_h = np.asarray(config.fwd_horizons, dtype=np.int64)
    window = label_window_bars(config)
    met = window_quirks(bar_quirks, codes, window)
    protect = 0
    for kind in config.protect_from:
        protect |= QUIRK_BITS[kind]
    usable = (met & np.uint8(protect)) == 0
    pt, sl, horizon, exc = float(config.pt), float(config.sl), int(config.horizon), int(config.excursion_bars)
    label, both, touch_row, bars, ret, ret_atr, fwd, mfe, mae, eligible = _label_kernel(
        high, low, close, atr, codes, usable, pt, sl, horizon, window, fwd_h, exc
    )
    # rows that would be eligible without the quirk rule: full window in the symbol and a usable ATR
    with np.errstate(invalid="ignore"):
        complete = (np.arange(n) + window < symbol_ends(codes)) & np.isfinite(atr) & (atr > 0)
    blocked = complete & ~usable
    info: dict[str, Any] = {
        "n_ineligible_by_quirk": {k: int(np.count_nonzero(blocked & ((met & QUIRK_BITS[k]) != 0)))
                                  for k in config.protect_from},
        "n_ineligible_quirk_total": int(np.count_nonzero(blocked)),
        "n_windows_with_quirk": {k: int(np.count_nonzero(complete & ((met & QUIRK_BITS[k]) != 0)))
                                 for k in QUIRK_KINDS},
    }

    e = config.excursion_bars
    raw = {f"mfe_{e}": mfe, f"mae_{e}": mae, "early_move": mfe - mae, "tb_return_atr": ret_atr}
    max_before = {k: (float(np.nanmax(np.abs(v))) if eligible.any() else None) for k, v in raw.items()}
    clipped_row = np.zeros(n, dtype=bool)
    n_clipped = dict.fromkeys(raw, 0)
    bound = config.target_clip_atr
    if bound is not None:
        with np.errstate(invalid="ignore"):
            over = {k: np.abs(v) > bound for k, v in raw.items()}
        n_clipped = {k: int(np.count_nonzero(m)) for k, m in over.items()}
        clipped_row = over[f"mfe_{e}"] | over[f"mae_{e}"] | over["tb_return_atr"]
        mfe = np.minimum(mfe, bound)  # NaN stays NaN
        mae = np.minimum(mae, bound)
        ret_atr = np.clip(ret_atr, -bound, bound)
    info["target_clip"] = {
        "target_clip_atr": bound,
        "n_clipped": n_clipped,
        "n_rows_clipped": int(np.count_nonzero(clipped_row)),
        "max_abs_before_clip": max_before,
    }

    out: dict[str, np.ndarray] = {
        "tb_label": label,
        "tb_both_touched": both,
        "tb_touch_row": touch_row,
        "tb_bars_to_touch": bars,
        "tb_return": ret,
        "tb_return_atr": ret_atr,
    }
    for f, h in enumerate(config.fwd_horizons):
        out[f"fwd_ret_{h}"] = fwd[f]
    out[f"mfe_{e}"] = mfe
    out[f"mae_{e}"] = mae
    out["early_move"] = mfe - mae
    out["label_eligible"] = eligible
    out["label_quirks"] = met | np.where(clipped_row, np.uint8(LABEL_CLIPPED), np.uint8(0))
    return out, info


def label_arrays(
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    atr: np.ndarray,
    symbol_codes: np.ndarray,
    config: LabelConfig,
    quirks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every label column over flat arrays, in ``label_columns`` order, except that the touch is given as
    ``tb_touch_row`` (row index, -1 when unlabelled) instead of a timestamp. Eligibility uses the full
    ``label_window_bars(config)`` and ``quirks`` (per bar a uint8 of ``bar_quality.QUIRK_BITS``; None:
    no bar is flagged)."""
    return _label_arrays_and_info(high, low, close, atr, symbol_codes, config, quirks)[0]


def timestamps_ns(ts: pd.Series) -> np.ndarray:
    """A datetime column as int64 nanoseconds since the epoch, UTC (naive timestamps are taken as UTC)."""
    idx = pd.DatetimeIndex(ts)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    return idx.as_unit("ns").asi8


def symbol_codes_checked(df: pd.DataFrame, where: str) -> np.ndarray:
    """Per-row int64 symbol codes of a bars-ordered frame, after checking the bars convention.

    Raises ``ValueError`` (prefixed with ``where``) unless each symbol's rows are contiguous and its
    timestamps strictly increase, i.e. the frame is sorted by ``(symbol, timestamp)`` without duplicates.
    """
    codes, uniques = pd.factorize(df["symbol"], sort=False, use_na_sentinel=True)
    if (codes < 0).any():
        raise ValueError(f"{where}: column 'symbol' has missing values")
    codes = codes.astype(np.int64)
    if len(codes) > 1 and (np.diff(codes) < 0).any():
        first_bad = int(np.flatnonzero(np.diff(codes) < 0)[0]) + 1
        raise ValueError(
            f"{where}: rows must be sorted by (symbol, timestamp); symbol {uniques[codes[first_bad]]!r} "
            f"reappears at row {first_bad} after other symbols"
        )
    ts = df["timestamp"]
    if not pd.api.types.is_datetime64_any_dtype(ts.dtype):
        raise ValueError(f"{where}: column 'timestamp' must be a datetime column, got dtype {ts.dtype}")
    if ts.isna().any():
        raise ValueError(f"{where}: column 'timestamp' has missing values")
    t = timestamps_ns(ts)
    same_symbol = codes[1:] == codes[:-1]
    bad = np.flatnonzero(same_symbol & (t[1:] <= t[:-1]))
    if bad.size:
        row = int(bad[0]) + 1
        raise ValueError(
            f"{where}: rows must be sorted by (symbol, timestamp) without duplicates; symbol "
            f"{uniques[codes[row]]!r} has timestamp {ts.iloc[row]} at row {row} not after {ts.iloc[row - 1]}"
        )
    return codes


def label_dataset(
    features_df: pd.DataFrame, config: LabelConfig = LabelConfig(), quirks: np.ndarray | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Append the label columns to a bars-ordered frame (``symbol, timestamp, high, low, close, atr`` and
    any other columns, passed through). ``quirks``: per row a uint8 of ``bar_quality.QUIRK_BITS`` (the
    ``quirks`` column of the raw stage's flags table, same row order; None: nothing flagged).
    Returns the frame (same row order, ``RangeIndex``) and stats."""
    missing = [c for c in REQUIRED_COLUMNS if c not in features_df.columns]
    if missing:
        raise ValueError(f"label_dataset: input frame lacks required columns {missing}")
    clash = [c for c in label_columns(config) if c in features_df.columns]
    if clash:
        raise ValueError(f"label_dataset: input frame already has label columns {clash}")
    df = features_df.reset_index(drop=True)
    codes = symbol_codes_checked(df, "label_dataset")
    high, low, close, atr = (
        df[c].to_numpy(np.float64, na_value=np.nan) for c in ("high", "low", "close", "atr")
    )
    arrays, info = _label_arrays_and_info(high, low, close, atr, codes, config, quirks)
    touch_row = arrays.pop("tb_touch_row")
    touch_time = df["timestamp"].array.take(touch_row, allow_fill=True)
    columns: dict[str, Any] = {}
    for name in label_columns(config):
        columns[name] = touch_time if name == "tb_touch_time" else arrays[name]
    labels = pd.DataFrame(columns, index=df.index, copy=False)  # fresh arrays: no need to copy them again
    out = pd.concat([df, labels], axis=1)
    stats = _label_stats(arrays, config)
    stats["quirks_given"] = quirks is not None
    stats["quirk_protection"] = {"protect_from": list(config.protect_from), **{k: v for k, v in info.items()
                                                                              if k != "target_clip"}}
    stats["target_clip"] = info["target_clip"]
    return out, stats


def _label_stats(arrays: dict[str, np.ndarray], config: LabelConfig) -> dict[str, Any]:
    eligible = arrays["label_eligible"]
    n = int(eligible.shape[0])
    n_eligible = int(eligible.sum())
    counts = np.bincount(arrays["tb_label"][eligible] + 1, minlength=3)  # labels -1, 0, 1 -> 0, 1, 2
    balance = {str(k): (float(counts[k + 1] / n_eligible) if n_eligible else 0.0) for k in (-1, 0, 1)}
    bars = arrays["tb_bars_to_touch"][eligible]
    return {
        "n_rows": n,
        "n_eligible": n_eligible,
        "eligibility_rate": float(n_eligible / n) if n else 0.0,
        "class_balance": balance,
        "n_both_touched": int(arrays["tb_both_touched"].sum()),
        "mean_bars_to_touch": float(bars.mean()) if n_eligible else None,
        "label_window_bars": label_window_bars(config),
    }
