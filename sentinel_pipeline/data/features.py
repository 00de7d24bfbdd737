"""Stage 2: causal per-symbol features in four groups, and the feature contract that lists them.

Input: bars with ``symbol, timestamp (datetime64[ns, UTC]), open, high, low, close, volume``, grouped
by symbol with strictly increasing timestamps inside each symbol (the project sorts by
``(symbol, timestamp)``). Output of :func:`compute_features`: one row per bar in the same order with a
``RangeIndex``: ``symbol, timestamp, open, high, low, close, volume, atr``, every contract feature in
contract order, then ``feature_valid``.

Feature groups (names for the default :class:`FeatureConfig`; ``build_contract`` is the authority):

``seq`` (float32, what a sequence model sees over ``seq_len`` bars)
    ``ret_{k}`` log return over k bars; ``ret_{k}_vn`` = ret_k / (rv_w * sqrt(k)), the vol-normalised
    momentum; ``atr_pct`` = atr / close; ``rv_{w}`` realised vol = RMS of the last w one-bar log
    returns; ``rsi_{w}`` Wilder RSI rescaled to [-1, 1] ((RSI - 50) / 50); ``macd_line`` and
    ``macd_hist`` (EMA fast - EMA slow, and minus its signal EMA) in ATR units; ``close_pos`` =
    (close - low) / (high - low) (0.5 on a zero-range bar); ``range_atr`` = (high - low) / atr;
    ``vol_z_{w}`` z-score of log1p(volume) against its last w bars (0 when they do not vary);
    ``gap`` = log(open / previous close).
``snap`` (float32, decision-time snapshot)
    ``dist_high_{w}``/``dist_low_{w}`` close minus the rolling high/low of w bars in ATR units;
    ``px_sma_{w}`` close minus its w-bar simple moving average in ATR units; ``vol_ratio_{s}_{l}`` =
    rv_s / rv_l; ``ret_{k}_z`` = ret_k / (rv_w * sqrt(k)) over a longer vol window; ``rsi_{w}`` (slow);
    ``vol_z_{w}`` (long window).
``ctx_cat`` (int32 codes ``0..cardinality-1``, a value on every row)
    ``hour_bucket`` UTC hour // hours_per_bucket (daily bars stamped 00:00 all fall into bucket 0);
    ``weekday`` (Monday = 0); ``vol_regime`` tercile of rv_w's rank among the symbol's previous
    ``history`` rv values (rolling, causal); ``trend_regime`` 0/1/2 = the EMA's slope over k bars in
    ATR units below -threshold / in between / above +threshold; ``symbol_bucket`` =
    ``zlib.crc32(symbol) % buckets`` (stable across processes, unlike ``hash()``). During their
    warm-up ``vol_regime`` and ``trend_regime`` hold the middle class 1 and the row is not valid.
``ctx_cont`` (float32, bounded, not scaled downstream)
    ``session_bar`` bars since the symbol's first bar of the same UTC date, divided by ``scale`` and
    capped at 1; ``xs_ret_z`` the cross-sectional market move: the mean over all symbols with a bar
    at this timestamp of clip(ret_1 / rv_w, -clip, clip). It is the only feature that reads other
    symbols (bars at the same timestamp only); it is NaN where the row's own rv_w is.

Optional FFD group (``FeatureConfig(ffd=FFDConfig(...))``, off by default): ``ffd_logclose`` joins
``seq``, the fixed-width fractional difference of log close (:mod:`sentinel_pipeline.data.ffd`); its
order ``d``, ``tau`` and the (capped) window are its params; NaN, hence not valid, on its warm-up rows.

Daily bars (``FeatureConfig(bar_frequency="daily")``, :func:`daily_feature_config`): ``hour_bucket``
and ``session_bar`` are left out (one bar a day carries no hour or session position); ``month``
(0..11, of the UTC date) follows ``weekday`` in ``ctx_cat``; and four **cross-sectional ranks** join
``seq``: ``xs_rank_ret_{k}`` (k in ``xs_rank_return_lags``, default 20 and 60: k-bar log momentum),
``xs_rank_rv_{w}`` (realised vol) and ``xs_rank_vol_z_{w}`` (volume z-score), each the percentile rank
of the symbol's value among the symbols with a finite value at the same timestamp, in [-1, 1], ties
averaged (:func:`cross_sectional_rank`; a lone value is 0). Their sources are computed by the same
kernel but are not contract features; a rank is NaN (and the row not valid) where its source is.
Their params carry ``bar_frequency: "daily"``, so the daily contract hashes differently; the intraday
default contract is unchanged.

Causality: the value at row t uses only bars <= t of its symbol (``xs_ret_z`` and the daily ranks:
also the other symbols' bars at timestamp t). Every recursion (Wilder ATR/RSI, EMAs) starts at the
symbol's first bar and every rolling window counts bars, so the features of a prefix of the bars are bit-for-bit the prefix of the features of
the whole series; replay relies on that. ``feature_valid`` is true where every contract feature is
finite and no ``ctx_cat`` feature sits in its warm-up; on clean bars that is exactly bar index
``>= warmup_bars(config)`` of each symbol. All recursions run in numba kernels over flat arrays with
symbol boundaries, in float64, with float32 outputs.

``FEATURE_CODE_VERSION`` bump rule: bump it (as a new integer string) with every change to this
module that can change a feature value, name, order, dtype, warm-up or validity for the same
``FeatureConfig`` (formula, NaN/zero handling, clipping, rounding, a new feature). Changes of
parameters need no bump: every parameter a feature's values depend on is in that feature's
``params`` and so already in the contract hash.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numba import njit

from sentinel_pipeline.atomic_io import atomic_path
from sentinel_pipeline.data.feature_contract import GROUP_DTYPES, FeatureContract, FeatureSpec
from sentinel_pipeline.data.ffd import FFDConfig, ffd_series, ffd_weights, log_prices

FEATURE_CODE_VERSION = "1"

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
BAR_COLUMNS: tuple[str, ...] = ("symbol", "timestamp", *PRICE_COLUMNS, "volume")

_NS_HOUR = 3_600_000_000_000
_NS_DAY = 24 * _NS_HOUR
_RESYNC = 1024  # running sums are recomputed exactly every _RESYNC bars of a symbol (bounded drift)

# float feature kinds (seq, snap, ctx_cont)
_RET, _RET_VN, _ATR_PCT, _RV, _RSI, _MACD_LINE, _MACD_HIST, _CLOSE_POS = 0, 1, 2, 3, 4, 5, 6, 7
_RANGE_ATR, _VOL_Z, _GAP, _DIST_HIGH, _DIST_LOW, _PX_SMA, _VOL_RATIO = 8, 9, 10, 11, 12, 13, 14
_SESSION_BAR, _XS_RET_Z = 15, 16
_FFD = -2  # computed outside the kernel (ffd.ffd_series)
# categorical feature kinds (ctx_cat)
_HOUR_BUCKET, _WEEKDAY, _VOL_REGIME, _TREND_REGIME, _SYMBOL_BUCKET, _MONTH = 0, 1, 2, 3, 4, 5

BAR_FREQUENCIES: tuple[str, ...] = ("intraday", "daily")


# --------------------------------------------------------------------------------------------
# configuration and contract
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureConfig:
    """Window parameters of every feature. Each one that changes a feature is in its contract params."""

    seq_len: int = 30
    context_features: bool = True
    atr_window: int = 14
    # seq
    return_lags: tuple[int, ...] = (1, 2, 5, 10, 20)
    momentum_lags: tuple[int, ...] = (10,)  # ret_{k}_vn
    momentum_rv_window: int = 20
    rv_windows: tuple[int, ...] = (5, 20)
    rsi_window: int = 14
    macd_fast: int = 12
    macd_slow: int = 26
    macd_signal: int = 9
    volume_z_window: int = 20
    # snap
    range_windows: tuple[int, ...] = (20, 60)
    sma_windows: tuple[int, ...] = (20, 60)
    vol_ratio_windows: tuple[int, int] = (5, 60)
    zret_lags: tuple[int, ...] = (20, 60)  # ret_{k}_z
    zret_rv_window: int = 60
    snap_rsi_window: int = 28
    snap_volume_z_window: int = 60
    # ctx_cat
    hours_per_bucket: int = 3
    vol_regime_rv_window: int = 20
    vol_regime_history: int = 250
    vol_regime_min_periods: int = 40
    trend_ema_window: int = 50
    trend_slope_bars: int = 10
    trend_threshold_atr: float = 0.5
    symbol_buckets: int = 8
    # ctx_cont
    session_bar_scale: int = 24
    xs_rv_window: int = 20
    xs_clip: float = 5.0
    # bar frequency: "daily" drops hour_bucket and session_bar, adds month and the cross-sectional ranks
    bar_frequency: str = "intraday"
    # cross-sectional ranks (daily only; seq group): momentum over these lags, realised vol, volume z
    xs_rank_return_lags: tuple[int, ...] = (20, 60)
    xs_rank_rv_window: int = 20
    xs_rank_volume_z_window: int = 20
    # optional FFD group (off by default): ``ffd_logclose`` joins seq (see ``data/ffd.py``)
    ffd: FFDConfig | None = None

    def __post_init__(self) -> None:
        if self.bar_frequency not in BAR_FREQUENCIES:
            raise ValueError(f"FeatureConfig.bar_frequency must be one of {list(BAR_FREQUENCIES)}, "
                             f"got {self.bar_frequency!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "bar_frequency":
                continue
            if f.name == "ffd":
                if value is not None and not isinstance(value, FFDConfig):
                    object.__setattr__(self, f.name, FFDConfig(**value))
                continue
            if f.name == "context_features":
                object.__setattr__(self, f.name, bool(value))
            elif f.name in ("trend_threshold_atr", "xs_clip"):
                object.__setattr__(self, f.name, float(value))
            elif isinstance(value, list | tuple):
                ints = tuple(int(v) for v in value)
                if len(set(ints)) != len(ints) or any(v < 1 for v in ints):
                    raise ValueError(f"FeatureConfig.{f.name} must hold distinct integers >= 1, got {value!r}")
                object.__setattr__(self, f.name, ints)
            else:
                if int(value) < 1:
                    raise ValueError(f"FeatureConfig.{f.name} must be >= 1, got {value!r}")
                object.__setattr__(self, f.name, int(value))
        if 24 % self.hours_per_bucket:
            raise ValueError(f"FeatureConfig.hours_per_bucket must divide 24, got {self.hours_per_bucket}")
        if self.symbol_buckets < 2:
            raise ValueError("FeatureConfig.symbol_buckets must be >= 2")
        if self.macd_fast >= self.macd_slow:
            raise ValueError("FeatureConfig.macd_fast must be smaller than macd_slow")
        if len(self.vol_ratio_windows) != 2 or self.vol_ratio_windows[0] >= self.vol_ratio_windows[1]:
            raise ValueError("FeatureConfig.vol_ratio_windows must be (short, long) with short < long")
        if self.vol_regime_min_periods > self.vol_regime_history:
            raise ValueError("FeatureConfig.vol_regime_min_periods must be <= vol_regime_history")
        if not (self.trend_threshold_atr >= 0 and math.isfinite(self.trend_threshold_atr)):
            raise ValueError("FeatureConfig.trend_threshold_atr must be finite and >= 0")
        if not (self.xs_clip > 0 and math.isfinite(self.xs_clip)):
            raise ValueError("FeatureConfig.xs_clip must be finite and > 0")


    @property
    def daily(self) -> bool:
        return self.bar_frequency == "daily"


def daily_feature_config(**overrides: Any) -> FeatureConfig:
    """The feature configuration of the daily panel preset (``bar_frequency="daily"``)."""
    return FeatureConfig(**{"bar_frequency": "daily", **overrides})


@dataclass(frozen=True)
class _FeatureDef:
    """One contract feature plus how the kernel computes it and how many leading bars it needs.

    ``source``: for a cross-sectional rank, the per-symbol feature (not in the contract) whose value
    is ranked across the symbols at each timestamp.
    """

    spec: FeatureSpec
    kind: int
    ip: tuple[int, int, int]
    fp: float
    warmup: int  # first bar index (per symbol) at which the feature is defined on clean bars
    source: _FeatureDef | None = None


def _float_def(name: str, group: str, kind: int, params: dict[str, Any], warmup: int,
               ip: tuple[int, ...] = (), fp: float = 0.0) -> _FeatureDef:
    spec = FeatureSpec(name, group, GROUP_DTYPES[group], params)
    return _FeatureDef(spec, kind, (*ip, 0, 0, 0)[:3], fp, warmup)  # type: ignore[arg-type]


def _feature_defs(cfg: FeatureConfig) -> list[_FeatureDef]:
    """Every feature of ``cfg`` in contract order (seq, snap, ctx_cat, ctx_cont)."""
    a = cfg.atr_window
    aw = a - 1  # first bar with a Wilder ATR
    defs: list[_FeatureDef] = []

    def seq(name: str, kind: int, params: dict[str, Any], warmup: int, ip: tuple[int, ...] = ()) -> None:
        defs.append(_float_def(name, "seq", kind, params, warmup, ip))

    def snap(name: str, kind: int, params: dict[str, Any], warmup: int, ip: tuple[int, ...] = ()) -> None:
        defs.append(_float_def(name, "snap", kind, params, warmup, ip))

    for k in cfg.return_lags:
        seq(f"ret_{k}", _RET, {"lag": k}, k, (k,))
    w = cfg.momentum_rv_window
    for k in cfg.momentum_lags:
        seq(f"ret_{k}_vn", _RET_VN, {"lag": k, "rv_window": w}, max(k, w), (k, w))
    seq("atr_pct", _ATR_PCT, {"atr_window": a}, aw)
    for w in cfg.rv_windows:
        seq(f"rv_{w}", _RV, {"window": w}, w, (w,))
    seq(f"rsi_{cfg.rsi_window}", _RSI, {"window": cfg.rsi_window}, cfg.rsi_window, (cfg.rsi_window,))
    fast, slow, sig = cfg.macd_fast, cfg.macd_slow, cfg.macd_signal
    seq("macd_line", _MACD_LINE, {"fast": fast, "slow": slow, "atr_window": a}, max(slow - 1, aw), (fast, slow))
    seq("macd_hist", _MACD_HIST, {"fast": fast, "slow": slow, "signal": sig, "atr_window": a},
        max(slow + sig - 2, aw), (fast, slow, sig))
    seq("close_pos", _CLOSE_POS, {}, 0)
    seq("range_atr", _RANGE_ATR, {"atr_window": a}, aw)
    w = cfg.volume_z_window
    seq(f"vol_z_{w}", _VOL_Z, {"window": w}, w - 1, (w,))
    seq("gap", _GAP, {}, 1)
    if cfg.ffd is not None and cfg.ffd.d is None:  # d not chosen yet: only the warm-up bound (the cap) is known
        defs.append(_float_def("ffd_logclose", "seq", _FFD, {"d": None}, cfg.ffd.max_window - 1))
    elif cfg.ffd is not None:
        params = cfg.ffd.params()
        defs.append(_float_def("ffd_logclose", "seq", _FFD, params, params["window"] - 1))
    if cfg.daily:
        for src in _rank_sources(cfg):
            params = {"source": src.spec.name, **src.spec.params, "bar_frequency": "daily", "range": "[-1,1]",
                      "ties": "average", "over": "symbols_with_a_finite_value_at_the_timestamp"}
            spec = FeatureSpec(f"xs_rank_{src.spec.name}", "seq", GROUP_DTYPES["seq"], params)
            defs.append(_FeatureDef(spec, -1, (0, 0, 0), 0.0, src.warmup, src))

    for w in cfg.range_windows:
        snap(f"dist_high_{w}", _DIST_HIGH, {"window": w, "atr_window": a}, max(w - 1, aw), (w,))
        snap(f"dist_low_{w}", _DIST_LOW, {"window": w, "atr_window": a}, max(w - 1, aw), (w,))
    for w in cfg.sma_windows:
        snap(f"px_sma_{w}", _PX_SMA, {"window": w, "atr_window": a}, max(w - 1, aw), (w,))
    s, lng = cfg.vol_ratio_windows
    snap(f"vol_ratio_{s}_{lng}", _VOL_RATIO, {"short": s, "long": lng}, lng, (s, lng))
    w = cfg.zret_rv_window
    for k in cfg.zret_lags:
        snap(f"ret_{k}_z", _RET_VN, {"lag": k, "rv_window": w}, max(k, w), (k, w))
    w = cfg.snap_rsi_window
    snap(f"rsi_{w}", _RSI, {"window": w}, w, (w,))
    w = cfg.snap_volume_z_window
    snap(f"vol_z_{w}", _VOL_Z, {"window": w}, w - 1, (w,))

    if cfg.context_features:
        hb = cfg.hours_per_bucket
        calendar = [("month", _MONTH, {"bar_frequency": "daily", "calendar": "utc_date"}, 12, 0, (), 0.0)] \
            if cfg.daily else [("hour_bucket", _HOUR_BUCKET, {"hours_per_bucket": hb}, 24 // hb, 0, (hb,), 0.0)]
        cat_defs = [
            *([] if cfg.daily else calendar),
            ("weekday", _WEEKDAY, {}, 7, 0, (), 0.0),
            *(calendar if cfg.daily else []),
            ("vol_regime", _VOL_REGIME,
             {"rv_window": cfg.vol_regime_rv_window, "history": cfg.vol_regime_history,
              "min_periods": cfg.vol_regime_min_periods}, 3,
             cfg.vol_regime_rv_window + cfg.vol_regime_min_periods,
             (cfg.vol_regime_rv_window, cfg.vol_regime_history, cfg.vol_regime_min_periods), 0.0),
            ("trend_regime", _TREND_REGIME,
             {"ema_window": cfg.trend_ema_window, "slope_bars": cfg.trend_slope_bars,
              "threshold_atr": cfg.trend_threshold_atr, "atr_window": a}, 3,
             max(cfg.trend_ema_window - 1 + cfg.trend_slope_bars, aw),
             (cfg.trend_ema_window, cfg.trend_slope_bars), cfg.trend_threshold_atr),
            ("symbol_bucket", _SYMBOL_BUCKET, {"hash": "crc32_utf8", "buckets": cfg.symbol_buckets},
             cfg.symbol_buckets, 0, (), 0.0),
        ]
        for name, kind, params, card, warmup, ip, fp in cat_defs:
            spec = FeatureSpec(name, "ctx_cat", GROUP_DTYPES["ctx_cat"], params, card)
            defs.append(_FeatureDef(spec, kind, (*ip, 0, 0, 0)[:3], fp, warmup))  # type: ignore[arg-type]
        sc = cfg.session_bar_scale
        if not cfg.daily:
            defs.append(_float_def("session_bar", "ctx_cont", _SESSION_BAR, {"scale": sc, "session": "utc_date"},
                                   0, (sc,)))
        w = cfg.xs_rv_window
        defs.append(_float_def("xs_ret_z", "ctx_cont", _XS_RET_Z, {"rv_window": w, "clip": cfg.xs_clip},
                               w, (w,), cfg.xs_clip))
    return defs


def _rank_sources(cfg: FeatureConfig) -> list[_FeatureDef]:
    """The per-symbol values the daily cross-sectional ranks are taken of (not contract features)."""
    out = [_float_def(f"ret_{k}", "seq", _RET, {"lag": k}, k, (k,)) for k in cfg.xs_rank_return_lags]
    w = cfg.xs_rank_rv_window
    out.append(_float_def(f"rv_{w}", "seq", _RV, {"window": w}, w, (w,)))
    w = cfg.xs_rank_volume_z_window
    out.append(_float_def(f"vol_z_{w}", "seq", _VOL_Z, {"window": w}, w - 1, (w,)))
    return out


def build_contract(config: FeatureConfig | None = None) -> FeatureContract:
    """The feature contract of ``config`` (ordered names, groups, dtypes, params); needs no data."""
    config = config or FeatureConfig()
    _require_resolved_ffd(config)
    return FeatureContract(
        features=tuple(d.spec for d in _feature_defs(config)),
        seq_len=config.seq_len,
        context_features=config.context_features,
        code_version=FEATURE_CODE_VERSION,
    )


def _require_resolved_ffd(config: FeatureConfig) -> None:
    if config.ffd is not None and config.ffd.d is None:
        raise ValueError("FeatureConfig.ffd.d is not chosen yet: choose it on the train window first "
                         "(ffd.select_d; the data half's feature_contract stage does) or give it")


def resolve_ffd(config: FeatureConfig, d: float) -> FeatureConfig:
    """``config`` with the FFD order set to ``d`` (the contract then carries it)."""
    if config.ffd is None:
        raise ValueError("FeatureConfig.ffd is off")
    return replace(config, ffd=replace(config.ffd, d=d))


def warmup_bars(config: FeatureConfig | None = None) -> int:
    """Leading bars of each symbol whose features are not valid even on clean bars.

    With the FFD group on and ``d`` not chosen yet this is the bound ``ffd.max_window - 1``."""
    return max(d.warmup for d in _feature_defs(config or FeatureConfig()))


# --------------------------------------------------------------------------------------------
# numba kernels: every function below works on the bars of ONE symbol (1-D slices)
# --------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _div(x: float, y: float) -> float:
    return x / y if y != 0.0 else np.nan


@njit(cache=True, error_model="numpy")
def _rolling_sum(x, w, first, out):
    """out[t] = sum(x[t-w+1..t]) for t >= first + w - 1, NaN before; x[first:] must be finite.

    A running sum that is recomputed exactly every _RESYNC bars (counted from the symbol's first
    bar), which bounds rounding drift while keeping out[t] a function of x[:t+1] only.
    """
    s = 0.0
    for t in range(x.shape[0]):
        if t < first:
            out[t] = np.nan
            continue
        if t % _RESYNC == 0 and t - w + 1 >= first:
            s = 0.0
            for j in range(t - w + 1, t + 1):
                s += x[j]
        else:
            s += x[t]
            if t - w >= first:
                s -= x[t - w]
        out[t] = s if t >= first + w - 1 else np.nan


@njit(cache=True, error_model="numpy")
def _realised_vol(lr, w, sq, out):
    """RMS of the last w one-bar log returns (lr[0] is undefined): NaN for t < w."""
    n = lr.shape[0]
    for t in range(1, n):
        sq[t] = lr[t] * lr[t]
    _rolling_sum(sq[:n], w, 1, out)
    for t in range(w, n):
        out[t] = math.sqrt(max(out[t], 0.0) / w)


@njit(cache=True, error_model="numpy")
def _ema(x, span, out):
    """EMA with alpha = 2 / (span + 1), seeded with x[0] (pandas ``ewm(span, adjust=False)``)."""
    alpha = 2.0 / (span + 1.0)
    e = x[0]
    out[0] = e
    for t in range(1, x.shape[0]):
        e = (1.0 - alpha) * e + alpha * x[t]
        out[t] = e


@njit(cache=True, error_model="numpy")
def _wilder_atr(h, lw, c, w, out):
    """Wilder ATR: mean of the first w true ranges at bar w-1, then ((w-1) * atr + tr) / w."""
    acc = 0.0
    for t in range(c.shape[0]):
        if t == 0:
            tr = h[0] - lw[0]
        else:
            pc = c[t - 1]
            tr = max(h[t] - lw[t], abs(h[t] - pc), abs(lw[t] - pc))
        if t < w:
            acc += tr
            out[t] = acc / w if t == w - 1 else np.nan
            if t == w - 1:
                acc = acc / w
        else:
            acc = ((w - 1) * acc + tr) / w
            out[t] = acc


@njit(cache=True, error_model="numpy")
def _wilder_rsi(c, w, out):
    """Wilder RSI rescaled to [-1, 1]: (avg_gain - avg_loss) / (avg_gain + avg_loss), 0 without moves."""
    n = c.shape[0]
    ag = 0.0
    al = 0.0
    if n > 0:
        out[0] = np.nan
    for t in range(1, n):
        d = c[t] - c[t - 1]
        g = d if d > 0.0 else 0.0
        lo = -d if d < 0.0 else 0.0
        if t <= w:
            ag += g
            al += lo
            if t == w:
                ag /= w
                al /= w
        else:
            ag = ((w - 1) * ag + g) / w
            al = ((w - 1) * al + lo) / w
        if t < w:
            out[t] = np.nan
        else:
            tot = ag + al
            out[t] = (ag - al) / tot if tot > 0.0 else 0.0


@njit(cache=True, error_model="numpy")
def _rolling_extreme(x, w, sign, dq, out):
    """Rolling max (sign=1) or min (sign=-1) of the last w values with a monotonic deque."""
    head = 0
    tail = 0
    for t in range(x.shape[0]):
        xt = sign * x[t]
        while tail > head and sign * x[dq[tail - 1]] <= xt:
            tail -= 1
        dq[tail] = t
        tail += 1
        if dq[head] <= t - w:
            head += 1
        out[t] = x[dq[head]] if t >= w - 1 else np.nan


@njit(cache=True, error_model="numpy")
def _float_feature(kind, p0, p1, p2, fp, ts, o, h, lw, c, v, lc, lr, atr, a, b, s2, d, dq, out):
    """Write one float feature of one symbol into ``out`` (lc = log close, lr = one-bar log return).

    a, b, s2, d, dq are scratch.
    """
    n = c.shape[0]
    if kind == _RET or kind == _RET_VN:
        k = p0
        if kind == _RET_VN:
            _realised_vol(lr, p1, s2, a)
        sk = math.sqrt(k)
        for t in range(n):
            if t < k:
                out[t] = np.nan
            elif kind == _RET:
                out[t] = lc[t] - lc[t - k]
            else:
                out[t] = _div(lc[t] - lc[t - k], a[t] * sk)
    elif kind == _ATR_PCT:
        for t in range(n):
            out[t] = atr[t] / c[t]
    elif kind == _RV:
        _realised_vol(lr, p0, s2, a)
        for t in range(n):
            out[t] = a[t]
    elif kind == _RSI:
        _wilder_rsi(c, p0, a)
        for t in range(n):
            out[t] = a[t]
    elif kind == _MACD_LINE or kind == _MACD_HIST:
        _ema(c, p0, a)
        _ema(c, p1, b)
        for t in range(n):
            s2[t] = a[t] - b[t]
        first = p1 - 1
        if kind == _MACD_HIST:
            _ema(s2, p2, d)
            first = p1 + p2 - 2
            for t in range(n):
                s2[t] -= d[t]
        for t in range(n):
            out[t] = _div(s2[t], atr[t]) if t >= first else np.nan
    elif kind == _CLOSE_POS:
        for t in range(n):
            rng = h[t] - lw[t]
            out[t] = (c[t] - lw[t]) / rng if rng > 0.0 else 0.5
    elif kind == _RANGE_ATR:
        for t in range(n):
            out[t] = _div(h[t] - lw[t], atr[t])
    elif kind == _VOL_Z:
        w = p0
        for t in range(n):
            a[t] = math.log1p(v[t])
            s2[t] = a[t] * a[t]
        _rolling_sum(a, w, 0, b)
        _rolling_sum(s2, w, 0, d)
        for t in range(n):
            if t < w - 1:
                out[t] = np.nan
                continue
            m = b[t] / w
            var = d[t] / w - m * m
            out[t] = (a[t] - m) / math.sqrt(var) if var > 1e-9 else 0.0
    elif kind == _GAP:
        if n > 0:
            out[0] = np.nan
        for t in range(1, n):
            out[t] = math.log(o[t]) - lc[t - 1]
    elif kind == _DIST_HIGH or kind == _DIST_LOW:
        if kind == _DIST_HIGH:
            _rolling_extreme(h, p0, 1.0, dq, a)
        else:
            _rolling_extreme(lw, p0, -1.0, dq, a)
        for t in range(n):
            out[t] = _div(c[t] - a[t], atr[t])
    elif kind == _PX_SMA:
        w = p0
        _rolling_sum(c, w, 0, a)
        for t in range(n):
            out[t] = _div(c[t] - a[t] / w, atr[t])
    elif kind == _VOL_RATIO:
        _realised_vol(lr, p0, s2, a)
        _realised_vol(lr, p1, s2, b)
        for t in range(n):
            out[t] = _div(a[t], b[t])
    elif kind == _SESSION_BAR:
        scale = p0
        k = 0
        prev_day = 0
        for t in range(n):
            day = ts[t] // _NS_DAY
            k = 0 if t == 0 or day != prev_day else k + 1
            prev_day = day
            out[t] = min(k, scale) / scale
    elif kind == _XS_RET_Z:
        _realised_vol(lr, p0, s2, a)
        for t in range(n):
            if t < p0:
                out[t] = np.nan
            elif a[t] > 0.0:
                out[t] = min(max(lr[t] / a[t], -fp), fp)
            else:
                out[t] = 0.0


@njit(cache=True, error_model="numpy")
def _month_of_day(days):
    """Month 0..11 of the UTC date ``days`` after 1970-01-01 (Hinnant's civil-from-days algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    return mp + 2 if mp < 10 else mp - 10


@njit(cache=True, error_model="numpy")
def _cat_feature(kind, p0, p1, p2, fp, bucket, ts, c, lr, atr, a, s2, out, ready):
    """Write one ctx_cat feature of one symbol into ``out``; clear ``ready`` on its warm-up rows."""
    n = c.shape[0]
    if kind == _HOUR_BUCKET:
        for t in range(n):
            out[t] = ((ts[t] // _NS_HOUR) % 24) // p0
    elif kind == _WEEKDAY:
        for t in range(n):
            out[t] = (ts[t] // _NS_DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    elif kind == _MONTH:
        for t in range(n):
            out[t] = _month_of_day(ts[t] // _NS_DAY)
    elif kind == _SYMBOL_BUCKET:
        for t in range(n):
            out[t] = bucket
    elif kind == _VOL_REGIME:
        w, hist, minp = p0, p1, p2
        _realised_vol(lr, w, s2, a)
        for t in range(n):
            lo = max(w, t - hist)
            m = t - lo
            if m < minp:
                out[t] = 1
                ready[t] = False
                continue
            x = a[t]
            window = a[lo:t]
            less = 0
            less_equal = 0
            for j in range(m):  # this form vectorises (SIMD compares, integer sums)
                less += np.uint8(window[j] < x)
                less_equal += np.uint8(window[j] <= x)
            frac = (less + 0.5 * (less_equal - less)) / m
            out[t] = 0 if frac < 1.0 / 3.0 else (1 if frac < 2.0 / 3.0 else 2)
    elif kind == _TREND_REGIME:
        ew, k = p0, p1
        _ema(c, ew, a)
        for t in range(n):
            if t < ew - 1 + k or not atr[t] > 0.0:
                out[t] = 1
                ready[t] = False
                continue
            slope = (a[t] - a[t - k]) / atr[t]
            out[t] = 2 if slope > fp else (0 if slope < -fp else 1)


@njit(cache=True, nogil=True, error_model="numpy")
def _features_kernel(ts, o, h, lw, c, v, starts, ends, buckets, atr_window,
                     f_kind, f_ip, f_fp, c_kind, c_ip, c_fp,
                     out_atr, out_f, out_c, valid):
    """All features of all symbols; symbol i owns rows starts[i]:ends[i]. Scratch is per symbol."""
    max_len = 0
    for i in range(starts.shape[0]):
        max_len = max(max_len, ends[i] - starts[i])
    lc = np.empty(max_len)
    lr = np.empty(max_len)
    a = np.empty(max_len)
    b = np.empty(max_len)
    s2 = np.empty(max_len)
    d = np.empty(max_len)
    dq = np.empty(max_len, np.int64)
    ready = np.empty(max_len, np.bool_)
    for i in range(starts.shape[0]):
        s = starts[i]
        e = ends[i]
        n = e - s
        cs = c[s:e]
        for t in range(n):
            lc[t] = math.log(cs[t])
            lr[t] = lc[t] - lc[t - 1] if t > 0 else np.nan
        atr = out_atr[s:e]
        _wilder_atr(h[s:e], lw[s:e], cs, atr_window, atr)
        ready[:n] = True
        for f in range(f_kind.shape[0]):
            out = out_f[f, s:e]
            _float_feature(f_kind[f], f_ip[f, 0], f_ip[f, 1], f_ip[f, 2], f_fp[f], ts[s:e], o[s:e], h[s:e],
                           lw[s:e], cs, v[s:e], lc[:n], lr[:n], atr, a[:n], b[:n], s2[:n], d[:n], dq[:n], out)
            for t in range(n):
                if not np.isfinite(out[t]):
                    ready[t] = False
        for k in range(c_kind.shape[0]):
            _cat_feature(c_kind[k], c_ip[k, 0], c_ip[k, 1], c_ip[k, 2], c_fp[k], buckets[i], ts[s:e], cs,
                         lr[:n], atr, a[:n], s2[:n], out_c[k, s:e], ready[:n])
        valid[s:e] = ready[:n]


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def _validated_inputs(bars: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(timestamps as int64 ns, symbol segment starts, float64 price/volume arrays, unique symbols)."""
    missing = [col for col in BAR_COLUMNS if col not in bars.columns]
    if missing:
        raise ValueError(f"bars: missing columns {missing} (need {list(BAR_COLUMNS)})")
    ts_dtype = bars["timestamp"].dtype
    if not isinstance(ts_dtype, pd.DatetimeTZDtype) or str(ts_dtype.tz) not in ("UTC", "Etc/UTC"):
        raise ValueError(f"bars: column 'timestamp' must be datetime64[ns, UTC], got {ts_dtype}")
    ts = np.asarray(bars["timestamp"].array.as_unit("ns").asi8, dtype=np.int64)
    if ts.size and ts.min() == np.iinfo(np.int64).min:
        raise ValueError(f"bars: column 'timestamp' has NaT at row {int(np.argmin(ts))}")
    codes, uniques = pd.factorize(bars["symbol"], sort=False)
    if (codes < 0).any():
        raise ValueError(f"bars: column 'symbol' is missing at row {int(np.argmax(codes < 0))}")
    change = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    if change.size and (np.diff(codes[np.r_[0, change]]) != 1).any():
        raise ValueError("bars: rows of a symbol are not contiguous (sort the bars by (symbol, timestamp))")
    starts = np.r_[0, change].astype(np.int64) if codes.size else np.zeros(0, np.int64)
    same = np.ones(ts.size, dtype=bool)
    same[starts] = False
    bad_ts = np.flatnonzero(same[1:] & (ts[1:] <= ts[:-1])) + 1
    if bad_ts.size:
        raise ValueError(f"bars: timestamps not strictly increasing within symbol at row {int(bad_ts[0])} "
                         "(duplicate or unsorted bars)")
    arrays: dict[str, np.ndarray] = {}
    for col in (*PRICE_COLUMNS, "volume"):
        try:
            x = np.ascontiguousarray(bars[col].to_numpy(dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bars: column {col!r} is not numeric: {exc}") from exc
        bad = ~np.isfinite(x) | ((x <= 0) if col != "volume" else (x < 0))
        if bad.any():
            what = "non-finite or non-positive prices" if col != "volume" else "non-finite or negative volumes"
            raise ValueError(f"bars: column {col!r} has {int(bad.sum())} {what} (first at row "
                             f"{int(np.argmax(bad))}); ingest (stage 1) quarantines such rows")
        arrays[col] = x
    return ts, starts, arrays, np.asarray(uniques, dtype=object)


def feature_threads() -> int:
    """Threads :func:`compute_features` spreads its symbols over when none are given: the CPUs of this
    process's affinity mask (the data half's stages run one at a time), at most 8. Symbols are
    independent in the kernel, so the result is the same for any count (test)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _run_features_kernel(threads: int, starts: np.ndarray, ends: np.ndarray, buckets: np.ndarray,
                         *args: Any, outputs: tuple[np.ndarray, ...]) -> None:
    """The kernel over contiguous groups of symbols of about equal rows, one group per thread (it
    releases the GIL; each group writes its own rows of the shared outputs)."""
    ts, o, h, lw, c, v, atr_window, *plans = args
    n_sym = starts.shape[0]
    threads = max(1, min(int(threads), n_sym))
    if threads == 1:
        _features_kernel(ts, o, h, lw, c, v, starts, ends, buckets, atr_window, *plans, *outputs)
        return
    rows_before = np.cumsum(ends - starts) - (ends - starts)
    cuts = np.searchsorted(rows_before, np.linspace(0, int(ends[-1] - starts[0]), threads + 1)[1:-1])
    bounds = [0, *sorted({int(x) for x in cuts if 0 < x < n_sym}), n_sym]
    with ThreadPoolExecutor(max_workers=len(bounds) - 1) as pool:
        futures = [pool.submit(_features_kernel, ts, o, h, lw, c, v, starts[a:b], ends[a:b], buckets[a:b],
                               atr_window, *plans, *outputs) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for f in futures:
            f.result()


def compute_features(bars: pd.DataFrame, config: FeatureConfig | None = None,
                     threads: int | None = None) -> pd.DataFrame:
    """One row of features per bar, same order as ``bars`` (see the module docstring for the columns).
    ``threads``: the symbols are spread over that many threads (None: :func:`feature_threads`)."""
    config = config or FeatureConfig()
    _require_resolved_ffd(config)
    defs = _feature_defs(config)
    ts, starts, arr, symbols = _validated_inputs(bars)
    n = ts.size
    ends = np.r_[starts[1:], n].astype(np.int64)
    buckets = np.array([zlib.crc32(str(s).encode("utf-8")) % config.symbol_buckets for s in symbols],
                       dtype=np.int64)
    float_defs = [d for d in defs if d.spec.group != "ctx_cat"]
    rank_defs = [d for d in float_defs if d.source is not None]
    # the kernel computes the per-symbol features and the rank sources (their NaNs clear feature_valid)
    ffd_defs = [d for d in float_defs if d.kind == _FFD]
    kernel_defs = ([d for d in float_defs if d.source is None and d.kind != _FFD]
                   + [d.source for d in rank_defs])  # type: ignore[misc]
    cat_defs = [d for d in defs if d.spec.group == "ctx_cat"]

    def plan(ds: list[_FeatureDef]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.array([d.kind for d in ds], dtype=np.int64),
                np.array([d.ip for d in ds], dtype=np.int64).reshape(len(ds), 3),
                np.array([d.fp for d in ds], dtype=np.float64))

    out_atr = np.empty(n, dtype=np.float64)
    out_f = np.empty((len(kernel_defs), n), dtype=np.float32)
    out_c = np.empty((len(cat_defs), n), dtype=np.int32)
    valid = np.empty(n, dtype=bool)
    if n:
        _run_features_kernel(feature_threads() if threads is None else threads, starts, ends, buckets,
                             ts, arr["open"], arr["high"], arr["low"], arr["close"], arr["volume"],
                             config.atr_window, *plan(kernel_defs), *plan(cat_defs),
                             outputs=(out_atr, out_f, out_c, valid))

    float_rows = {d.spec.name: j for j, d in enumerate(kernel_defs[:len(kernel_defs) - len(rank_defs)])}
    ffd_cols: dict[str, np.ndarray] = {}
    for d in ffd_defs:
        assert config.ffd is not None
        w = ffd_weights(config.ffd.d, config.ffd.tau, config.ffd.max_window)  # type: ignore[arg-type]
        col = ffd_series(log_prices(arr["close"]), starts, ends, w).astype(np.float32)
        valid &= np.isfinite(col)  # warm-up rows (fewer than window bars of the symbol) are NaN: not valid
        ffd_cols[d.spec.name] = col
    if "xs_ret_z" in float_rows:
        _cross_sectional_mean(out_f[float_rows["xs_ret_z"]], ts)
    ranks: dict[str, np.ndarray] = {}
    if rank_defs:
        ts_codes = pd.factorize(ts, sort=False)[0]
        first_source = len(kernel_defs) - len(rank_defs)
        for j, d in enumerate(rank_defs):
            ranks[d.spec.name] = cross_sectional_rank(out_f[first_source + j], ts_codes)
    cat_rows = {d.spec.name: j for j, d in enumerate(cat_defs)}

    columns: dict[str, Any] = {col: bars[col].array for col in BAR_COLUMNS}
    columns["atr"] = out_atr
    for d in defs:
        name = d.spec.name
        if name in ranks:
            columns[name] = ranks[name]
        elif name in ffd_cols:
            columns[name] = ffd_cols[name]
        else:
            columns[name] = out_c[cat_rows[name]] if name in cat_rows else out_f[float_rows[name]]
    columns["feature_valid"] = valid
    return pd.DataFrame(columns, index=pd.RangeIndex(n), copy=False)


def _cross_sectional_mean(z: np.ndarray, ts: np.ndarray) -> None:
    """Replace each finite z[i] in place by the mean of the finite z at timestamp ts[i].

    ``np.bincount`` adds in row order, so the sums (and the result) on a timestamp prefix of the bars
    are bit-for-bit those on the whole table.
    """
    codes, uniq = pd.factorize(ts, sort=False)
    ok = np.isfinite(z)
    sel = codes[ok]
    sums = np.bincount(sel, weights=z[ok], minlength=uniq.size)
    counts = np.bincount(sel, minlength=uniq.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    z[ok] = means[sel]


def cross_sectional_rank(values: np.ndarray, group_codes: np.ndarray) -> np.ndarray:
    """Percentile rank of each finite value among the finite values of its group, mapped to [-1, 1].

    ``group_codes`` (int, one per value) are the timestamps' codes: a value is ranked only against the
    other symbols' values at the same timestamp, so the rank is as causal as the values are. Ties get
    their average rank (pandas ``rank(method="average")``); with ``m`` finite values in a group the rank
    ``r`` (1..m) maps to ``2 * (r - 1) / (m - 1) - 1``, and a lone value to 0. Non-finite values stay NaN.
    float32 output.
    """
    values = np.asarray(values)
    out = np.full(values.shape, np.nan, dtype=np.float32)
    ok = np.flatnonzero(np.isfinite(values))
    if not ok.size:
        return out
    codes = np.asarray(group_codes, dtype=np.int64)[ok]
    x = values[ok]
    # one stable sort by (group, value) instead of a groupby: the rank of a run of equal values in a
    # group is the mean of its 1-based positions in the group (what pandas' rank(method="average") gives)
    order = np.lexsort((x, codes))
    cs, xs = codes[order], x[order]
    n = cs.size
    new_group = np.r_[True, cs[1:] != cs[:-1]]
    new_run = new_group | np.r_[True, xs[1:] != xs[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    run_id = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)
    run_last = np.r_[run_first[1:], n] - 1
    rank = (run_first + run_last)[run_id] / 2.0 - group_start + 1.0  # 1-based, ties averaged
    group_size = np.bincount(cs)[cs].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(group_size > 1, 2.0 * (rank - 1.0) / (group_size - 1.0) - 1.0, 0.0)
    out[ok[order]] = scaled
    return out


def feature_report(features: pd.DataFrame, contract: FeatureContract) -> dict[str, Any]:
    """Small JSON-able summary of a ``compute_features`` result for logs and UI metadata."""
    valid = features["feature_valid"].to_numpy(dtype=bool)
    n = int(valid.size)
    report: dict[str, Any] = {
        "feature_contract_hash": contract.hash,
        "n_rows": n,
        "n_symbols": int(features["symbol"].nunique()),
        "n_valid_rows": int(valid.sum()),
        "valid_fraction": float(valid.mean()) if n else 0.0,
        "dims": contract.dims(),
    }
    if n:
        report["time_min"] = str(features["timestamp"].min())
        report["time_max"] = str(features["timestamp"].max())
    return report


def write_features(features: pd.DataFrame, contract: FeatureContract, features_path: str | Path,
                   contract_dir: str | Path) -> dict[str, Path]:
    """Write the feature table (parquet) and ``feature_contract.json`` + ``feature_schema.txt`` atomically."""
    missing = [name for name in contract.all_names if name not in features.columns]
    if missing:
        raise ValueError(f"{features_path}: feature table lacks contract features {missing}")
    with atomic_path(features_path) as tmp:
        features.to_parquet(tmp, index=False)
    return {"features": Path(features_path), **contract.write(contract_dir)}
