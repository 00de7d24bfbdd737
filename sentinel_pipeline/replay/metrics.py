"""Metrics of a replay: candidate/trade counts, entry quality, returns, a daily equity curve with its
Sharpe ratio and maximum drawdown, and the information coefficient of the signal.

- **Daily equity curve**: every trade carries unit notional and no compounding; the P&L of a UTC day is
  the sum of the simple returns of the trades that exit that day; days run over the distinct UTC dates
  of the bars given (so flat days count as zero); equity = 1 + cumulative P&L.
- **Sharpe** = mean(daily P&L) / std(daily P&L, ddof=1) · √periods_per_year (252 trading days, 365 for
  markets with Saturday bars; ``ReplayConfig.annualisation`` overrides). Zero trades, fewer than two
  days or zero variance give 0.0 and a note, never NaN.
- **Max drawdown** = max over days of (running peak − equity) / running peak, the peak starting at the
  initial equity 1; a fraction ≥ 0.
- **IC / rank IC**: Pearson / Spearman correlation of the signal with the 5-bar forward return
  ``close[t+5]/close[t] − 1`` (same symbol), computed per timestamp across symbols over timestamps with
  at least 3 symbols and averaged; when no timestamp has 3 symbols, one pooled correlation over all
  rows (``ic_method`` says which). ``None`` when it cannot be computed.

Every value is a plain ``int``/``float``/``str``/``None`` (JSON-able); means over zero trades are
``None`` with a note.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sentinel_pipeline.replay.config import periods_per_year

IC_HORIZON = 5
MIN_SYMBOLS_PER_TIMESTAMP = 3


def forward_simple_returns(bars: pd.DataFrame, horizon: int = IC_HORIZON) -> np.ndarray:
    """``close[t+h] / close[t] - 1`` within each symbol of bars sorted by (symbol, timestamp); NaN where
    the symbol has no bar ``t+h``."""
    close = bars["close"].to_numpy(np.float64, na_value=np.nan)
    sym = bars["symbol"].to_numpy()
    out = np.full(close.shape[0], np.nan)
    if close.shape[0] > horizon:
        same = sym[horizon:] == sym[:-horizon]
        out[:-horizon] = np.where(same, close[horizon:] / close[:-horizon] - 1.0, np.nan)
    return out


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 3:
        return None
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return None
    return float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy))


def _grouped_corr(frame: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Pearson correlation of ``x`` and ``y`` per ``t`` group (NaN for groups with zero variance)."""
    g = frame.groupby("t", sort=False)
    dx = frame[x] - g[x].transform("mean")
    dy = frame[y] - g[y].transform("mean")
    parts = pd.DataFrame({"t": frame["t"], "xy": dx * dy, "xx": dx * dx, "yy": dy * dy}).groupby("t").sum()
    denom = np.sqrt(parts["xx"] * parts["yy"])
    return (parts["xy"] / denom.where(denom > 0)).dropna()


def signal_ic(
    signal: np.ndarray, fwd: np.ndarray, timestamps: pd.Series | np.ndarray, min_symbols: int = MIN_SYMBOLS_PER_TIMESTAMP
) -> dict[str, Any]:
    """``ic``, ``rank_ic``, ``ic_method`` (per_timestamp/pooled/none), ``ic_n_timestamps``, ``ic_n_rows``."""
    signal = np.asarray(signal, dtype=np.float64)
    fwd = np.asarray(fwd, dtype=np.float64)
    ok = np.isfinite(signal) & np.isfinite(fwd)
    frame = pd.DataFrame({"t": np.asarray(timestamps)[ok], "s": signal[ok], "f": fwd[ok]})
    out: dict[str, Any] = {"ic": None, "rank_ic": None, "ic_method": "none", "ic_n_timestamps": 0,
                           "ic_n_rows": int(ok.sum())}
    if frame.empty:
        return out
    sizes = frame.groupby("t")["s"].transform("size")
    cross = frame[sizes >= min_symbols]
    if not cross.empty:
        cross = cross.assign(rs=cross.groupby("t")["s"].rank(), rf=cross.groupby("t")["f"].rank())
        ic = _grouped_corr(cross, "s", "f")
        ric = _grouped_corr(cross, "rs", "rf")
        if len(ic):
            out.update(ic=float(ic.mean()), rank_ic=float(ric.mean()) if len(ric) else None,
                       ic_method="per_timestamp", ic_n_timestamps=int(len(ic)))
            return out
    s, f = frame["s"].to_numpy(), frame["f"].to_numpy()
    ic = _corr(s, f)
    if ic is not None:
        ric = _corr(pd.Series(s).rank().to_numpy(), pd.Series(f).rank().to_numpy())
        out.update(ic=ic, rank_ic=ric, ic_method="pooled")
    return out


def _utc_days(ts: pd.Series | pd.DatetimeIndex) -> pd.DatetimeIndex:
    idx = pd.DatetimeIndex(ts)
    idx = idx.tz_convert("UTC") if idx.tz is not None else idx.tz_localize("UTC")
    return idx.normalize()


def daily_pnl(trades: pd.DataFrame, bars: pd.DataFrame) -> pd.Series:
    """Sum of trade returns per UTC exit day over every distinct UTC day of ``bars`` (0.0 on flat days)."""
    days = _utc_days(bars["timestamp"]).unique().sort_values()
    pnl = pd.Series(trades["return"].to_numpy(np.float64), index=_utc_days(trades["exit_time"]))
    by_day = pnl.groupby(level=0).sum()
    outside = by_day.index.difference(days)
    if len(outside):
        raise ValueError(f"trades exit on days outside the bars given: {[d.date().isoformat() for d in outside[:3]]}")
    return by_day.reindex(days, fill_value=0.0).rename("pnl")


def equity_curve(trades: pd.DataFrame, bars: pd.DataFrame) -> pd.Series:
    """Daily equity ``1 + cumulative daily P&L`` indexed by UTC day."""
    return (1.0 + daily_pnl(trades, bars).cumsum()).rename("equity")


def sharpe_ratio(daily: np.ndarray, periods: float) -> tuple[float, str | None]:
    """Annualised Sharpe of daily P&L, and a note when it is set to 0.0 (too few days, zero variance)."""
    daily = np.asarray(daily, dtype=np.float64)
    if daily.size < 2:
        return 0.0, f"sharpe set to 0.0: {daily.size} day(s) in the equity curve, need 2"
    sd = float(daily.std(ddof=1))
    if not sd > 1e-15:
        return 0.0, "sharpe set to 0.0: the daily P&L has zero variance"
    return float(daily.mean() / sd * math.sqrt(periods)), None


def max_drawdown(equity: np.ndarray) -> float:
    """Largest fall from a running peak as a fraction of that peak (the peak starts at 1.0)."""
    equity = np.asarray(equity, dtype=np.float64)
    if equity.size == 0:
        return 0.0
    peak = np.maximum.accumulate(np.maximum(equity, 1.0))
    return float(np.max((peak - equity) / peak))


def _stat(values: pd.Series, how: str) -> float | None:
    return float(getattr(values, how)()) if len(values) else None


def trade_metrics(
    trades: pd.DataFrame,
    bars: pd.DataFrame,
    signal: np.ndarray | pd.Series | None,
    forward_returns: np.ndarray | None = None,
    *,
    counts: dict[str, int] | None = None,
    annualisation: float | None = None,
) -> dict[str, Any]:
    """All replay metrics of one set of trades (see the module docstring), JSON-able.

    ``bars`` are the replay window's bars (the equity curve runs over their days; forward returns come
    from them unless ``forward_returns`` is given, one value per bar). ``signal`` is one value per bar
    (``None``: no IC, e.g. for the random baseline). ``counts`` defaults to ``trades.attrs["counts"]``
    as set by ``simulate_trades``/``random_entry_baseline``.
    """
    counts = counts if counts is not None else trades.attrs.get("counts")
    if counts is None:
        raise ValueError("trade_metrics: no candidate counts: pass counts= or trades from simulate_trades")
    notes: list[str] = []
    n = len(trades)
    if n == 0:
        notes.append("no trades: per-trade means are None")
    mfe_col = next(c for c in trades.columns if c.startswith("mfe_"))
    mae_col = next(c for c in trades.columns if c.startswith("mae_"))
    ret = trades["return"].astype(np.float64)
    periods = float(annualisation) if annualisation is not None else periods_per_year(bars["timestamp"])
    daily = daily_pnl(trades, bars)
    sharpe, note = sharpe_ratio(daily.to_numpy(), periods)
    if note:
        notes.append(note)
    equity = 1.0 + daily.cumsum().to_numpy()
    reasons = trades["exit_reason"].astype(str).value_counts()
    metrics: dict[str, Any] = {
        **{k: int(v) for k, v in counts.items()},
        "n_censored": int(trades["censored"].sum()),
        "exit_reasons": {r: int(reasons.get(r, 0)) for r in ("upper", "lower", "vertical", "censored")},
        "entry_quality": {
            f"{mae_col}_mean": _stat(trades[mae_col], "mean"),
            f"{mae_col}_median": _stat(trades[mae_col], "median"),
            f"{mfe_col}_mean": _stat(trades[mfe_col], "mean"),
            f"{mfe_col}_median": _stat(trades[mfe_col], "median"),
        },
        "goes_against_us_rate": _stat(trades["goes_against_us"].astype(np.float64), "mean"),
        "hit_rate": _stat((ret > 0).astype(np.float64), "mean"),
        "mean_return_per_trade": _stat(ret, "mean"),
        "total_return": float(ret.sum()),
        "mean_bars_held": _stat(trades["bars_held"].astype(np.float64), "mean"),
        "sharpe": sharpe,
        "sharpe_periods_per_year": periods,
        "max_drawdown": max_drawdown(equity),
        "n_days": int(len(daily)),
    }
    if signal is None:
        metrics.update(ic=None, rank_ic=None, ic_method="none", ic_n_timestamps=0, ic_n_rows=0)
        notes.append("no signal given: ic/rank_ic are None")
    else:
        sig = np.asarray(signal, dtype=np.float64)
        if sig.shape != (len(bars),):
            raise ValueError(f"trade_metrics: signal must hold one value per bar ({len(bars)}), got {sig.shape}")
        fwd = forward_simple_returns(bars) if forward_returns is None else np.asarray(forward_returns, np.float64)
        if fwd.shape != (len(bars),):
            raise ValueError(f"trade_metrics: forward returns must hold one value per bar ({len(bars)}), got {fwd.shape}")
        metrics.update(signal_ic(sig, fwd, bars["timestamp"].to_numpy("datetime64[ns]")))
        if metrics["ic"] is None:
            notes.append("ic/rank_ic are None: fewer than 3 finite (signal, forward return) pairs or zero variance")
    metrics["notes"] = notes
    return metrics
