"""Autocorrelation-robust statistics for the gates and the backtest.

Samples in this pipeline overlap: a label or forward return spans ``horizon`` bars, so consecutive
per-timestamp values (ICs, loss differences, daily P&L of positions held for days) are correlated and
a plain ``std / sqrt(n)`` understates the uncertainty. Everything here therefore takes a lag or a
block length, which callers set to at least the label horizon:

- :func:`hac_mean_test`: mean of a series with its Newey-West (Bartlett kernel, HAC) standard error
  and t-statistic, from ``statsmodels`` (OLS on a constant with ``cov_type="HAC"``).
- :func:`block_bootstrap_ci`: a circular block bootstrap confidence interval of any statistic of a
  series (``arch.bootstrap.CircularBlockBootstrap``).
- :func:`sharpe_ratio_ci`: the annualised Sharpe ratio with Lo's (2002) GMM standard error, whose
  long-run covariance is Newey-West with the given lag (autocorrelated returns), and the normal
  confidence interval it implies.
- :func:`effective_windows`: how many non-overlapping label windows a sample of timestamps rests on.

Every result is a small dataclass of plain floats/ints with ``to_dict()`` for JSON and metadata.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class MeanTest:
    """Mean of a series, its HAC standard error and the t-statistic ``mean / se``."""

    mean: float
    se: float
    t: float
    n: int
    lag: int
    p_one_sided: float  # P(T >= t) under a normal null of mean 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def hac_mean_test(x: Any, lag: int) -> MeanTest:
    """Newey-West test of ``mean(x) = 0`` with ``lag`` lags (non-finite values dropped).

    ``lag`` is clipped to ``n - 1``. With fewer than 3 values, or zero variance, the standard error
    and t are NaN (callers turn that into "not enough data", never into a pass).
    """
    import statsmodels.api as sm

    x = _finite(x)
    n = int(x.size)
    lag = int(max(0, min(int(lag), n - 1)))
    if n < 3 or not np.ptp(x) > 0:
        mean = float(x.mean()) if n else float("nan")
        return MeanTest(mean, float("nan"), float("nan"), n, lag, float("nan"))
    fit = sm.OLS(x, np.ones((n, 1))).fit(cov_type="HAC", cov_kwds={"maxlags": lag, "use_correction": True})
    mean, se = float(fit.params[0]), float(fit.bse[0])
    t = mean / se if se > 0 else float("nan")
    p = float(sps.norm.sf(t)) if math.isfinite(t) else float("nan")
    return MeanTest(mean, se, t, n, lag, p)


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float
    lower: float
    upper: float
    level: float
    block: int
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def block_bootstrap_ci(
    x: Any,
    block: int,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> BootstrapCI:
    """Two-sided percentile interval of ``statistic`` under a circular block bootstrap (``arch``)."""
    from arch.bootstrap import CircularBlockBootstrap

    x = _finite(x)
    block = int(max(1, min(int(block), max(1, x.size))))
    est = float(statistic(x)) if x.size else float("nan")
    if x.size < 3:
        return BootstrapCI(est, float("nan"), float("nan"), level, block, 0)
    bs = CircularBlockBootstrap(block, x, seed=np.random.default_rng(seed))
    draws = np.asarray(bs.apply(lambda a: np.atleast_1d(statistic(a)), reps=n_boot), dtype=np.float64)[:, 0]
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return BootstrapCI(est, float("nan"), float("nan"), level, block, n_boot)
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return BootstrapCI(est, float(lo), float(hi), level, block, n_boot)


@dataclass(frozen=True)
class SharpeEstimate:
    """Annualised Sharpe ratio with Lo's HAC standard error and a normal confidence interval."""

    sharpe: float  # annualised
    se: float  # annualised standard error
    lower: float
    upper: float
    level: float
    n: int
    lag: int
    periods_per_year: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _long_run_cov(u: np.ndarray, lag: int) -> np.ndarray:
    """Newey-West long-run covariance of the rows of ``u`` (n, k) (Bartlett weights)."""
    n = u.shape[0]
    u = u - u.mean(axis=0)
    s = u.T @ u / n
    for j in range(1, lag + 1):
        w = 1.0 - j / (lag + 1.0)
        g = u[j:].T @ u[:-j] / n
        s += w * (g + g.T)
    return s


def sharpe_ratio_ci(returns: Any, periods_per_year: float, *, lag: int = 0, level: float = 0.95) -> SharpeEstimate:
    """Sharpe of per-period ``returns`` annualised by ``sqrt(periods_per_year)``.

    Standard error: Lo (2002), "The Statistics of Sharpe Ratios", GMM form: the delta method on
    ``(mean, variance)`` with a Newey-West long-run covariance of ``lag`` lags, so that
    autocorrelated returns (overlapping holdings) widen the interval. With ``lag=0`` it reduces to
    the i.i.d. formula ``sqrt((1 + SR^2 / 2) / n)`` (per period, before annualising) up to the
    kurtosis term. Hand-written (a few lines of algebra): no maintained library returns Lo's GMM
    standard error.
    """
    r = _finite(returns)
    n = int(r.size)
    lag = int(max(0, min(int(lag), n - 2)))
    ann = math.sqrt(float(periods_per_year))
    nan = float("nan")
    if n < 3:
        return SharpeEstimate(nan, nan, nan, nan, level, n, lag, float(periods_per_year))
    mu, var = float(r.mean()), float(r.var())
    if not var > 1e-30:
        return SharpeEstimate(nan, nan, nan, nan, level, n, lag, float(periods_per_year))
    sd = math.sqrt(var)
    sr = mu / sd
    u = np.column_stack([r - mu, (r - mu) ** 2 - var])
    omega = _long_run_cov(u, lag)
    grad = np.array([1.0 / sd, -mu / (2.0 * var * sd)])
    v = float(grad @ omega @ grad) / n
    se = math.sqrt(max(v, 0.0))
    z = float(sps.norm.ppf(0.5 + level / 2))
    return SharpeEstimate(sr * ann, se * ann, (sr - z * se) * ann, (sr + z * se) * ann, level, n, lag,
                          float(periods_per_year))


def effective_windows(n_timestamps: int, horizon: int) -> int:
    """Number of non-overlapping label windows ``n_timestamps`` consecutive timestamps contain."""
    return int(n_timestamps // max(1, int(horizon)))
