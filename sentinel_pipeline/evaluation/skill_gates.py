"""Statistical skill tests of a trained model on a split that checkpoint selection never saw.

Each test reads the per-sample table of :func:`~sentinel_pipeline.evaluation.predictions.score_split`
and returns a :class:`GateResult`: the number it tested, the bound, whether it passed, the sample
size and the number of independent label windows the result rests on. "Not enough data to decide"
is a failed result with that reason, never a pass.

- :func:`directional_skill` (every variant): the rank IC of the trading signal against the realised
  forward return over the label horizon. On a panel (enough symbols per timestamp) it is the mean
  per-timestamp cross-sectional Spearman IC; on thin data (e.g. one index) it is the pooled
  time-series rank correlation per symbol (signal and return rank-standardised within each symbol,
  their product averaged per timestamp). Either way the per-timestamp series overlaps by up to the
  label horizon, so the t-statistic is Newey-West (HAC) with ``lag >= horizon``
  (:func:`~sentinel_pipeline.evaluation.statistics.hac_mean_test`).
- :func:`mse_skill` (regression heads): a paired Diebold-Mariano-style test of the squared-error
  difference between the train-mean predictor and the model, per timestamp, HAC with the same lag,
  on targets winsorised at the split's ``q`` / ``1 - q`` quantiles so that a few bad ticks (an
  unadjusted split gives a target of thousands of ATR units) cannot make any model look good.
- :func:`shift_null_skill` (classifiers): accuracy and macro-F1 against a *shift null*: the model's
  predictions shifted in time by a common offset (every symbol by the same number of timestamps,
  circularly, offsets of at least the label horizon) keep the model's class mix and its
  autocorrelation but lose any alignment with the outcomes; the observed value must exceed the null's
  ``quantile``. The majority-class baseline stays as information only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sentinel_pipeline.evaluation.predictions import head_column
from sentinel_pipeline.evaluation.statistics import effective_windows, hac_mean_test
from sentinel_pipeline.training.evaluation import per_timestamp_correlations

N_CLASSES = 3


@dataclass
class GateResult:
    """One gate's verdict with the evidence it rests on (JSON-able via :meth:`to_dict`)."""

    name: str
    passed: bool
    statistic: str  # what was tested, e.g. "HAC t of mean cross-sectional rank IC"
    value: float  # the tested number
    bound: float  # the threshold it had to reach
    n_samples: int
    n_timestamps: int
    n_windows: int  # independent (non-overlapping) label windows
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("value", "bound"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d


def _not_enough(name: str, statistic: str, bound: float, n: int, n_ts: int, n_win: int, why: str) -> GateResult:
    return GateResult(name, False, statistic, float("nan"), bound, n, n_ts, n_win, f"not enough data to decide: {why}")


def _timestamp_codes(ts: Any) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(pd.Series(np.asarray(ts)), sort=True)
    return codes.astype(np.int64), len(uniques)


def target_for_horizon(columns: Any, horizon: int) -> str:
    """The forward-return column of the label horizon (``fwd_ret_<horizon>``), else the longest one."""
    name = f"fwd_ret_{int(horizon)}"
    if name in columns:
        return name
    fwd = sorted((c for c in columns if str(c).startswith("fwd_ret_")), key=lambda c: int(str(c).split("_")[-1]))
    if not fwd:
        raise ValueError(f"no forward-return column among {list(columns)}")
    return fwd[-1]


def _time_series_rank_products(signal: np.ndarray, target: np.ndarray, symbol: np.ndarray,
                               tcode: np.ndarray) -> np.ndarray:
    """Per-timestamp mean of (rank-z signal x rank-z target), ranks standardised within each symbol."""
    frame = pd.DataFrame({"s": signal, "y": target, "sym": symbol, "t": tcode})
    g = frame.groupby("sym", sort=False)
    rs, ry = g["s"].rank(), g["y"].rank()

    def z(r: pd.Series) -> pd.Series:
        grp = r.groupby(frame["sym"])
        sd = grp.transform("std", ddof=0)
        return (r - grp.transform("mean")) / sd.where(sd > 0)

    prod = (z(rs) * z(ry)).rename("p")
    per_t = pd.DataFrame({"t": frame["t"], "p": prod}).dropna().groupby("t")["p"].mean()
    return per_t.sort_index().to_numpy(np.float64)


def directional_skill(
    pred: pd.DataFrame,
    horizon: int,
    *,
    min_t: float,
    lag: int | None = None,
    min_symbols: int = 5,
    min_windows: int = 10,
    signal_col: str = "signal",
    target_col: str | None = None,
) -> GateResult:
    """HAC t of the signal's rank IC against the forward return of the label horizon (module docstring)."""
    name = "directional_skill"
    target_col = target_col or target_for_horizon(pred.columns, horizon)
    lag = int(max(int(horizon), int(lag or 0)))
    s = pred[signal_col].to_numpy(np.float64)
    y = pred[target_col].to_numpy(np.float64)
    ok = np.isfinite(s) & np.isfinite(y)
    s, y = s[ok], y[ok]
    tcode, _ = _timestamp_codes(pred["timestamp"].to_numpy()[ok])
    symbol = pred["symbol"].to_numpy()[ok]
    n = int(ok.sum())
    per_ts = np.bincount(tcode) if n else np.zeros(0, dtype=np.int64)
    cross = per_ts.size > 0 and float(np.median(per_ts)) >= min_symbols
    if cross:
        series = per_timestamp_correlations(s, y, tcode, rank=True, min_group=min_symbols)
        method = f"mean per-timestamp cross-sectional rank IC (>= {min_symbols} symbols)"
    else:
        series = _time_series_rank_products(s, y, symbol, tcode) if n else np.zeros(0)
        method = "pooled per-symbol time-series rank IC"
    statistic = f"HAC t (lag {lag}) of {method} of {signal_col} vs {target_col}"
    n_ts = int(series.size)
    n_win = effective_windows(n_ts, horizon)
    if n_win < min_windows:
        return _not_enough(name, statistic, min_t, n, n_ts, n_win,
                           f"{n_ts} usable timestamps = {n_win} independent {horizon}-bar label windows, "
                           f"need {min_windows}")
    test = hac_mean_test(series, lag)
    if not math.isfinite(test.t):
        return _not_enough(name, statistic, min_t, n, n_ts, n_win, "the IC series has zero variance")
    passed = test.t >= min_t
    detail = (f"rank IC {test.mean:+.4f} (HAC se {test.se:.4f}), t {test.t:+.2f} "
              f"{'>=' if passed else '<'} {min_t:g}; {n} samples, {n_ts} timestamps, {n_win} independent windows")
    return GateResult(name, passed, statistic, float(test.t), float(min_t), n, n_ts, n_win, detail,
                      {"mean_ic": test.mean, "se": test.se, "lag": lag, "method": "cross_sectional" if cross
                       else "time_series", "target": target_col})


def mse_skill(
    pred: pd.DataFrame,
    head: str,
    target_col: str,
    baseline_mean: float,
    horizon: int,
    *,
    min_t: float,
    lag: int | None = None,
    winsor_quantile: float = 0.01,
    min_windows: int = 10,
) -> GateResult:
    """Paired HAC test that the model's MSE is below the train-mean predictor's (module docstring)."""
    name = f"mse_skill[{head}]"
    lag = int(max(int(horizon), int(lag or 0)))
    p = pred[head_column(head)].to_numpy(np.float64)
    y = pred[target_col].to_numpy(np.float64)
    ok = np.isfinite(p) & np.isfinite(y)
    p, y = p[ok], y[ok]
    tcode, _ = _timestamp_codes(pred["timestamp"].to_numpy()[ok])
    n = int(ok.sum())
    statistic = (f"HAC t (lag {lag}) of the per-timestamp mean of squared-error(train mean) - squared-error(model), "
                 f"target {target_col} winsorised at {winsor_quantile:g}/{1 - winsor_quantile:g}")
    if n < 3:
        return _not_enough(name, statistic, min_t, n, 0, 0, f"{n} finite samples")
    lo, hi = np.quantile(y, [winsor_quantile, 1 - winsor_quantile]) if winsor_quantile > 0 else (-np.inf, np.inf)
    yw = np.clip(y, lo, hi)
    d = (yw - baseline_mean) ** 2 - (yw - p) ** 2
    sums = np.bincount(tcode, d)
    counts = np.bincount(tcode)
    series = sums[counts > 0] / counts[counts > 0]
    n_ts = int(series.size)
    n_win = effective_windows(n_ts, horizon)
    if n_win < min_windows:
        return _not_enough(name, statistic, min_t, n, n_ts, n_win,
                           f"{n_ts} timestamps = {n_win} independent label windows, need {min_windows}")
    test = hac_mean_test(series, lag)
    if not math.isfinite(test.t):
        return _not_enough(name, statistic, min_t, n, n_ts, n_win, "the loss difference has zero variance")
    mse_model = float(np.mean((yw - p) ** 2))
    mse_base = float(np.mean((yw - baseline_mean) ** 2))
    passed = test.t >= min_t
    detail = (f"MSE {mse_model:.4g} vs train-mean {mse_base:.4g} (ratio {mse_model / mse_base:.4f}), "
              f"t {test.t:+.2f} {'>=' if passed else '<'} {min_t:g}; {n} samples, {n_ts} timestamps, "
              f"{n_win} independent windows")
    return GateResult(name, passed, statistic, float(test.t), float(min_t), n, n_ts, n_win, detail,
                      {"mse": mse_model, "baseline_mse": mse_base, "winsor_bounds": [float(lo), float(hi)],
                       "lag": lag})


def _accuracy_macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    cm = np.bincount(y_true * N_CLASSES + y_pred, minlength=N_CLASSES * N_CLASSES).reshape(N_CLASSES, N_CLASSES)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(tp.sum() / max(cm.sum(), 1)), float(f1.mean())


def shift_offsets(n_timestamps: int, horizon: int, n_shifts: int) -> np.ndarray:
    """Up to ``n_shifts`` circular offsets in ``[horizon, T - horizon]``, evenly spaced."""
    lo, hi = int(horizon), int(n_timestamps) - int(horizon)
    if hi < lo:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(lo, hi, num=min(int(n_shifts), hi - lo + 1)).round().astype(np.int64))


def shift_null_skill(
    pred: pd.DataFrame,
    horizon: int,
    *,
    quantile: float = 0.95,
    n_shifts: int = 200,
    min_windows: int = 10,
) -> GateResult:
    """Accuracy and macro-F1 of ``pred_class`` vs ``tb_class`` against the shift null (module docstring).

    Passes when both observed values exceed the null's ``quantile``. ``value`` is the smaller of the
    two empirical percentiles of the observed values within their nulls.
    """
    name = "shift_null"
    y_true = pred["tb_class"].to_numpy(np.int64)
    y_pred = pred["pred_class"].to_numpy(np.int64)
    tcode, n_ts = _timestamp_codes(pred["timestamp"].to_numpy())
    scode, n_sym = _timestamp_codes(pred["symbol"].to_numpy())
    n = int(y_true.size)
    n_win = effective_windows(n_ts, horizon)
    statistic = (f"accuracy and macro-F1 vs the {quantile:g} quantile of predictions shifted by a common "
                 f"offset of >= {horizon} timestamps")
    offsets = shift_offsets(n_ts, horizon, n_shifts)
    if n_win < min_windows or offsets.size < 20:
        return _not_enough(name, statistic, quantile, n, n_ts, n_win,
                           f"{n_ts} timestamps = {n_win} independent label windows (need {min_windows}), "
                           f"{offsets.size} admissible offsets (need 20)")
    grid = np.full((n_sym, n_ts), -1, dtype=np.int64)
    grid[scode, tcode] = y_pred
    acc_obs, f1_obs = _accuracy_macro_f1(y_true, y_pred)
    acc_null = np.empty(offsets.size)
    f1_null = np.empty(offsets.size)
    for i, k in enumerate(offsets):
        shifted = grid[scode, (tcode - k) % n_ts]
        keep = shifted >= 0
        acc_null[i], f1_null[i] = _accuracy_macro_f1(y_true[keep], shifted[keep])
    q_acc, q_f1 = float(np.quantile(acc_null, quantile)), float(np.quantile(f1_null, quantile))
    pct_acc = float((acc_null < acc_obs).mean())
    pct_f1 = float((f1_null < f1_obs).mean())
    passed = acc_obs > q_acc and f1_obs > q_f1
    detail = (f"accuracy {acc_obs:.4f} vs null q{quantile:g} {q_acc:.4f} (percentile {pct_acc:.3f}); "
              f"macro-F1 {f1_obs:.4f} vs null q{quantile:g} {q_f1:.4f} (percentile {pct_f1:.3f}); "
              f"{offsets.size} shifts; {n} samples, {n_ts} timestamps, {n_win} independent windows")
    return GateResult(name, passed, statistic, min(pct_acc, pct_f1), float(quantile), n, n_ts, n_win, detail,
                      {"accuracy": acc_obs, "macro_f1": f1_obs, "null_accuracy_q": q_acc, "null_macro_f1_q": q_f1,
                       "null_accuracy_median": float(np.median(acc_null)),
                       "null_macro_f1_median": float(np.median(f1_null)),
                       "p_accuracy": float((1 + (acc_null >= acc_obs).sum()) / (1 + offsets.size)),
                       "p_macro_f1": float((1 + (f1_null >= f1_obs).sum()) / (1 + offsets.size)),
                       "n_shifts": int(offsets.size)})
