"""Test-period portfolio backtest of a scored split, with a distribution of random strategies.

Input: the per-sample table of :func:`sentinel_pipeline.evaluation.predictions.score_split` (only
``symbol``, ``timestamp``, ``signal`` and ``fwd_ret_1`` are required; ``row`` marks gaps). Output: a
:class:`BacktestResult` with per-bar and daily portfolio returns, the trades, the metrics and a random
baseline. No Dagster, no torch: it can be run and tested on tables built by hand.

Rules
-----

**Timing.** The signal of bar ``t`` is known at bar ``t``'s close. An entry fills at the close of bar
``t + execution_lag`` of the same symbol (default lag 1: the next bar, so the backtest never trades at
the price the signal was computed from) and is then held for ``holding_bars`` bars (default: the label
horizon): its weight is carried over the return intervals of the bars ``t+lag .. t+lag+H-1``, where the
interval of bar ``j`` is ``close[j] -> close[j+1]`` (``fwd_ret_1[j]``). A hold does not cross a gap in a
symbol's rows (the ``row`` column jumps, or the symbol's rows end): it is closed there. An entry whose
fill bar is not in the table is not a trade (``n_entries_without_fill``).

**Entries** (``BacktestConfig.entry``):

- ``cross_section``: at each timestamp with at least ``min_cross_section`` finite signals, a sample
  enters long when its signal is among the top ``k = max(1, floor(fraction * n_t))`` of the timestamp
  *and* positive, short when among the bottom ``k`` and negative (``allow_short``). A rank within the
  timestamp: nothing is fitted on the backtest window.
- ``threshold``: a sample enters with side ``sign(signal)`` when ``|signal| >= threshold``. The
  threshold is *given* (``BacktestConfig.threshold``); the pipeline takes it from the validation
  split's predictions (:func:`threshold_from_validation`: the ``1 - 2 * fraction`` quantile of
  ``|signal|``, so that the same share of samples as in the cross-sectional rule would trade there),
  never from the test window.
- ``auto`` (default): ``cross_section`` when the median timestamp holds at least ``min_cross_section``
  symbols (a panel), else ``threshold`` (a single symbol or a thin panel).

**Portfolio (overlapping cohorts, Jegadeesh-Titman).** The entries of one timestamp form a cohort with
gross weight 1 (``equal``: each entry ``side / n_entries``; ``signal``: each ``side * |signal| /
sum |signal|``), held ``H`` bars; the portfolio holds the last ``H`` cohorts with weight ``1/H`` each,
so its weight per symbol is the *net* of the overlapping entries on that symbol and its gross exposure
never exceeds 1: an entry every bar on one symbol is a position of 1, not of ``H`` (and a lone entry
holds ``1/H`` of the capital, the slot of its cohort). Weights are target
weights (rebalanced to the target every bar; price drift within a bar is ignored).

**Accounting, per bar.** For every (symbol, bar) row: P&L ``w * fwd_ret_1``; cost ``(cost_bps +
slippage_bps) / 1e4 * |w - w_prev|`` on every change of weight (``w_prev`` = 0 at the start of a
symbol's segment), plus the closing trade ``|w|`` after a segment's last row. The portfolio return of
a timestamp is the sum over its rows (each interval's P&L is booked at the timestamp it starts at, so
the overnight interval belongs to the day it starts on); equity compounds the per-bar net returns;
a day's return is its end-of-day equity over the previous day's minus 1, over every trading day with a
bar (days without positions count as 0). A trading day is the UTC date, except that where no bar falls
on a Saturday (equities, FX), Sunday bars count towards Monday (FX opens on Sunday evening UTC).

**Annualisation** from the data itself: bars per day = the median number of distinct timestamps per
trading day; periods per year = 252, or 365 when any bar falls on a Saturday (``replay.config.
periods_per_year``). The annualised Sharpe ratio is the daily Sharpe times ``sqrt(periods_per_year)``
with Lo's (2002) standard error, Newey-West with ``lag = ceil(H / bars_per_day)`` days (at least the
holding period: overlapping holdings make daily returns autocorrelated). Below ``min_days`` days or
``min_trades`` trades no annualised figure (Sharpe, Sortino, CAGR, volatility) is reported, and a note
says why.

**Trades.** Each entry is one trade; its return per unit notional is ``side * sum(fwd_ret_1)`` over its
held bars (fixed notional, as in the portfolio), net of a stand-alone round trip ``2 * (cost_bps +
slippage_bps) / 1e4``. The portfolio pays less where overlapping entries net out (its costs come from
the weight changes above). Hit rate = share of trades with a positive net return.

**Random baselines**, each ``n_random`` strategies with the model's number of trades, its holding rule,
weighting, costs and accounting, on the same bars, vectorised in NumPy (strategies in chunks of a
dense ``strategies x rows`` matrix):

- ``random`` (random entries, random sides): each strategy deals the model's cohort sizes (entries per
  timestamp) to the timestamps in a random order and fills every cohort with symbols drawn uniformly
  without replacement among the rows of that timestamp that can fill (a cohort larger than its new
  timestamp's capacity spills over to spare rows drawn uniformly, so the trade count is always the
  model's); each trade gets a random side (+1/-1 with equal odds; +1 only when ``allow_short`` is
  off); ``signal`` weighting gives them the model's trade magnitudes, shuffled. Keeping the cohort
  sizes keeps the concentration of the model's portfolio (with entries spread uniformly over rows,
  cohorts of one or two names made the random strategies riskier than a zero-skill model, which then
  ranked near their bottom).
- ``shifted`` (the model's own schedule at random times, random signs): every symbol's entries, sides
  and magnitudes are shifted circularly in time within the rows of its segment by a random offset
  (the same for segments of equal length, so cohorts stay together), and each symbol's sides are
  multiplied by a random sign. It keeps what the random trades destroy: the persistence of the
  model's positions, hence its turnover, costs and the volatility of its returns. A model whose
  signal is persistent trades less than random-side trades of the same count and holds the same side
  for days; against ``random`` even a zero-skill persistent signal lands in the tails (measured: 7 of
  12 single-symbol and 6 of 12 panel zero-skill runs at the 0th or 100th percentile of total net return), against ``shifted`` it
  lands across the distribution. ``shifted`` answers "does the model know *when*"; ``random``
  answers "does trading it beat trading at random".

Reported for each: the model's percentile and empirical p-value ``(1 + #{random >= model}) / (1 +
n_random)`` for the daily Sharpe ratio and the total net return, and the 5/50/95 % quantiles of the
strategies' equity per day. Notes flag what distorts the ranks: a negative Sharpe ratio ranks higher
among losing strategies the more volatile it is; a model that beats ``random`` but not ``shifted``;
a model that is mostly net long or short against net-flat random-sign strategies (market exposure).

:func:`compare_backtests` pairs two backtests on the same days (current vs previous bundle): deltas of
the annualised Sharpe ratio and of the mean daily return with circular block bootstrap intervals of
the paired days (block >= the holding period in days). :func:`plot_backtest` draws equity, the random
band and drawdown into one PNG; :func:`backtest_report` / :func:`rounded` make the JSON report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.evaluation.predictions import bar_seconds
from sentinel_pipeline.evaluation.statistics import block_bootstrap_ci, hac_mean_test, sharpe_ratio_ci
from sentinel_pipeline.replay.config import periods_per_year
from sentinel_pipeline.replay.report import jsonable

WEIGHTINGS: tuple[str, ...] = ("equal", "signal")
ENTRY_RULES: tuple[str, ...] = ("auto", "cross_section", "threshold")
REQUIRED_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", "signal", "fwd_ret_1")
BAND_QUANTILES: tuple[float, float, float] = (0.05, 0.5, 0.95)
# a dense block of at most this many (strategy, row) cells is simulated at once
_CHUNK_CELLS = 4_000_000
# cumulative sums leave residues of this order where a position is exactly flat
_FLAT = 1e-12


@dataclass(frozen=True)
class BacktestConfig:
    """How the test period is traded and judged (see the module docstring for the rules).

    Costs: ``cost_bps`` (commission + half spread) and ``slippage_bps`` per side, per unit of weight
    traded. The defaults, 5 + 2 bps per side (14 bps a round trip), suit liquid equities and FX at
    hourly or daily bars; for thinner instruments or shorter bars raise them.
    """

    cost_bps: float = 5.0
    slippage_bps: float = 2.0
    weighting: str = "equal"
    entry: str = "auto"
    fraction: float = 0.1
    threshold: float | None = None
    min_cross_section: int = 5
    holding_bars: int | None = None  # None: the label horizon given to run_backtest
    execution_lag: int = 1
    allow_short: bool = True
    min_days: int = 30
    min_trades: int = 30
    n_random: int = 1000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"BacktestConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        for name in ("cost_bps", "slippage_bps"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and 0 <= v < 1e4):
                raise bad(name, "a finite number of basis points in [0, 10000)")
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"one of {WEIGHTINGS}")
        if self.entry not in ENTRY_RULES:
            raise bad("entry", f"one of {ENTRY_RULES}")
        if not (isinstance(self.fraction, int | float) and 0 < self.fraction <= 0.5):
            raise bad("fraction", "a number in (0, 0.5]")
        if self.threshold is not None and not (
            isinstance(self.threshold, int | float) and math.isfinite(self.threshold) and self.threshold >= 0
        ):
            raise bad("threshold", "a finite number >= 0 or None")
        if not (is_int(self.min_cross_section) and self.min_cross_section >= 2):
            raise bad("min_cross_section", "an integer >= 2")
        if self.holding_bars is not None and not (is_int(self.holding_bars) and self.holding_bars >= 1):
            raise bad("holding_bars", "an integer >= 1 or None")
        if not (is_int(self.execution_lag) and self.execution_lag >= 0):
            raise bad("execution_lag", "an integer >= 0")
        if not (is_int(self.min_days) and self.min_days >= 3):
            raise bad("min_days", "an integer >= 3")
        if not (is_int(self.min_trades) and self.min_trades >= 1):
            raise bad("min_trades", "an integer >= 1")
        if not (is_int(self.n_random) and self.n_random >= 1000):
            raise bad("n_random", "an integer >= 1000 (a p-value needs a distribution, not a few draws)")
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if not (isinstance(self.level, float) and 0 < self.level < 1):
            raise bad("level", "a float in (0, 1)")

    @property
    def cost_rate(self) -> float:
        """Cost per unit of weight traded (one side), as a fraction."""
        return (float(self.cost_bps) + float(self.slippage_bps)) / 1e4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def threshold_from_validation(signal: Any, fraction: float) -> float:
    """The ``|signal|`` threshold at which ``2 * fraction`` of the (validation) samples would enter:
    the ``1 - 2 * fraction`` quantile of ``|signal|``. Fit it on a split the backtest does not trade."""
    s = np.abs(np.asarray(signal, dtype=np.float64))
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("cannot set a threshold from an empty or all-NaN signal")
    return float(np.quantile(s, max(0.0, 1.0 - 2.0 * float(fraction))))


# -- the layout of a table: symbol-major rows, segments, timestamps, days ----------------------------


@dataclass
class _Layout:
    """The table in symbol-major order (symbol, then time) with everything the simulation indexes."""

    order: np.ndarray  # symbol-major position -> row of the input table
    symbol: np.ndarray  # (n,) symbol of each position
    seg_start: np.ndarray  # (n,) first position of the position's segment
    seg_end: np.ndarray  # (n,) last position of its segment
    t_idx: np.ndarray  # (n,) index into ``times``
    times: pd.DatetimeIndex  # sorted distinct timestamps (UTC)
    day_of_time: np.ndarray  # (T,) index into ``days``
    days: pd.DatetimeIndex  # sorted distinct UTC dates (midnight, UTC)
    tm_order: np.ndarray  # positions sorted by timestamp (stable)
    tm_starts: np.ndarray  # (T,) start of each timestamp's run in ``tm_order``
    day_last_time: np.ndarray  # (D,) index of each day's last timestamp
    r1: np.ndarray  # (n,) fwd_ret_1, NaN -> 0
    signal: np.ndarray  # (n,) signal (NaN kept)
    n_nonfinite_returns: int
    # the padded form the simulation runs on: every segment is preceded by ``pad`` empty columns (and
    # the last one followed by them), so that a plain shifted difference of a cumulative sum never
    # mixes two segments and the step into the padding after a segment is its closing trade
    pad_pos: np.ndarray  # (n,) padded column of each symbol-major position
    real: np.ndarray  # (L,) True at real rows, False at padding
    r1_pad: np.ndarray  # (L,) fwd_ret_1 at real rows, 0 at padding
    tm_order_pad: np.ndarray  # (L,) columns sorted by their timestamp (padding: the row before it)
    tm_starts_pad: np.ndarray  # (T,) start of each timestamp's run in ``tm_order_pad``

    @property
    def n(self) -> int:
        return int(self.order.shape[0])


def trading_days(times: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """The trading day (UTC midnight) each timestamp counts towards: its UTC date, except that in a
    market shut on Saturdays (no Saturday bar) Sunday bars belong to Monday's session (FX opens on Sunday
    evening UTC), so that such a market has 5 daily returns a week, as ``periods_per_year`` = 252 assumes."""
    idx = pd.DatetimeIndex(times)
    day = idx.normalize()
    dow = idx.day_of_week
    if not bool((dow == 5).any()):
        day = day + pd.to_timedelta(np.where(dow == 6, 1, 0), unit="D")
    return pd.DatetimeIndex(day)


def _layout(predictions: pd.DataFrame, pad: int) -> _Layout:
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"backtest needs columns {list(REQUIRED_COLUMNS)}; missing {missing}")
    if len(predictions) == 0:
        raise ValueError("backtest needs at least one row")
    ts = pd.to_datetime(predictions["timestamp"], utc=True)
    if ts.isna().any():
        raise ValueError("backtest: timestamps must not be missing")
    ts_ns = ts.to_numpy("datetime64[ns]").astype(np.int64)
    sym_codes, sym_names = pd.factorize(predictions["symbol"].astype(str), sort=True)
    order = np.lexsort((ts_ns, sym_codes))
    s_sorted, t_sorted = sym_codes[order], ts_ns[order]
    if np.any((s_sorted[1:] == s_sorted[:-1]) & (t_sorted[1:] == t_sorted[:-1])):
        raise ValueError("backtest: (symbol, timestamp) pairs must be unique")
    n = order.shape[0]
    new_seg = np.ones(n, dtype=bool)
    new_seg[1:] = s_sorted[1:] != s_sorted[:-1]
    if "row" in predictions.columns:
        rows = predictions["row"].to_numpy(np.int64)[order]
        new_seg[1:] |= rows[1:] != rows[:-1] + 1
    starts = np.flatnonzero(new_seg)
    seg_id = np.cumsum(new_seg) - 1
    ends = np.append(starts[1:] - 1, n - 1)
    times_ns, t_idx = np.unique(t_sorted, return_inverse=True)
    times = pd.DatetimeIndex(pd.to_datetime(times_ns, utc=True))
    day_ns = trading_days(times)
    days, day_of_time = np.unique(day_ns.to_numpy("datetime64[ns]").astype(np.int64), return_inverse=True)
    tm_order = np.argsort(t_idx, kind="stable")
    tm_starts = np.searchsorted(t_idx[tm_order], np.arange(times.shape[0]))
    day_last_time = np.append(np.flatnonzero(np.diff(day_of_time)), times.shape[0] - 1)
    r1 = predictions["fwd_ret_1"].to_numpy(np.float64)[order]
    bad = ~np.isfinite(r1)
    r1 = np.where(bad, 0.0, r1)
    signal = predictions["signal"].to_numpy(np.float64)[order]
    pad_pos = np.arange(n) + pad * (seg_id + 1)
    size = n + pad * (starts.shape[0] + 1)
    real = np.zeros(size, dtype=bool)
    real[pad_pos] = True
    r1_pad = np.zeros(size)
    r1_pad[pad_pos] = r1
    # padding columns take the timestamp of the real column before them (the first ones: the first row's)
    owner = np.maximum.accumulate(np.where(real, np.arange(size), 0))
    col_time = np.zeros(size, dtype=np.int64)
    col_time[pad_pos] = t_idx
    col_time = np.where(real[owner], col_time[owner], t_idx[0])
    tm_order_pad = np.argsort(col_time, kind="stable")
    tm_starts_pad = np.searchsorted(col_time[tm_order_pad], np.arange(times.shape[0]))
    return _Layout(
        order=order, symbol=np.asarray(sym_names)[s_sorted], seg_start=starts[seg_id], seg_end=ends[seg_id],
        t_idx=t_idx.astype(np.int64), times=times,
        day_of_time=day_of_time.astype(np.int64), days=pd.DatetimeIndex(pd.to_datetime(days, utc=True)),
        tm_order=tm_order, tm_starts=tm_starts, day_last_time=day_last_time,
        r1=r1, signal=signal, n_nonfinite_returns=int(bad.sum()),
        pad_pos=pad_pos, real=real, r1_pad=r1_pad, tm_order_pad=tm_order_pad, tm_starts_pad=tm_starts_pad,
    )


def _bars_per_day(layout: _Layout) -> float:
    return float(np.median(np.bincount(layout.day_of_time)))


def resolve_entry_rule(predictions: pd.DataFrame, config: BacktestConfig) -> str:
    """The entry rule ``config.entry`` means on this table (``auto`` resolved): ``cross_section`` or
    ``threshold``. Callers use it to know whether a threshold must be fitted (on validation) first."""
    return _resolve_entry(config, _layout(predictions, pad=1))


def _resolve_entry(config: BacktestConfig, layout: _Layout) -> str:
    if config.entry != "auto":
        return config.entry
    finite = np.isfinite(layout.signal)
    per_time = np.bincount(layout.t_idx[finite], minlength=layout.times.shape[0])
    return "cross_section" if float(np.median(per_time)) >= config.min_cross_section else "threshold"


def _entry_sides(config: BacktestConfig, layout: _Layout, rule: str) -> np.ndarray:
    """+1 / -1 / 0 per symbol-major position: the entry rule applied to the signal."""
    s = layout.signal
    finite = np.isfinite(s)
    side = np.zeros(layout.n, dtype=np.int8)
    if rule == "threshold":
        if config.threshold is None:
            raise ValueError("the threshold entry rule needs BacktestConfig.threshold (fit it on validation: "
                             "threshold_from_validation)")
        hit = finite & (np.abs(s) >= config.threshold) & (s != 0)
        side[hit & (s > 0)] = 1
        if config.allow_short:
            side[hit & (s < 0)] = -1
        return side
    # cross_section: rank within each timestamp among finite signals
    idx = np.flatnonzero(finite)
    t = layout.t_idx[idx]
    o = np.lexsort((s[idx], t))
    idx, t = idx[o], t[o]
    counts = np.bincount(t, minlength=layout.times.shape[0])
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(idx.shape[0]) - group_start[t]  # 0 = lowest signal of its timestamp
    n_t = counts[t]
    k = np.maximum(1, np.floor(config.fraction * n_t)).astype(np.int64)
    ok = n_t >= config.min_cross_section
    top = ok & (rank >= n_t - k) & (s[idx] > 0)
    side[idx[top]] = 1
    if config.allow_short:
        bottom = ok & (rank < k) & (s[idx] < 0)
        side[idx[bottom]] = -1
    return side


def _fill_ok(layout: _Layout, lag: int) -> np.ndarray:
    """Positions whose fill bar (``lag`` rows later) lies in the same segment."""
    return np.arange(layout.n) + lag <= layout.seg_end


def _cohort_weights(pos: np.ndarray, side: np.ndarray, mag: np.ndarray, t_idx: np.ndarray,
                    strategy: np.ndarray, n_strategies: int, n_times: int) -> np.ndarray:
    """Entry weights ``side * mag / sum(mag of the same strategy and timestamp)`` (cohort gross 1)."""
    key = strategy * n_times + t_idx[pos]
    total = np.bincount(key, weights=mag, minlength=n_strategies * n_times)
    return side * mag / total[key]


@dataclass
class _Simulated:
    net: np.ndarray  # (K, T) per-timestamp net returns
    gross: np.ndarray | None = None
    cost: np.ndarray | None = None
    turnover: np.ndarray | None = None
    gross_exposure: np.ndarray | None = None
    net_exposure: np.ndarray | None = None
    n_positions: np.ndarray | None = None
    weights: np.ndarray | None = None  # (n,) symbol-major weight of each row (strategy 0)
    row_turnover: np.ndarray | None = None  # (n,) weight traded at each row, its closing trade included


def _simulate(entries: np.ndarray, layout: _Layout, hold: int, lag: int, rate: float,
              detail: bool = False) -> _Simulated:
    """Per-bar accounting of ``entries`` (K, L): cohort entry weights at the signal rows' padded
    columns. An entry at column ``i`` fills at ``i + lag`` and is held over ``i + lag .. i + lag + hold - 1``:
    the weight of column ``j`` is ``(C[j - lag] - C[j - lag - hold]) / hold`` with ``C`` the cumulative
    sum of the entries (padding >= hold + lag keeps segments apart)."""
    k, size = entries.shape
    a = hold + lag
    c = np.cumsum(entries, axis=1)
    w = np.empty_like(c)
    w[:, :a] = 0.0
    np.subtract(c[:, hold:size - lag], c[:, : size - a], out=w[:, a:])
    w *= layout.real / hold
    if detail:
        w[np.abs(w) < _FLAT] = 0.0
    turnover = c  # the cumulative sum is no longer needed: reuse its memory for |w[j] - w[j-1]|
    turnover[:, 0] = w[:, 0]
    np.subtract(w[:, 1:], w[:, :-1], out=turnover[:, 1:])
    np.abs(turnover, out=turnover)

    def per_time(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x[:, layout.tm_order_pad], layout.tm_starts_pad, axis=1)

    if not detail:  # net = w * r - rate * turnover, in place (the random strategies' path)
        w *= layout.r1_pad
        turnover *= rate
        w -= turnover
        return _Simulated(net=per_time(w))
    pnl = w * layout.r1_pad
    cost = rate * turnover
    out = _Simulated(net=per_time(pnl - cost))
    out.gross, out.cost, out.turnover = per_time(pnl), per_time(cost), per_time(turnover)
    out.gross_exposure, out.net_exposure = per_time(np.abs(w)), per_time(w)
    out.n_positions = per_time((w != 0).astype(np.float64))
    p = layout.pad_pos
    closing = np.where(layout.seg_end == np.arange(p.shape[0]), turnover[0, p + 1], 0.0)
    out.weights, out.row_turnover = w[0, p], turnover[0, p] + closing
    return out


def _equity(net: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.cumprod(1.0 + net, axis=-1)


def _daily(equity_t: np.ndarray, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """(end-of-day equity, daily returns) from per-timestamp equity (K, T)."""
    eq = equity_t[..., layout.day_last_time]
    before = np.concatenate([np.ones(eq.shape[:-1] + (1,)), eq[..., :-1]], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return eq, eq / before - 1.0


def _daily_sharpe(daily: np.ndarray) -> np.ndarray:
    """mean / std (ddof=1) per row; NaN where the std is 0 or fewer than 2 days."""
    if daily.shape[-1] < 2:
        return np.full(daily.shape[:-1], np.nan)
    mu = daily.mean(axis=-1)
    sd = daily.std(axis=-1, ddof=1)
    ok = sd > 1e-15
    return np.where(ok, mu / np.where(ok, sd, 1.0), np.nan)


def _drawdown(equity: np.ndarray) -> np.ndarray:
    peak = np.maximum.accumulate(np.concatenate([[1.0], equity]))[1:]
    return 1.0 - equity / peak


def _window_sum(cum: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """sum of the values at positions ``start .. stop`` (inclusive) from a zero-led cumulative sum."""
    return cum[stop + 1] - cum[start]


# -- results ---------------------------------------------------------------------------------------


@dataclass
class RandomBaseline:
    """The random strategies' outcomes and where the model stands among them."""

    n: int
    n_trades: int
    sharpe_daily: np.ndarray  # (n,) daily (not annualised) Sharpe per strategy, NaN where undefined
    total_return: np.ndarray  # (n,) total net return per strategy
    band: pd.DataFrame  # per day: q05, q50, q95 of the random end-of-day equity
    seconds: float
    trades_per_strategy: np.ndarray  # (n,) entries each strategy actually made (= the model's count)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class BacktestResult:
    config: BacktestConfig
    info: dict[str, Any]  # the rule as applied: entry, threshold, holding, lag, bars/day, periods/year
    bars: pd.DataFrame  # per timestamp
    daily: pd.DataFrame  # per UTC day
    trades: pd.DataFrame  # one row per trade
    positions: pd.DataFrame  # one row per input row: weight, pnl, cost
    metrics: dict[str, Any]
    notes: list[str]
    random: RandomBaseline | None  # random entries and sides with the model's trade count and cohort sizes
    shifted: RandomBaseline | None = None  # the model's schedule moved in time, random sign per symbol


def _empirical(model: float, draws: np.ndarray) -> dict[str, Any]:
    draws = draws[np.isfinite(draws)]
    if not math.isfinite(model) or draws.size == 0:
        return {"model": model if math.isfinite(model) else None, "percentile": None, "p_value": None,
                "n": int(draws.size), "random_q05": None, "random_q50": None, "random_q95": None}
    below, ties = float(np.mean(draws < model)), float(np.mean(draws == model))
    q05, q50, q95 = (float(v) for v in np.quantile(draws, BAND_QUANTILES))
    return {
        "model": float(model),
        "percentile": 100.0 * (below + 0.5 * ties),
        "p_value": (1.0 + float(np.sum(draws >= model))) / (1.0 + draws.size),
        "n": int(draws.size), "random_q05": q05, "random_q50": q50, "random_q95": q95,
    }


def _random_entries(rng: np.random.Generator, k: int, layout: _Layout, fill_tm: np.ndarray,
                    counts_active: np.ndarray, active: np.ndarray, cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(strategy, position) of the entries of ``k`` random strategies.

    Each strategy deals the model's cohort sizes (entries per timestamp) to the timestamps that can
    fill in a random order, and fills each cohort with rows drawn uniformly without replacement among
    that timestamp's fillable rows. A cohort larger than its timestamp's capacity keeps what fits; the
    rest go to spare fillable rows drawn uniformly (so the trade count is always the model's).
    """
    n_times = layout.times.shape[0]
    t_fill = layout.t_idx[fill_tm]  # ascending (fill_tm is in timestamp order)
    gstart = np.searchsorted(t_fill, np.arange(n_times))
    rank = np.arange(t_fill.shape[0]) - gstart[t_fill]
    dealt = rng.permuted(np.broadcast_to(counts_active, (k, counts_active.shape[0])), axis=1)
    kept = np.minimum(dealt, cap[active])
    overflow = (dealt - kept).sum(axis=1)
    per_time = np.zeros((k, n_times), dtype=np.int64)
    per_time[:, active] = kept
    # a random order within each timestamp: sort by (timestamp, uniform key)
    order = np.argsort(t_fill[None, :] + rng.random((k, t_fill.shape[0])), axis=1)
    chosen = rank[None, :] < per_time[:, t_fill]
    for j in np.flatnonzero(overflow):
        spare = np.flatnonzero(~chosen[j])
        chosen[j, rng.choice(spare, size=int(overflow[j]), replace=False)] = True
    strategy, slot = np.nonzero(chosen)
    return strategy, fill_tm[order[strategy, slot]]


def _shifted_entries(rng: np.random.Generator, k: int, layout: _Layout, trade_pos: np.ndarray,
                     trade_side: np.ndarray, lag: int, allow_short: bool) -> tuple[np.ndarray, ...]:
    """(strategy, position, side) of ``k`` strategies that trade the model's own entry schedule, moved in
    time: every symbol's entries are shifted circularly within the rows of its segment that can fill, by
    an offset drawn per strategy (shared by segments of equal length, so cohorts stay together), and each
    symbol's sides are multiplied by a random sign per strategy (not when ``allow_short`` is off)."""
    n_trades = trade_pos.shape[0]
    start = layout.seg_start[trade_pos]
    span = layout.seg_end[trade_pos] - lag - start + 1  # fillable rows of the segment (>= 1)
    base = rng.integers(0, 2**62, size=(k, 1))
    offset = np.where(span > 1, 1 + base % np.maximum(span - 1, 1), 0)  # never 0 where it can move
    pos = start + (trade_pos - start + offset) % span
    if allow_short:
        codes = np.unique(layout.symbol, return_inverse=True)[1]
        flip = rng.choice(np.array([-1.0, 1.0]), size=(k, int(codes.max()) + 1))
        side = trade_side[None, :] * flip[:, codes[trade_pos]]
    else:
        side = np.broadcast_to(trade_side, (k, n_trades))
    return np.repeat(np.arange(k), n_trades), pos.reshape(-1), np.asarray(side, dtype=np.float64).reshape(-1)


def _distribution(config: BacktestConfig, layout: _Layout, hold: int, n_trades: int, draw: Any,
                  model_sharpe: float, model_total: float, describe: Mapping[str, str]) -> RandomBaseline:
    """Simulate ``config.n_random`` strategies drawn by ``draw(rng, k) -> (strategy, pos, side, mag)``."""
    import time

    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    n_times = layout.times.shape[0]
    total_k = int(config.n_random)
    n_days = layout.days.shape[0]
    sharpe = np.full(total_k, np.nan)
    total = np.zeros(total_k)
    eq_days = np.ones((total_k, n_days))
    trades_each = np.zeros(total_k, dtype=np.int64)
    chunk = max(1, min(total_k, _CHUNK_CELLS // layout.real.shape[0]))
    for a in range(0, total_k if n_trades else 0, chunk):
        k = min(chunk, total_k - a)
        strategy, pos, side, mag = draw(rng, k)
        weights = _cohort_weights(pos, side, mag, layout.t_idx, strategy, k, n_times)
        entries = np.zeros((k, layout.real.shape[0]))
        entries[strategy, layout.pad_pos[pos]] = weights
        trades_each[a:a + k] = np.count_nonzero(entries, axis=1)
        sim = _simulate(entries, layout, hold, config.execution_lag, config.cost_rate)
        eq_t = _equity(sim.net)
        eq_d, daily = _daily(eq_t, layout)
        sharpe[a:a + k] = _daily_sharpe(daily)
        total[a:a + k] = eq_t[:, -1] - 1.0
        eq_days[a:a + k] = eq_d
    band = pd.DataFrame(
        np.quantile(eq_days, BAND_QUANTILES, axis=0).T, columns=["q05", "q50", "q95"],
        index=pd.Index(layout.days, name="date"),
    )
    seconds = time.perf_counter() - t0
    summary = {
        "n": total_k, "n_trades_each": n_trades, "seconds": seconds, **describe,
        "sharpe_daily": _empirical(model_sharpe, sharpe),
        "total_return": _empirical(model_total, total),
    }
    return RandomBaseline(total_k, n_trades, sharpe, total, band, seconds, trades_each, summary)


def _baselines(config: BacktestConfig, layout: _Layout, fillable: np.ndarray, trade_pos: np.ndarray,
               trade_side: np.ndarray, model_mag: np.ndarray, hold: int, model_sharpe: float,
               model_total: float) -> tuple[RandomBaseline, RandomBaseline]:
    """The random baseline and the shifted-schedule baseline (see the module docstring)."""
    n_trades, n_times = int(trade_pos.shape[0]), layout.times.shape[0]
    fill_tm = fillable[np.argsort(layout.t_idx[fillable], kind="stable")]
    cap = np.bincount(layout.t_idx[fill_tm], minlength=n_times)
    active = np.flatnonzero(cap > 0)
    counts_active = np.bincount(layout.t_idx[trade_pos], minlength=n_times)[active]
    sides = np.array([-1.0, 1.0])

    def draw_random(rng: np.random.Generator, k: int) -> tuple[np.ndarray, ...]:
        strategy, pos = _random_entries(rng, k, layout, fill_tm, counts_active, active, cap)
        side = rng.choice(sides, size=pos.shape[0]) if config.allow_short else np.ones(pos.shape[0])
        if config.weighting == "signal":
            mag = np.concatenate([rng.permutation(model_mag) for _ in range(k)])
        else:
            mag = np.ones(pos.shape[0])
        return strategy, pos, side, mag

    def draw_shifted(rng: np.random.Generator, k: int) -> tuple[np.ndarray, ...]:
        strategy, pos, side = _shifted_entries(rng, k, layout, trade_pos, trade_side, config.execution_lag,
                                               config.allow_short)
        return strategy, pos, side, np.tile(model_mag, k)

    random = _distribution(config, layout, hold, n_trades, draw_random, model_sharpe, model_total, {
        "entry": "the model's cohort sizes dealt to random timestamps, rows drawn uniformly within each",
        "side": "random +1/-1 per trade" if config.allow_short else "+1 (long only)"})
    shifted = _distribution(config, layout, hold, n_trades, draw_shifted, model_sharpe, model_total, {
        "entry": "the model's own entry schedule, shifted circularly in time by a random offset",
        "side": "the model's sides times a random sign per symbol" if config.allow_short else "the model's sides"})
    return random, shifted


def _baseline_caveats(metrics: Mapping[str, Any], random: Mapping[str, Any], shifted: Mapping[str, Any],
                      allow_short: bool) -> list[str]:
    """What a reader must know before taking the model's rank among the random strategies at face value."""
    out = []
    for name, summary in (("random", random), ("shifted", shifted)):
        sr, tot = summary["sharpe_daily"], summary["total_return"]
        if sr["percentile"] is not None and sr["model"] < 0 and (sr["random_q50"] or 0) < 0 and sr["percentile"] > 50:
            out.append(
                f"the model's Sharpe ratio is negative: among strategies that lose money a more volatile one has the "
                f"less negative Sharpe, so its Sharpe percentile among the {name} strategies ({sr['percentile']:.1f}) "
                f"flatters it; its total net return ranks at the {tot['percentile']:.1f}th percentile")
    p_random, p_shifted = random["total_return"]["p_value"], shifted["total_return"]["p_value"]
    if p_random is not None and p_shifted is not None and p_random <= 0.05 < p_shifted:
        out.append(
            f"the model beats random trades (p = {p_random:.3f} on total net return) but not its own entry schedule "
            f"moved in time (p = {p_shifted:.3f}): the edge comes from how it trades (persistence, turnover, "
            "exposure), not from when")
    gross, net = metrics["mean_gross_exposure"], metrics["mean_net_exposure"]
    if allow_short and gross > 0 and abs(net) > 0.5 * gross:
        out.append(
            f"the model was net {'long' if net > 0 else 'short'} {abs(net) / gross:.0%} of its gross exposure on "
            "average while the random-sign strategies are net flat: part of any edge over them is market exposure")
    return out


def run_backtest(
    predictions: pd.DataFrame,
    config: BacktestConfig | None = None,
    *,
    horizon: int | None = None,
    random_baseline: bool = True,
) -> BacktestResult:
    """Backtest ``predictions`` (one row per sample; see the module docstring for every rule).

    ``horizon``: the label horizon in bars, the holding period unless ``config.holding_bars`` is set.
    ``random_baseline=False`` skips the random strategies (e.g. for the previous bundle).
    """
    config = config or BacktestConfig()
    hold = config.holding_bars if config.holding_bars is not None else horizon
    if hold is None or int(hold) != hold or int(hold) < 1:
        raise ValueError(f"backtest needs a holding period: config.holding_bars or horizon (>= 1), got {hold!r}")
    hold = int(hold)
    lag = int(config.execution_lag)
    rate = config.cost_rate
    layout = _layout(predictions, pad=hold + lag)
    notes: list[str] = []
    rule = _resolve_entry(config, layout)
    side = _entry_sides(config, layout, rule)
    fill_ok = _fill_ok(layout, lag)
    n_unfilled = int(np.count_nonzero((side != 0) & ~fill_ok))
    side[~fill_ok] = 0
    trade_pos = np.flatnonzero(side)
    mag_all = np.abs(layout.signal) if config.weighting == "signal" else np.ones(layout.n)
    trade_mag = np.where(np.isfinite(mag_all[trade_pos]), mag_all[trade_pos], 0.0)
    if config.weighting == "signal" and trade_pos.size and not np.all(trade_mag > 0):
        raise ValueError("signal weighting needs a non-zero signal on every entry")
    n_times = layout.times.shape[0]
    weights = _cohort_weights(trade_pos, side[trade_pos].astype(np.float64), trade_mag, layout.t_idx,
                              np.zeros(trade_pos.shape[0], dtype=np.int64), 1, n_times)
    entries = np.zeros((1, layout.real.shape[0]))
    entries[0, layout.pad_pos[trade_pos]] = weights
    sim = _simulate(entries, layout, hold, lag, rate, detail=True)
    assert sim.gross is not None and sim.cost is not None and sim.turnover is not None
    assert sim.gross_exposure is not None and sim.net_exposure is not None and sim.n_positions is not None
    assert sim.weights is not None and sim.row_turnover is not None

    net_t = sim.net[0]
    eq_t = _equity(net_t)
    dd_t = _drawdown(eq_t)
    eq_d, daily_ret = (v[0] for v in _daily(eq_t[None, :], layout))
    dd_d = _drawdown(eq_d)
    n_days = int(layout.days.shape[0])
    bars_per_day = _bars_per_day(layout)
    ppy = periods_per_year(layout.times)
    hold_days = int(max(1, math.ceil(hold / bars_per_day)))
    bsec = bar_seconds(layout.times)

    bars = pd.DataFrame({
        "timestamp": layout.times,
        "n_symbols": np.diff(np.append(layout.tm_starts, layout.n)),
        "gross_return": sim.gross[0], "cost": sim.cost[0], "net_return": net_t,
        "turnover": sim.turnover[0], "gross_exposure": sim.gross_exposure[0],
        "net_exposure": sim.net_exposure[0], "n_positions": sim.n_positions[0].astype(np.int64),
        "equity": eq_t, "drawdown": dd_t,
    })
    day_sum = lambda a: np.bincount(layout.day_of_time, weights=a, minlength=n_days)  # noqa: E731
    daily = pd.DataFrame({
        "date": layout.days,
        "n_bars": np.bincount(layout.day_of_time, minlength=n_days),
        "gross_return": day_sum(sim.gross[0]), "cost": day_sum(sim.cost[0]), "net_return": daily_ret,
        "turnover": day_sum(sim.turnover[0]), "equity": eq_d, "drawdown": dd_d,
        "equity_gross": np.cumprod(1.0 + sim.gross[0])[layout.day_last_time],
    })

    # trades: held rows fill .. min(fill + hold - 1, segment end)
    fill = trade_pos + lag
    stop = np.minimum(fill + hold - 1, layout.seg_end[trade_pos])
    cum_r = np.concatenate([[0.0], np.cumsum(layout.r1)])
    t_side = side[trade_pos].astype(np.float64)
    gross_tr = t_side * _window_sum(cum_r, fill, stop)
    net_tr = gross_tr - 2.0 * rate
    trades = pd.DataFrame({
        "symbol": layout.symbol[trade_pos],
        "signal_time": layout.times[layout.t_idx[trade_pos]],
        "fill_time": layout.times[layout.t_idx[fill]],
        "side": t_side.astype(np.int64), "signal": layout.signal[trade_pos],
        "cohort_weight": weights, "n_bars": (stop - fill + 1).astype(np.int64),
        "gross_return": gross_tr, "net_return": net_tr,
    })
    inv = np.empty(layout.n, dtype=np.int64)
    inv[layout.order] = np.arange(layout.n)
    positions = pd.DataFrame({
        "symbol": predictions["symbol"].to_numpy(),
        "timestamp": pd.DatetimeIndex(pd.to_datetime(predictions["timestamp"], utc=True)),
        "signal": predictions["signal"].to_numpy(np.float64),
        "fwd_ret_1": predictions["fwd_ret_1"].to_numpy(np.float64),
        "entry_side": side[inv].astype(np.int64),
        "weight": sim.weights[inv],
        "pnl": (sim.weights * layout.r1)[inv],
        "cost": (rate * sim.row_turnover)[inv],
    })

    n_trades = int(trade_pos.size)
    invested = sim.gross_exposure[0] > _FLAT
    metrics: dict[str, Any] = {
        "n_samples": layout.n, "n_symbols": int(np.unique(layout.symbol).size),
        "n_timestamps": int(n_times), "n_days": n_days,
        "start": layout.times[0], "end": layout.times[-1],
        "n_trades": n_trades, "n_long": int(np.sum(t_side > 0)), "n_short": int(np.sum(t_side < 0)),
        "n_entries_without_fill": n_unfilled,
        "total_return": float(eq_t[-1] - 1.0),
        "total_return_gross": float(np.prod(1.0 + sim.gross[0]) - 1.0),
        "total_cost": float(sim.cost[0].sum()),
        "mean_daily_return": float(daily_ret.mean()),
        "max_drawdown": float(dd_t.max()), "max_drawdown_daily": float(dd_d.max()),
        "mean_daily_turnover": float(daily["turnover"].mean()),
        "annual_turnover": float(daily["turnover"].mean() * ppy),
        "mean_gross_exposure": float(sim.gross_exposure[0].mean()),
        "mean_net_exposure": float(sim.net_exposure[0].mean()),
        "fraction_bars_invested": float(invested.mean()),
        "hit_rate": float(np.mean(net_tr > 0)) if n_trades else None,
        "mean_trade_return": float(net_tr.mean()) if n_trades else None,
        "mean_trade_return_gross": float(gross_tr.mean()) if n_trades else None,
        "mean_trade_bars": float((stop - fill + 1).mean()) if n_trades else None,
        "daily_sharpe": float(_daily_sharpe(daily_ret[None, :])[0]),
    }
    mean_test = hac_mean_test(daily_ret, hold_days)
    metrics["mean_daily_return_t_hac"] = mean_test.t
    enough_days, enough_trades = n_days >= config.min_days, n_trades >= config.min_trades
    if enough_days and enough_trades:
        sr = sharpe_ratio_ci(daily_ret, ppy, lag=hold_days, level=config.level)
        downside = math.sqrt(float(np.mean(np.minimum(daily_ret, 0.0) ** 2)))
        metrics.update({
            "sharpe": sr.sharpe, "sharpe_se": sr.se, "sharpe_lower": sr.lower, "sharpe_upper": sr.upper,
            "sortino": float(daily_ret.mean() / downside * math.sqrt(ppy)) if downside > 0 else None,
            "annualised_return": float(eq_d[-1] ** (ppy / n_days) - 1.0) if eq_d[-1] > 0 else -1.0,
            "annualised_volatility": float(daily_ret.std(ddof=1) * math.sqrt(ppy)),
        })
        if not math.isfinite(sr.sharpe):
            notes.append("annualised Sharpe undefined: the daily returns have no variance (no positions?)")
    else:
        metrics.update(dict.fromkeys(("sharpe", "sharpe_se", "sharpe_lower", "sharpe_upper", "sortino",
                                      "annualised_return", "annualised_volatility")))
        why = []
        if not enough_days:
            why.append(f"{n_days} days < min_days {config.min_days}")
        if not enough_trades:
            why.append(f"{n_trades} trades < min_trades {config.min_trades}")
        se = math.sqrt(ppy / max(n_days, 1))
        notes.append(
            f"no annualised Sharpe/Sortino/return reported: {'; '.join(why)}. Over {n_days} days the standard "
            f"error of an annualised Sharpe ratio is about sqrt({ppy:.0f}/{n_days}) = {se:.1f} even for i.i.d. "
            "returns (more with overlapping holdings): the figure would be noise. Daily figures, the random "
            "baseline and the drawdown are still reported."
        )
    if n_trades == 0:
        notes.append("the entry rule selected no trade on this window")
    if layout.n_nonfinite_returns:
        notes.append(f"{layout.n_nonfinite_returns} rows without a finite fwd_ret_1 were marked at 0 return")
    if math.isfinite(bsec) and bsec < 3600 and config.slippage_bps <= 2:
        notes.append(f"bars of {bsec / 60:.0f} min: {config.slippage_bps:g} bps slippage per side is likely "
                     "optimistic at this frequency")
    if n_days < 4 * hold_days:
        notes.append(f"{n_days} days hold fewer than 4 non-overlapping holding periods of {hold_days} days")

    info: dict[str, Any] = {
        "entry_rule": rule, "fraction": config.fraction if rule == "cross_section" else None,
        "threshold": config.threshold if rule == "threshold" else None,
        "holding_bars": hold, "execution_lag": lag, "allow_short": config.allow_short,
        "weighting": config.weighting, "cost_bps": float(config.cost_bps),
        "slippage_bps": float(config.slippage_bps), "round_trip_cost_bps": 2e4 * rate,
        "bars_per_day": bars_per_day, "bar_seconds": bsec, "periods_per_year": ppy,
        "holding_days": hold / bars_per_day, "sharpe_lag_days": hold_days,
        "min_days": config.min_days, "min_trades": config.min_trades,
    }
    random = shifted = None
    if random_baseline:
        random, shifted = _baselines(config, layout, np.flatnonzero(fill_ok), trade_pos, t_side, trade_mag, hold,
                                     metrics["daily_sharpe"], metrics["total_return"])
        if n_trades == 0:
            notes.append("random baselines not run: the model made no trade")
        notes.extend(_baseline_caveats(metrics, random.summary, shifted.summary, config.allow_short))
        for name, dist in (("random", random), ("shifted", shifted)):
            for q in ("q05", "q50", "q95"):
                daily[f"{name}_{q}"] = dist.band[q].to_numpy()
    return BacktestResult(config, info, bars, daily, trades, positions, metrics, notes, random, shifted)


# -- comparison with another backtest on the same window -------------------------------------------


def compare_backtests(current: BacktestResult, previous: BacktestResult, *, n_boot: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two backtests of the same window (current minus previous).

    Days are paired by date (inner join). ``mean_daily_return``: the mean of the paired differences
    with a circular block bootstrap interval and a HAC t-statistic; ``sharpe``: the difference of the
    annualised Sharpe ratios with a bootstrap interval that resamples the paired days in blocks
    (both strategies' returns of the same days together). Block = lag = the longer holding period in
    days. The Sharpe delta is ``None`` when either side's annualised Sharpe was not reported.
    """
    level = current.config.level
    a = current.daily.set_index("date")["net_return"]
    b = previous.daily.set_index("date")["net_return"]
    joined = pd.concat([a.rename("current"), b.rename("previous")], axis=1, join="inner").dropna()
    x, y = joined["current"].to_numpy(), joined["previous"].to_numpy()
    block = int(max(current.info["sharpe_lag_days"], previous.info["sharpe_lag_days"], 1))
    ppy = float(current.info["periods_per_year"])
    diff = x - y
    notes: list[str] = []
    out: dict[str, Any] = {"n_days_paired": int(diff.size), "block_days": block, "level": level}
    if diff.size < 3:
        notes.append(f"only {diff.size} paired days: no comparison")
        out.update({"mean_daily_return": None, "sharpe": None, "notes": notes})
        return out
    ci = block_bootstrap_ci(diff, block, np.mean, level=level, n_boot=n_boot, seed=seed)
    test = hac_mean_test(diff, block)
    out["mean_daily_return"] = {
        "current": float(x.mean()), "previous": float(y.mean()), "delta": ci.estimate,
        "lower": ci.lower, "upper": ci.upper, "t_hac": test.t, "p_one_sided": test.p_one_sided,
    }
    out["total_return"] = {"current": current.metrics["total_return"], "previous": previous.metrics["total_return"],
                           "delta": current.metrics["total_return"] - previous.metrics["total_return"]}
    cur_sr, prev_sr = current.metrics.get("sharpe"), previous.metrics.get("sharpe")
    if cur_sr is None or prev_sr is None or not (math.isfinite(cur_sr) and math.isfinite(prev_sr)):
        notes.append("Sharpe delta not reported: the annualised Sharpe of "
                     f"{'current' if cur_sr is None else 'previous'} was not reported (see its notes)")
        out["sharpe"] = None
    else:
        def sharpe_diff(idx: np.ndarray) -> float:
            i = idx.astype(np.int64)
            sx, sy = x[i].std(ddof=1), y[i].std(ddof=1)
            if not (sx > 0 and sy > 0):
                return float("nan")
            return float((x[i].mean() / sx - y[i].mean() / sy) * math.sqrt(ppy))

        # the bootstrap resamples day indices in blocks, so both series keep their pairing
        sci = block_bootstrap_ci(np.arange(diff.size, dtype=np.float64), block, sharpe_diff, level=level,
                                 n_boot=n_boot, seed=seed)
        out["sharpe"] = {"current": float(cur_sr), "previous": float(prev_sr),
                         "delta": float(cur_sr - prev_sr), "lower": sci.lower, "upper": sci.upper}
    out["notes"] = notes
    return out


# -- report and plot --------------------------------------------------------------------------------


def rounded(obj: Any, digits: int = 4) -> Any:
    """``obj`` with every float rounded to ``digits`` significant digits (for reading; ints untouched)."""
    if isinstance(obj, Mapping):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    if isinstance(obj, float) and math.isfinite(obj) and obj != 0:
        return round(obj, digits - 1 - int(math.floor(math.log10(abs(obj)))))
    return obj


def backtest_report(result: BacktestResult, comparison: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able dict of the backtest (config, rule as applied, metrics, random baseline, notes,
    comparison with the previous bundle when given). Round it with :func:`rounded` for reading."""
    report: dict[str, Any] = {
        **dict(extra or {}),
        "config": result.config.to_dict(),
        "rule": result.info,
        "metrics": result.metrics,
        "random_baseline": result.random.summary if result.random is not None else None,
        "shifted_baseline": result.shifted.summary if result.shifted is not None else None,
        "notes": list(result.notes),
    }
    if comparison is not None:
        report["vs_previous"] = dict(comparison)
    return jsonable(report)


def plot_backtest(result: BacktestResult, path: str | Path, *, previous: BacktestResult | None = None,
                  title: str = "Backtest") -> Path:
    """Equity (end of day) with the random band and the previous bundle, and the drawdown, in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    days = result.daily["date"].dt.tz_localize(None)
    fig, (ax, ax_dd) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    try:
        if result.random is not None:
            band = result.random.band
            ax.fill_between(days, band["q05"], band["q95"], color="0.8", alpha=0.7,
                            label=f"{result.random.n} random trades strategies, 5-95 %")
            ax.plot(days, band["q50"], color="0.45", lw=1, ls="--", label="random median")
        if result.shifted is not None:
            band = result.shifted.band
            ax.plot(days, band["q05"], color="tab:green", lw=0.8, ls="--",
                    label=f"{result.shifted.n} x own schedule moved in time, 5 / 95 %")
            ax.plot(days, band["q95"], color="tab:green", lw=0.8, ls="--")
        if previous is not None:
            prev = previous.daily.set_index("date")["equity"].reindex(result.daily["date"])
            ax.plot(days, prev.to_numpy(), color="tab:orange", lw=1.3, label="previous bundle")
        ax.plot(days, result.daily["equity_gross"], color="tab:blue", lw=1, ls=":", label="model before costs")
        ax.plot(days, result.daily["equity"], color="tab:blue", lw=1.8, label="model (net of costs)")
        ax.axhline(1.0, color="k", lw=0.6)
        sharpe = result.metrics.get("sharpe")
        sr = f"Sharpe {sharpe:.2f}" if isinstance(sharpe, float) and math.isfinite(sharpe) else "Sharpe not reported"
        ax.set_title(f"{title}\n{sr}, {result.metrics['n_trades']} trades over {result.metrics['n_days']} days, "
                     f"{result.info['round_trip_cost_bps']:g} bps round trip, hold {result.info['holding_bars']} bars",
                     fontsize=10)
        ax.set_ylabel("equity")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        ax_dd.fill_between(days, 0, -100 * result.daily["drawdown"], color="tab:red", alpha=0.5)
        ax_dd.set_ylabel("drawdown %")
        ax_dd.grid(alpha=0.3)
        fig.autofmt_xdate()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
