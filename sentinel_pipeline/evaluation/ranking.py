"""Evaluation and backtest of a cross-sectional ranking model (one score per horizon, every day).

Input: a *scored table* (a :class:`~pandas.DataFrame`, one row per (timestamp, symbol)), as
:func:`~sentinel_pipeline.evaluation.predictions.score_split` writes it for window models and the
day-batch scorer of the graph family writes it for ranking models: ``timestamp``, ``symbol``, one score
column per horizon (default ``out_ret_<h>``, the mapping ``{h: column}`` is configurable) and the
realised targets ``fwd_ret_<h>`` (log return from the bar's close over the next ``h`` bars). No Dagster,
no torch: everything runs on tables built by hand. Statistics come from
:mod:`~sentinel_pipeline.evaluation.statistics` (HAC t, Lo's Sharpe interval), per-day correlations from
``training.evaluation.per_timestamp_correlations``, the paired comparison with the previous bundle from
``backtest.compare_backtests`` and the verdict of the blocking gate from ``skill_gates.directional_skill``.

The table is laid out as dense ``(days, symbols)`` matrices; a *day* is one distinct timestamp of the
table (daily bars), so horizons and holding periods count rows of the table's own calendar.

**Information coefficients** (:func:`ic_statistics`), per horizon ``h`` on every split: per day, the
Pearson IC and the Spearman RankIC of the score against ``fwd_ret_h`` over the symbols of that day (days
with fewer than ``min_symbols`` finite pairs or a constant side are left out); their mean, standard
deviation, ICIR = mean / std (per day) and ``icir_annualised = icir * sqrt(periods_per_year)`` (the
usual convention; for ``h > 1`` consecutive daily ICs share ``h - 1`` days of returns, so this figure is
descriptive and the inference is the HAC t), the Newey-West t with ``lag = max(h, hac_lag)`` and its
normal interval, the number of days and of independent (non-overlapping) ``h``-day windows.
**IC decay** (:func:`ic_decay`): the RankIC of each decay head's score against the realised 1/5/10/20-day
returns, each with its HAC interval (lag = the target's horizon).

**Quantile long-short on non-overlapping holding periods** (:func:`quantile_long_short`), per horizon
``h``: every ``h`` days, long the top ``quantile`` of the day's symbols by the ``h``-day score and short
the bottom ``quantile`` (``k = max(1, floor(quantile * n))`` each, equal weight ``1/k``: gross 2), held
``h`` days; the period's gross return ``sum(w * expm1(fwd_ret_h))``, its turnover ``sum |w - w_prev|``
over both legs (target weights; drift within a period ignored, no closing trade after the last period)
and its net return ``gross - cost_bps / 1e4 * turnover``. The ``h`` possible phases (first rebalance on
day 0 .. h-1) are all run: ``mean_period_return`` and the turnover average over all of them (a stable
estimate, not the luck of one calendar). **Inference:** the ``h`` phases interleaved give one ``h``-day
return starting on every day; its mean has a HAC t with ``lag = h`` and its Sharpe ratio (annualised
with ``periods_per_year / h`` periods) Lo's interval with the same lag. Phase 0's own non-overlapping
series is reported beside it with plain (lag 0) figures as a check.

**Daily long-short backtest** (:func:`daily_long_short`), test split: every day the top/bottom
``quantile`` by one score (``backtest_horizon``'s head, default the 1-day head), equal weight,
rebalanced daily; the weights chosen at day ``t``'s close are held over the interval of day
``t + execution_lag`` (``fwd_ret_1``; default lag 1: the backtest never trades at the close its score
was computed from), costs ``cost_bps`` per unit of turnover. Equity, Sharpe with Lo's interval (lag 1),
max drawdown, turnover. Against:

- the **previous bundle** (the same backtest of its scored test table): ``backtest.compare_backtests``
  pairs the days and gives the mean daily difference with a HAC t and a block-bootstrap interval, and
  the Sharpe difference;
- **random portfolios** (``n_random`` seeded draws): every day, random long and short sets of the
  model's sizes among the symbols the model could rank that day, same lag and accounting. Their
  turnover is that of a fresh random set each day, far above a persistent ranking's, so their
  percentile is read on the **gross** daily Sharpe ratio (does the ranking pick better than chance?);
  the net one is reported as information. Calibrated for a ranking redrawn every day, *not* for a
  persistent one: where symbols trend over the window, a fresh random set averages the trends away while
  a persistent zero-skill ranking bets on them (measured in ``test_ranking``: 11 of 30 such null runs
  below p = 0.05);
- **permuted rankings** (``n_random`` draws): the model's own weights with the symbols relabelled by one
  random permutation per draw (the same for every day). Same sizes, persistence, turnover and costs as
  the model, so it answers "does the ranking know *which* symbols" and stays calibrated for persistent
  rankings (0 of the same 30 runs below 0.05): read this one first. On an unbalanced panel a weight
  relabelled onto a symbol without a bar that day earns 0.

Reported for each: the model's percentile and the empirical p-value ``(1 + #{draw >= model}) / (1 + n)``
(``backtest._empirical``), and the 5/50/95 % band of their equity per day.

:func:`run_ranking_evaluation` runs all of it on the validation and test tables (and the previous
bundle's test table) and returns a :class:`RankingReport`; :func:`write_ranking_outputs` writes it as
one directory that replaces the old one atomically; :func:`ranking_markdown` is the table for the UI;
:func:`directional_gate` is the statistical gate every variant passes, on the chosen head and horizon.
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
from scipy import stats as sps

from sentinel_pipeline.atomic_io import atomic_dir, atomic_path, write_json_atomic, write_text_atomic
from sentinel_pipeline.evaluation.backtest import (
    BAND_QUANTILES,
    _daily_sharpe,
    _drawdown,
    _empirical,
    compare_backtests,
    rounded,
)
from sentinel_pipeline.evaluation.skill_gates import GateResult, directional_skill
from sentinel_pipeline.evaluation.statistics import effective_windows, hac_mean_test, sharpe_ratio_ci
from sentinel_pipeline.replay.config import periods_per_year as _periods_per_year
from sentinel_pipeline.replay.report import jsonable
from sentinel_pipeline.stage_cache import write_record
from sentinel_pipeline.training.evaluation import per_timestamp_correlations

REPORT_NAME = "ranking_report.json"
MARKDOWN_NAME = "ranking.md"
IC_DECAY_PLOT = "ic_decay.png"
EQUITY_PLOT = "long_short_equity.png"
DAILY_NAME = "long_short_daily.parquet"
PERIODS_NAME = "long_short_periods.parquet"
DEFAULT_HORIZONS: tuple[int, ...] = (1, 5, 10, 20)
# a dense block of at most this many (draw, day, symbol) cells is simulated at once
_CHUNK_CELLS = 2_000_000


def score_column(horizon: int) -> str:
    """The default score column of a horizon's head (``out_ret_<h>``, as ``score_split`` names heads)."""
    return f"out_ret_{int(horizon)}"


def target_column(horizon: int) -> str:
    return f"fwd_ret_{int(horizon)}"


@dataclass(frozen=True)
class RankingConfig:
    """How a ranking is judged (see the module docstring).

    ``score_columns``: ``{horizon: column}``; ``None``: ``out_ret_<h>`` for every horizon.
    ``decay_horizons``: the heads whose IC decay is reported (``None``: every horizon's head).
    ``cost_bps``: cost per unit of turnover (both legs counted), in basis points; the default 7 bps
    matches the window backtest's 5 + 2 bps per side. ``periods_per_year``: ``None`` = from the data
    (252, or 365 when a bar falls on a Saturday). ``gate_horizon``: the head and target of the
    directional gate (the 5-day signal).
    """

    horizons: tuple[int, ...] = DEFAULT_HORIZONS
    score_columns: Mapping[int, str] | None = None
    decay_horizons: tuple[int, ...] | None = None
    quantile: float = 0.2
    cost_bps: float = 7.0
    min_symbols: int = 5
    hac_lag: int | None = None
    backtest_horizon: int = 1
    execution_lag: int = 1
    n_random: int = 1000
    seed: int = 0
    level: float = 0.95
    periods_per_year: float | None = None
    gate_horizon: int = 5
    gate_min_t: float = 3.0
    gate_min_windows: int = 10

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"RankingConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        if not (isinstance(self.horizons, tuple) and self.horizons and all(is_int(h) and h >= 1 for h in self.horizons)
                and len(set(self.horizons)) == len(self.horizons)):
            raise bad("horizons", "a non-empty tuple of distinct integers >= 1")
        if self.score_columns is not None:
            missing = [h for h in self.horizons if h not in self.score_columns]
            if missing:
                raise bad("score_columns", f"a mapping with a column for every horizon (missing {missing})")
        if self.decay_horizons is not None and not set(self.decay_horizons) <= set(self.horizons):
            raise bad("decay_horizons", f"a subset of horizons {self.horizons}")
        if not (isinstance(self.quantile, int | float) and 0 < self.quantile <= 0.5):
            raise bad("quantile", "a number in (0, 0.5]")
        if not (isinstance(self.cost_bps, int | float) and math.isfinite(self.cost_bps) and 0 <= self.cost_bps < 1e4):
            raise bad("cost_bps", "a finite number of basis points in [0, 10000)")
        if not (is_int(self.min_symbols) and self.min_symbols >= 2):
            raise bad("min_symbols", "an integer >= 2")
        if self.hac_lag is not None and not (is_int(self.hac_lag) and self.hac_lag >= 0):
            raise bad("hac_lag", "an integer >= 0 or None")
        for name in ("backtest_horizon", "gate_horizon"):
            if getattr(self, name) not in self.horizons:
                raise bad(name, f"one of horizons {self.horizons}")
        if not (is_int(self.execution_lag) and self.execution_lag >= 0):
            raise bad("execution_lag", "an integer >= 0")
        if not (is_int(self.n_random) and self.n_random >= 100):
            raise bad("n_random", "an integer >= 100 (a p-value needs a distribution, not a few draws)")
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if not (isinstance(self.level, float) and 0 < self.level < 1):
            raise bad("level", "a float in (0, 1)")
        if self.periods_per_year is not None and not (
                isinstance(self.periods_per_year, int | float) and self.periods_per_year > 0):
            raise bad("periods_per_year", "a number > 0 or None")
        if not (is_int(self.gate_min_windows) and self.gate_min_windows >= 1):
            raise bad("gate_min_windows", "an integer >= 1")

    @property
    def cost_rate(self) -> float:
        """Cost per unit of turnover, as a fraction."""
        return float(self.cost_bps) / 1e4

    def score_col(self, horizon: int) -> str:
        return (self.score_columns or {}).get(horizon) or score_column(horizon)

    def lag(self, horizon: int) -> int:
        """The Newey-West lag for an ``horizon``-day series: at least the horizon."""
        return int(max(int(horizon), int(self.hac_lag or 0)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["score_columns"] = {str(h): self.score_col(h) for h in self.horizons}
        return d


# -- the dense (day, symbol) layout -------------------------------------------------------------------


@dataclass
class Panel:
    """A scored table as dense ``(days, symbols)`` matrices (NaN where a (day, symbol) has no row)."""

    name: str
    days: pd.DatetimeIndex  # sorted distinct timestamps (UTC)
    symbols: np.ndarray
    values: dict[str, np.ndarray]  # column -> (T, S) float64
    long: pd.DataFrame  # the table's rows as given: ``day`` (index into ``days``) and the columns used

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.days), len(self.symbols)


def panel_from_scored(scored: pd.DataFrame, columns: list[str], name: str = "scored table") -> Panel:
    """Lay ``scored`` out as :class:`Panel`; a missing column, a duplicate (timestamp, symbol) or an
    empty table raises ``ValueError`` naming ``name`` and the problem."""
    if not isinstance(scored, pd.DataFrame):
        raise ValueError(f"{name}: expected a pandas DataFrame, got {type(scored).__name__}")
    need = ["timestamp", "symbol", *dict.fromkeys(columns)]
    missing = [c for c in need if c not in scored.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing} (has {list(scored.columns)})")
    if scored.empty:
        raise ValueError(f"{name}: the table has no rows")
    ts = pd.to_datetime(scored["timestamp"], utc=True)
    if ts.isna().any():
        raise ValueError(f"{name}: {int(ts.isna().sum())} rows without a timestamp")
    t_idx, days = pd.factorize(ts, sort=True)
    s_idx, symbols = pd.factorize(scored["symbol"], sort=True)
    key = t_idx.astype(np.int64) * len(symbols) + s_idx
    if np.unique(key).size != key.size:
        dup = scored.loc[pd.Series(key).duplicated().to_numpy(), ["timestamp", "symbol"]].iloc[0]
        raise ValueError(f"{name}: duplicate rows for (timestamp, symbol) = ({dup['timestamp']}, {dup['symbol']})")
    shape = (len(days), len(symbols))
    values: dict[str, np.ndarray] = {}
    for c in dict.fromkeys(columns):
        m = np.full(shape, np.nan)
        v = pd.to_numeric(scored[c], errors="coerce").to_numpy(np.float64)
        m[t_idx, s_idx] = v
        values[c] = m
    # the day index stands for the timestamp (an int key groups fast; tz-aware values become objects)
    long = pd.DataFrame({"day": t_idx.astype(np.int64),
                         **{c: pd.to_numeric(scored[c], errors="coerce").to_numpy(np.float64) for c in values}})
    return Panel(name, pd.DatetimeIndex(days), np.asarray(symbols), values, long)


def _ppy(panel: Panel, config: RankingConfig) -> float:
    return float(config.periods_per_year) if config.periods_per_year else float(_periods_per_year(panel.days))


# -- information coefficients -------------------------------------------------------------------------


def _series_stats(series: np.ndarray, horizon: int, lag: int, ppy: float, level: float) -> dict[str, Any]:
    """Mean, std, ICIR, HAC t and interval of a per-day IC series (``horizon``: its overlap)."""
    n = int(series.size)
    test = hac_mean_test(series, lag)
    sd = float(series.std(ddof=1)) if n >= 2 else float("nan")
    icir = test.mean / sd if sd > 0 else float("nan")
    z = float(sps.norm.ppf(0.5 + level / 2))
    return {
        "mean": test.mean, "std": sd, "icir": icir,
        "icir_annualised": icir * math.sqrt(ppy) if math.isfinite(icir) else float("nan"),
        "hac_se": test.se, "hac_t": test.t, "p_one_sided": test.p_one_sided, "lag": test.lag,
        "lower": test.mean - z * test.se, "upper": test.mean + z * test.se,
        "share_positive": float(np.mean(series > 0)) if n else float("nan"),
        "n_days": n, "n_windows": effective_windows(n, horizon),
    }


def daily_ic(panel: Panel, score_col: str, target_col: str, *, rank: bool, min_symbols: int) -> np.ndarray:
    """Per-day cross-sectional correlation (Pearson, or Spearman with ``rank``) in day order."""
    long = panel.long
    return per_timestamp_correlations(long[score_col].to_numpy(), long[target_col].to_numpy(),
                                      long["day"].to_numpy(), rank=rank, min_group=min_symbols)


def ic_statistics(panel: Panel, horizon: int, config: RankingConfig, *, score_col: str | None = None,
                  target_horizon: int | None = None) -> dict[str, Any]:
    """IC and RankIC of ``score_col`` (default: the horizon's head) against ``fwd_ret_<target_horizon>``
    (default: the same horizon): the statistics of :func:`_series_stats` for each."""
    score_col = score_col or config.score_col(horizon)
    th = int(target_horizon or horizon)
    ppy = _ppy(panel, config)
    out: dict[str, Any] = {"score": score_col, "target": target_column(th), "horizon": th}
    for key, rank in (("ic", False), ("rank_ic", True)):
        series = daily_ic(panel, score_col, target_column(th), rank=rank, min_symbols=config.min_symbols)
        out[key] = _series_stats(series, th, config.lag(th), ppy, config.level)
    return out


def ic_decay(panel: Panel, config: RankingConfig) -> dict[str, Any]:
    """``{head horizon: {target horizon: RankIC statistics}}``: each decay head's score against the
    realised return of every horizon."""
    heads = config.decay_horizons or config.horizons
    return {str(h): {str(k): ic_statistics(panel, h, config, score_col=config.score_col(h),
                                           target_horizon=k)["rank_ic"] for k in config.horizons}
            for h in heads}


# -- quantile portfolios ------------------------------------------------------------------------------


def quantile_weights(score: np.ndarray, quantile: float, min_symbols: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-weight long-short target weights per day from a ``(T, S)`` score (NaN: not rankable).

    Long the ``k = max(1, floor(quantile * n_t))`` highest scores of day ``t`` with ``1/k`` each, short the
    ``k`` lowest with ``-1/k`` (one stable ordering for both legs, so ties never put a symbol in both);
    days with fewer than ``min_symbols`` rankable symbols hold nothing. Returns ``(weights, k)``.
    """
    ok = np.isfinite(score)
    n = ok.sum(axis=1)
    k = np.maximum(1, np.floor(quantile * n)).astype(np.int64)
    k = np.where((n >= min_symbols) & (2 * k <= n), k, 0)
    order = np.argsort(np.where(ok, -score, np.inf), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(score.shape[1]), score.shape), axis=1)
    long = rank < k[:, None]
    short = ok & (rank >= (n - k)[:, None]) & (k[:, None] > 0)
    inv_k = np.where(k > 0, 1.0 / np.maximum(k, 1), 0.0)[:, None]
    return long * inv_k - short * inv_k, k


def _turnover(weights: np.ndarray) -> np.ndarray:
    """``sum |w_t - w_{t-1}|`` along the second-to-last axis (from an empty book)."""
    prev = np.concatenate([np.zeros_like(weights[..., :1, :]), weights[..., :-1, :]], axis=-2)
    return np.abs(weights - prev).sum(axis=-1)


def quantile_long_short(panel: Panel, horizon: int, config: RankingConfig) -> tuple[dict[str, Any], pd.DataFrame]:
    """Top-vs-bottom quantile long-short of the horizon's head on non-overlapping ``horizon``-day periods,
    every phase (module docstring). Returns the summary and one row per (phase, rebalance)."""
    h = int(horizon)
    score = panel.values[config.score_col(h)]
    ret = panel.values[target_column(h)]
    rankable = np.where(np.isfinite(ret), score, np.nan)  # a period needs its realised return
    weights, k = quantile_weights(rankable, config.quantile, config.min_symbols)
    simple = np.where(np.isfinite(ret), np.expm1(np.where(np.isfinite(ret), ret, 0.0)), 0.0)
    gross_all = (weights * simple).sum(axis=1)
    n_days = len(panel.days)
    rows = []
    for phase in range(min(h, n_days)):
        idx = np.arange(phase, n_days, h)
        w = weights[idx]
        gross = gross_all[idx]
        turnover = _turnover(w)
        cost = config.cost_rate * turnover
        net = gross - cost
        rows.append(pd.DataFrame({
            "phase": phase, "period": np.arange(idx.size), "day_index": idx, "date": panel.days[idx],
            "n_long": k[idx], "n_short": k[idx], "gross_return": gross, "turnover": turnover, "cost": cost,
            "net_return": net, "equity": np.cumprod(1.0 + net), "equity_gross": np.cumprod(1.0 + gross),
        }))
    periods = pd.concat(rows, ignore_index=True)
    ppy = _ppy(panel, config)
    lag = config.lag(h)
    by_day = periods.sort_values("day_index")
    interleaved = by_day["net_return"].to_numpy()  # a period without positions counts as 0
    invested = by_day["n_long"].to_numpy() > 0
    test = hac_mean_test(interleaved, lag)
    test_gross = hac_mean_test(by_day["gross_return"].to_numpy(), lag)
    sr = sharpe_ratio_ci(interleaved, ppy / h, lag=lag, level=config.level)
    p0 = periods.loc[periods["phase"] == 0, "net_return"].to_numpy()
    sr0 = sharpe_ratio_ci(p0, ppy / h, lag=0, level=config.level)
    per_phase = periods.groupby("phase")
    later = periods[periods["period"] > 0]
    summary = {
        "horizon": h, "score": config.score_col(h), "target": target_column(h), "quantile": config.quantile,
        "cost_bps": float(config.cost_bps), "n_phases": int(periods["phase"].nunique()),
        "n_periods_per_phase": int(per_phase.size().max()),
        "n_invested_periods": int(invested.sum()),
        "mean_names_per_leg": float(by_day.loc[invested, "n_long"].mean()) if invested.any() else 0.0,
        "mean_period_return": float(per_phase["net_return"].mean().mean()),
        "mean_period_return_gross": float(per_phase["gross_return"].mean().mean()),
        "mean_turnover": float(later["turnover"].mean()) if len(later) else float("nan"),
        "first_turnover": float(periods.loc[periods["period"] == 0, "turnover"].mean()),
        "mean_cost": float(per_phase["cost"].mean().mean()),
        "annualised_return": float(per_phase["net_return"].mean().mean() * ppy / h),
        "final_equity_by_phase": [float(v) for v in per_phase["equity"].last().to_numpy()],
        "inference": (f"all {h} phases interleaved ({h}-day returns starting every day): HAC t and Lo's "
                      f"Sharpe interval with lag {lag}, Sharpe annualised with {ppy:g}/{h} periods a year"),
        "t_hac": test.t, "p_one_sided": test.p_one_sided, "t_hac_gross": test_gross.t,
        "sharpe": sr.sharpe, "sharpe_se": sr.se, "sharpe_lower": sr.lower, "sharpe_upper": sr.upper,
        "phase0_non_overlapping": {"n_periods": int(p0.size), "mean": float(p0.mean()) if p0.size else float("nan"),
                                   "t": hac_mean_test(p0, 0).t, "sharpe": sr0.sharpe,
                                   "sharpe_lower": sr0.lower, "sharpe_upper": sr0.upper},
        "sharpe_by_phase": [sharpe_ratio_ci(g["net_return"].to_numpy(), ppy / h, lag=0).sharpe
                            for _, g in per_phase],
    }
    return summary, periods


# -- the daily-rebalanced backtest --------------------------------------------------------------------


@dataclass
class LongShortBacktest:
    """A daily long-short backtest. ``config``, ``daily``, ``info`` and ``metrics`` carry what
    ``backtest.compare_backtests`` reads (``config.level``; ``daily`` date/net_return;
    ``info`` sharpe_lag_days/periods_per_year; ``metrics`` total_return/sharpe)."""

    config: RankingConfig
    daily: pd.DataFrame  # date, gross_return, turnover, cost, net_return, equity, equity_gross, drawdown, n_long
    info: dict[str, Any]
    metrics: dict[str, Any]
    weights: np.ndarray = field(repr=False)  # (T, S) weights held over each day's interval
    random: dict[str, Any] | None = None  # random portfolios: summary
    permuted: dict[str, Any] | None = None  # permuted rankings: summary
    notes: list[str] = field(default_factory=list)


def _held(weights: np.ndarray, lag: int) -> np.ndarray:
    """Weights chosen at day t held over day t + lag's interval (the first ``lag`` days hold nothing)."""
    if lag == 0:
        return weights
    out = np.zeros_like(weights)
    out[..., lag:, :] = weights[..., :-lag, :]
    return out


def _simulate(held: np.ndarray, r1: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gross, turnover, net) per day of held weights ``(..., T, S)`` on simple returns ``r1 (T, S)``."""
    gross = (held * r1).sum(axis=-1)
    turnover = _turnover(held)
    return gross, turnover, gross - rate * turnover


def daily_long_short(panel: Panel, config: RankingConfig) -> LongShortBacktest:
    """The daily-rebalanced top/bottom quantile backtest of ``backtest_horizon``'s head (module docstring)."""
    col = config.score_col(config.backtest_horizon)
    score = panel.values[col]
    r1_log = panel.values[target_column(1)]
    weights, k = quantile_weights(score, config.quantile, config.min_symbols)
    held = _held(weights, config.execution_lag)
    missing = ~np.isfinite(r1_log)
    n_held_missing = int(np.sum((held != 0) & missing))
    r1 = np.where(missing, 0.0, np.expm1(np.where(missing, 0.0, r1_log)))
    gross, turnover, net = _simulate(held, r1, config.cost_rate)
    equity = np.cumprod(1.0 + net)
    ppy = _ppy(panel, config)
    sr = sharpe_ratio_ci(net, ppy, lag=1, level=config.level)
    daily = pd.DataFrame({
        "date": panel.days, "n_long": _held(k[:, None].astype(np.float64), config.execution_lag)[:, 0].astype(np.int64),
        "gross_return": gross, "turnover": turnover, "cost": config.cost_rate * turnover, "net_return": net,
        "equity": equity, "equity_gross": np.cumprod(1.0 + gross), "drawdown": _drawdown(equity),
    })
    metrics = {
        "score": col, "n_days": int(len(panel.days)), "n_symbols": int(len(panel.symbols)),
        "n_invested_days": int((daily["n_long"] > 0).sum()),
        "mean_names_per_leg": float(daily.loc[daily["n_long"] > 0, "n_long"].mean()) if (daily["n_long"] > 0).any()
        else 0.0,
        "total_return": float(equity[-1] - 1.0), "total_return_gross": float(np.prod(1.0 + gross) - 1.0),
        "mean_daily_return": float(net.mean()), "mean_daily_return_gross": float(gross.mean()),
        "mean_daily_turnover": float(turnover.mean()), "total_cost": float((config.cost_rate * turnover).sum()),
        "max_drawdown": float(daily["drawdown"].max()),
        "daily_sharpe": float(_daily_sharpe(net[None, :])[0]),
        "daily_sharpe_gross": float(_daily_sharpe(gross[None, :])[0]),
        "t_hac": hac_mean_test(net, 1).t,
        "sharpe": sr.sharpe, "sharpe_se": sr.se, "sharpe_lower": sr.lower, "sharpe_upper": sr.upper,
    }
    info = {"quantile": config.quantile, "execution_lag": config.execution_lag, "cost_bps": float(config.cost_bps),
            "periods_per_year": ppy, "sharpe_lag_days": 1, "rebalance": "daily, equal weight, target weights"}
    notes = []
    if n_held_missing:
        notes.append(f"{n_held_missing} held (day, symbol) positions without a finite fwd_ret_1 were marked at 0 "
                     "return")
    return LongShortBacktest(config, daily, info, metrics, held, notes=notes)


def _baseline_summary(name: str, model_gross: float, model_net: float, model_total: float,
                      sh_gross: np.ndarray, sh_net: np.ndarray, total: np.ndarray, turnover: np.ndarray,
                      equity_band: np.ndarray) -> dict[str, Any]:
    return {
        "name": name, "n": int(sh_gross.size),
        "sharpe_daily_gross": _empirical(model_gross, sh_gross),
        "sharpe_daily": _empirical(model_net, sh_net),
        "total_return": _empirical(model_total, total),
        "mean_daily_turnover": float(np.mean(turnover)),
        "band": {f"q{int(round(100 * q)):02d}": equity_band[i] for i, q in enumerate(BAND_QUANTILES)},
    }


def random_portfolios(panel: Panel, result: LongShortBacktest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The random-portfolio and permuted-ranking distributions of ``result`` (module docstring).
    Vectorised over draws in chunks of at most ``_CHUNK_CELLS`` (draw, day, symbol) cells."""
    config = result.config
    score = panel.values[config.score_col(config.backtest_horizon)]
    ok = np.isfinite(score)
    _, k = quantile_weights(score, config.quantile, config.min_symbols)
    r1_log = panel.values[target_column(1)]
    r1 = np.where(np.isfinite(r1_log), np.expm1(np.where(np.isfinite(r1_log), r1_log, 0.0)), 0.0)
    t, s = score.shape
    n = int(config.n_random)
    chunk = int(max(1, _CHUNK_CELLS // max(1, t * s)))
    rng_random = np.random.default_rng([config.seed, 1])
    rng_perm = np.random.default_rng([config.seed, 2])
    model_w = result.weights  # already held (lag applied)
    out: dict[str, dict[str, list[np.ndarray]]] = {"random": {}, "permuted": {}}
    inv_k = np.where(k > 0, 1.0 / np.maximum(k, 1), 0.0)[None, :, None]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        keys = rng_random.random((m, t, s))
        keys[:, ~ok] = np.inf
        order = np.argsort(keys, axis=2)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(s), order.shape), axis=2)
        kk = k[None, :, None]
        w = (rank < kk) * inv_k - ((rank >= kk) & (rank < 2 * kk)) * inv_k
        held = _held(w, config.execution_lag)
        perm = np.argsort(rng_perm.random((m, s)), axis=1)
        held_perm = model_w[:, perm].transpose(1, 0, 2)  # (m, T, S): symbols relabelled per draw
        for name, h in (("random", held), ("permuted", held_perm)):
            gross, turnover, net = _simulate(h, r1, config.cost_rate)
            acc = out[name]
            acc.setdefault("sh_gross", []).append(_daily_sharpe(gross))
            acc.setdefault("sh_net", []).append(_daily_sharpe(net))
            eq = np.cumprod(1.0 + net, axis=1)
            acc.setdefault("equity", []).append(eq)
            acc.setdefault("turnover", []).append(turnover.mean(axis=1))
    m = result.metrics
    summaries = []
    for name in ("random", "permuted"):
        acc = {key: np.concatenate(v) for key, v in out[name].items()}
        band = np.quantile(acc["equity"], BAND_QUANTILES, axis=0)
        summaries.append(_baseline_summary(
            name, m["daily_sharpe_gross"], m["daily_sharpe"], m["total_return"], acc["sh_gross"], acc["sh_net"],
            acc["equity"][:, -1] - 1.0, acc["turnover"], band))
    return summaries[0], summaries[1]


# -- the directional gate -----------------------------------------------------------------------------


def directional_gate(scored: pd.DataFrame, config: RankingConfig | None = None, *,
                     horizon: int | None = None, min_t: float | None = None, lag: int | None = None,
                     min_symbols: int | None = None, min_windows: int | None = None) -> GateResult:
    """``skill_gates.directional_skill`` on one head of a ranking model: its score column as the signal,
    ``fwd_ret_<horizon>`` as the target, HAC lag >= the horizon (the gate every variant passes, on the
    head and horizon the family names; default the config's ``gate_horizon``, the 5-day head)."""
    config = config or RankingConfig()
    h = int(horizon or config.gate_horizon)
    signal_col = config.score_col(h) if h in config.horizons else score_column(h)
    target_col = target_column(h)
    missing = [c for c in ("timestamp", "symbol", signal_col, target_col) if c not in scored.columns]
    if missing:
        raise ValueError(f"scored table: missing column(s) {missing} for the directional gate")
    # integer nanoseconds group the same way and fast (tz-aware values become Python objects in NumPy)
    ts = pd.to_datetime(scored["timestamp"], utc=True).dt.as_unit("ns").astype("int64")
    table = pd.DataFrame({"timestamp": ts.to_numpy(), "symbol": scored["symbol"].to_numpy(),
                          signal_col: scored[signal_col].to_numpy(), target_col: scored[target_col].to_numpy()})
    return directional_skill(
        table, h, min_t=float(config.gate_min_t if min_t is None else min_t), lag=max(h, int(lag or 0)),
        min_symbols=int(min_symbols or config.min_symbols),
        min_windows=int(min_windows or config.gate_min_windows), signal_col=signal_col, target_col=target_col)


# -- the stage-level function -------------------------------------------------------------------------


@dataclass
class RankingReport:
    """Everything :func:`run_ranking_evaluation` computed: ``summary`` (JSON-able after :meth:`to_dict`)
    and the frames the plots and parquet files are made of."""

    summary: dict[str, Any]
    backtest: LongShortBacktest | None
    previous_backtest: LongShortBacktest | None
    periods: pd.DataFrame  # every split's non-overlapping periods (column ``split``)

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        return rounded(jsonable(self.summary), digits)


def evaluate_split(scored: pd.DataFrame, config: RankingConfig, name: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """IC statistics, IC decay and non-overlapping quantile long-short of every horizon on one split."""
    cols = [c for h in config.horizons for c in (config.score_col(h), target_column(h))]
    panel = panel_from_scored(scored, cols, name)
    horizons: dict[str, Any] = {}
    frames = []
    for h in config.horizons:
        stats = ic_statistics(panel, h, config)
        ls, periods = quantile_long_short(panel, h, config)
        horizons[str(h)] = {**stats, "long_short": ls}
        frames.append(periods.assign(horizon=h))
    out = {"n_rows": int(len(scored)), "n_days": int(panel.shape[0]), "n_symbols": int(panel.shape[1]),
           "start": panel.days[0], "end": panel.days[-1], "periods_per_year": _ppy(panel, config),
           "horizons": horizons, "ic_decay": ic_decay(panel, config)}
    return out, pd.concat(frames, ignore_index=True)


def run_ranking_evaluation(scored_val: pd.DataFrame | None, scored_test: pd.DataFrame,
                           previous_scored_test: pd.DataFrame | None = None,
                           config: RankingConfig | None = None, *, extra: Mapping[str, Any] | None = None
                           ) -> RankingReport:
    """Evaluate a ranking model from its scored validation and test tables (module docstring); the
    previous bundle's scored test table, when given, is backtested the same way and compared."""
    config = config or RankingConfig()
    splits: dict[str, Any] = {}
    frames = []
    for name, table in (("val", scored_val), ("test", scored_test)):
        if table is None:
            continue
        splits[name], periods = evaluate_split(table, config, f"scored {name} table")
        frames.append(periods.assign(split=name))
    bt_cols = [config.score_col(config.backtest_horizon), target_column(1)]
    test_panel = panel_from_scored(scored_test, bt_cols, "scored test table")
    current = daily_long_short(test_panel, config)
    current.random, current.permuted = random_portfolios(test_panel, current)
    previous = comparison = None
    if previous_scored_test is not None:
        previous = daily_long_short(panel_from_scored(previous_scored_test, bt_cols, "previous scored test table"),
                                    config)
        comparison = compare_backtests(current, previous, seed=config.seed)  # type: ignore[arg-type]
    notes = list(current.notes)
    notes.extend(_caveats(current))
    gate = directional_gate(scored_test, config)
    summary = {
        **dict(extra or {}),
        "config": config.to_dict(),
        "splits": splits,
        "backtest": {
            "split": "test", "info": current.info, "metrics": current.metrics,
            "random_portfolios": _without_band(current.random),
            "permuted_rankings": _without_band(current.permuted),
            "vs_previous": comparison,
            "previous_metrics": previous.metrics if previous is not None else None,
        },
        "gate": {"split": "test", "role": "information: the blocking gate is verification's quality_gates",
                 **gate.to_dict()},
        "notes": notes,
    }
    return RankingReport(summary, current, previous, pd.concat(frames, ignore_index=True))


def _without_band(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if summary is None else {k: v for k, v in summary.items() if k != "band"}


def _caveats(result: LongShortBacktest) -> list[str]:
    notes = []
    rnd, perm = result.random or {}, result.permuted or {}
    p_r = (rnd.get("sharpe_daily_gross") or {}).get("p_value")
    p_p = (perm.get("sharpe_daily_gross") or {}).get("p_value")
    if p_r is not None and p_p is not None and p_r < 0.05 <= p_p:
        notes.append("the ranking beats random portfolios but not its own weights on relabelled symbols: its "
                     "edge over random may come from persistence (fewer, steadier positions), not from which "
                     "symbols it picks")
    if rnd and result.metrics["mean_daily_turnover"] < 0.5 * rnd["mean_daily_turnover"]:
        notes.append(f"the model turns over {result.metrics['mean_daily_turnover']:.3g} a day against "
                     f"{rnd['mean_daily_turnover']:.3g} for random portfolios: their net percentiles favour the "
                     "model through costs alone; read the gross percentile and the permuted rankings")
    return notes


# -- markdown, plots, files ---------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return str(rounded(v, digits))
    return str(v)


def ranking_markdown(summary: Mapping[str, Any], digits: int = 3) -> str:
    """Markdown tables of a report's ``to_dict()`` (or raw summary): per split and horizon the IC
    figures and the non-overlapping long-short; then the daily backtest and its baselines."""
    lines: list[str] = []
    cols = ["split", "h", "IC", "RankIC", "RankIC 95% CI", "ICIR", "ICIR ann.", "HAC t", "days", "windows",
            "L/S net/period", "L/S t", "L/S Sharpe [CI]", "turnover"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for split, body in (summary.get("splits") or {}).items():
        for h, hs in (body.get("horizons") or {}).items():
            ric, ls = hs["rank_ic"], hs["long_short"]
            lines.append("| " + " | ".join([
                split, str(h), _fmt(hs["ic"]["mean"], digits), _fmt(ric["mean"], digits),
                f"[{_fmt(ric['lower'], digits)}, {_fmt(ric['upper'], digits)}]", _fmt(ric["icir"], digits),
                _fmt(ric["icir_annualised"], digits), _fmt(ric["hac_t"], digits), str(ric["n_days"]),
                str(ric["n_windows"]), _fmt(ls["mean_period_return"], digits), _fmt(ls["t_hac"], digits),
                f"{_fmt(ls['sharpe'], digits)} [{_fmt(ls['sharpe_lower'], digits)}, {_fmt(ls['sharpe_upper'], digits)}]",
                _fmt(ls["mean_turnover"], digits)]) + " |")
    bt = summary.get("backtest") or {}
    m = bt.get("metrics") or {}
    if m:
        lines += ["", "| daily backtest | total return | Sharpe [CI] | max drawdown | turnover/day | "
                      "p vs random (gross Sharpe) | p vs permuted (gross Sharpe) | delta mean/day vs previous [CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        rnd = ((bt.get("random_portfolios") or {}).get("sharpe_daily_gross") or {}).get("p_value")
        perm = ((bt.get("permuted_rankings") or {}).get("sharpe_daily_gross") or {}).get("p_value")
        vs = (bt.get("vs_previous") or {}).get("mean_daily_return") or {}
        delta = f"{_fmt(vs.get('delta'), digits)} [{_fmt(vs.get('lower'), digits)}, {_fmt(vs.get('upper'), digits)}]" \
            if vs else ""
        lines.append("| " + " | ".join([
            str(m.get("score", "")), _fmt(m.get("total_return"), digits),
            f"{_fmt(m.get('sharpe'), digits)} [{_fmt(m.get('sharpe_lower'), digits)}, {_fmt(m.get('sharpe_upper'), digits)}]",
            _fmt(m.get("max_drawdown"), digits), _fmt(m.get("mean_daily_turnover"), digits),
            _fmt(rnd, digits), _fmt(perm, digits), delta]) + " |")
    gate = summary.get("gate") or {}
    if gate:
        lines += ["", f"Gate ({gate.get('statistic', '')}): {'PASS' if gate.get('passed') else 'FAIL'} - "
                      f"{gate.get('detail', '')}"]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_ic_decay(summary: Mapping[str, Any], path: str | Path, *, title: str = "IC decay") -> Path:
    """RankIC of each decay head against the realised return of every horizon, with its interval; one
    panel per split."""
    plt = _pyplot()
    splits = [(name, body) for name, body in (summary.get("splits") or {}).items() if body.get("ic_decay")]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.5 * max(1, len(splits)), 4), squeeze=False)
    try:
        for ax, (name, body) in zip(axes[0], splits, strict=False):
            decay = body["ic_decay"]
            heads = list(decay)
            width = 0.8 / max(1, len(heads))
            for j, head in enumerate(heads):
                targets = list(decay[head])
                x = np.arange(len(targets)) + (j - (len(heads) - 1) / 2) * width
                mean = np.array([decay[head][k]["mean"] if decay[head][k]["mean"] is not None else np.nan
                                 for k in targets], dtype=np.float64)
                lo = np.array([decay[head][k]["lower"] if decay[head][k]["lower"] is not None else np.nan
                               for k in targets], dtype=np.float64)
                hi = np.array([decay[head][k]["upper"] if decay[head][k]["upper"] is not None else np.nan
                               for k in targets], dtype=np.float64)
                ax.bar(x, mean, width=width, label=f"{head}-day head",
                       yerr=np.vstack([mean - lo, hi - mean]), capsize=3, alpha=0.8)
                ax.set_xticks(np.arange(len(targets)), [f"{k}d" for k in targets])
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("realised forward return")
            ax.set_ylabel("mean daily RankIC (HAC 95 % CI)")
            ax.set_title(f"{name} split", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def plot_long_short_equity(report: RankingReport, path: str | Path, *, title: str = "Daily long-short") -> Path:
    """The model's daily long-short equity (net and gross), the previous bundle's, and the 5-95 % bands of
    the random portfolios and of the permuted rankings."""
    plt = _pyplot()
    bt = report.backtest
    if bt is None:
        raise ValueError("the report has no daily backtest to plot")
    days = bt.daily["date"].dt.tz_localize(None)
    fig, ax = plt.subplots(figsize=(10, 5))
    try:
        if bt.random is not None:
            band = bt.random["band"]
            ax.fill_between(days, band["q05"], band["q95"], color="0.8", alpha=0.7,
                            label=f"{bt.random['n']} random portfolios, 5-95 %")
            ax.plot(days, band["q50"], color="0.45", lw=1, ls="--", label="random median")
        if bt.permuted is not None:
            band = bt.permuted["band"]
            ax.plot(days, band["q05"], color="tab:green", lw=0.8, ls="--",
                    label=f"{bt.permuted['n']} permuted rankings, 5 / 95 %")
            ax.plot(days, band["q95"], color="tab:green", lw=0.8, ls="--")
        if report.previous_backtest is not None:
            prev = report.previous_backtest.daily.set_index("date")["equity"].reindex(bt.daily["date"])
            ax.plot(days, prev.to_numpy(), color="tab:orange", lw=1.3, label="previous bundle")
        ax.plot(days, bt.daily["equity_gross"], color="tab:blue", lw=1, ls=":", label="model before costs")
        ax.plot(days, bt.daily["equity"], color="tab:blue", lw=1.8, label="model (net of costs)")
        ax.axhline(1.0, color="k", lw=0.6)
        m = bt.metrics
        sr = f"Sharpe {m['sharpe']:.2f} [{m['sharpe_lower']:.2f}, {m['sharpe_upper']:.2f}]" \
            if math.isfinite(m["sharpe"]) else "Sharpe undefined"
        ax.set_title(f"{title}: {m['score']}, top/bottom {bt.config.quantile:g}, {bt.config.cost_bps:g} bps per unit "
                     f"turnover\n{sr}, max drawdown {100 * m['max_drawdown']:.1f} %, over {m['n_days']} days",
                     fontsize=10)
        ax.set_ylabel("equity")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def write_ranking_outputs(out_dir: str | Path, report: RankingReport, *, title: str = "",
                          fingerprint: str | None = None) -> dict[str, Path]:
    """Write the report (JSON, markdown), both plots and the daily/period tables into a fresh directory
    that replaces ``out_dir`` in one rename. ``fingerprint``: recorded in ``out_dir/.stage.json`` with the
    outputs' digests (``stage_cache.write_record``: pipeline reuse, as the window backtest does)."""
    out_dir = Path(out_dir)
    summary = report.to_dict()
    names = {"report": REPORT_NAME, "markdown": MARKDOWN_NAME, "ic_decay": IC_DECAY_PLOT, "periods": PERIODS_NAME}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_json_atomic(tmp / REPORT_NAME, summary)
        write_text_atomic(tmp / MARKDOWN_NAME, ranking_markdown(summary))
        plot_ic_decay(summary, tmp / IC_DECAY_PLOT, title=f"{title}: IC decay" if title else "IC decay")
        report.periods.to_parquet(tmp / PERIODS_NAME, index=False)
        if report.backtest is not None:
            names["equity"] = EQUITY_PLOT
            names["daily"] = DAILY_NAME
            plot_long_short_equity(report, tmp / EQUITY_PLOT, title=title or "Daily long-short")
            daily = report.backtest.daily.copy()
            for name, base in (("random", report.backtest.random), ("permuted", report.backtest.permuted)):
                if base is not None:
                    for q, v in base["band"].items():
                        daily[f"{name}_{q}"] = v
            if report.previous_backtest is not None:
                prev = report.previous_backtest.daily.set_index("date")
                daily["previous_net_return"] = prev["net_return"].reindex(daily["date"]).to_numpy()
                daily["previous_equity"] = prev["equity"].reindex(daily["date"]).to_numpy()
            daily.to_parquet(tmp / DAILY_NAME, index=False)
        if fingerprint is not None:
            write_record(tmp, fingerprint, [tmp / n for n in names.values()],
                         {"bundle": summary.get("bundle")})
    return {k: out_dir / v for k, v in names.items()}
