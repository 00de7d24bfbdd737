"""Replay configuration, the replay window and the barrier parameters a replay trades with.

The replay window is the tail of the data a bundle is replayed on: the last ``window_bars`` distinct
timestamps when that is set, else every timestamp within ``window_days`` of the last one (default: the
last week). Barrier parameters (``pt``, ``sl``, ``horizon``) come from the labels the model was trained
on (``label_params`` in the HDF5 attrs / bundle metadata, or a ``LabelConfig``), so the replay exits
trades by the same triple-barrier rules the labels used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

TRADING_DAYS_PER_YEAR = 252.0
CALENDAR_DAYS_PER_YEAR = 365.0


@dataclass(frozen=True)
class ReplayConfig:
    """How a bundle is replayed and its trades simulated.

    - ``window_bars``: replay the last N distinct timestamps; ``None`` → use ``window_days``.
    - ``window_days``: replay the timestamps ``> last - window_days`` (default 7: the last week).
    - ``threshold``: a bar is an entry candidate when ``|signal| >= threshold``; side = sign(signal).
    - ``allow_short``: when False, only ``signal >= threshold`` is a candidate (long only).
    - ``excursion_bars``: MFE/MAE are measured over this many bars from the entry bar on.
    - ``baseline_seed``: seed of the random-entry baseline.
    - ``annualisation``: periods per year of the DAILY equity curve, Sharpe is scaled by its square
      root; ``None`` → derived from the bars (:func:`periods_per_year`).
    """

    window_bars: int | None = None
    window_days: float = 7.0
    threshold: float = 0.1
    allow_short: bool = True
    excursion_bars: int = 6
    baseline_seed: int = 0
    annualisation: float | None = None

    def __post_init__(self) -> None:
        if self.window_bars is not None and (int(self.window_bars) != self.window_bars or self.window_bars < 1):
            raise ValueError(f"ReplayConfig.window_bars must be an integer >= 1 or None, got {self.window_bars!r}")
        if not (math.isfinite(self.window_days) and self.window_days > 0):
            raise ValueError(f"ReplayConfig.window_days must be a finite number > 0, got {self.window_days!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"ReplayConfig.threshold must be a finite number >= 0, got {self.threshold!r}")
        if int(self.excursion_bars) != self.excursion_bars or self.excursion_bars < 1:
            raise ValueError(f"ReplayConfig.excursion_bars must be an integer >= 1, got {self.excursion_bars!r}")
        if self.annualisation is not None and not (math.isfinite(self.annualisation) and self.annualisation > 0):
            raise ValueError(f"ReplayConfig.annualisation must be a number > 0 or None, got {self.annualisation!r}")


@dataclass(frozen=True)
class BarrierParams:
    """Triple-barrier widths in ATR units at the signal bar and the vertical barrier in bars."""

    pt: float
    sl: float
    horizon: int


def barrier_params(label_params: Mapping[str, Any] | Any) -> BarrierParams:
    """``pt``, ``sl``, ``horizon`` from a ``label_params`` dict or any object with those attributes
    (``LabelConfig``); refuses missing or non-positive values."""
    get = label_params.get if isinstance(label_params, Mapping) else lambda k: getattr(label_params, k, None)
    values = {k: get(k) for k in ("pt", "sl", "horizon")}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"label_params lack {missing}: cannot set the triple barriers of the replay")
    pt, sl, horizon = float(values["pt"]), float(values["sl"]), values["horizon"]
    if not (math.isfinite(pt) and pt > 0 and math.isfinite(sl) and sl > 0):
        raise ValueError(f"label_params pt/sl must be finite and > 0, got pt={pt!r} sl={sl!r}")
    if int(horizon) != horizon or int(horizon) < 1:
        raise ValueError(f"label_params horizon must be an integer >= 1, got {horizon!r}")
    return BarrierParams(pt=pt, sl=sl, horizon=int(horizon))


def replay_window_mask(timestamps: pd.Series | pd.DatetimeIndex, config: ReplayConfig) -> np.ndarray:
    """Boolean per row: does the row's timestamp lie in the replay window (the tail of the data)?"""
    idx = pd.DatetimeIndex(timestamps)
    if len(idx) == 0:
        return np.zeros(0, dtype=bool)
    if config.window_bars is not None:
        distinct = idx.unique().sort_values()
        start = distinct[max(len(distinct) - int(config.window_bars), 0)]
        return np.asarray(idx >= start)
    start = idx.max() - pd.Timedelta(days=float(config.window_days))
    return np.asarray(idx > start)


def periods_per_year(timestamps: pd.Series | pd.DatetimeIndex) -> float:
    """Periods per year of a daily equity curve over these bars: 365 when the market trades every day
    (any bar on a Saturday, UTC: crypto), else 252 trading days (equities; FX, which opens on Sunday
    evening UTC but is shut on Saturdays)."""
    idx = pd.DatetimeIndex(timestamps)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC")
    return CALENDAR_DAYS_PER_YEAR if bool((idx.day_of_week == 5).any()) else TRADING_DAYS_PER_YEAR
