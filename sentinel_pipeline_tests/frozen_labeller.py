"""The labeller as it was before its single-pass rewrite: a verbatim copy of the kernel and its wrapper
(``_label_kernel``, ``triple_barrier``, ``window_quirks``, ``_label_arrays_and_info``, ``label_dataset``,
``_label_stats``), kept as the bit-identity reference of ``test_labels_identical.py``. Do not edit: it
defines "identical to before". Only the config, column lists and input checks come from the live module
(they did not change).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import pandas as pd

from sentinel_pipeline.data.bar_quality import QUIRK_BITS, QUIRK_KINDS, TRANSITION_QUIRKS
from sentinel_pipeline.data.labels import (
    LABEL_CLIPPED,
    REQUIRED_COLUMNS,
    LabelConfig,
    label_columns,
    label_window_bars,
    symbol_codes_checked,
)


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


def label_arrays(high, low, close, atr, symbol_codes, config: LabelConfig, quirks=None) -> dict[str, np.ndarray]:
    return _label_arrays_and_info(high, low, close, atr, symbol_codes, config, quirks)[0]


def label_dataset(
    features_df: pd.DataFrame, config: LabelConfig, quirks: np.ndarray | None = None
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
