"""Fixed-width-window fractional differentiation (FFD) of log close, and the choice of its order d.

FFD (Lopez de Prado, *Advances in Financial Machine Learning*, ch. 5.5): the series
``x_t = sum_{k=0}^{W-1} w_k * log(close_{t-k})`` over the bars of one symbol, with the binomial
weights ``w_0 = 1``, ``w_k = -w_{k-1} * (d - k + 1) / k``, truncated at the first ``k`` with
``|w_k| < tau``, so the window ``W`` is fixed (the same weights at every bar). ``d = 0`` is the log
price itself, ``d = 1`` the one-bar log return; a fractional ``d`` keeps more memory of the price level
than a return while (for large enough ``d``) being stationary.

Window cap: for a small ``d`` and a tiny ``tau`` the weights decay so slowly that ``W`` exceeds the
series (every value NaN). The window is capped at ``max_window`` bars: the weights ``w_k`` with
``k >= max_window`` are dropped even where ``|w_k| >= tau``. The contract records the window used, the
cap and whether it acted (``window_capped``).

Warm-up: row ``t`` of a symbol (0-based) has a value only when ``t >= W - 1`` (W bars of its own
history); earlier rows are NaN, and NaN clears ``feature_valid`` (never back-filled). Each value uses
bars ``t-W+1..t`` of its own symbol only, so the FFD of a prefix is the prefix of the FFD.

Choice of d (:func:`select_d`), on the **train window only**: the train window is every row whose
timestamp is before the split config's ``val_start`` cut, computed from the timestamps alone
(:func:`train_cut_ns`, the same rule as ``splits.assign_splits``; no labels). For each d on the grid
``0, step, 2*step, ..., d_max`` (ascending) the FFD of each symbol's train rows is tested with the
augmented Dickey-Fuller test (statsmodels ``adfuller``, constant, ``maxlag=1``, no autolag, as in
AFML's snippet 5.4); the p-values are **pooled by their median over the symbols** with at least
``min_adf_obs`` finite values (a d at which no symbol has that many is skipped), and the smallest d whose median p is below ``adf_level`` is chosen.
Pooled, not per symbol, because the contract has one feature with one meaning for every symbol (a
model sees one column), and the median is not moved by a few odd symbols. When no d on the grid
passes, the largest grid value is used and the report says ``passed: false``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from sentinel_pipeline.data import splits


@dataclass(frozen=True)
class FFDConfig:
    """The FFD feature group. ``d=None``: chosen on the train window (:func:`select_d`) before the contract."""

    d: float | None = None
    tau: float = 1e-4
    max_window: int = 500
    d_step: float = 0.05
    d_max: float = 1.0
    adf_level: float = 0.05
    min_adf_obs: int = 50

    def __post_init__(self) -> None:
        for name in ("tau", "d_step", "d_max", "adf_level"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("max_window", "min_adf_obs"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.d is not None:
            object.__setattr__(self, "d", float(self.d))
            if not (math.isfinite(self.d) and self.d >= 0):
                raise ValueError(f"FFDConfig.d must be finite and >= 0, got {self.d!r}")
        if not (0 < self.tau < 1):
            raise ValueError(f"FFDConfig.tau must be in (0, 1), got {self.tau!r}")
        if self.max_window < 1:
            raise ValueError(f"FFDConfig.max_window must be >= 1, got {self.max_window!r}")
        if not (self.d_step > 0 and self.d_max > 0 and math.isfinite(self.d_max)):
            raise ValueError("FFDConfig.d_step and d_max must be > 0")
        if not (0 < self.adf_level < 1):
            raise ValueError(f"FFDConfig.adf_level must be in (0, 1), got {self.adf_level!r}")
        if self.min_adf_obs < 10:
            raise ValueError("FFDConfig.min_adf_obs must be >= 10")

    def grid(self) -> list[float]:
        """The candidate orders, ascending (rounded to 10 decimals so that 0.15 is 0.15)."""
        n = int(math.floor(self.d_max / self.d_step + 1e-9))
        return [round(k * self.d_step, 10) for k in range(n + 1)]

    def params(self) -> dict[str, Any]:
        """Contract params of the FFD feature (needs a resolved ``d``)."""
        if self.d is None:
            raise ValueError("FFDConfig.d is not chosen yet: run ffd.select_d on the train window first "
                             "(data_half's feature_contract stage does) or give d")
        w = ffd_weights(self.d, self.tau, self.max_window)
        return {"input": "log_close", "d": self.d, "tau": self.tau, "window": int(w.size),
                "max_window": self.max_window, "window_capped": uncapped_window(self.d, self.tau) > self.max_window,
                "d_grid": [0.0, self.d_max, self.d_step], "adf_level": self.adf_level,
                "adf_pooling": "median_p_over_symbols", "adf_regression": "c", "adf_maxlag": 1,
                "min_adf_obs": self.min_adf_obs, "selected_on": "train_window"}


def ffd_weights(d: float, tau: float, max_window: int) -> np.ndarray:
    """``w_0..w_{W-1}`` (float64): stop at the first ``|w_k| < tau`` or at ``max_window`` weights."""
    w = [1.0]
    k = 1
    while len(w) < max_window:
        nxt = -w[-1] * (d - k + 1) / k
        if abs(nxt) < tau:
            break
        w.append(nxt)
        k += 1
    return np.asarray(w, dtype=np.float64)


def uncapped_window(d: float, tau: float, limit: int = 10_000_000) -> int:
    """The window without the cap (stops counting at ``limit``)."""
    return int(ffd_weights(d, tau, limit).size)


@njit(cache=True, error_model="numpy")
def _ffd_kernel(x, starts, ends, w, out):
    """out[t] = sum_k w[k] * x[t-k] within each symbol block [starts[i], ends[i]); NaN on warm-up rows."""
    m = w.shape[0]
    for i in range(starts.shape[0]):
        s = starts[i]
        e = ends[i]
        for t in range(s, e):
            if t - s < m - 1:
                out[t] = np.nan
                continue
            acc = 0.0
            for k in range(m):
                acc += w[k] * x[t - k]
            out[t] = acc


@njit(cache=True, error_model="numpy")
def _log(x, out):
    for t in range(x.shape[0]):  # scalar libm log, element by element (the features kernel's log)
        out[t] = math.log(x[t])


def log_prices(close: np.ndarray) -> np.ndarray:
    """``log(close)`` (float64) computed element by element, so a prefix gives bit-identical values."""
    x = np.ascontiguousarray(close, dtype=np.float64)
    out = np.empty(x.size, dtype=np.float64)
    _log(x, out)
    return out


def ffd_series(log_close: np.ndarray, starts: np.ndarray, ends: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """FFD (float64) of ``log_close`` per symbol block ``starts[i]:ends[i]`` with fixed ``weights``."""
    x = np.ascontiguousarray(log_close, dtype=np.float64)
    out = np.empty(x.size, dtype=np.float64)
    _ffd_kernel(x, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                np.ascontiguousarray(weights, dtype=np.float64), out)
    return out


def symbol_blocks(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end rows of the contiguous symbol blocks of ``symbols`` (rows sorted by symbol)."""
    n = len(symbols)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sym = np.asarray(symbols, dtype=object)
    change = np.flatnonzero(sym[1:] != sym[:-1]) + 1
    starts = np.r_[0, change].astype(np.int64)
    return starts, np.r_[starts[1:], n].astype(np.int64)


def train_cut_ns(ts_ns: np.ndarray, split_config: splits.SplitConfig) -> int:
    """``val_start`` of ``split_config`` on these timestamps (int ns): train rows are those before it."""
    unique_ts = splits.distinct_sorted(np.asarray(ts_ns, dtype=np.int64))
    i1, _ = splits._cut_indices(unique_ts, split_config)
    return int(unique_ts[i1])


def select_d(symbols: np.ndarray, ts_ns: np.ndarray, close: np.ndarray, config: FFDConfig,
             split_config: splits.SplitConfig) -> dict[str, Any]:
    """Choose d on the train window (module docstring). Rows sorted by (symbol, timestamp).

    Returns ``{"d", "adf_p", "passed", "window", "train_cut", "n_symbols_tested", "tried"}`` where
    ``tried`` lists ``(d, median p)`` for every grid value tested (the search stops at the first pass).
    """
    import inspect

    from statsmodels.tsa.stattools import adfuller  # imported here: only the FFD group needs it

    # statsmodels >= 0.15 warns unless the return type is stated; 0.14 has no such argument
    kw = {"result_object": False} if "result_object" in inspect.signature(adfuller).parameters else {}

    cut = train_cut_ns(ts_ns, split_config)
    train = np.asarray(ts_ns, dtype=np.int64) < cut
    sym = np.asarray(symbols, dtype=object)[train]
    lc = log_prices(np.asarray(close, dtype=np.float64)[train])
    starts, ends = symbol_blocks(sym)
    tried: list[tuple[float, float]] = []
    chosen: tuple[float, float, bool, int] | None = None
    n_tested = 0
    for d in config.grid():
        w = ffd_weights(d, config.tau, config.max_window)
        x = ffd_series(lc, starts, ends, w)
        ps = []
        for s, e in zip(starts, ends, strict=True):
            seg = x[s:e]
            seg = seg[np.isfinite(seg)]
            if seg.size < config.min_adf_obs or np.ptp(seg) == 0.0:
                continue
            ps.append(float(adfuller(seg, maxlag=1, regression="c", autolag=None, **kw)[1]))
        if not ps:  # the window leaves too few train values at this d: not testable, try the next d
            tried.append((d, math.nan))
            continue
        n_tested = len(ps)
        p = float(np.median(ps))
        tried.append((d, p))
        if p < config.adf_level:
            chosen = (d, p, True, int(w.size))
            break
    if chosen is None:
        testable = [(d, p) for d, p in tried if math.isfinite(p)]
        if not testable:
            raise ValueError(f"FFD: no symbol has {config.min_adf_obs} finite FFD values in the train window at any "
                             f"d on the grid (max_window {config.max_window}); lower max_window or min_adf_obs, "
                             "or give d")
        d, p = testable[-1]
        chosen = (d, p, False, int(ffd_weights(d, config.tau, config.max_window).size))
    return {"d": chosen[0], "adf_p": chosen[1], "passed": chosen[2], "window": chosen[3],
            "train_cut": splits._iso(cut), "n_symbols_tested": n_tested,
            "tried": [[d, p if math.isfinite(p) else None] for d, p in tried]}
