"""Trade simulation of a replay: signal → entries → triple-barrier exits, and a random-entry baseline.

Rules (the production rules the replay measures a model by):

- **Candidates**: bars whose signal satisfies ``|signal| >= threshold`` (``signal >= threshold`` when
  shorts are off); NaN means "no decision at this bar". Side = sign of the signal.
- **One position per symbol**: a candidate at signal row ``s`` is skipped (and counted) while the
  symbol's previous trade is still open, i.e. when ``s`` lies before that trade's exit bar. A candidate
  at the exit bar itself may trade (the exit happens during/at the close of that bar, the new entry at
  the next open).
- **Entry** at the NEXT bar's open of the same symbol. A candidate on a symbol's last bar cannot enter
  (``n_skipped_no_next_bar``); one whose ATR is missing or ≤ 0 cannot set barriers
  (``n_skipped_invalid_atr``).
- **Exit** by the triple-barrier rules of the labels (``data/labels.py``), re-anchored at the entry
  price: for a long, profit-take at ``entry + pt·ATR[s]`` and stop at ``entry − sl·ATR[s]``, mirrored for a
  short (profit-take below, stop above). Bars ``s+1 .. s+horizon`` (the entry bar first) are scanned in
  order; the first bar whose high/low reaches a barrier decides; a bar reaching both counts as the stop
  (conservative, as in the labels). With no touch the trade exits at the close of bar ``s+horizon``
  (vertical). A trade whose vertical bar lies beyond the symbol's last bar and that touches nothing is
  closed at the last close and flagged ``censored``.
- **Fills**: the profit-take fills at its barrier price; the stop fills at the worse of its barrier and
  the bar's open (a bar that gaps through the stop fills at the open — the labels assume the barrier
  price, which would flatter gap losses). Entry bars never gap (entry is their open).
- ``exit_reason`` is side-relative like the labels' ``tb_label``: ``upper`` = profit-take barrier,
  ``lower`` = stop barrier (for a short, ``upper`` is the barrier below the entry), ``vertical``,
  ``censored``.
- ``mfe_E``/``mae_E`` (``E = excursion_bars``, default 6): the largest favourable/adverse move from the
  entry price over the first ``E`` bars from the entry bar on (bars ``s+1 .. s+E``, the labels' window),
  regardless of when the trade exits — an entry-quality measure — in ATR[s] units, both ≥ 0; truncated
  at the symbol's last bar. ``goes_against_us = mae_E > mfe_E``.

The simulation is one numba kernel looping over candidates (and over each trade's few bars); there is
no Python loop over bars (the baseline's bisection calls the kernel O(log n) times). ``simulate_trades`` stores its candidate counts in ``trades.attrs["counts"]``
for :func:`sentinel_pipeline.replay.metrics.trade_metrics`.
"""

from __future__ import annotations

import numba
import numpy as np
import pandas as pd

from sentinel_pipeline.data.labels import symbol_codes_checked
from sentinel_pipeline.replay.config import BarrierParams, ReplayConfig, barrier_params, replay_window_mask

BAR_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "open", "high", "low", "close")
EXIT_REASONS: tuple[str, ...] = ("upper", "lower", "vertical", "censored")
_UPPER, _LOWER, _VERTICAL, _CENSORED = 0, 1, 2, 3
# candidate outcomes of the kernel
_TRADED, _SKIP_OPEN, _SKIP_NO_NEXT, _SKIP_ATR = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True)
def _one_trade(s, last, side, a, pt, sl, horizon, n_exc, open_, high, low, close):
    """Simulate the trade signalled at row ``s`` (entry at ``s+1 <= last``, ATR ``a > 0``).
    Returns ``(exit_row, exit_price, reason, mfe, mae)``."""
    e0 = s + 1
    entry = open_[e0]
    if side > 0:
        take = entry + pt * a
        stop = entry - sl * a
    else:
        take = entry - pt * a
        stop = entry + sl * a
    vertical = s + horizon
    scan_end = min(vertical, last)
    exit_row = scan_end
    reason = _VERTICAL if vertical <= last else _CENSORED
    price = close[scan_end]
    for r in range(e0, scan_end + 1):
        if side > 0:
            hit_stop = low[r] <= stop
            hit_take = high[r] >= take
        else:
            hit_stop = high[r] >= stop
            hit_take = low[r] <= take
        if hit_stop:  # also when both are reached in this bar: conservative
            exit_row = r
            reason = _LOWER
            price = min(stop, open_[r]) if side > 0 else max(stop, open_[r])
            break
        if hit_take:
            exit_row = r
            reason = _UPPER
            price = take
            break
    mfe = 0.0
    mae = 0.0
    for r in range(e0, min(e0 + n_exc - 1, last) + 1):
        if side > 0:
            fav = high[r] - entry
            adv = entry - low[r]
        else:
            fav = entry - low[r]
            adv = high[r] - entry
        mfe = max(mfe, fav / a)
        mae = max(mae, adv / a)
    return exit_row, price, reason, mfe, mae


@numba.njit(cache=True, nogil=True)
def _simulate_kernel(cand_rows, cand_side, last_row, atr, pt, sl, horizon, n_exc, open_, high, low, close):
    """Sequential one-position-per-symbol simulation over candidates sorted by row."""
    n = cand_rows.shape[0]
    status = np.full(n, _TRADED, np.int8)
    exit_row = np.full(n, -1, np.int64)
    price = np.full(n, np.nan)
    reason = np.full(n, -1, np.int8)
    mfe = np.full(n, np.nan)
    mae = np.full(n, np.nan)
    blocked_until = -1  # exit row of the last trade; rows of later symbols are always beyond it
    for k in range(n):
        s = cand_rows[k]
        if s < blocked_until:
            status[k] = _SKIP_OPEN
            continue
        if s >= last_row[s]:
            status[k] = _SKIP_NO_NEXT
            continue
        a = atr[s]
        if not (np.isfinite(a) and a > 0.0):
            status[k] = _SKIP_ATR
            continue
        exit_row[k], price[k], reason[k], mfe[k], mae[k] = _one_trade(
            s, last_row[s], cand_side[k], a, pt, sl, horizon, n_exc, open_, high, low, close
        )
        blocked_until = exit_row[k]
    return status, exit_row, price, reason, mfe, mae


def _bar_arrays(bars: pd.DataFrame, where: str) -> dict[str, np.ndarray]:
    missing = [c for c in BAR_COLUMNS if c not in bars.columns]
    if missing:
        raise ValueError(f"{where}: bars lack columns {missing}")
    codes = symbol_codes_checked(bars, where)
    n = len(bars)
    out = {c: bars[c].to_numpy(np.float64, na_value=np.nan) for c in ("open", "high", "low", "close")}
    if n:
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        lengths = np.diff(np.r_[starts, n])
        out["last_row"] = np.repeat(starts + lengths - 1, lengths).astype(np.int64)
    else:
        out["last_row"] = np.zeros(0, np.int64)
    return out


def _per_row(values: np.ndarray | pd.Series, n: int, name: str, where: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if arr.shape != (n,):
        raise ValueError(f"{where}: {name} must hold one value per bar ({n}), got shape {arr.shape}")
    return arr


def _trades_frame(
    bars: pd.DataFrame,
    signal_rows: np.ndarray,
    sides: np.ndarray,
    exit_row: np.ndarray,
    exit_price: np.ndarray,
    reason: np.ndarray,
    mfe: np.ndarray,
    mae: np.ndarray,
    excursion_bars: int,
    open_: np.ndarray,
) -> pd.DataFrame:
    entry_row = signal_rows + 1
    entry_price = open_[entry_row]
    side = sides.astype(np.int8)
    ts = bars["timestamp"].array
    ret = side * (exit_price - entry_price) / entry_price
    frame = pd.DataFrame(
        {
            "symbol": bars["symbol"].array.take(signal_rows),
            "signal_time": ts.take(signal_rows),
            "entry_time": ts.take(entry_row),
            "entry_price": entry_price,
            "side": side,
            "exit_time": ts.take(exit_row),
            "exit_price": exit_price,
            "exit_reason": pd.Categorical.from_codes(reason.astype(np.int8), categories=list(EXIT_REASONS)),
            "return": ret,
            "bars_held": (exit_row - entry_row + 1).astype(np.int64),
            f"mfe_{excursion_bars}": mfe,
            f"mae_{excursion_bars}": mae,
            "goes_against_us": mae > mfe,
            "censored": reason == _CENSORED,
        }
    )
    return frame


def simulate_trades(
    bars: pd.DataFrame,
    signal: np.ndarray | pd.Series,
    atr: np.ndarray | pd.Series,
    label_params: object,
    config: ReplayConfig | None = None,
) -> pd.DataFrame:
    """Trades of a signal over bars sorted by ``(symbol, timestamp)`` (see the module docstring).

    ``signal`` and ``atr`` (price units, at each bar) are one value per bar. Returns one row per trade
    in (symbol, signal time) order with columns ``symbol, signal_time, entry_time, entry_price, side,
    exit_time, exit_price, exit_reason, return, bars_held, mfe_E, mae_E, goes_against_us, censored``;
    ``trades.attrs["counts"]`` holds ``n_candidates, n_trades_created, n_skipped_position_open,
    n_skipped_no_next_bar, n_skipped_invalid_atr``.
    """
    where = "simulate_trades"
    config = config or ReplayConfig()
    arrays = _bar_arrays(bars, where)
    n = len(bars)
    sig = _per_row(signal, n, "signal", where)
    atr_arr = _per_row(atr, n, "atr", where)
    params: BarrierParams = barrier_params(label_params)
    with np.errstate(invalid="ignore"):
        is_cand = np.abs(sig) >= config.threshold
        if not config.allow_short:
            is_cand &= sig > 0
        is_cand &= sig != 0  # a zero signal has no side (only reachable with threshold 0)
    cand_rows = np.flatnonzero(is_cand).astype(np.int64)
    cand_side = np.sign(sig[cand_rows]).astype(np.int64)
    status, exit_row, price, reason, mfe, mae = _simulate_kernel(
        cand_rows, cand_side, arrays["last_row"], atr_arr, params.pt, params.sl, params.horizon,
        int(config.excursion_bars), arrays["open"], arrays["high"], arrays["low"], arrays["close"],
    )
    traded = status == _TRADED
    trades = _trades_frame(
        bars, cand_rows[traded], cand_side[traded], exit_row[traded], price[traded], reason[traded],
        mfe[traded], mae[traded], int(config.excursion_bars), arrays["open"],
    )
    trades.attrs["counts"] = {
        "n_candidates": int(cand_rows.size),
        "n_trades_created": int(traded.sum()),
        "n_skipped_position_open": int((status == _SKIP_OPEN).sum()),
        "n_skipped_no_next_bar": int((status == _SKIP_NO_NEXT).sum()),
        "n_skipped_invalid_atr": int((status == _SKIP_ATR).sum()),
    }
    return trades


def random_entry_baseline(
    bars: pd.DataFrame,
    atr: np.ndarray | pd.Series,
    n_trades: int,
    label_params: object,
    config: ReplayConfig | None = None,
) -> pd.DataFrame:
    """Random entries with the model's trade count: the same entry, exit and one-position rules.

    The pool is the bars of the replay window (:func:`~sentinel_pipeline.replay.config.replay_window_mask`)
    that can trade (a next bar exists, ATR finite and > 0). A seeded permutation of the pool and a random
    side per bar (±1; +1 only when shorts are off) are drawn once; the candidates are the first ``k``
    bars of the permutation, simulated in time order exactly like a model's candidates
    (:func:`simulate_trades`), with ``k`` the smallest (bisection) giving at least ``n_trades`` trades.
    Surplus trades (a candidate can add more than one trade net) are dropped at random, which keeps
    the rest non-overlapping. Fewer than ``n_trades`` only when even the whole pool gives fewer.
    ``attrs["counts"]`` as in :func:`simulate_trades` (``n_candidates`` = ``k``) plus
    ``n_dropped_to_match``.
    """
    where = "random_entry_baseline"
    config = config or ReplayConfig()
    if int(n_trades) != n_trades or n_trades < 0:
        raise ValueError(f"{where}: n_trades must be an integer >= 0, got {n_trades!r}")
    arrays = _bar_arrays(bars, where)
    n = len(bars)
    atr_arr = _per_row(atr, n, "atr", where)
    params = barrier_params(label_params)
    with np.errstate(invalid="ignore"):
        ok = replay_window_mask(bars["timestamp"], config) & (np.arange(n) < arrays["last_row"])
        ok &= np.isfinite(atr_arr) & (atr_arr > 0)
    rng = np.random.default_rng(config.baseline_seed)
    perm = rng.permutation(np.flatnonzero(ok).astype(np.int64))
    side_of_row = rng.choice(np.array([-1, 1]), size=n) if config.allow_short else np.ones(n, np.int64)
    side_of_row = side_of_row.astype(np.int64)

    def run(k: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        rows = np.sort(perm[:k])
        out = _simulate_kernel(
            rows, side_of_row[rows], arrays["last_row"], atr_arr, params.pt, params.sl, params.horizon,
            int(config.excursion_bars), arrays["open"], arrays["high"], arrays["low"], arrays["close"],
        )
        return rows, out

    def n_traded(k: int) -> int:
        return int((run(k)[1][0] == _TRADED).sum())

    k = perm.size
    if n_trades > 0 and n_traded(k) >= n_trades:
        lo, hi = 0, k  # invariant: n_traded(lo) < n_trades <= n_traded(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if n_traded(mid) >= n_trades else (mid, hi)
        k = hi
    elif n_trades == 0:
        k = 0
    rows, (status, exit_row, price, reason, mfe, mae) = run(k)
    traded = np.flatnonzero(status == _TRADED)
    n_dropped = max(traded.size - int(n_trades), 0)
    if n_dropped:
        traded = np.sort(rng.choice(traded, size=int(n_trades), replace=False))
    trades = _trades_frame(
        bars, rows[traded], side_of_row[rows[traded]], exit_row[traded], price[traded], reason[traded],
        mfe[traded], mae[traded], int(config.excursion_bars), arrays["open"],
    )
    trades.attrs["counts"] = {
        "n_candidates": int(k),
        "n_trades_created": int(traded.size),
        "n_skipped_position_open": int((status == _SKIP_OPEN).sum()),
        "n_skipped_no_next_bar": 0,
        "n_skipped_invalid_atr": 0,
        "n_dropped_to_match": int(n_dropped),
    }
    return trades
